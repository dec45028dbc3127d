//! Who owns each GPU process: the eBPF tracker's record of its device open (with the cgroup it
//! ran in) when there is one, else its cgroup read from procfs ([`crate::cgroup`]). A process
//! whose cgroup is gone is unknown, never a guess.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Attribution;
use crate::cgroup::{Membership, ProcfsResolver};
use crate::ebpf::Tracker;
use crate::shm::ProcessEntry;

/// How long an unchanged PID list keeps its pod attribution before procfs is read again.
pub const REATTRIBUTE_EVERY: Duration = Duration::from_secs(1);

/// The attribution policy of one GPU's processes, with a short memory of its last answers.
pub struct Owners {
    tracker: Option<Arc<Tracker>>,
    resolver: ProcfsResolver,
    /// The processes of the last full attribution, and when it ran.
    attributed: Vec<ProcessEntry>,
    attributed_at: Option<Instant>,
}

impl Owners {
    /// Attribution through `tracker` when it runs, else (and for processes it missed) through
    /// the procfs at `proc_root`.
    pub fn new(proc_root: &Path, tracker: Option<Arc<Tracker>>) -> Owners {
        Owners {
            tracker,
            resolver: ProcfsResolver::new(proc_root),
            attributed: Vec::new(),
            attributed_at: None,
        }
    }

    /// Ties each process to its pod. Reading procfs for every process on every sample was a
    /// quarter of the agent's CPU, so an unchanged PID list reuses the previous answers for up
    /// to [`REATTRIBUTE_EVERY`] (the resolver re-checks start times then, catching PID reuse).
    pub fn attribute(&mut self, processes: &mut [ProcessEntry]) {
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        let fresh = self
            .attributed_at
            .is_some_and(|at| at.elapsed() < REATTRIBUTE_EVERY);
        if fresh && pids.iter().eq(self.attributed.iter().map(|p| &p.pid)) {
            for (p, known) in processes.iter_mut().zip(&self.attributed) {
                p.pod_uid.clone_from(&known.pod_uid);
                p.container_id.clone_from(&known.container_id);
                p.attribution = known.attribution;
            }
            return;
        }
        for p in processes.iter_mut() {
            // eBPF saw the process open the GPU, with the cgroup it ran in: preferred.
            if let Some(info) = self.tracker.as_ref().and_then(|t| t.process(p.pid)) {
                if info.cgroup_path.is_none() {
                    // Its cgroup is gone: unknown, never a guess.
                    p.attribution = Attribution::Unknown;
                    continue;
                }
                if let Some(pod) = info.pod {
                    p.pod_uid = Some(pod.pod_uid);
                    p.container_id = pod.container_id;
                }
                p.attribution = Attribution::Ebpf;
                continue;
            }
            // Missed by eBPF (off, unavailable, or its events dropped): procfs.
            match self.resolver.resolve(p.pid) {
                Membership::Pod(pod) => {
                    p.pod_uid = Some(pod.pod_uid);
                    p.container_id = pod.container_id;
                    p.attribution = Attribution::Procfs;
                }
                Membership::NotInPod { .. } => p.attribution = Attribution::Procfs,
                Membership::Unknown { reason } => {
                    tracing::debug!(pid = p.pid, %reason, "cannot attribute process");
                    p.attribution = Attribution::Unknown;
                }
            }
        }
        self.resolver.evict_missing(&pids);
        self.attributed = processes.to_vec();
        self.attributed_at = Some(Instant::now());
    }
}
