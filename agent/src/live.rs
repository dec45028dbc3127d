//! The agent's in-memory view of one GPU: its windows, its latest processes, and the windows of
//! every pod that used it in the last 5 minutes. Updated by the GPU's sampler after each sample,
//! read by the gRPC server. No I/O.
//!
//! Per-pod values come from [`crate::attribution`]. A pod that used the GPU before but has no
//! process on it now gets zeros (it measurably uses nothing there) for every metric the GPU
//! measured in that sample, until it has been absent for [`POD_FORGET_AFTER`]; a metric the GPU
//! does not measure (utilization on a MIG instance, GPM without GPM) stays unavailable, and
//! while the GPU itself is lost or failing, every pod's values are unavailable, never zero.

use std::collections::HashMap;
use std::time::Duration;

use crate::attribution::{attribute, Attribution, Proc};
use crate::sample::{GpuState, Metric, Sample};
use crate::shm::ProcessEntry;
use crate::window::GpuWindows;

/// A pod absent from a GPU this long is dropped from that GPU's view.
pub const POD_FORGET_AFTER_NS: u64 = 300_000_000_000;
/// [`POD_FORGET_AFTER_NS`] as text, for docs and logs.
pub const POD_FORGET_AFTER: &str = "5m";

/// One pod's use of one GPU.
pub struct PodLive {
    /// Windows of the pod's attributed values.
    pub windows: GpuWindows,
    /// Containers of the pod seen on the GPU.
    pub container_ids: Vec<String>,
    /// The pod's processes on the GPU in the newest sample.
    pub pids: Vec<u32>,
    /// Whether the GPU was shared in the newest sample.
    pub shared: bool,
    /// How the pod was found.
    pub attribution: Attribution,
    /// Newest sample that saw one of the pod's processes, ns since the Unix epoch.
    pub last_present_ns: u64,
}

/// One GPU as the agent sees it now.
pub struct GpuLive {
    /// Windows of the GPU's own values.
    pub windows: GpuWindows,
    /// State in the newest sample.
    pub state: GpuState,
    /// Newest sample time, ns since the Unix epoch (0: none yet).
    pub newest_ns: u64,
    /// Processes in the newest sample.
    pub processes: Vec<ProcessEntry>,
    /// Pods that used the GPU recently, by UID.
    pub pods: HashMap<String, PodLive>,
    vram_total_bytes: u64,
    interval: Duration,
}

/// A pod's values on a GPU it no longer uses, given the GPU's `measured` values: 0 for what the
/// GPU measured, unavailable for the rest (and for the temperature, which is not a use).
fn idle_values(measured: &[Option<f64>; Metric::COUNT]) -> [Option<f64>; Metric::COUNT] {
    std::array::from_fn(|i| {
        (Metric::ALL[i] != Metric::TemperatureC && measured[i].is_some()).then_some(0.0)
    })
}

impl GpuLive {
    /// An empty view; `windows` may hold history rebuilt from the ring. `interval` sizes the
    /// pods' windows.
    pub fn new(windows: GpuWindows, vram_total_bytes: u64, interval: Duration) -> GpuLive {
        GpuLive {
            newest_ns: windows.last_ts_ns(),
            windows,
            state: GpuState::Starting,
            processes: Vec::new(),
            pods: HashMap::new(),
            vram_total_bytes,
            interval,
        }
    }

