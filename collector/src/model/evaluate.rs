//! One trigger's value from the cluster view: which pods match, what each contributes, and
//! whether the data can be trusted. Pure (time is passed in); the KEDA service calls it.
//!
//! Rules (documented for users in `docs/TRIGGERS.md`):
//! - Matched pods are the pods of the ScaledObject's namespace whose labels match `podSelector`.
//!   Pods not `Running` or not yet scheduled contribute nothing (they use no GPU).
//! - Each (pod, GPU) pair the pod's node agent attributed has one value: the window statistic
//!   `timeAggregation` of `metric` over `window` (on a shared GPU, the pod's split share).
//! - Pods form replicas: each pod is one, or, with `replicaLabel`, the pods with the same value
//!   of that label are one (a LeaderWorkerSet group); a pod without the label is a replica of
//!   its own. A replica's pods' shares of one GPU add up; then its GPUs combine by
//!   `gpuAggregation` into the replica's value (a TP=4 replica at 70 % on each GPU reads 70 with
//!   `avg`). A running replica with no GPU entry reads 0: its agents see it use no GPU.
//! - The replicas' values combine by `aggregation` into the value KEDA gets.
//! - `sm_active` on a GPU without GPM falls back to that GPU's `gpu_util` (and says so in the
//!   evaluation), because NVML has no SM-activity counter there.
//! - A matched pod on a GPU that is `lost` or `error` (its windows still hold values from
//!   before), or whose node has no agent, or whose agent has not reported within
//!   `staleAfter`, or whose agent's newest snapshot was refused (NaN, a percentage over 100, a
//!   GPU listed twice: `sources::validate`), or a value the agent could not measure, makes the
//!   whole answer unavailable
//!   (KEDA then applies its `fallback`); a partial sum is never presented as whole.
//! - Zero matched pods give 0 (inactive): that is how scale-to-zero happens.

use std::sync::Arc;
use std::time::Instant;

use proto::agent::{GpuSummary, MetricSummary, NodeSnapshot, PodSummary};
use proto::series::Wanted;
use vocab::GpuState;

use crate::model::trigger::{aggregate, aggregate_gpus, Metric, TimeAggregation, Trigger};
use crate::sources::pods::PodMeta;
use crate::sources::view::View;

/// One pod's value on one GPU, as its node's agent attributed it.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuValue {
    /// The pod.
    pub pod: Arc<PodMeta>,
    /// The node it runs on.
    pub node: Arc<str>,
    /// The GPU (`GPU-…`) or MIG instance (`MIG-…`).
    pub gpu_uuid: Arc<str>,
    /// The pod's value on it (its split share when `shared`).
    pub value: f64,
    /// Other pods or processes use the GPU too.
    pub shared: bool,
    /// `sm_active` fell back to `gpu_util` (the GPU has no GPM).
    pub fell_back: bool,
}

/// One replica and how its value came about.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    /// `<replicaLabel>=<value>` for a group, else `<namespace>/<pod name>` (empty with
    /// [`Detail::Value`]).
    pub key: String,
    /// Its running pods (none with [`Detail::Value`]).
    pub pods: Vec<Arc<PodMeta>>,
    /// Its pods' values per GPU (none with [`Detail::Value`]).
    pub gpus: Vec<GpuValue>,
    /// Its GPUs combined by `gpuAggregation` (0 when it uses none).
    pub value: f64,
}

/// What a trigger evaluates to.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The replicas' values combined by `aggregation`.
    pub value: f64,
    /// Matched pods that are running.
    pub running_pods: usize,
    /// (pod, GPU) values read.
    pub values: usize,
    /// GPUs whose `sm_active` fell back to `gpu_util`.
    pub fallbacks: usize,
    /// The replicas, in the order their first pod was matched.
    pub replicas: Vec<Replica>,
}

