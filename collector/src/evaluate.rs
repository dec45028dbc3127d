//! One trigger's value from the cluster view: which pods match, what each contributes, and
//! whether the data can be trusted. Pure (time is passed in); the KEDA service calls it.
//!
//! Rules (documented for users in `docs/TRIGGERS.md`):
//! - Matched pods are the pods of the ScaledObject's namespace whose labels match `podSelector`.
//!   Pods not `Running` or not yet scheduled contribute nothing (they use no GPU).
//! - Each (pod, GPU) pair the pod's node agent attributed contributes one value: the window
//!   statistic `timeAggregation` of `metric` over `window`. A running pod on a fresh node with no
//!   GPU entry contributes one 0: its agent sees it use no GPU.
//! - `sm_active` on a GPU without GPM falls back to that GPU's `gpu_util` (and says so in the
//!   evaluation), because NVML has no SM-activity counter there.
//! - A matched pod whose node has no agent, or whose agent has not reported within
//!   `staleAfter`, or a value the agent could not measure, makes the whole answer unavailable
//!   (KEDA then applies its `fallback`); a partial sum is never presented as whole.
//! - Zero matched pods give 0 (inactive): that is how scale-to-zero happens.

use std::sync::Arc;
use std::time::Instant;

use proto::agent::{MetricSummary, NodeSnapshot, PodSummary};

use crate::pods::PodMeta;
use crate::trigger::{aggregate, Metric, TimeAggregation, Trigger};
use crate::view::View;

/// What a trigger evaluates to.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The aggregated value.
    pub value: f64,
    /// Matched pods that are running.
    pub running_pods: usize,
    /// (pod, GPU) values aggregated.
    pub values: usize,
    /// GPUs whose `sm_active` fell back to `gpu_util`.
    pub fallbacks: usize,
}

/// Why a trigger has no trustworthy value.
#[derive(Clone, Debug, PartialEq)]
pub struct Unavailable {
    /// One line per problem (at most a handful are listed).
    pub reasons: Vec<String>,
    /// How many problems there were in all.
    pub total: usize,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no trustworthy value: {}", self.reasons.join("; "))?;
        if self.total > self.reasons.len() {
            write!(f, "; and {} more", self.total - self.reasons.len())?;
        }
        Ok(())
    }
}

fn statistic(m: &MetricSummary, trigger: &Trigger) -> Option<f64> {
    if trigger.time_aggregation == TimeAggregation::Last {
        return m.last;
    }
    let secs = trigger.window.as_secs() as u32;
    let w = m.windows.iter().find(|w| w.window_s == secs)?;
    Some(match trigger.time_aggregation {
        TimeAggregation::Avg => w.avg,
        TimeAggregation::Max => w.max,
        TimeAggregation::Min => w.min,
        TimeAggregation::P95 => w.p95,
        TimeAggregation::Last => unreachable!("handled above"),
    })
}

fn metric<'a>(ms: &'a [MetricSummary], name: &str) -> Option<&'a MetricSummary> {
    ms.iter().find(|m| m.metric == name)
}

/// One (pod, GPU) value, or why it is missing. The bool says a fallback was used.
fn pod_gpu_value(
    snap: &NodeSnapshot,
    pod: &PodSummary,
    trigger: &Trigger,
) -> Result<(f64, bool), String> {
    let name = trigger.metric.name();
    if let Some(v) = metric(&pod.metrics, name).and_then(|m| statistic(m, trigger)) {
        return Ok((v, false));
    }
    let gpu = snap.gpus.iter().find(|g| g.uuid == pod.gpu_uuid);
    if trigger.metric == Metric::SmActive && gpu.is_some_and(|g| !g.gpm_supported) {
        if let Some(v) = metric(&pod.metrics, "gpu_util").and_then(|m| statistic(m, trigger)) {
            return Ok((v, true));
        }
    }
    let state = gpu.map_or("not reported", |g| crate::dump::state_name(g.state));
    Err(format!(
        "{name} of pod {} on GPU {} of node {} is not measured over {}s (GPU state {state})",
        pod.pod_uid,
        pod.gpu_uuid,
        snap.node_name,
        trigger.window.as_secs()
    ))
}

