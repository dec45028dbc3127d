//! Per-pod values on one GPU from the GPU's values and its processes. Pure: no I/O; who owns
//! which process is decided by [`super::owners`].
//!
//! - A pod that has a GPU alone (every process on it belongs to that pod) gets the GPU's values.
//! - On a shared GPU (several pods, or a pod beside processes outside any pod), utilization-type
//!   metrics (`sm_active`, `gpu_util`, `sm_occupancy`, `tensor_active`, `dram_active`,
//!   `mem_util`) and `power_watts` are split by the processes' NVML `sm_util`; `vram_used_bytes`
//!   and `vram_used_pct` are the pod's processes' used memory; `temperature_c` is the GPU's.
//! - A split that needs a number NVML has not given (a process's `sm_util` or used memory) is
//!   unavailable for that metric, never a guessed 0.

use crate::sample::Metric;

/// One process on the GPU, as attribution needs it.
#[derive(Clone, Copy, Debug)]
pub struct Proc<'a> {
    /// The pod's UID, or `None` for a process outside any pod.
    pub pod_uid: Option<&'a str>,
    /// Device memory used, bytes, when NVML reports it.
    pub used_memory_bytes: Option<u64>,
    /// SM utilization percent from NVML's per-process samples, when measured.
    pub sm_util: Option<f32>,
}

/// A pod's values on one GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct PodValues<'a> {
    /// The pod's UID.
    pub pod_uid: &'a str,
    /// Whether the GPU is shared with other pods or non-pod processes.
    pub shared: bool,
    /// Values indexed like [`Metric::ALL`]; `None` is unavailable.
    pub values: [Option<f64>; Metric::COUNT],
}

fn split_by_sm(metric: Metric) -> bool {
    matches!(
        metric,
        Metric::SmActive
            | Metric::GpuUtil
            | Metric::SmOccupancy
            | Metric::TensorActive
            | Metric::DramActive
            | Metric::MemUtil
            | Metric::PowerWatts
    )
}

/// Sums `f` over `procs`; `None` if any process lacks the number.
fn sum<'p, T: Into<f64>>(
    procs: impl Iterator<Item = &'p Proc<'p>>,
    f: impl Fn(&Proc<'_>) -> Option<T>,
) -> Option<f64> {
    procs.map(|p| f(p).map(Into::into)).sum()
}

