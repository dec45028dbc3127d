//! The slow path: per-process SM utilization (`nvmlDeviceGetProcessUtilization`, 2.5 ms on an
//! H100), read on a thread of its own every [`proc_util_period`], only for GPUs whose sampler
//! asked for it (more than one process), so it never delays a GPU's per-interval sample.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gpuscale_health::ops::lock;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Device;

use crate::node::Node;
use crate::stop::Stop;
use crate::unix_now_ns;

/// How often per-process utilization is read for GPUs with more than one process.
pub fn proc_util_period(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(1))
}

/// Per-process SM utilization the slow thread measured for one GPU.
#[derive(Default)]
pub(crate) struct ProcUtil {
    /// Set by the device sampler: the GPU has more than one process.
    pub(crate) wanted: bool,
    /// When the map was last refreshed.
    pub(crate) at: Option<Instant>,
    /// Each process's average SM utilization over the last period, percent.
    pub(crate) sm_util: HashMap<u32, f32>,
}

/// The slow path: per-process SM utilization for GPUs whose sampler asked for it.
pub(crate) fn run(devices: &[Device<'_>], agent: &Node, interval: Duration, stop: &Stop) {
    let _span = tracing::info_span!("proc_util").entered();
    let period = proc_util_period(interval);
    let mut last_seen = vec![0u64; devices.len()];
    let mut next = Instant::now();
    loop {
        agent.stats.proc_util.beat();
        next += period;
        if stop.wait_until(next) {
            return;
        }
        for (i, d) in devices.iter().enumerate() {
            let wanted = lock(&agent.proc_util[i]).wanted;
            if !wanted {
                continue;
            }
            // Samples since our last look; the first look covers one period.
            let since = match last_seen[i] {
                0 => (unix_now_ns() / 1000).saturating_sub(period.as_micros() as u64),
                t => t,
            };
            let map = match d.process_utilization_stats(since) {
                Ok(samples) => {
                    let mut acc: HashMap<u32, (u64, u32)> = HashMap::new();
                    for s in samples {
                        last_seen[i] = last_seen[i].max(s.timestamp);
                        let e = acc.entry(s.pid).or_default();
                        e.0 += u64::from(s.sm_util);
                        e.1 += 1;
                    }
                    acc.into_iter()
                        .map(|(pid, (sum, n))| (pid, sum as f32 / n as f32))
                        .collect()
                }
                // NOT_FOUND: no process ran a kernel since `since` — a measured zero.
                Err(NvmlError::NotFound) => HashMap::new(),
                Err(e) => {
                    tracing::debug!(gpu = i, error = %e, "per-process utilization unavailable");
                    continue;
                }
            };
            let mut pu = lock(&agent.proc_util[i]);
            pu.sm_util = map;
            pu.at = Some(Instant::now());
        }
    }
}