/// Evaluates `trigger` over the `matched` pods at time `now`.
pub fn evaluate(
    view: &View,
    matched: &[Arc<PodMeta>],
    trigger: &Trigger,
    now: Instant,
) -> Result<Evaluation, Unavailable> {
    let mut values = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut running = 0;
    let mut fallbacks = 0;
    for pod in matched {
        if pod.phase != "Running" || pod.node.is_empty() {
            continue;
        }
        running += 1;
        let Some(&node) = view.by_node_name.get(&pod.node) else {
            problems.push(format!(
                "pod {}/{} runs on node {} where no agent reports",
                pod.namespace, pod.name, pod.node
            ));
            continue;
        };
        let state = &view.nodes[node];
        let (Some(snap), Some(received)) = (&state.snapshot, state.received) else {
            continue;
        };
        let age = now.saturating_duration_since(received);
        if age > trigger.stale_after {
            problems.push(format!(
                "node {} (agent {}) last reported {:.1}s ago, more than staleAfter {}s{}",
                pod.node,
                state.address,
                age.as_secs_f64(),
                trigger.stale_after.as_secs_f64(),
                if state.last_error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", state.last_error)
                }
            ));
            continue;
        }
        let entries = view.pod_gpus.get(&pod.uid);
        let mut any = false;
        for e in entries.into_iter().flatten().filter(|e| e.node == node) {
            any = true;
            match pod_gpu_value(snap, &snap.pods[e.pod], trigger) {
                Ok((v, fell_back)) => {
                    values.push(v);
                    fallbacks += usize::from(fell_back);
                }
                Err(why) => problems.push(why),
            }
        }
        if !any {
            values.push(0.0);
        }
    }
    if !problems.is_empty() {
        // Several pods on one stale node tell the same story once.
        let mut seen = std::collections::HashSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        let total = problems.len();
        problems.truncate(5);
        return Err(Unavailable {
            reasons: problems,
            total,
        });
    }
    Ok(Evaluation {
        value: aggregate(trigger.aggregation, &values),
        running_pods: running,
        values: values.len(),
        fallbacks,
    })
}

