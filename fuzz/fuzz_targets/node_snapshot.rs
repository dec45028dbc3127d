//! An agent's `NodeSnapshot` as it arrives from the network: decoded from protobuf bytes (prost,
//! as tonic decodes it) and checked by `sources::validate::check`; one that passes then enters
//! the view (`View::update`) and is read as KEDA calls read it (`model::evaluate::evaluate` for
//! every trigger metric under a spread of windows and aggregations, and `opened_within`).
//!
//! Input: the protobuf encoding of a `NodeSnapshot` (`proto/agent.proto`); bytes that do not
//! decode are skipped (tonic refuses them before the collector sees them). Seeds in
//! `fuzz/corpus/node_snapshot/` are snapshots an agent could send, one it must not (NaN), and
//! the inputs of two findings (`regression-*`, see docs/RELIABILITY.md, "Fuzzing").
//!
//! Each input is also applied as a delta (revision 3's streams of changes, `View::apply_delta`)
//! to a good snapshot of its node; a state the view then takes keeps the same promises.
//!
//! Never panics, and a snapshot that passes keeps what `validate` promises the view: a node
//! name of 1 to 253 bytes and a time; every number of every metric this build knows finite,
//! percentages within 0..100 (bar rounding), bytes and watts not negative, no metric or window
//! listed twice, at most 16 windows; no GPU UUID twice; every pod on a listed GPU, never twice.
//! And what KEDA is then told is a finite number ≥ 0, or `UNAVAILABLE`: never NaN or infinity.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use collector::model::evaluate::{evaluate, opened_within};
use collector::model::trigger::{
    default_gpu_aggregation, Aggregation, GpuAggregation, Metric, TimeAggregation, Trigger, Window,
};
use collector::sources::pods::PodMeta;
use collector::sources::validate::{check, MAX_NODE_NAME};
use collector::sources::view::{NodeState, View};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use proto::agent::{MetricSummary, NodeSnapshot};

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = NodeSnapshot::decode(data) else {
        return;
    };
    as_a_delta(snap.clone());
    if let Err(refused) = check(&snap) {
        assert!(
            refused.0.len() < 1024,
            "a reason quotes a prefix, not the input: {} bytes",
            refused.0.len()
        );
        return;
    }
    holds(&snap);
    read_as_keda_does(snap);
});