    /// Takes one sample and the processes seen with it (already attributed to pods).
    pub fn record(&mut self, sample: &Sample, processes: Vec<ProcessEntry>) {
        let ts = sample.ts_ns;
        let values = sample.metrics(self.vram_total_bytes);
        self.windows.push_metrics(ts, values);
        self.state = sample.state();
        self.newest_ns = ts;
        if self.state != GpuState::Ok {
            // The GPU's numbers are unavailable, so every pod's are too.
            for pod in self.pods.values_mut() {
                pod.windows.push_metrics(ts, [None; Metric::COUNT]);
            }
            self.processes = processes;
            return;
        }
        let procs: Vec<Proc<'_>> = processes
            .iter()
            .map(|p| Proc {
                pod_uid: p.pod_uid.as_deref(),
                used_memory_bytes: p.used_memory_bytes,
                sm_util: p.sm_util,
            })
            .collect();
        let attributed = attribute(&values, self.vram_total_bytes, &procs);
        for pv in &attributed {
            let mine = || {
                processes
                    .iter()
                    .filter(|p| p.pod_uid.as_deref() == Some(pv.pod_uid))
            };
            let pod = self
                .pods
                .entry(pv.pod_uid.to_owned())
                .or_insert_with(|| PodLive {
                    windows: GpuWindows::for_gpu_at(self.interval),
                    container_ids: Vec::new(),
                    pids: Vec::new(),
                    shared: false,
                    attribution: Attribution::None,
                    last_present_ns: 0,
                });
            pod.windows.push_metrics(ts, pv.values);
            pod.shared = pv.shared;
            pod.pids = mine().map(|p| p.pid).collect();
            for c in mine().filter_map(|p| p.container_id.as_ref()) {
                if !pod.container_ids.contains(c) {
                    pod.container_ids.push(c.clone());
                }
            }
            pod.attribution = mine()
                .map(|p| p.attribution)
                .max_by_key(|s| *s as u8)
                .unwrap_or_default();
            pod.last_present_ns = ts;
        }
        self.pods.retain(|uid, pod| {
            if attributed.iter().any(|pv| pv.pod_uid == uid) {
                return true;
            }
            pod.windows.push_metrics(ts, idle_values(&values));
            pod.pids.clear();
            ts.saturating_sub(pod.last_present_ns) < POD_FORGET_AFTER_NS
        });
        self.processes = processes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Slot;

    const S: u64 = 1_000_000_000;

    fn sample(ts: u64, sm: f32) -> Sample {
        let mut s = Sample::empty(ts, GpuState::Ok);
        s.set(Slot::SmActive, sm);
        s.set(Slot::GpuUtil, sm);
        s.set_vram_used(10 << 30);
        s
    }

    fn proc(pid: u32, pod: &str, sm: Option<f32>) -> ProcessEntry {
        ProcessEntry {
            pid,
            used_memory_bytes: Some(1 << 30),
            sm_util: sm,
            pod_uid: Some(pod.into()),
            container_id: Some(format!("{pid:064x}")),
            attribution: Attribution::Procfs,
        }
    }

    fn avg(live: &GpuLive, pod: &str, m: Metric) -> Option<f64> {
        live.pods[pod]
            .windows
            .metric(m, crate::window::Window::S10)
            .map(|s| s.avg)
    }

    #[test]
    fn a_pod_that_leaves_the_gpu_reads_zero_then_is_forgotten() {
        let mut live = GpuLive::new(GpuWindows::for_gpu(), 80 << 30, Duration::from_secs(1));
        for t in 0..10 {
            live.record(&sample(t * S, 90.0), vec![proc(1, "a", None)]);
        }
        assert_eq!(avg(&live, "a", Metric::SmActive), Some(90.0));
        assert_eq!(live.pods["a"].pids, vec![1]);
        assert!(!live.pods["a"].shared);
        for t in 10..20 {
            live.record(&sample(t * S, 0.0), vec![]);
        }
        assert_eq!(avg(&live, "a", Metric::SmActive), Some(0.0));
        assert!(live.pods["a"].pids.is_empty());
        live.record(&sample(400 * S, 0.0), vec![]);
        assert!(!live.pods.contains_key("a"));
    }

    #[test]
    fn a_pod_that_leaves_reads_zero_only_for_what_the_gpu_measures() {
        // A MIG instance: GPM and memory, no utilization.
        let mut live = GpuLive::new(GpuWindows::for_gpu(), 10 << 30, Duration::from_secs(1));
        let mig_sample = |ts: u64| {
            let mut s = Sample::empty(ts, GpuState::Ok);
            s.set(Slot::SmActive, 40.0);
            s.set_vram_used(4 << 30);
            s
        };
        live.record(&mig_sample(0), vec![proc(1, "a", None)]);
        assert_eq!(avg(&live, "a", Metric::SmActive), Some(40.0));
        assert_eq!(avg(&live, "a", Metric::GpuUtil), None);
        live.record(&mig_sample(S), vec![]);
        let last = |m: Metric| live.pods["a"].windows.last(m.index());
        assert_eq!(last(Metric::SmActive), Some(0.0));
        assert_eq!(last(Metric::VramUsedBytes), Some(0.0));
        assert_eq!(last(Metric::GpuUtil), None, "not measured: never 0");
        assert_eq!(last(Metric::PowerWatts), None);
    }

    #[test]
    fn a_lost_gpu_makes_pod_values_unavailable() {
        let mut live = GpuLive::new(GpuWindows::for_gpu(), 80 << 30, Duration::from_secs(1));
        live.record(&sample(0, 90.0), vec![proc(1, "a", None)]);
        live.record(&Sample::empty(20 * S, GpuState::Lost), vec![]);
        assert_eq!(avg(&live, "a", Metric::SmActive), None);
        assert_eq!(live.state, GpuState::Lost);
    }

    #[test]
    fn two_pods_share_a_gpu_by_sm_util() {
        let mut live = GpuLive::new(GpuWindows::for_gpu(), 80 << 30, Duration::from_secs(1));
        live.record(
            &sample(0, 80.0),
            vec![proc(1, "a", Some(30.0)), proc(2, "b", Some(10.0))],
        );
        assert_eq!(avg(&live, "a", Metric::SmActive), Some(60.0));
        assert_eq!(avg(&live, "b", Metric::SmActive), Some(20.0));
        assert!(live.pods["b"].shared);
        assert_eq!(live.pods["b"].container_ids, vec![format!("{:064x}", 2)]);
    }
}
