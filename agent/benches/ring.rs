//! Benchmarks of the shared-memory ring (docs/BENCHMARKS.md has the numbers).
//!
//! - `ring_write`: one `SampleWriter::push` of a `Sample` into an 8192-slot ring, on a heap buffer and on
//!   a real mmap'd ring file (`ShmWriter`), against `crossbeam_queue::ArrayQueue<Sample>` in the
//!   same run (push+pop, and `force_push` on a full queue, which overwrites like our ring).
//!   Target: < 50 ns per record.
//! - `ring_read`: reader-side cost of `SampleReader::latest`, `SampleReader::read` and a full
//!   `SampleReader::for_each` scan, first on a quiet ring, then while a background thread pushes
//!   continuously.
//!
//! Run: `cargo bench -p agent --bench ring`. Under `cargo test` each bench runs once.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent::ring::{Read, SampleReader, SampleWriter, SLOT_WORDS};
use agent::sample::{GpuState, Sample, Slot};
use agent::shm::{GpuInfo, Params, ShmWriter};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;

/// Slots per ring: 10 minutes at 100 ms, rounded up to a power of two (what the agent uses).
const CAPACITY: usize = 8192;

/// A realistic record: every value present, as the sampler writes for a busy H100.
fn sample(i: u64) -> Sample {
    let mut s = Sample::empty(1_800_000_000_000_000_000 + i * 100_000_000, GpuState::Ok);
    s.set(Slot::GpuUtil, 97.0);
    s.set(Slot::MemUtil, 48.0);
    s.set(Slot::SmActive, 78.5);
    s.set(Slot::SmOccupancy, 41.25);
    s.set(Slot::TensorActive, 62.0);
    s.set(Slot::DramActive, 45.5);
    s.set(Slot::PowerWatts, 640.125);
    s.set(Slot::TemperatureC, 67.0);
    s.set_vram_used(61_440 << 20);
    s.process_count = 2;
    s
}

/// Word storage of one heap ring: its head and `CAPACITY` slots.
fn heap_storage() -> (AtomicU64, Vec<AtomicU64>) {
    (
        AtomicU64::new(0),
        (0..CAPACITY * SLOT_WORDS)
            .map(|_| AtomicU64::new(0))
            .collect(),
    )
}

fn short(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
}

fn ring_write(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_write");
    short(&mut group);
    group.throughput(Throughput::Elements(1));

    let (head, slots) = heap_storage();
    let ring = SampleWriter::new(&head, &slots);
    let mut i = 0u64;
    group.bench_function("ring_push_heap_8192", |b| {
        b.iter(|| {
            i += 1;
            ring.push(black_box(&sample(i)));
        })
    });

    let dir = tempfile::Builder::new()
        .prefix("gpuscale-bench-ring-write-")
        .tempdir()
        .expect("creating the bench's temp dir");
    let params = Params {
        capacity: CAPACITY as u32,
        interval_ns: 100_000_000,
        node_name: "bench".into(),
        driver_version: "580.159.04".into(),
    };
    let gpu = GpuInfo {
        index: 0,
        uuid: "GPU-5ca1ab1e-0000-4000-8000-000000000000".into(),
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_total_bytes: 81_559 << 20,
        gpm_supported: true,
        ..GpuInfo::default()
    };
    let mut writer = ShmWriter::open(&dir.path().join("agent.ring"), &params, &[gpu])
        .expect("opening a ring file in the temp dir");
    let regions = writer.parts().regions;
    let mapped = regions[0].ring();
    assert_eq!(mapped.capacity(), CAPACITY as u64);
    let mut i = 0u64;
    group.bench_function("ring_push_mmap_8192", |b| {
        b.iter(|| {
            i += 1;
            mapped.push(black_box(&sample(i)));
        })
    });

    let queue = ArrayQueue::<Sample>::new(CAPACITY);
    let mut i = 0u64;
    group.bench_function("arrayqueue_push_pop", |b| {
        b.iter(|| {
            i += 1;
            let _ = queue.push(black_box(sample(i)));
            black_box(queue.pop())
        })
    });

    let full = ArrayQueue::<Sample>::new(CAPACITY);
    while full.push(sample(0)).is_ok() {}
    let mut i = 0u64;
    group.bench_function("arrayqueue_force_push_full", |b| {
        b.iter(|| {
            i += 1;
            black_box(full.force_push(black_box(sample(i))))
        })
    });
    group.finish();
    drop(regions);
    drop(writer);
}

/// A writer thread pushing through `ring` as fast as it can until `stop` is set; returns how many
/// records it pushed and for how long.
fn spawn_writer<'s, 'r: 's>(
    s: &'s std::thread::Scope<'s, '_>,
    ring: &'s SampleWriter<'r>,
    stop: &'s AtomicBool,
) -> std::thread::ScopedJoinHandle<'s, (u64, Duration)> {
    s.spawn(move || {
        let start = Instant::now();
        let mut n = 0u64;
        // Relaxed: a plain stop flag; nothing else is published through it.
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..64 {
                ring.push(&sample(n));
                n += 1;
            }
        }
        (n, start.elapsed())
    })
}

fn read_benches(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    ring: SampleReader<'_>,
    suffix: &str,
) {
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("latest_{suffix}"), |b| {
        b.iter(|| black_box(ring.latest()))
    });
    group.bench_function(format!("read_newest_{suffix}"), |b| {
        b.iter(|| black_box(ring.read(ring.head().saturating_sub(1))))
    });
    group.throughput(Throughput::Elements(CAPACITY as u64));
    let (mut scans, mut skipped) = (0u64, 0u64);
    group.bench_function(format!("for_each_8192_{suffix}"), |b| {
        b.iter(|| {
            let mut sum = 0u64;
            scans += 1;
            skipped += ring.for_each(|s| sum = sum.wrapping_add(s.ts_ns));
            black_box(sum)
        })
    });
    eprintln!(
        "ring_read/for_each_8192_{suffix}: {:.2} % of the records were overwritten mid-scan and \
         skipped ({skipped} of {})",
        skipped as f64 * 100.0 / (scans * CAPACITY as u64).max(1) as f64,
        scans * CAPACITY as u64
    );
}

fn ring_read(c: &mut Criterion) {
    let (head, slots) = heap_storage();
    let writer = SampleWriter::new(&head, &slots);
    let ring = writer.reader();
    for i in 0..CAPACITY as u64 {
        writer.push(&sample(i));
    }
    // Sanity: a full ring reads back; not a timing assertion.
    assert_eq!(ring.read(0), Read::Record(sample(0)));

    let mut group = c.benchmark_group("ring_read");
    short(&mut group);
    read_benches(&mut group, ring, "quiet");

    let stop = AtomicBool::new(false);
    let (pushed, took) = std::thread::scope(|s| {
        let pusher = spawn_writer(s, &writer, &stop);
        read_benches(&mut group, ring, "with_writer");
        // Relaxed: see `spawn_writer`.
        stop.store(true, Ordering::Relaxed);
        pusher.join().expect("the writer thread panicked")
    });
    group.finish();
    eprintln!(
        "ring_read: the background writer pushed {pushed} records in {:.2} s ({:.1} M records/s) \
         while the readers ran",
        took.as_secs_f64(),
        pushed as f64 / took.as_secs_f64().max(1e-9) / 1e6
    );
}

criterion_group!(benches, ring_write, ring_read);
criterion_main!(benches);
