//! Benchmarks of the rolling windows (docs/BENCHMARKS.md has the numbers).
//!
//! - `window_update`: `GpuWindows::push_metrics` of one GPU sample with all 10 metrics present
//!   (10 metrics × 4 windows updated, plus evictions), on windows already holding a full 5 minutes
//!   at 100 ms, so every push also evicts. Target: < 100 ns per sample.
//! - `window_query`: with 8 GPUs each holding 5 minutes at 100 ms (3000 samples of varying
//!   values), one metric's one-window summary across the 8 GPUs (target < 10 µs), and the full
//!   snapshot: 10 metrics × 4 windows × 8 GPUs.
//!
//! Run: `cargo bench -p agent --bench window`. Under `cargo test` each bench runs once.

use std::hint::black_box;
use std::time::Duration;

use agent::sample::{GpuState, Metric, Sample, Slot};
use agent::window::{GpuWindows, Window, WindowSet};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const INTERVAL_NS: u64 = 100_000_000;
/// 5 minutes at 100 ms: what the longest window holds in the agent's default configuration.
const FULL: u64 = 3000;
const GPUS: usize = 8;
const MIB: u64 = 1 << 20;
const VRAM_TOTAL: u64 = 81_559 * MIB;

/// A deterministic generator of realistic, varying GPU load: every metric wanders around a
/// per-GPU level with noise, with integer NVML percentages and whole-MiB VRAM like the real
/// driver reports.
struct Load {
    x: u64,
    level: f32,
}

impl Load {
    fn new(gpu: usize) -> Load {
        Load {
            x: 0x9e37_79b9_7f4a_7c15 ^ gpu as u64,
            level: 20.0 + 9.0 * gpu as f32,
        }
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f32 {
        self.x = self
            .x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.x >> 40) as f32 / (1u64 << 24) as f32
    }

    fn sample(&mut self, seq: u64) -> Sample {
        // A slow random walk plus per-sample noise, kept in 0..=100.
        self.level = (self.level + (self.next() - 0.5) * 4.0).clamp(1.0, 99.0);
        let l = self.level;
        let mut pct = |scale: f32| (l * scale + (self.next() - 0.5) * 10.0).clamp(0.0, 100.0);
        let gpu_util = pct(1.0).round();
        let mem_util = pct(0.5).round();
        let sm_active = pct(0.8);
        let sm_occupancy = pct(0.4);
        let tensor_active = pct(0.6);
        let dram_active = pct(0.45);
        let mut s = Sample::empty(1_800_000_000_000_000_000 + seq * INTERVAL_NS, GpuState::Ok);
        s.set(Slot::GpuUtil, gpu_util);
        s.set(Slot::MemUtil, mem_util);
        s.set(Slot::SmActive, sm_active);
        s.set(Slot::SmOccupancy, sm_occupancy);
        s.set(Slot::TensorActive, tensor_active);
        s.set(Slot::DramActive, dram_active);
        s.set(Slot::PowerWatts, 70.0 + l * 6.3 + self.next() * 5.0);
        s.set(Slot::TemperatureC, (34.0 + l * 0.35).round());
        s.set_vram_used((20_000 + (l * 500.0) as u64 + (self.next() * 64.0) as u64) * MIB);
        s.process_count = 2;
        s
    }
}

/// One GPU's windows after `FULL` samples, and the generator positioned after them.
fn filled(gpu: usize) -> (GpuWindows, Load) {
    let mut w = GpuWindows::for_gpu();
    let mut load = Load::new(gpu);
    for seq in 0..FULL {
        let s = load.sample(seq);
        w.push_metrics(s.ts_ns, s.metrics(VRAM_TOTAL));
    }
    (w, load)
}