/// Why a trigger has no trustworthy value.
#[derive(Clone, Debug, PartialEq)]
pub struct Unavailable {
    /// One line per problem (at most a handful are listed).
    pub reasons: Vec<String>,
    /// How many problems there were in all.
    pub total: usize,
    /// Some node does not stream the trigger's series yet (asked for just now): the answer may
    /// come within a sample interval or two.
    pub not_streamed: bool,
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

/// The series evaluating `trigger` reads: its metric over its window (its last value with
/// `timeAggregation: last`) and, for `sm_active`, `gpu_util` likewise (the fallback on GPUs
/// without GPM).
pub fn series_of(trigger: &Trigger) -> Wanted {
    let window = (trigger.time_aggregation != TimeAggregation::Last).then_some(trigger.window);
    let w = Wanted::none().with(trigger.metric, window);
    if trigger.metric == Metric::SmActive {
        w.with(Metric::GpuUtil, window)
    } else {
        w
    }
}

/// What `trigger` reads of its metric, in words: `over 30s`, or `now` (`last`).
fn over(trigger: &Trigger) -> String {
    match trigger.time_aggregation {
        TimeAggregation::Last => "now".to_owned(),
        _ => format!("over {}s", trigger.window.secs()),
    }
}

fn statistic(m: &MetricSummary, trigger: &Trigger) -> Option<f64> {
    if trigger.time_aggregation == TimeAggregation::Last {
        return m.last;
    }
    let secs = trigger.window.secs();
    let w = m.windows.iter().find(|w| w.window_s == secs)?;
    Some(match trigger.time_aggregation {
        TimeAggregation::Avg => w.avg,
        TimeAggregation::Max => w.max,
        TimeAggregation::Min => w.min,
        TimeAggregation::P95 => w.p95,
        TimeAggregation::Last => unreachable!("handled above"),
    })
}

fn metric(ms: &[MetricSummary], metric: Metric) -> Option<&MetricSummary> {
    // Compared as wire values: this runs for every matched pod of every KEDA call.
    let wire = proto::agent::Metric::from(metric) as i32;
    ms.iter().find(|m| m.metric == wire)
}

/// One (pod, GPU) value, or why it is missing. The bool says a fallback was used. `gpu`: the
/// pod's GPU as its agent reports it (none: not reported).
fn pod_gpu_value(
    snap: &NodeSnapshot,
    meta: &PodMeta,
    pod: &PodSummary,
    gpu: Option<&GpuSummary>,
    trigger: &Trigger,
) -> Result<(f64, bool), String> {
    let name = trigger.metric.name();
    // A GPU that fell off the bus or fails: its windows still hold what it did before, which is
    // not what it does now.
    if let Some(g) = gpu {
        let state = proto::agent::GpuState::vocab(g.state);
        if matches!(state, Some(GpuState::Lost | GpuState::Error)) {
            return Err(format!(
                "{name} of pod {}/{} on GPU {} of node {} is not trusted: the GPU is {} (its \
                 windows hold values from before)",
                meta.namespace,
                meta.name,
                pod.gpu_uuid,
                snap.node_name,
                proto::agent::GpuState::name_of(g.state)
            ));
        }
    }
    if let Some(v) = metric(&pod.metrics, trigger.metric).and_then(|m| statistic(m, trigger)) {
        return Ok((v, false));
    }
    if trigger.metric == Metric::SmActive && gpu.is_some_and(|g| !g.gpm_supported) {
        if let Some(v) = metric(&pod.metrics, Metric::GpuUtil).and_then(|m| statistic(m, trigger)) {
            return Ok((v, true));
        }
    }
    let state = gpu.map_or("not reported", |g| proto::agent::GpuState::name_of(g.state));
    let over = over(trigger);
    let mig = gpu.filter(|g| !g.parent_uuid.is_empty());
    let why = match mig {
        Some(g) if matches!(trigger.metric, Metric::GpuUtil | Metric::MemUtil) => format!(
            "; it is a MIG instance of {}, and NVML measures no utilization on MIG instances: \
             use sm_active (measured per instance on Hopper and newer) or vram_used_pct",
            g.parent_uuid
        ),
        Some(g) => format!("; it is a MIG instance of {}", g.parent_uuid),
        None => String::new(),
    };
    Err(format!(
        "{name} of pod {}/{} on GPU {} of node {} is not measured {over} (GPU state {state}){why}",
        meta.namespace, meta.name, pod.gpu_uuid, snap.node_name,
    ))
}

/// The value of `trigger`'s `replicaLabel` on `pod`: the replica it belongs to (none: a
/// replica of its own).
fn replica_of<'a>(pod: &'a PodMeta, trigger: &Trigger) -> Option<&'a str> {
    let label = trigger.replica_label.as_deref()?;
    pod.labels.get(label).map(String::as_str)
}

