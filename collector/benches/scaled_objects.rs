//! What the collector keeps per ScaledObject: memory after 10,000 distinct ScaledObjects, against
//! its idle size measured in the same run (issue 14's target: under 64 MiB above idle).
//!
//! The fixture is a cluster of 625 nodes as agents send them (8 GPUs, 2 pods per GPU, every
//! metric and window: [`fixture`]), 10,000 pods, one app per pod, and ScaledObject `k` selecting
//! app `k` (`podSelector: app=svc-k`), so each call matches one pod and answers a value. What
//! runs per call is what `GetMetrics` runs minus gRPC framing: `Scaler::value` (size limits,
//! trigger parse or cache, selector, pod selection cache, evaluation) then `Scaler::observe`
//! (the per-ScaledObject value series `/metrics` exports).
//!
//! Phases, each followed by a reading of the live heap (a counting global allocator: exact and
//! repeatable, whatever else the machine does) and of the process's resident set (`VmRSS`):
//!
//! 1. idle: the view and the pods built, no ScaledObject asked about yet (the baseline);
//! 2. 10,000 typical ScaledObjects (names like `svc-42`, 8 metadata keys, a few hundred bytes);
//! 3. the same 10,000 again: a steady cluster must not grow;
//! 4. 10,000 more, hostile: 253-byte names (the limit) and an 8 KiB `podSelector` each, so
//!    every cache holds its largest entries and the value series are past their cap of 10,000.
//!
//! It prints a table for docs/BENCHMARKS.md and fails when the live heap grows by 64 MiB or more
//! over idle, or grows between phases 2 and 3.
//!
//! Run: `cargo bench -p collector --bench scaled_objects`. Under `cargo test` it runs the same
//! phases with 1,000 ScaledObjects per phase (and 63 nodes).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use collector::api::metrics::CollectorMetrics;
use collector::api::scaler::Scaler;
use collector::model::evaluate::Detail;
use proto::externalscaler::ScaledObjectRef;

mod fixture;
use fixture::*;

/// Bytes allocated and not yet freed, by anything in the process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting live bytes.
struct Counting;

// SAFETY: every call goes to `System` with the caller's arguments unchanged; the counter only
// observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            // Relaxed: a statistic, read after the work it counts has finished on this thread.
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from `alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Issue 14's bound on what 10,000 ScaledObjects may add.
const TARGET_MIB: f64 = 64.0;

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The process's resident set, from `/proc/self/status`.
fn rss() -> isize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<isize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A ScaledObject of app `k` as a hostile caller could send it: the longest name the limits
/// allow and a `podSelector` of 8 KiB that still selects app `k`'s pod.
fn hostile(k: usize) -> ScaledObjectRef {
    let mut r = scaled_object(k);
    let tag = format!("-{k}");
    r.name = format!("{}{tag}", "h".repeat(253 - tag.len()));
    let padding: Vec<String> = (0..730).map(|i| format!("v{k:05}{i:04}")).collect();
    r.scaler_metadata.insert(
        "podSelector".into(),
        format!("app=svc-{k},pad notin ({})", padding.join(",")),
    );
    r
}

struct Reading {
    what: String,
    live: isize,
    rss: isize,
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let per_phase: usize = if bench { 10_000 } else { 1_000 };
    let nodes = per_phase.div_ceil(PODS_PER_NODE);
    let started = Instant::now();

    let cluster = cluster(nodes);
    let pods = pods(nodes, per_phase);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let scaler = Scaler::new(cluster, pods, None, Arc::default(), stop_rx);
    scaler.observe_with(Arc::new(CollectorMetrics::default()));
    let typical: Vec<ScaledObjectRef> = (0..per_phase).map(scaled_object).collect();
    let hostile: Vec<ScaledObjectRef> = (0..per_phase).map(hostile).collect();
    eprintln!(
        "{nodes} nodes, {} pods, {per_phase} ScaledObjects per phase, built in {:.1} s",
        nodes * PODS_PER_NODE,
        started.elapsed().as_secs_f64()
    );

    let mut readings = Vec::new();
    let mut read = |what: String| {
        readings.push(Reading {
            what,
            live: LIVE.load(Ordering::Relaxed),
            rss: rss(),
        })
    };
    let ask = |refs: &[ScaledObjectRef]| {
        for r in refs {
            let answer = scaler.value(r, Detail::Value);
            if let Err(s) = &answer {
                panic!("{}/{}: {}", r.namespace, r.name, s.message());
            }
            scaler.observe(r, &answer);
        }
    };
    // The ScaledObjects' own requests are built before the idle reading and live to the end:
    // they are KEDA's memory, not the collector's.
    read("idle (view and pods built, nothing asked)".into());
    ask(&typical);
    read(format!("{per_phase} typical ScaledObjects"));
    ask(&typical);
    read("the same again".into());
    ask(&hostile);
    read(format!(
        "{per_phase} more, hostile (253-byte names, 8 KiB selectors)"
    ));

    let idle = &readings[0];
    println!("| phase | live heap | above idle | resident set | above idle |");
    println!("|---|---|---|---|---|");
    for r in &readings {
        println!(
            "| {} | {:.1} MiB | {:+.1} MiB | {:.1} MiB | {:+.1} MiB |",
            r.what,
            mib(r.live),
            mib(r.live - idle.live),
            mib(r.rss),
            mib(r.rss - idle.rss)
        );
    }
    let worst = readings
        .iter()
        .map(|r| r.live - idle.live)
        .max()
        .unwrap_or(0);
    println!(
        "largest growth of the live heap over idle: {:.1} MiB = {:.2}x of the {TARGET_MIB} MiB target",
        mib(worst),
        mib(worst) / TARGET_MIB
    );
    assert!(
        mib(worst) < TARGET_MIB,
        "the collector's per-ScaledObject state grew {:.1} MiB over idle, over {TARGET_MIB} MiB",
        mib(worst)
    );
    let (first, again) = (readings[1].live, readings[2].live);
    assert!(
        again - first < 64 * 1024,
        "asking about the same ScaledObjects again grew the heap by {} bytes",
        again - first
    );
}