/// Whether one of the `matched` pods opened a GPU device file within `within` before `now`
/// (trigger key `activeAfterOpen`): a replica still loading its weights shows no utilization
/// yet, but its process has opened the GPU. Times are compared on the agent's clock: the
/// snapshot's `taken_unix_ns` plus the time since it arrived.
pub fn opened_within(
    view: &View,
    matched: &[Arc<PodMeta>],
    within: std::time::Duration,
    now: Instant,
) -> bool {
    if within.is_zero() {
        return false;
    }
    matched.iter().any(|pod| {
        let Some(&node) = view.by_node_name.get(&pod.node) else {
            return false;
        };
        let state = &view.nodes[node];
        let (Some(snap), Some(received)) = (&state.snapshot, state.received) else {
            return false;
        };
        let agent_now =
            snap.taken_unix_ns + now.saturating_duration_since(received).as_nanos() as u64;
        snap.opens.iter().any(|o| {
            o.pod_uid == pod.uid
                && agent_now.saturating_sub(o.last_open_unix_ns) <= within.as_nanos() as u64
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trigger::Trigger;
    use proto::agent::{GpuSummary, WindowStats};
    use std::collections::{BTreeMap, HashMap};
    use std::time::Duration;

    fn trigger(pairs: &[(&str, &str)]) -> Trigger {
        let mut m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.entry("targetValue".into()).or_insert("80".into());
        m.entry("podSelector".into()).or_insert("app=vllm".into());
        Trigger::parse(&m).unwrap()
    }

    fn ms(name: &str, avg: f64) -> MetricSummary {
        MetricSummary {
            metric: name.into(),
            last: Some(avg),
            windows: [10, 30, 60, 300]
                .map(|w| WindowStats {
                    window_s: w,
                    avg,
                    min: avg,
                    max: avg,
                    p95: avg,
                    count: 10,
                })
                .to_vec(),
        }
    }

    fn pod_meta(uid: &str, node: &str) -> Arc<PodMeta> {
        Arc::new(PodMeta {
            namespace: "ml".into(),
            name: format!("vllm-{uid}"),
            uid: uid.into(),
            labels: BTreeMap::from([("app".into(), "vllm".into())]),
            node: node.into(),
            phase: "Running".into(),
            owner: "Deployment/vllm".into(),
            container_ids: Vec::new(),
        })
    }

    /// Four pods at 90 % sm_active on two nodes.
    fn cluster() -> (View, Vec<Arc<PodMeta>>, Instant) {
        let now = Instant::now();
        let mut view = View::default();
        let mut metas = vec![];
        for n in 0..2 {
            view.nodes.push(crate::view::NodeState {
                connected: true,
                ..crate::view::NodeState::new(&format!("10.0.0.{n}:7701"))
            });
            let pods: Vec<PodSummary> = (0..2)
                .map(|i| PodSummary {
                    pod_uid: format!("p{n}{i}"),
                    gpu_uuid: format!("GPU-{n}{i}"),
                    metrics: vec![ms("sm_active", 90.0), ms("gpu_util", 97.0)],
                    ..Default::default()
                })
                .collect();
            for p in &pods {
                metas.push(pod_meta(&p.pod_uid, &format!("node-{n}")));
            }
            let gpus = (0..2)
                .map(|i| GpuSummary {
                    uuid: format!("GPU-{n}{i}"),
                    gpm_supported: true,
                    state: 2,
                    ..Default::default()
                })
                .collect();
            view.update(
                n,
                NodeSnapshot {
                    node_name: format!("node-{n}"),
                    gpus,
                    pods,
                    ..Default::default()
                },
                now,
            );
        }
        (view, metas, now)
    }

    #[test]
    fn four_pods_at_90_sum_to_360() {
        let (view, pods, now) = cluster();
        let e = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!((e.value, e.running_pods, e.values), (360.0, 4, 4));
        let e = evaluate(
            &view,
            &pods,
            &trigger(&[("metric", "sm_active"), ("aggregation", "avg")]),
            now,
        )
        .unwrap();
        assert_eq!(e.value, 90.0);
    }

    #[test]
    fn zero_matched_pods_give_zero() {
        let (view, _, now) = cluster();
        let e = evaluate(&view, &[], &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!((e.value, e.running_pods), (0.0, 0));
    }

    #[test]
    fn a_stale_node_makes_the_answer_unavailable_naming_it() {
        let (view, pods, now) = cluster();
        let later = now + Duration::from_secs(11);
        let err = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), later).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("node node-0") && text.contains("node node-1"),
            "{text}"
        );
        assert!(text.contains("staleAfter"), "{text}");
        // A longer staleAfter trusts the same data.
        let e = evaluate(
            &view,
            &pods,
            &trigger(&[("metric", "sm_active"), ("staleAfter", "30s")]),
            later,
        )
        .unwrap();
        assert_eq!(e.value, 360.0);
    }

    #[test]
    fn a_pod_on_a_node_without_agent_is_unavailable_and_a_pending_pod_counts_nothing() {
        let (view, mut pods, now) = cluster();
        pods.push(pod_meta("stray", "node-9"));
        let err = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap_err();
        assert!(
            err.to_string().contains("node-9 where no agent reports"),
            "{err}"
        );
        pods.pop();
        let mut pending = (*pod_meta("new", "")).clone();
        pending.phase = "Pending".into();
        pods.push(Arc::new(pending));
        let e = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!((e.value, e.running_pods), (360.0, 4));
    }

    #[test]
    fn a_running_pod_without_gpu_entries_counts_zero() {
        let (view, mut pods, now) = cluster();
        pods.push(pod_meta("cpu-only", "node-1"));
        let e = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!((e.value, e.values, e.running_pods), (360.0, 5, 5));
    }

    #[test]
    fn sm_active_falls_back_to_gpu_util_without_gpm_and_other_gaps_are_unavailable() {
        let (mut view, pods, now) = cluster();
        let mut snap = (**view.nodes[1].snapshot.as_ref().unwrap()).clone();
        for g in &mut snap.gpus {
            g.gpm_supported = false;
        }
        for p in &mut snap.pods {
            p.metrics.retain(|m| m.metric != "sm_active");
        }
        view.update(1, snap, now);
        let e = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!((e.value, e.fallbacks), (90.0 * 2.0 + 97.0 * 2.0, 2));
        let err =
            evaluate(&view, &pods, &trigger(&[("metric", "tensor_active")]), now).unwrap_err();
        assert!(err.to_string().contains("tensor_active of pod"), "{err}");
    }

    #[test]
    fn a_recent_device_open_counts_within_active_after_open_only() {
        let (mut view, pods, now) = cluster();
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        snap.taken_unix_ns = 1_000_000_000_000;
        snap.opens.push(proto::agent::DeviceOpen {
            pid: 7,
            pod_uid: "p00".into(),
            last_open_unix_ns: snap.taken_unix_ns - 20_000_000_000,
            ..Default::default()
        });
        view.update(0, snap, now);
        let s = Duration::from_secs;
        assert!(opened_within(&view, &pods, s(60), now));
        assert!(!opened_within(&view, &pods, s(10), now));
        assert!(!opened_within(&view, &pods, Duration::ZERO, now));
        // 45 s later on the collector's clock the open is 65 s old.
        assert!(!opened_within(&view, &pods, s(60), now + s(45)));
        assert!(
            !opened_within(&view, &pods[2..], s(60), now),
            "another pod's open"
        );
    }

    #[test]
    fn time_aggregation_picks_the_window_statistic() {
        let (mut view, pods, now) = cluster();
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        for p in &mut snap.pods {
            for m in &mut p.metrics {
                for w in &mut m.windows {
                    w.max = 100.0 + f64::from(w.window_s);
                }
            }
        }
        view.update(0, snap, now);
        let t = trigger(&[
            ("metric", "sm_active"),
            ("timeAggregation", "max"),
            ("window", "1m"),
            ("aggregation", "max"),
        ]);
        assert_eq!(evaluate(&view, &pods, &t, now).unwrap().value, 160.0);
    }
}
