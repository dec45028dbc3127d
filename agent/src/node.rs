//! The node's shared state: what the sampler threads write every tick and the servers (gRPC,
//! `/metrics`) read. One [`Node`] per agent, built by [`crate::daemon`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuscale_health::ops::lock;

use crate::ebpf::Tracker;
use crate::live::GpuLive;
use crate::sample::Sample;
use crate::sampler::proc_util::ProcUtil;
use crate::shm::{AgentStatus, GpuInfo, ProcessEntry};
use crate::stats::Stats;

/// Everything the device threads share with the rest of the agent (the gRPC server, `/metrics`).
pub struct Node {
    /// Node name reported with the data.
    pub node_name: String,
    /// NVIDIA driver version.
    pub driver_version: String,
    /// Sampling interval.
    pub interval: Duration,
    /// The GPUs being sampled (physical GPUs, each followed by its MIG instances).
    pub gpus: Vec<GpuInfo>,
    live: Vec<Mutex<GpuLive>>,
    /// Per GPU: what the per-process utilization thread measured, and whether the GPU's sampler
    /// wants it.
    pub(crate) proc_util: Vec<Mutex<ProcUtil>>,
    samples: tokio::sync::watch::Sender<u64>,
    status: Mutex<AgentStatus>,
    /// The eBPF device-open tracker, when it runs.
    pub(crate) tracker: Option<Arc<Tracker>>,
    /// Progress and timing of the loops, for `/healthz` and `/metrics`.
    pub(crate) stats: Stats,
}

impl Node {
    /// The node state of `gpus`, with `live` (one view per GPU, in the same order), the initial
    /// agent-wide `status` and the eBPF `tracker` if one runs.
    pub(crate) fn new(
        node_name: String,
        driver_version: String,
        interval: Duration,
        gpus: Vec<GpuInfo>,
        live: Vec<GpuLive>,
        status: AgentStatus,
        tracker: Option<Arc<Tracker>>,
    ) -> Node {
        debug_assert_eq!(gpus.len(), live.len());
        Node {
            node_name,
            driver_version,
            interval,
            live: live.into_iter().map(Mutex::new).collect(),
            proc_util: gpus.iter().map(|_| Mutex::default()).collect(),
            stats: Stats::new(gpus.len()),
            gpus,
            samples: tokio::sync::watch::channel(0).0,
            status: Mutex::new(status),
            tracker,
        }
    }

    /// A look at one GPU's live view (windows, processes, pods), under its lock: keep `f` short,
    /// the GPU's sampler waits for it.
    pub fn with_live<T>(&self, gpu: usize, f: impl FnOnce(&GpuLive) -> T) -> T {
        f(&lock(&self.live[gpu]))
    }

    /// Agent-wide status: the eBPF tracker's state and recent GPU device opens.
    pub fn status(&self) -> AgentStatus {
        lock(&self.status).clone()
    }

    /// Replaces the agent-wide status (the status loop, once a second).
    pub(crate) fn set_status(&self, status: AgentStatus) {
        *lock(&self.status) = status;
    }

    /// A receiver that sees a new value after every recorded sample of any GPU.
    pub fn samples(&self) -> tokio::sync::watch::Receiver<u64> {
        self.samples.subscribe()
    }

    /// Takes one tick's sample of GPU `gpu` into the live view and the stats, and wakes the
    /// snapshot streams.
    pub(crate) fn record(&self, gpu: usize, sample: &Sample, processes: Vec<ProcessEntry>) {
        let mut live = lock(&self.live[gpu]);
        live.record(sample, processes);
        // Under the live lock, so a scrape sees the sample with its processes.
        self.stats.gpus[gpu].record(sample);
        drop(live);
        self.samples.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
impl Node {
    /// A node `test-node` with `gpus` and nothing sampled, for other modules' tests.
    pub(crate) fn for_tests(gpus: Vec<GpuInfo>, interval: Duration) -> Node {
        let live = gpus
            .iter()
            .map(|g| {
                GpuLive::new(
                    crate::window::GpuWindows::for_gpu(),
                    g.memory_total_bytes,
                    interval,
                )
            })
            .collect();
        Node::new(
            "test-node".into(),
            "580.159.04".into(),
            interval,
            gpus,
            live,
            AgentStatus::default(),
            None,
        )
    }
}