/// The key of the replica `pod` starts: `<replicaLabel>=<value>` for a group, else
/// `<namespace>/<pod name>`.
fn replica_key(pod: &PodMeta, trigger: &Trigger) -> String {
    match (trigger.replica_label.as_deref(), replica_of(pod, trigger)) {
        (Some(label), Some(value)) => format!("{label}={value}"),
        _ => format!("{}/{}", pod.namespace, pod.name),
    }
}

/// How much of an evaluation to keep: the value (what KEDA gets), or each replica's key, pods
/// and per-GPU values too (what `dump` shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// The value, the counts, and each replica's value.
    Value,
    /// Also each replica's pods and the per-GPU values they came from.
    Full,
}

/// Where one running matched pod is in the view.
#[derive(Clone, Debug, PartialEq)]
enum Place {
    /// No agent reports the pod's node.
    NoAgent,
    /// More than one agent claims the pod's node.
    Conflict,
    /// The node's agent's slot, and the pod's entries in [`Located::entries`].
    At(usize, std::ops::Range<usize>),
}

/// Where the running pods of a list of matched pods are in the view: for each, the agent that
/// reports its node and its (pod, GPU) entries there. Finding them costs two hash lookups per
/// pod; a `Located` stays right while the view's indexes do ([`View::structure`]) and the pod
/// list is the same, so a `StreamIsActive` stream, which looks again whenever one of its nodes
/// sends new values, finds them once.
#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    /// The [`View::structure`] it was made at.
    pub structure: u64,
    /// (index into the matched pods, where) per running pod, in the matched order.
    places: Vec<(usize, Place)>,
    entries: Vec<crate::sources::view::PodEntry>,
}

impl Located {
    /// The slots of the agents that report the pods' nodes (a slot once per pod on it).
    pub fn nodes(&self) -> impl Iterator<Item = usize> + '_ {
        self.places.iter().filter_map(|(_, p)| match p {
            Place::At(node, _) => Some(*node),
            _ => None,
        })
    }
}

/// Finds the running pods of `matched` in `view`.
pub fn locate(view: &View, matched: &[Arc<PodMeta>]) -> Located {
    let mut places = Vec::with_capacity(matched.len());
    let mut entries = Vec::with_capacity(matched.len());
    for (i, pod) in matched.iter().enumerate() {
        if pod.phase != "Running" || pod.node.is_empty() {
            continue;
        }
        let place = match view.claimants(&pod.node) {
            [] => Place::NoAgent,
            &[node] => {
                let from = entries.len();
                let all = view.pod_gpus.get(&pod.uid).into_iter().flatten();
                entries.extend(all.filter(|e| e.node == node));
                Place::At(node, from..entries.len())
            }
            _ => Place::Conflict,
        };
        places.push((i, place));
    }
    Located {
        structure: view.structure,
        places,
        entries,
    }
}

/// Evaluates `trigger` over the `matched` pods at time `now`, with every detail.
pub fn evaluate(
    view: &View,
    matched: &[Arc<PodMeta>],
    trigger: &Trigger,
    now: Instant,
) -> Result<Evaluation, Unavailable> {
    evaluate_located(
        view,
        matched,
        &locate(view, matched),
        trigger,
        now,
        Detail::Full,
    )
}