fn window_update(c: &mut Criterion) {
    let mut group = c.benchmark_group("window_update");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .throughput(Throughput::Elements(1));

    // Precomputed inputs, so only the window update is timed; 4096 distinct samples cycle.
    let (mut w, mut load) = filled(0);
    let inputs: Vec<[Option<f64>; Metric::COUNT]> = (FULL..FULL + 4096)
        .map(|seq| load.sample(seq).metrics(VRAM_TOTAL))
        .collect();
    let mut seq = FULL;
    group.bench_function("push_metrics_10_metrics", |b| {
        b.iter(|| {
            let values = inputs[(seq % 4096) as usize];
            // Time keeps moving forward so the windows stay full and every push evicts.
            let ts = 1_800_000_000_000_000_000 + seq * INTERVAL_NS;
            seq += 1;
            w.push_metrics(ts, black_box(values));
        })
    });
    // Sanity, not timing: the 5 m window still holds its 5 minutes.
    assert_eq!(
        w.metric(Metric::GpuUtil, Window::M5).map(|s| s.count),
        Some(3000)
    );

    // What the sampler does per sample: `Sample::metrics` then `push_metrics`.
    let (mut w, mut load) = filled(1);
    let samples: Vec<Sample> = (FULL..FULL + 4096).map(|seq| load.sample(seq)).collect();
    let mut seq = FULL;
    group.bench_function("sample_metrics_then_push", |b| {
        b.iter(|| {
            let mut s = samples[(seq % 4096) as usize];
            s.ts_ns = 1_800_000_000_000_000_000 + seq * INTERVAL_NS;
            seq += 1;
            let s = black_box(s);
            w.push_metrics(s.ts_ns, s.metrics(VRAM_TOTAL));
        })
    });

    // The same work for a single metric (`WindowSet<1>`: 1 metric × 4 windows), to split the
    // per-sample cost into a fixed part and a per-metric part.
    let mut one = WindowSet::<1>::new([4.0]);
    let (_, mut load) = filled(2);
    let values: Vec<f32> = (0..4096)
        .map(|seq| load.sample(seq).values[Slot::SmActive as usize])
        .collect();
    for seq in 0..FULL {
        one.push(seq * INTERVAL_NS, [Some(values[(seq % 4096) as usize])]);
    }
    let mut seq = FULL;
    group.bench_function("push_1_metric", |b| {
        b.iter(|| {
            let v = values[(seq % 4096) as usize];
            one.push(seq * INTERVAL_NS, black_box([Some(v)]));
            seq += 1;
        })
    });
    group.finish();
}

fn window_query(c: &mut Criterion) {
    let gpus: Vec<GpuWindows> = (0..GPUS).map(|g| filled(g).0).collect();
    for g in &gpus {
        // Sanity, not timing: every window is full (10 s = 100 samples … 5 m = 3000).
        assert_eq!(
            g.metric(Metric::SmActive, Window::S10).map(|s| s.count),
            Some(100)
        );
        assert_eq!(
            g.metric(Metric::SmActive, Window::M5).map(|s| s.count),
            Some(3000)
        );
    }

    let mut group = c.benchmark_group("window_query");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);

    group.throughput(Throughput::Elements(GPUS as u64));
    for w in [Window::S10, Window::M5] {
        group.bench_function(format!("sm_active_{w}_8gpus"), |b| {
            b.iter(|| {
                for g in &gpus {
                    black_box(g.metric(black_box(Metric::SmActive), black_box(w)));
                }
            })
        });
    }
    group.bench_function("vram_used_bytes_5m_8gpus", |b| {
        b.iter(|| {
            for g in &gpus {
                black_box(g.metric(black_box(Metric::VramUsedBytes), Window::M5));
            }
        })
    });

    group.throughput(Throughput::Elements(
        (GPUS * Metric::COUNT * Window::ALL.len()) as u64,
    ));
    group.bench_function("snapshot_10x4_8gpus", |b| {
        b.iter(|| {
            for g in &gpus {
                for m in Metric::ALL {
                    for w in Window::ALL {
                        black_box(g.metric(m, w));
                    }
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, window_update, window_query);
criterion_main!(benches);