/// The same message as a delta on a stream of changes (agent API revision 3): applied to a good
/// snapshot of its node (`View::apply_delta`); unless the node is then refused, the state it
/// makes keeps every promise of a checked snapshot, and is read as KEDA reads it.
fn as_a_delta(mut delta: NodeSnapshot) {
    delta.delta = true;
    let base = NodeSnapshot {
        api_version: 3,
        node_name: delta.node_name.clone(),
        taken_unix_ns: 1_800_000_000_000_000_000,
        gpus: vec![proto::agent::GpuSummary {
            uuid: "GPU-fuzz".into(),
            ..Default::default()
        }],
        pods: vec![proto::agent::PodSummary {
            pod_uid: "pod-fuzz".into(),
            gpu_uuid: "GPU-fuzz".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let at = Instant::now();
    let mut view = View {
        nodes: vec![NodeState::new("10.0.0.1:50051")],
        ..View::default()
    };
    view.update(0, base, at);
    view.apply_delta(0, delta, at);
    let state = &view.nodes[0];
    if let (None, Some(snap)) = (&state.refused, &state.snapshot) {
        let snap = NodeSnapshot::clone(snap);
        assert!(!snap.delta, "an applied state is whole");
        check(&snap).expect("a state the view took passes the check");
        holds(&snap);
        read_as_keda_does(snap);
    }
}

/// What a snapshot that passed `check` promises its readers.
fn holds(snap: &NodeSnapshot) {
    assert!(!snap.node_name.is_empty() && snap.node_name.len() <= MAX_NODE_NAME);
    assert_ne!(snap.taken_unix_ns, 0);
    let mut uuids = HashSet::new();
    for g in &snap.gpus {
        metrics_hold(&g.metrics);
        if !g.uuid.is_empty() {
            assert!(uuids.insert(g.uuid.as_str()), "GPU {:?} twice", g.uuid);
        }
    }
    let mut pods = HashSet::new();
    for p in &snap.pods {
        metrics_hold(&p.metrics);
        assert!(!p.pod_uid.is_empty());
        assert!(
            uuids.contains(p.gpu_uuid.as_str()),
            "pod {:?} on GPU {:?}, not listed",
            p.pod_uid,
            p.gpu_uuid
        );
        assert!(pods.insert((p.pod_uid.as_str(), p.gpu_uuid.as_str())));
    }
}

/// Puts `snap` into a view as the agent stream does, then evaluates triggers over its pods (and
/// the pods of its device opens) as KEDA calls do, a millisecond after it arrived.
fn read_as_keda_does(snap: NodeSnapshot) {
    let mut uids: Vec<&str> = snap.pods.iter().map(|p| p.pod_uid.as_str()).collect();
    uids.extend(snap.opens.iter().map(|o| o.pod_uid.as_str()));
    uids.sort_unstable();
    uids.dedup();
    let matched: Vec<Arc<PodMeta>> = uids
        .iter()
        .enumerate()
        .map(|(i, uid)| {
            Arc::new(PodMeta {
                namespace: "ml".into(),
                name: format!("vllm-{i}"),
                uid: (*uid).to_owned(),
                // Two replicas of several pods each under `replicaLabel: group`.
                labels: BTreeMap::from([("group".to_owned(), (i % 2).to_string())]),
                node: snap.node_name.clone(),
                phase: "Running".into(),
                owner: "Deployment/vllm".into(),
                container_ids: Vec::new(),
            })
        })
        .collect();
    let at = Instant::now();
    let now = at + Duration::from_millis(1);
    let mut view = View {
        nodes: vec![NodeState::new("10.0.0.1:50051")],
        ..View::default()
    };
    view.update(0, snap, at);

    let _ = opened_within(&view, &matched, Duration::from_secs(60), now);
    // Every variant of each aggregation, and every window, in five combinations.
    let shapes = [
        (
            Window::S10,
            TimeAggregation::Avg,
            Some(GpuAggregation::Avg),
            Aggregation::Sum,
            false,
        ),
        (
            Window::S30,
            TimeAggregation::Max,
            Some(GpuAggregation::Max),
            Aggregation::Avg,
            true,
        ),
        (
            Window::S60,
            TimeAggregation::P95,
            Some(GpuAggregation::Sum),
            Aggregation::Max,
            false,
        ),
        (
            Window::M5,
            TimeAggregation::Min,
            None,
            Aggregation::Min,
            true,
        ),
        (
            Window::S30,
            TimeAggregation::Last,
            None,
            Aggregation::Sum,
            true,
        ),
    ];
    for metric in Metric::TRIGGER {
        for (window, time_aggregation, gpu_aggregation, aggregation, by_group) in shapes {
            let trigger = Trigger {
                metric,
                pod_selector: None,
                window,
                time_aggregation,
                gpu_aggregation: gpu_aggregation.unwrap_or(default_gpu_aggregation(metric)),
                replica_label: by_group.then(|| "group".to_owned()),
                aggregation,
                target_value: 80.0,
                activation_threshold: 0.0,
                stale_after: Duration::from_secs(10),
                active_after_open: Duration::ZERO,
            };
            match evaluate(&view, &matched, &trigger, now) {
                Ok(e) => assert!(
                    e.value.is_finite() && e.value >= 0.0,
                    "KEDA would be told {} for {} ({time_aggregation} over {}, gpuAggregation \
                     {}, aggregation {aggregation}, replicaLabel {by_group})",
                    e.value,
                    metric,
                    window.label(),
                    trigger.gpu_aggregation,
                ),
                Err(unavailable) => {
                    let _ = unavailable.to_string();
                }
            }
        }
    }
}

/// The numbers of one GPU's or pod's metrics are what a reader may use.
fn metrics_hold(ms: &[MetricSummary]) {
    let mut seen = HashSet::new();
    for m in ms {
        let Some(metric) = m.vocab_metric() else {
            continue;
        };
        assert!(seen.insert(metric), "{metric} twice");
        assert!(m.windows.len() <= 16, "{} windows", m.windows.len());
        let mut windows = HashSet::new();
        for w in &m.windows {
            assert!(windows.insert(w.window_s), "window {}s twice", w.window_s);
        }
        let values = m
            .last
            .into_iter()
            .chain(m.windows.iter().flat_map(|w| [w.avg, w.min, w.max, w.p95]));
        for v in values {
            assert!(v.is_finite(), "{metric} {v}");
            if metric.is_percent() {
                assert!((0.0..=100.0 + 1e-6).contains(&v), "{metric} {v}");
            }
            if matches!(metric, Metric::VramUsedBytes | Metric::PowerWatts) {
                assert!(v >= 0.0, "{metric} {v}");
            }
        }
    }
}