/// Evaluates `trigger` over the `matched` pods, found in `view` as `located` says (made by
/// [`locate`] from this `view`'s indexes and these pods), at time `now`.
pub fn evaluate_located(
    view: &View,
    matched: &[Arc<PodMeta>],
    located: &Located,
    trigger: &Trigger,
    now: Instant,
    detail: Detail,
) -> Result<Evaluation, Unavailable> {
    debug_assert_eq!(located.structure, view.structure, "located in another view");
    let mut replicas: Vec<Replica> = Vec::new();
    // Replicas of more than one pod, by `replicaLabel` value (a pod without the label, or any
    // pod without `replicaLabel`, is a replica of its own).
    let mut groups: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    // (replica, node slot, GPU, value) per value read.
    let mut read: Vec<(usize, usize, usize, f64)> = Vec::with_capacity(located.entries.len());
    let mut problems: Vec<String> = Vec::new();
    let mut values = 0;
    let mut fallbacks = 0;
    let mut not_streamed = false;
    let series = series_of(trigger);
    for (i, place) in &located.places {
        let pod = &matched[*i];
        let group = replica_of(pod, trigger);
        let r = match group.and_then(|g| groups.get(g)) {
            Some(&r) => r,
            None => {
                replicas.push(Replica {
                    key: match detail {
                        Detail::Full => replica_key(pod, trigger),
                        Detail::Value => String::new(),
                    },
                    pods: Vec::new(),
                    gpus: Vec::new(),
                    value: 0.0,
                });
                if let Some(g) = group {
                    groups.insert(g, replicas.len() - 1);
                }
                replicas.len() - 1
            }
        };
        if detail == Detail::Full {
            replicas[r].pods.push(pod.clone());
        }
        let (node, at) = match place {
            Place::At(node, at) => (*node, at.clone()),
            Place::NoAgent => {
                problems.push(format!(
                    "pod {}/{} runs on node {} where no agent reports",
                    pod.namespace, pod.name, pod.node
                ));
                continue;
            }
            Place::Conflict => {
                let agents = view.conflict(&pod.node).unwrap_or_default();
                problems.push(format!(
                    "node {} is claimed by {} agents ({}): one of them is not that node's agent; \
                     until only one reports it, its values cannot be trusted",
                    pod.node,
                    agents.len(),
                    agents.join(", ")
                ));
                continue;
            }
        };
        let state = &view.nodes[node];
        let (Some(snap), Some(received)) = (&state.snapshot, state.received) else {
            continue;
        };
        if let Some(why) = &state.refused {
            problems.push(format!(
                "node {} (agent {}) sent a snapshot the collector refused: {why}",
                pod.node, state.address
            ));
            continue;
        }
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
        if !state.carries.covers(&series) {
            not_streamed = true;
            problems.push(format!(
                "node {} (agent {}) does not stream {} {} yet: the collector asked its agent \
                 for it when this trigger was first seen, and it comes within a sample interval",
                pod.node,
                state.address,
                trigger.metric.name(),
                over(trigger),
            ));
            continue;
        }
        for e in &located.entries[at] {
            let summary = &snap.pods[e.pod];
            match pod_gpu_value(snap, pod, summary, snap.gpus.get(e.gpu), trigger) {
                Ok((value, fell_back)) => {
                    values += 1;
                    fallbacks += usize::from(fell_back);
                    read.push((r, node, e.gpu, value));
                    if detail == Detail::Full {
                        replicas[r].gpus.push(GpuValue {
                            pod: pod.clone(),
                            node: state.names.node.clone(),
                            gpu_uuid: state.names.gpus[e.gpu].clone(),
                            value,
                            shared: summary.shared,
                            fell_back,
                        });
                    }
                }
                Err(why) => problems.push(why),
            }
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
            not_streamed,
        });
    }
    // Each replica's value: its pods' shares of each GPU added up, then its GPUs combined by
    // `gpuAggregation`.
    read.sort_by_key(|&(r, node, gpu, _)| (r, node, gpu));
    let mut per_gpu: Vec<f64> = Vec::new();
    for run in read.chunk_by(|a, b| a.0 == b.0) {
        per_gpu.clear();
        for same in run.chunk_by(|a, b| (a.1, a.2) == (b.1, b.2)) {
            per_gpu.push(same.iter().map(|v| v.3).sum());
        }
        replicas[run[0].0].value = aggregate_gpus(trigger.gpu_aggregation, &per_gpu);
    }
    let per_replica: Vec<f64> = replicas.iter().map(|r| r.value).collect();
    let value = aggregate(trigger.aggregation, &per_replica);
    // Every value passed validation (finite), but finite values can add up past what a float
    // holds (two pods at 1e308 W): KEDA must get no value rather than infinity.
    if !value.is_finite() {
        return Err(Unavailable {
            reasons: vec![format!(
                "{} of the matched pods adds up to {value}: their agents report values no GPU \
                 has",
                trigger.metric.name()
            )],
            total: 1,
            not_streamed: false,
        });
    }
    Ok(Evaluation {
        value,
        running_pods: located.places.len(),
        values,
        fallbacks,
        replicas,
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
        let Some(node) = view.node(&pod.node) else {
            return false;
        };
        if view.conflict(&pod.node).is_some() {
            return false;
        }
        let state = &view.nodes[node];
        let (Some(snap), Some(received), None) = (&state.snapshot, state.received, &state.refused)
        else {
            return false;
        };
        // Saturating: `taken_unix_ns` is the agent's word (validation only refuses 0).
        let agent_now = snap
            .taken_unix_ns
            .saturating_add(now.saturating_duration_since(received).as_nanos() as u64);
        snap.opens.iter().any(|o| {
            o.pod_uid == pod.uid
                && agent_now.saturating_sub(o.last_open_unix_ns) <= within.as_nanos() as u64
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::trigger::Trigger;
    use proto::agent::{GpuSummary, WindowStats};
    use std::collections::{BTreeMap, HashMap};
    use std::time::Duration;
    use vocab::Window;

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
            metric: proto::agent::Metric::named(name).unwrap() as i32,
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
            view.nodes.push(crate::sources::view::NodeState {
                connected: true,
                ..crate::sources::view::NodeState::new(&format!("10.0.0.{n}:7701"))
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
    fn a_gpu_is_found_by_its_uuid_when_the_agent_lists_its_gpus_in_another_order() {
        let (mut view, pods, now) = cluster();
        // The same pods on the same GPUs, the GPUs listed the other way round, GPU-01 lost.
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        snap.gpus.reverse();
        snap.gpus[0].state = proto::agent::GpuState::Lost as i32;
        view.update(0, snap, now);
        let t = trigger(&[("metric", "sm_active")]);
        let err = evaluate(&view, &pods, &t, now).unwrap_err();
        assert_eq!(err.total, 1, "{err}");
        assert!(
            err.reasons[0].contains("pod ml/vllm-p01 on GPU GPU-01 of node node-0 is not trusted"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_gpu_makes_its_pods_unavailable_at_once_though_its_windows_hold_values() {
        let (mut view, pods, now) = cluster();
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        snap.gpus[1].state = proto::agent::GpuState::Lost as i32;
        view.update(0, snap, now);
        let t = trigger(&[("metric", "sm_active")]);
        let text = evaluate(&view, &pods, &t, now).unwrap_err().to_string();
        assert!(
            text.contains("on GPU GPU-01 of node node-0 is not trusted: the GPU is lost"),
            "{text}"
        );
        assert_eq!(
            evaluate(&view, &pods, &t, now).unwrap_err().total,
            1,
            "{text}"
        );
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        snap.gpus[1].state = proto::agent::GpuState::Ok as i32;
        view.update(0, snap, now);
        assert_eq!(evaluate(&view, &pods, &t, now).unwrap().value, 360.0);
    }

    #[test]
    fn a_refused_snapshot_makes_its_nodes_pods_unavailable_until_a_good_one() {
        let (mut view, pods, now) = cluster();
        view.refuse(
            1,
            "GPU \"GPU-10\" sm_active last is NaN: not a finite number".into(),
        );
        let t = trigger(&[("metric", "sm_active")]);
        let text = evaluate(&view, &pods, &t, now).unwrap_err().to_string();
        assert!(
            text.contains(
                "node node-1 (agent 10.0.0.1:7701) sent a snapshot the collector refused"
            ) && text.contains("NaN"),
            "{text}"
        );
        assert!(!text.contains("node-0"), "node-0 is fine: {text}");
        // A good snapshot clears it.
        let snap = (**view.nodes[1].snapshot.as_ref().unwrap()).clone();
        view.update(1, snap, now);
        assert_eq!(evaluate(&view, &pods, &t, now).unwrap().value, 360.0);
        assert!(view.nodes[1].last_error.is_empty());
        assert_eq!(view.nodes[1].refused_total, 1);
    }

    #[test]
    fn a_second_agent_claiming_a_node_makes_it_unavailable_naming_both_until_one_stops() {
        let (mut view, pods, now) = cluster();
        // An impostor at another address reports node-0 with its own numbers.
        view.nodes.push(crate::sources::view::NodeState {
            connected: true,
            ..crate::sources::view::NodeState::new("10.9.9.9:7701")
        });
        let mut fake = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        for p in &mut fake.pods {
            p.metrics = vec![ms("sm_active", 0.0)];
        }
        view.update(2, fake, now);
        let t = trigger(&[("metric", "sm_active")]);
        let text = evaluate(&view, &pods, &t, now).unwrap_err().to_string();
        assert!(
            text.contains("node node-0 is claimed by 2 agents (10.0.0.0:7701, 10.9.9.9:7701)"),
            "{text}"
        );
        assert!(!text.contains("node-1"), "{text}");
        // The impostor leaves (its address is no longer followed): node-0 is its agent's again.
        view.retire_node(2);
        assert_eq!(evaluate(&view, &pods, &t, now).unwrap().value, 360.0);
        assert_eq!(view.node("node-0"), Some(0));
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
        assert_eq!((e.value, e.values, e.running_pods), (360.0, 4, 5));
        assert_eq!(e.replicas.len(), 5);
        assert_eq!(e.replicas[4].value, 0.0);
        // With avg across replicas, it is a replica at 0.
        let t = trigger(&[("metric", "sm_active"), ("aggregation", "avg")]);
        assert_eq!(evaluate(&view, &pods, &t, now).unwrap().value, 72.0);
    }

    #[test]
    fn sm_active_falls_back_to_gpu_util_without_gpm_and_other_gaps_are_unavailable() {
        let (mut view, pods, now) = cluster();
        let mut snap = (**view.nodes[1].snapshot.as_ref().unwrap()).clone();
        for g in &mut snap.gpus {
            g.gpm_supported = false;
        }
        for p in &mut snap.pods {
            p.metrics
                .retain(|m| m.vocab_metric() != Some(Metric::SmActive));
        }
        view.update(1, snap, now);
        let e = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!((e.value, e.fallbacks), (90.0 * 2.0 + 97.0 * 2.0, 2));
        let err =
            evaluate(&view, &pods, &trigger(&[("metric", "tensor_active")]), now).unwrap_err();
        assert!(err.to_string().contains("tensor_active of pod"), "{err}");
    }

    #[test]
    fn a_series_its_node_does_not_stream_yet_is_unavailable_and_says_so() {
        let (mut view, pods, now) = cluster();
        let t = trigger(&[("metric", "sm_active"), ("window", "5m")]);
        // Node 1's stream carries last values and sm_active over 5 m, not gpu_util's fallback.
        let snap = (**view.nodes[1].snapshot.as_ref().unwrap()).clone();
        let carries = Wanted::lasts().with(Metric::SmActive, Some(Window::M5));
        view.update_carrying(1, snap.clone(), now, carries);
        let err = evaluate(&view, &pods, &t, now).unwrap_err();
        assert!(err.not_streamed, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("node node-1")
                && text.contains("does not stream sm_active over 300s yet"),
            "{text}"
        );
        // Once it does (its stream asked again, the first message whole): the value.
        let carries = carries.with(Metric::GpuUtil, Some(Window::M5));
        view.update_carrying(1, snap, now, carries);
        assert!(evaluate(&view, &pods, &t, now).is_ok());
        // What a trigger reads: its window, with sm_active gpu_util's too; `last` no window.
        assert_eq!(
            series_of(&t),
            Wanted::none()
                .with(Metric::SmActive, Some(Window::M5))
                .with(Metric::GpuUtil, Some(Window::M5))
        );
        let last = trigger(&[("metric", "power_watts"), ("timeAggregation", "last")]);
        assert_eq!(
            series_of(&last),
            Wanted::none().with(Metric::PowerWatts, None)
        );
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
    fn an_agent_clock_at_the_end_of_time_neither_overflows_nor_makes_every_open_recent() {
        // Found by fuzzing (fuzz/fuzz_targets/node_snapshot.rs): `taken_unix_ns` u64::MAX
        // overflowed (a panic with overflow checks, a wrapped clock that made any open recent
        // without).
        let (mut view, pods, now) = cluster();
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        snap.taken_unix_ns = u64::MAX;
        snap.opens.push(proto::agent::DeviceOpen {
            pid: 7,
            pod_uid: "p00".into(),
            last_open_unix_ns: 0,
            ..Default::default()
        });
        view.update(0, snap.clone(), now);
        let s = Duration::from_secs;
        assert!(!opened_within(&view, &pods, s(60), now + s(1)));
        snap.opens[0].last_open_unix_ns = u64::MAX - 5_000_000_000;
        view.update(0, snap, now);
        assert!(opened_within(&view, &pods, s(60), now + s(1)));
    }

    #[test]
    fn values_that_add_up_past_what_a_float_holds_are_unavailable_not_infinite() {
        // Found by fuzzing (fuzz/fuzz_targets/node_snapshot.rs): two pods at 1e308 W (each
        // finite, so each passes validation) summed to infinity.
        let (mut view, pods, now) = cluster();
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        for p in &mut snap.pods {
            p.metrics.push(ms("power_watts", 1e308));
        }
        view.update(0, snap, now);
        let node_0 = &pods[..2];
        let max = trigger(&[("metric", "power_watts"), ("aggregation", "max")]);
        assert_eq!(evaluate(&view, node_0, &max, now).unwrap().value, 1e308);
        let sum = trigger(&[("metric", "power_watts")]);
        let err = evaluate(&view, node_0, &sum, now).unwrap_err().to_string();
        assert!(
            err.contains("power_watts of the matched pods adds up to inf"),
            "{err}"
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

    /// One node `node-0` whose pods are (uid, GPU, sm_active, vram bytes, shared), each pod
    /// labelled `app=vllm` plus `labels`.
    fn node_view(
        entries: &[(&str, &str, f64, f64, bool)],
        labels: &[(&str, &str, &str)],
    ) -> (View, Vec<Arc<PodMeta>>, Instant) {
        let now = Instant::now();
        let mut view = View::default();
        view.nodes.push(crate::sources::view::NodeState {
            connected: true,
            ..crate::sources::view::NodeState::new("10.0.0.1:7701")
        });
        let mut gpus: Vec<GpuSummary> = Vec::new();
        let mut metas: Vec<Arc<PodMeta>> = Vec::new();
        let pods = entries
            .iter()
            .map(|&(uid, gpu, sm, vram, shared)| {
                if !gpus.iter().any(|g| g.uuid == gpu) {
                    gpus.push(GpuSummary {
                        uuid: gpu.into(),
                        gpm_supported: true,
                        state: 2,
                        ..Default::default()
                    });
                }
                if !metas.iter().any(|m| m.uid == uid) {
                    let mut m = (*pod_meta(uid, "node-0")).clone();
                    for (pod, k, v) in labels {
                        if *pod == uid {
                            m.labels.insert((*k).into(), (*v).into());
                        }
                    }
                    metas.push(Arc::new(m));
                }
                PodSummary {
                    pod_uid: uid.into(),
                    gpu_uuid: gpu.into(),
                    shared,
                    metrics: vec![ms("sm_active", sm), ms("vram_used_bytes", vram)],
                    ..Default::default()
                }
            })
            .collect();
        view.update(
            0,
            NodeSnapshot {
                node_name: "node-0".into(),
                gpus,
                pods,
                ..Default::default()
            },
            now,
        );
        (view, metas, now)
    }

    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

    /// A TP=4 pod on four GPUs at 70 % and a pod on one GPU at 90 %.
    fn tp4_and_one(first_gpu: f64) -> (View, Vec<Arc<PodMeta>>, Instant) {
        node_view(
            &[
                ("tp", "GPU-0", first_gpu, 60.0 * GIB, false),
                ("tp", "GPU-1", 70.0, 60.0 * GIB, false),
                ("tp", "GPU-2", 70.0, 60.0 * GIB, false),
                ("tp", "GPU-3", 70.0, 60.0 * GIB, false),
                ("one", "GPU-4", 90.0, 20.0 * GIB, false),
            ],
            &[],
        )
    }

    #[test]
    fn a_tensor_parallel_replica_counts_once_not_once_per_gpu() {
        use crate::model::hpa::{desired_replicas, MetricType};
        let (view, pods, now) = tp4_and_one(70.0);
        let t = trigger(&[("metric", "sm_active")]);
        let e = evaluate(&view, &pods, &t, now).unwrap();
        // avg over the TP replica's four GPUs (70) + the other replica (90).
        assert_eq!((e.value, e.replicas.len(), e.values), (160.0, 2, 5));
        assert_eq!(
            desired_replicas(e.value, 80.0, MetricType::AverageValue, 2),
            2
        );
        assert_eq!(e.replicas[0].key, "ml/vllm-tp");
        assert_eq!(e.replicas[0].gpus.len(), 4);

        // The busiest GPU is the bottleneck of a tensor-parallel replica.
        let (view, pods, now) = tp4_and_one(95.0);
        let t = trigger(&[("metric", "sm_active"), ("gpuAggregation", "max")]);
        let e = evaluate(&view, &pods, &t, now).unwrap();
        assert_eq!(e.replicas[0].value, 95.0);
        assert_eq!(e.value, 185.0);
        // The old per-GPU sum, on request.
        let t = trigger(&[("metric", "sm_active"), ("gpuAggregation", "sum")]);
        assert_eq!(
            evaluate(&view, &pods, &t, now).unwrap().value,
            95.0 + 210.0 + 90.0
        );
        // avg + metricType Value: the mean replica.
        let t = trigger(&[("metric", "sm_active"), ("aggregation", "avg")]);
        let e = evaluate(&view, &pods, &t, now).unwrap();
        assert_eq!(e.value, ((95.0 + 210.0) / 4.0 + 90.0) / 2.0);
    }

    #[test]
    fn vram_of_a_tensor_parallel_replica_is_the_sum_over_its_gpus() {
        let (view, pods, now) = tp4_and_one(70.0);
        let t = trigger(&[("metric", "vram_used_bytes")]);
        let e = evaluate(&view, &pods, &t, now).unwrap();
        assert_eq!(e.replicas[0].value, 240.0 * GIB);
        assert_eq!(e.value, 260.0 * GIB);
    }

    #[test]
    fn pods_sharing_a_replica_label_value_are_one_replica() {
        let label = "leaderworkerset.sigs.k8s.io/group-key";
        let (view, pods, now) = node_view(
            &[
                ("leader", "GPU-0", 60.0, 0.0, false),
                ("worker", "GPU-1", 80.0, 0.0, false),
                ("solo", "GPU-2", 90.0, 0.0, false),
            ],
            &[("leader", label, "g1"), ("worker", label, "g1")],
        );
        let t = trigger(&[("metric", "sm_active"), ("replicaLabel", label)]);
        let e = evaluate(&view, &pods, &t, now).unwrap();
        assert_eq!(e.replicas.len(), 2);
        assert_eq!(e.replicas[0].key, format!("{label}=g1"));
        assert_eq!(e.replicas[0].pods.len(), 2);
        // (60 + 80) / 2 for the group, and the pod without the label on its own.
        assert_eq!((e.replicas[0].value, e.replicas[1].value), (70.0, 90.0));
        assert_eq!(e.value, 160.0);
        // Without replicaLabel, three replicas.
        let e = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!((e.replicas.len(), e.value), (3, 230.0));
    }

    #[test]
    fn a_replicas_shares_of_one_shared_gpu_add_up_before_gpus_combine() {
        let label = "group";
        // Leader and worker split GPU-0 (30 + 20); the worker also has GPU-1 at 90.
        let (view, pods, now) = node_view(
            &[
                ("leader", "GPU-0", 30.0, 0.0, true),
                ("worker", "GPU-0", 20.0, 0.0, true),
                ("worker", "GPU-1", 90.0, 0.0, false),
            ],
            &[("leader", label, "a"), ("worker", label, "a")],
        );
        let t = trigger(&[("metric", "sm_active"), ("replicaLabel", label)]);
        let e = evaluate(&view, &pods, &t, now).unwrap();
        assert_eq!((e.replicas.len(), e.value), (1, (50.0 + 90.0) / 2.0));
        assert!(e.replicas[0].gpus[0].shared);
    }

    #[test]
    fn a_replica_with_one_unmeasured_gpu_is_unavailable_never_partial() {
        let (mut view, pods, now) = tp4_and_one(70.0);
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        snap.pods[2]
            .metrics
            .retain(|m| m.vocab_metric() != Some(Metric::SmActive));
        view.update(0, snap, now);
        let t = trigger(&[("metric", "sm_active"), ("timeAggregation", "last")]);
        let err = evaluate(&view, &pods, &t, now).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "sm_active of pod ml/vllm-tp on GPU GPU-2 of node node-0 is not measured now"
            ),
            "{text}"
        );
    }

    #[test]
    fn gpu_util_on_a_mig_instance_is_unavailable_naming_the_instance() {
        let (mut view, pods, now) = node_view(&[("a", "MIG-1", 40.0, 5.0 * GIB, false)], &[]);
        let mut snap = (**view.nodes[0].snapshot.as_ref().unwrap()).clone();
        snap.gpus[0].parent_uuid = "GPU-parent".into();
        view.update(0, snap, now);
        let e = evaluate(&view, &pods, &trigger(&[("metric", "sm_active")]), now).unwrap();
        assert_eq!(e.value, 40.0);
        let err = evaluate(&view, &pods, &trigger(&[("metric", "gpu_util")]), now).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("on GPU MIG-1 of node node-0"), "{text}");
        assert!(text.contains("a MIG instance of GPU-parent"), "{text}");
        assert!(text.contains("use sm_active"), "{text}");
    }
}
