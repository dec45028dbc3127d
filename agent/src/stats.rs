//! The small counters and timers the agent's loops update about their own progress: a heartbeat
//! per loop, a histogram of per-tick sample durations, NVML error counters, and each GPU's newest
//! sample. [`crate::metrics`] reads them for `/healthz` and `/metrics`.

use std::sync::Mutex;
use std::time::Instant;

use gpuscale_health::ops::lock;
use gpuscale_health::Heartbeat;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::sample::Sample;

/// Upper bounds of the per-tick sample-duration histogram, seconds: NVML calls take µs on a
/// healthy GPU; a tick near the interval means the sampler falls behind.
const SAMPLE_BUCKETS: [f64; 16] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0,
];

/// Counters and timers of one GPU's sampler.
#[derive(Debug)]
pub struct GpuStats {
    /// Beats after every tick (sampled, or an empty sample while backing off).
    pub tick: Heartbeat,
    /// Seconds each NVML sampling round of a tick took (not counted while backing off).
    pub sample_seconds: Histogram,
    /// Sampling rounds that failed with `GPU_IS_LOST`.
    pub lost: Counter,
    /// Sampling rounds that failed with any other NVML error.
    pub errors: Counter,
    /// Values NVML gave that the metric cannot have, left unmeasured
    /// (`sampler::checked`).
    pub out_of_range: Counter,
    /// The newest sample and when it was taken (this process's clock).
    latest: Mutex<Option<(Sample, Instant)>>,
}

impl Default for GpuStats {
    fn default() -> Self {
        GpuStats {
            tick: Heartbeat::new(),
            sample_seconds: Histogram::new(SAMPLE_BUCKETS),
            lost: Counter::default(),
            errors: Counter::default(),
            out_of_range: Counter::default(),
            latest: Mutex::new(None),
        }
    }
}

impl GpuStats {
    /// Records the tick's sample (call it with the GPU's live view locked, so a scrape sees the
    /// sample and its processes together).
    pub fn record(&self, sample: &Sample) {
        *lock(&self.latest) = Some((*sample, Instant::now()));
        self.tick.beat();
    }

    /// The newest sample and when it was taken.
    pub fn latest(&self) -> Option<(Sample, Instant)> {
        *lock(&self.latest)
    }
}

/// Everything the agent's loops report about their own progress.
#[derive(Debug)]
pub struct Stats {
    /// One per GPU, in the agent's GPU order.
    pub gpus: Vec<GpuStats>,
    /// Beats every round of the 1 s status loop.
    pub status: Heartbeat,
    /// Beats every round of the per-process utilization loop.
    pub proc_util: Heartbeat,
}

impl Stats {
    /// Stats for `gpus` GPUs; every heartbeat starts now.
    pub fn new(gpus: usize) -> Stats {
        Stats {
            gpus: (0..gpus).map(|_| GpuStats::default()).collect(),
            status: Heartbeat::new(),
            proc_util: Heartbeat::new(),
        }
    }
}