/// Attributes the GPU's `values` (indexed like [`Metric::ALL`]) to the pods among `procs`.
/// Pods appear in the order of their first process.
pub fn attribute<'a>(
    values: &[Option<f64>; Metric::COUNT],
    vram_total_bytes: u64,
    procs: &[Proc<'a>],
) -> Vec<PodValues<'a>> {
    let mut pods: Vec<&'a str> = Vec::new();
    for uid in procs.iter().filter_map(|p| p.pod_uid) {
        if !pods.contains(&uid) {
            pods.push(uid);
        }
    }
    let exclusive = pods.len() == 1 && procs.iter().all(|p| p.pod_uid.is_some());
    if exclusive {
        return vec![PodValues {
            pod_uid: pods[0],
            shared: false,
            values: *values,
        }];
    }
    let total_sm = sum(procs.iter(), |p| p.sm_util);
    pods.into_iter()
        .map(|uid| {
            let mine = || procs.iter().filter(move |p| p.pod_uid == Some(uid));
            let pod_sm = sum(mine(), |p| p.sm_util);
            let pod_mem = sum(mine(), |p| p.used_memory_bytes.map(|b| b as f64));
            let share = match (pod_sm, total_sm) {
                (Some(_), Some(0.0)) => Some(0.0),
                (Some(p), Some(t)) => Some(p / t),
                _ => None,
            };
            let values = std::array::from_fn(|i| {
                let m = Metric::ALL[i];
                match m {
                    Metric::VramUsedBytes => pod_mem,
                    Metric::VramUsedPct => pod_mem
                        .filter(|_| vram_total_bytes > 0)
                        .map(|b| b * 100.0 / vram_total_bytes as f64),
                    Metric::TemperatureC => values[i],
                    _ if split_by_sm(m) => Some(values[i]? * share?),
                    _ => None,
                }
            });
            PodValues {
                pod_uid: uid,
                shared: true,
                values,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn gpu(sm: f64, util: f64, vram: u64) -> [Option<f64>; Metric::COUNT] {
        let mut v = [None; Metric::COUNT];
        v[Metric::SmActive.index()] = Some(sm);
        v[Metric::GpuUtil.index()] = Some(util);
        v[Metric::VramUsedBytes.index()] = Some(vram as f64);
        v[Metric::VramUsedPct.index()] = Some(vram as f64 * 100.0 / (80 * GIB) as f64);
        v[Metric::PowerWatts.index()] = Some(400.0);
        v[Metric::TemperatureC.index()] = Some(60.0);
        v
    }

    fn p(pod: Option<&str>, mem_gib: u64, sm: Option<f32>) -> Proc<'_> {
        Proc {
            pod_uid: pod,
            used_memory_bytes: Some(mem_gib * GIB),
            sm_util: sm,
        }
    }

    fn get(v: &PodValues<'_>, m: Metric) -> Option<f64> {
        v.values[m.index()]
    }

    #[test]
    fn a_pod_alone_on_a_gpu_gets_the_gpu_values() {
        let values = gpu(90.0, 97.0, 30 * GIB);
        // Two processes of the same pod, one without sm_util: still exclusive.
        let out = attribute(
            &values,
            80 * GIB,
            &[p(Some("a"), 20, None), p(Some("a"), 5, None)],
        );
        assert_eq!(out.len(), 1);
        assert!(!out[0].shared);
        assert_eq!(out[0].values, values);
    }

    #[test]
    fn a_shared_gpu_is_split_by_sm_util_and_memory() {
        let values = gpu(80.0, 100.0, 40 * GIB);
        let out = attribute(
            &values,
            80 * GIB,
            &[
                p(Some("a"), 20, Some(30.0)),
                p(Some("b"), 10, Some(10.0)),
                p(Some("a"), 5, Some(0.0)),
            ],
        );
        assert_eq!(out.len(), 2);
        let (a, b) = (&out[0], &out[1]);
        assert_eq!((a.pod_uid, b.pod_uid), ("a", "b"));
        assert!(a.shared && b.shared);
        assert_eq!(get(a, Metric::SmActive), Some(60.0));
        assert_eq!(get(b, Metric::SmActive), Some(20.0));
        assert_eq!(get(a, Metric::GpuUtil), Some(75.0));
        assert_eq!(get(a, Metric::PowerWatts), Some(300.0));
        assert_eq!(get(a, Metric::VramUsedBytes), Some((25 * GIB) as f64));
        assert_eq!(get(b, Metric::VramUsedPct), Some(12.5));
        assert_eq!(get(b, Metric::TemperatureC), Some(60.0));
    }

    #[test]
    fn a_pod_beside_a_non_pod_process_is_shared_and_the_node_part_is_not_a_pod() {
        let out = attribute(
            &gpu(50.0, 50.0, 10 * GIB),
            80 * GIB,
            &[p(Some("a"), 4, Some(25.0)), p(None, 6, Some(25.0))],
        );
        assert_eq!(out.len(), 1);
        assert!(out[0].shared);
        assert_eq!(get(&out[0], Metric::SmActive), Some(25.0));
    }

    #[test]
    fn an_unmeasured_sm_util_makes_the_split_unavailable_not_zero() {
        let out = attribute(
            &gpu(50.0, 50.0, 10 * GIB),
            80 * GIB,
            &[p(Some("a"), 4, Some(25.0)), p(Some("b"), 6, None)],
        );
        assert_eq!(get(&out[0], Metric::SmActive), None);
        assert_eq!(get(&out[1], Metric::GpuUtil), None);
        assert_eq!(get(&out[1], Metric::VramUsedBytes), Some((6 * GIB) as f64));
    }

    #[test]
    fn idle_shared_gpu_splits_to_zero() {
        let out = attribute(
            &gpu(0.0, 0.0, 10 * GIB),
            80 * GIB,
            &[p(Some("a"), 4, Some(0.0)), p(Some("b"), 6, Some(0.0))],
        );
        assert_eq!(get(&out[0], Metric::SmActive), Some(0.0));
        assert_eq!(get(&out[1], Metric::SmActive), Some(0.0));
    }

    #[test]
    fn no_pods_means_no_pod_values() {
        assert!(attribute(&gpu(1.0, 1.0, GIB), 80 * GIB, &[p(None, 1, None)]).is_empty());
        assert!(attribute(&gpu(1.0, 1.0, GIB), 80 * GIB, &[]).is_empty());
    }
}
