//! The collector's Prometheus series (`/metrics` on `--http-listen`): what KEDA was told per
//! ScaledObject, KEDA request counts and latencies by RPC and gRPC status, agent freshness, and
//! per-pod GPU values with namespace and pod names.
//!
//! Owns [`CollectorMetrics`] (the few values recorded as they happen), [`KedaMetrics`] (a tower
//! service around the ExternalScaler that times every call and reads its `grpc-status`), and a
//! prometheus-client collector that computes the agent and pod series from the cluster view and
//! the pod source at scrape time. It never does I/O and never blocks a KEDA call on a scrape.
//!
//! A value the collector cannot trust (a stale or disconnected agent, a metric the agent could
//! not measure, a ScaledObject whose last answer was an error) is absent, never 0.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use gpuscale_health::{counter_family, gauge_family, Labels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::codegen::{http, Bytes, Service};
use tonic::server::NamedService;

use crate::sources::pods::PodSource;
use crate::sources::view::Cluster;

/// Per-pod values of an agent whose newest snapshot is older than this are left out (the
/// default `staleAfter` of a trigger).
pub const POD_VALUES_FRESH: Duration = Duration::from_secs(10);
/// A ScaledObject not asked about for this long is forgotten (it was probably deleted).
pub const SCALED_OBJECT_FORGET: Duration = Duration::from_secs(600);
/// Upper bounds of the KEDA latency histogram, seconds. KEDA's metrics server gives
/// `GetMetrics` 3 s; the collector answers from memory in well under a millisecond, so the
/// bounds start at 10 µs (`cargo xtask bench-scale` reads its percentiles from them).
const LATENCY_BUCKETS: [f64; 17] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 3.0,
];
/// Metrics in the order agents report them (the KEDA trigger `metric` names), named once.
const POD_METRICS: [vocab::Metric; vocab::Metric::COUNT] = vocab::Metric::ALL;

/// `rpc` and `code` of a KEDA request.
type RpcLabels = [(&'static str, &'static str); 2];

/// Most ScaledObject triggers with a value series; past it the least recently answered are
/// forgotten (names are bounded by `api::limits`, so this bounds the map's bytes too).
pub const MAX_SCALED_OBJECT_SERIES: usize = 10_000;

/// How many (pod, GPU) pairs `/metrics` exports per-pod series for by default
/// (`--metrics-pod-gpus`): ten series each, 50,000 in all. At 5,000 nodes × 16 pods a scrape
/// of every pair was 56 MB of text for 490,000 series and took the collector's memory 110 MiB
/// over its resident size while it was built; past a few hundred nodes, read per-pod values
/// from the agents' own `gpuscale_pod_gpu_<metric>` series instead.
pub const DEFAULT_POD_GPUS: usize = 5_000;

/// (namespace, ScaledObject, metric).
type ScaledObjectKey = (String, String, String);

/// Values the collector records as they happen; everything else is read at scrape time.
pub struct CollectorMetrics {
    /// The newest value answered per ScaledObject trigger, and when.
    scaled_objects: Mutex<HashMap<ScaledObjectKey, (Option<f64>, Instant)>>,
    requests: Family<RpcLabels, Counter>,
    latency: Family<RpcLabels, Histogram, fn() -> Histogram>,
    /// At most this many (pod, GPU) pairs get per-pod series ([`DEFAULT_POD_GPUS`]).
    pod_gpus: AtomicUsize,
    /// Whether a scrape left pairs out (logged once per start of it).
    pod_gpus_over: AtomicBool,
}

impl Default for CollectorMetrics {
    fn default() -> Self {
        CollectorMetrics {
            scaled_objects: Mutex::new(HashMap::new()),
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            pod_gpus: AtomicUsize::new(DEFAULT_POD_GPUS),
            pod_gpus_over: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for CollectorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorMetrics").finish_non_exhaustive()
    }
}

impl CollectorMetrics {
    /// Records the value `GetMetrics` answered for the trigger `metric` (the metric name KEDA
    /// sees, like `gpuscale-sm-active-avg-30s-sum`) of ScaledObject `namespace/name`.
    pub fn observe_scaled_object(&self, namespace: &str, name: &str, metric: &str, value: f64) {
        self.set_scaled_object(
            namespace,
            name,
            metric,
            Some(value).filter(|v| v.is_finite()),
        );
    }

    /// Records that `GetMetrics` for that trigger answered an error (no trustworthy value): its
    /// series disappears until the next value.
    pub fn scaled_object_unavailable(&self, namespace: &str, name: &str, metric: &str) {
        self.set_scaled_object(namespace, name, metric, None);
    }

    fn set_scaled_object(&self, namespace: &str, name: &str, metric: &str, value: Option<f64>) {
        let mut map = self
            .scaled_objects
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.insert(
            (namespace.to_owned(), name.to_owned(), metric.to_owned()),
            (value, now),
        );
        if map.len() > MAX_SCALED_OBJECT_SERIES {
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < SCALED_OBJECT_FORGET);
        }
        if map.len() > MAX_SCALED_OBJECT_SERIES {
            // All recent: the least recently answered go, down to 90 % so that a flood pays
            // for this sort once per thousand calls, not on each.
            let mut ages: Vec<Instant> = map.values().map(|(_, at)| *at).collect();
            let keep = MAX_SCALED_OBJECT_SERIES * 9 / 10;
            let (_, cut, _) = ages.select_nth_unstable_by(map.len() - keep, |a, b| a.cmp(b));
            let cut = *cut;
            map.retain(|_, (_, at)| *at > cut);
        }
    }

    /// Exports per-pod series for at most `n` (pod, GPU) pairs (`--metrics-pod-gpus`).
    pub fn limit_pod_gpus(&self, n: usize) {
        self.pod_gpus.store(n, Ordering::Relaxed);
    }

    /// Counts one KEDA request to `rpc` that ended with gRPC status `code` after `seconds`.
    pub fn observe_keda_request(&self, rpc: &'static str, code: &'static str, seconds: f64) {
        let labels = [("rpc", rpc), ("code", code)];
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(seconds);
    }

    /// A registry with every collector series: the recorded ones and those computed from
    /// `cluster` and `pods` at scrape time.
    pub fn registry(self: &Arc<Self>, cluster: Arc<Cluster>, pods: Arc<dyn PodSource>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "gpuscale_collector_keda_requests",
            "KEDA external-scaler requests by RPC (IsActive, StreamIsActive, GetMetricSpec, \
             GetMetrics) and gRPC status code; a StreamIsActive stream counts when it ends",
            self.requests.clone(),
        );
        r.register(
            "gpuscale_collector_keda_request_duration_seconds",
            "Time from a KEDA request's arrival to its gRPC status, by RPC and code (for \
             StreamIsActive: the stream's lifetime)",
            self.latency.clone(),
        );
        r.register_collector(Box::new(ViewCollector {
            metrics: self.clone(),
            cluster,
            pods,
        }));
        r
    }
}

/// Computes the view-derived series on each scrape.
struct ViewCollector {
    metrics: Arc<CollectorMetrics>,
    cluster: Arc<Cluster>,
    pods: Arc<dyn PodSource>,
}

impl std::fmt::Debug for ViewCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewCollector").finish_non_exhaustive()
    }
}

/// One agent's freshness.
struct AgentRow {
    labels: Labels,
    connected: bool,
    age: Option<f64>,
    reconnects: u64,
    refused: u64,
}

/// Every series the view gives, copied out under its read lock.
struct ViewRows {
    agents: Vec<AgentRow>,
    /// Per (pod, GPU): its labels, and its value of each metric (indexed like
    /// [`POD_METRICS`]). Labels are kept once per pod and GPU, not once per metric: at
    /// thousands of nodes a scrape copies tens of thousands of pods.
    pods: Vec<(Labels, [Option<f64>; POD_METRICS.len()])>,
    /// Pairs with values left out of `pods` (over [`CollectorMetrics::limit_pod_gpus`]).
    pods_omitted: usize,
}

impl ViewCollector {
    fn rows(&self, now: Instant) -> ViewRows {
        let index = self.pods.index();
        let max = self.metrics.pod_gpus.load(Ordering::Relaxed);
        self.cluster.read(|v| {
            let mut pods = Vec::new();
            let mut pods_omitted = 0;
            let agents = v
                .nodes
                .iter()
                .filter(|n| !n.retired)
                .map(|n| {
                    let age = n.received.map(|r| now.saturating_duration_since(r));
                    let node = n
                        .snapshot
                        .as_ref()
                        .map(|s| s.node_name.clone())
                        .unwrap_or_default();
                    let fresh = n.connected
                        && n.refused.is_none()
                        && v.conflict(&node).is_none()
                        && age.is_some_and(|a| a <= POD_VALUES_FRESH);
                    if let (true, Some(snap)) = (fresh, &n.snapshot) {
                        for p in &snap.pods {
                            let Some(meta) = index.by_uid.get(&p.pod_uid) else {
                                continue;
                            };
                            let Some(gpu) = snap.gpus.iter().find(|g| g.uuid == p.gpu_uuid) else {
                                continue;
                            };
                            let mut values = [None; POD_METRICS.len()];
                            for m in &p.metrics {
                                if let (Some(i), Some(value)) = (
                                    POD_METRICS
                                        .iter()
                                        .position(|p| Some(*p) == m.vocab_metric()),
                                    m.last.filter(|v| v.is_finite()),
                                ) {
                                    values[i] = Some(value);
                                }
                            }
                            if values.iter().all(Option::is_none) {
                                continue;
                            }
                            if pods.len() >= max {
                                pods_omitted += 1;
                                continue;
                            }
                            pods.push((
                                vec![
                                    ("namespace", meta.namespace.clone()),
                                    ("pod", meta.name.clone()),
                                    ("node", node.clone()),
                                    ("gpu", gpu.index.to_string()),
                                ],
                                values,
                            ));
                        }
                    }
                    AgentRow {
                        labels: vec![("address", n.address.clone()), ("node", node)],
                        connected: n.connected,
                        age: age.map(|a| a.as_secs_f64()),
                        reconnects: u64::from(n.reconnects),
                        refused: n.refused_total,
                    }
                })
                .collect();
            ViewRows {
                agents,
                pods,
                pods_omitted,
            }
        })
    }
}

impl Collector for ViewCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        let rows = self.rows(now);
        gauge_family(
            &mut encoder,
            "gpuscale_collector_agent_connected",
            "1 while the collector holds a snapshot stream open to the agent, else 0",
            rows.agents
                .iter()
                .map(|a| (a.labels.clone(), i64::from(a.connected))),
        )?;
        gauge_family(
            &mut encoder,
            "gpuscale_collector_agent_snapshot_age_seconds",
            "Time since the agent's newest snapshot arrived; absent before the first",
            rows.agents
                .iter()
                .filter_map(|a| a.age.map(|age| (a.labels.clone(), age))),
        )?;
        counter_family(
            &mut encoder,
            "gpuscale_collector_agent_reconnects",
            "Times the snapshot stream to the agent was lost and retried",
            rows.agents.iter().map(|a| (a.labels.clone(), a.reconnects)),
        )?;
        counter_family(
            &mut encoder,
            "gpuscale_collector_pod_source_refused",
            "Versions of the pod source refused (a --pods-file that no longer parses, has a \
             duplicate UID or a non-string label); the last good list stays in use and /readyz \
             fails until a good one",
            [(Labels::new(), self.pods.health().refused_total)],
        )?;
        counter_family(
            &mut encoder,
            "gpuscale_collector_agent_snapshots_refused",
            "Snapshots from the agent refused as invalid (NaN, out-of-range values, a GPU or pod \
             listed twice, oversized names); the reason is logged and in dump",
            rows.agents.iter().map(|a| (a.labels.clone(), a.refused)),
        )?;
        let over = rows.pods_omitted > 0;
        if over && !self.metrics.pod_gpus_over.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                exported = rows.pods.len(),
                omitted = rows.pods_omitted,
                "/metrics exports per-pod series for the first {} (pod, GPU) pairs only \
                 (--metrics-pod-gpus); read the others from their agents' gpuscale_pod_gpu_* \
                 series, or raise the limit",
                rows.pods.len()
            );
        } else if !over {
            self.metrics.pod_gpus_over.store(false, Ordering::Relaxed);
        }
        gauge_family(
            &mut encoder,
            "gpuscale_collector_pod_gpu_omitted",
            "(pod, GPU) pairs with values whose per-pod series this scrape left out \
             (over --metrics-pod-gpus)",
            [(Labels::new(), rows.pods_omitted as i64)],
        )?;
        for (i, name) in POD_METRICS.iter().enumerate() {
            let series = rows
                .pods
                .iter()
                .filter_map(|(labels, values)| Some((labels.clone(), values[i]?)));
            gauge_family(
                &mut encoder,
                &format!("gpuscale_collector_pod_gpu_{name}"),
                &format!(
                    "The pod's {name} on the GPU in its agent's newest snapshot (the agent's \
                     attribution); absent when not measured, when the agent's snapshot is older \
                     than 10s, or when the pod source does not know the pod"
                ),
                series,
            )?;
        }
        let scaled: Vec<(Labels, f64)> = {
            let map = self
                .metrics
                .scaled_objects
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = map
                .iter()
                .filter(|(_, (_, at))| now.saturating_duration_since(*at) < SCALED_OBJECT_FORGET)
                .filter_map(|((ns, name, metric), (value, _))| {
                    value.map(|value| {
                        (
                            vec![
                                ("namespace", ns.clone()),
                                ("scaledobject", name.clone()),
                                ("metric", metric.clone()),
                            ],
                            value,
                        )
                    })
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        gauge_family(
            &mut encoder,
            "gpuscale_collector_scaledobject_value",
            "The value GetMetrics last answered KEDA for the ScaledObject's trigger (metric: \
             the name KEDA sees); absent after an error answer and 10 minutes after the last \
             request",
            scaled,
        )?;
        Ok(())
    }
}

/// The RPC of an ExternalScaler request path, from a fixed set (bounded label values).
fn rpc_name(path: &str) -> &'static str {
    match path.rsplit('/').next().unwrap_or_default() {
        "IsActive" => "IsActive",
        "StreamIsActive" => "StreamIsActive",
        "GetMetricSpec" => "GetMetricSpec",
        "GetMetrics" => "GetMetrics",
        _ => "other",
    }
}

/// gRPC's canonical name of a status code (`OK`, `INVALID_ARGUMENT`, `UNAVAILABLE`, …).
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// The `grpc-status` of a header or trailer map, if it has one.
fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let v = headers.get("grpc-status")?;
    Some(code_name(v.to_str().ok()?.trim().parse().ok()?))
}

/// One request in flight; records itself once, when its status is known.
struct InFlight {
    metrics: Arc<CollectorMetrics>,
    rpc: &'static str,
    started: Instant,
}

impl InFlight {
    fn finish(self, code: &'static str) {
        self.metrics
            .observe_keda_request(self.rpc, code, self.started.elapsed().as_secs_f64());
    }
}

/// A response body that records its request when the `grpc-status` trailer passes (or as
/// `CANCELLED` when the client hangs up first).
struct MeteredBody {
    inner: tonic::body::Body,
    request: Option<InFlight>,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| grpc_status(t).unwrap_or("UNKNOWN")),
            Poll::Ready(Some(Err(status))) => Some(code_name(status.code() as i32)),
            // The body ended without trailers: gRPC calls that a missing status.
            Poll::Ready(None) => Some("UNKNOWN"),
            Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(r) = self.request.take() {
                r.finish(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(r) = self.request.take() {
            r.finish("CANCELLED");
        }
    }
}

/// A tower service around a gRPC service (the ExternalScaler) that counts and times every
/// request by RPC and gRPC status in [`CollectorMetrics`]. Applied in `serve` with
/// [`KedaMetrics::new`]; it answers to the wrapped service's name.
#[derive(Clone)]
pub struct KedaMetrics<S> {
    inner: S,
    metrics: Arc<CollectorMetrics>,
}

impl<S> KedaMetrics<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, metrics: Arc<CollectorMetrics>) -> Self {
        KedaMetrics { inner, metrics }
    }
}

impl<S: NamedService> NamedService for KedaMetrics<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for KedaMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request_in_flight = InFlight {
            metrics: self.metrics.clone(),
            rpc: rpc_name(request.uri().path()),
            started: Instant::now(),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // An error before any message comes "trailers-only": the status is a header.
            if let Some(code) = grpc_status(response.headers()) {
                request_in_flight.finish(code);
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let body = MeteredBody {
                inner: body,
                request: Some(request_in_flight),
            };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::pods::{PodIndex, PodMeta};
    use proto::agent::{GpuSummary, MetricSummary, NodeSnapshot, PodSummary};

    struct Pods(Arc<PodIndex>);

    impl PodSource for Pods {
        fn index(&self) -> Arc<PodIndex> {
            self.0.clone()
        }
        fn describe(&self) -> String {
            "test pods".into()
        }
    }

    /// A pod as the pods file gives it (so new `PodMeta` fields need no change here).
    fn pod(ns: &str, name: &str, uid: &str) -> PodMeta {
        let list = serde_json::json!({"kind": "PodList", "items": [{
            "metadata": {"namespace": ns, "name": name, "uid": uid},
            "spec": {"nodeName": "n0"}, "status": {"phase": "Running"}}]});
        crate::sources::pods::parse_pod_list(std::path::Path::new("test.json"), &list.to_string())
            .unwrap()
            .remove(0)
    }

    fn metric(name: &str, last: Option<f64>) -> MetricSummary {
        MetricSummary {
            metric: proto::agent::Metric::named(name).unwrap() as i32,
            last,
            windows: vec![],
        }
    }

    fn snapshot() -> NodeSnapshot {
        NodeSnapshot {
            node_name: "n0".into(),
            gpus: vec![GpuSummary {
                index: 3,
                uuid: "GPU-3".into(),
                ..Default::default()
            }],
            pods: vec![
                PodSummary {
                    pod_uid: "uid-a".into(),
                    gpu_uuid: "GPU-3".into(),
                    metrics: vec![metric("sm_active", Some(42.0)), metric("gpu_util", None)],
                    ..Default::default()
                },
                PodSummary {
                    pod_uid: "uid-unknown".into(),
                    gpu_uuid: "GPU-3".into(),
                    metrics: vec![metric("sm_active", Some(7.0))],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn setup() -> (Arc<CollectorMetrics>, Arc<Cluster>, Registry) {
        let cluster = Arc::new(Cluster::new(&[
            "10.0.0.1:7701".into(),
            "10.0.0.2:7701".into(),
        ]));
        let pods: Arc<dyn PodSource> = Arc::new(Pods(Arc::new(PodIndex::new(
            1,
            vec![pod("ml", "vllm-0", "uid-a")],
        ))));
        let m = Arc::new(CollectorMetrics::default());
        let r = m.registry(cluster.clone(), pods);
        (m, cluster, r)
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn agent_freshness_and_named_pod_values_come_from_the_view() {
        let (_, cluster, r) = setup();
        cluster.write(|v| {
            v.nodes[0].connected = true;
            v.update(0, snapshot(), Instant::now());
            v.nodes[1].reconnects = 4;
        });
        let t = gpuscale_health::encode(&r).unwrap();
        let a0 = r#"{address="10.0.0.1:7701",node="n0"}"#;
        let a1 = r#"{address="10.0.0.2:7701",node=""}"#;
        assert_eq!(
            value(&t, &format!("gpuscale_collector_agent_connected{a0}")),
            Some(1.0)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_collector_agent_connected{a1}")),
            Some(0.0)
        );
        assert!(value(
            &t,
            &format!("gpuscale_collector_agent_snapshot_age_seconds{a0}")
        )
        .is_some());
        assert_eq!(
            value(
                &t,
                &format!("gpuscale_collector_agent_snapshot_age_seconds{a1}")
            ),
            None,
            "no snapshot yet: no age, not 0"
        );
        assert_eq!(
            value(
                &t,
                &format!("gpuscale_collector_agent_reconnects_total{a1}")
            ),
            Some(4.0)
        );
        let p = r#"{namespace="ml",pod="vllm-0",node="n0",gpu="3"}"#;
        assert_eq!(
            value(&t, &format!("gpuscale_collector_pod_gpu_sm_active{p}")),
            Some(42.0)
        );
        assert!(
            !t.contains("gpuscale_collector_pod_gpu_gpu_util{"),
            "unmeasured: absent\n{t}"
        );
        assert_eq!(
            t.matches("gpuscale_collector_pod_gpu_sm_active{").count(),
            1,
            "unknown pods are left out\n{t}"
        );
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("gpuscale_collector_"), "{line}");
        }
    }

    #[test]
    fn per_pod_series_stop_at_the_limit_and_the_rest_are_counted() {
        let cluster = Arc::new(Cluster::new(&["10.0.0.1:7701".into()]));
        let pods: Arc<dyn PodSource> = Arc::new(Pods(Arc::new(PodIndex::new(
            1,
            vec![
                pod("ml", "vllm-0", "uid-a"),
                pod("ml", "vllm-1", "uid-unknown"),
            ],
        ))));
        let m = Arc::new(CollectorMetrics::default());
        let r = m.registry(cluster.clone(), pods);
        cluster.write(|v| {
            v.nodes[0].connected = true;
            v.update(0, snapshot(), Instant::now());
        });
        let exported = |t: &str| t.matches("gpuscale_collector_pod_gpu_sm_active{").count();
        let omitted = |t: &str| value(t, "gpuscale_collector_pod_gpu_omitted");
        let t = gpuscale_health::encode(&r).unwrap();
        assert_eq!((exported(&t), omitted(&t)), (2, Some(0.0)), "{t}");
        m.limit_pod_gpus(1);
        let t = gpuscale_health::encode(&r).unwrap();
        assert_eq!((exported(&t), omitted(&t)), (1, Some(1.0)), "{t}");
        m.limit_pod_gpus(0);
        let t = gpuscale_health::encode(&r).unwrap();
        assert_eq!((exported(&t), omitted(&t)), (0, Some(2.0)), "{t}");
    }

    #[test]
    fn scaled_object_series_stay_bounded_forgetting_the_least_recently_answered() {
        let m = CollectorMetrics::default();
        let n = MAX_SCALED_OBJECT_SERIES + 500;
        for i in 0..n {
            m.observe_scaled_object(
                "ml",
                &format!("so-{i}"),
                "gpuscale-sm-active-avg-30s-sum",
                1.0,
            );
        }
        let map = m.scaled_objects.lock().unwrap();
        assert!(map.len() <= MAX_SCALED_OBJECT_SERIES, "{}", map.len());
        assert!(
            map.len() >= MAX_SCALED_OBJECT_SERIES * 8 / 10,
            "{}",
            map.len()
        );
        let newest = (
            "ml".to_owned(),
            format!("so-{}", n - 1),
            "gpuscale-sm-active-avg-30s-sum".to_owned(),
        );
        assert!(map.contains_key(&newest), "the newest answer is kept");
        let oldest = (
            "ml".to_owned(),
            "so-0".to_owned(),
            "gpuscale-sm-active-avg-30s-sum".to_owned(),
        );
        assert!(
            !map.contains_key(&oldest),
            "the least recently answered goes first"
        );
    }

    #[test]
    fn a_refused_snapshot_is_counted_and_hides_the_nodes_pod_values() {
        let (_, cluster, r) = setup();
        cluster.write(|v| {
            v.nodes[0].connected = true;
            v.update(0, snapshot(), Instant::now());
            v.refuse(
                0,
                "GPU \"GPU-3\" sm_active last is NaN: not a finite number".into(),
            );
            v.refuse(0, "again".into());
        });
        let t = gpuscale_health::encode(&r).unwrap();
        let a0 = r#"{address="10.0.0.1:7701",node="n0"}"#;
        assert_eq!(
            value(
                &t,
                &format!("gpuscale_collector_agent_snapshots_refused_total{a0}")
            ),
            Some(2.0)
        );
        assert!(
            !t.contains("gpuscale_collector_pod_gpu_sm_active{"),
            "values from a node whose newest snapshot was refused are not presented\n{t}"
        );
        // A good snapshot brings them back; the counter keeps its count.
        cluster.write(|v| v.update(0, snapshot(), Instant::now()));
        let t = gpuscale_health::encode(&r).unwrap();
        assert!(t.contains("gpuscale_collector_pod_gpu_sm_active{"), "{t}");
        assert_eq!(
            value(
                &t,
                &format!("gpuscale_collector_agent_snapshots_refused_total{a0}")
            ),
            Some(2.0)
        );
    }

    #[test]
    fn pod_values_of_a_stale_or_disconnected_agent_are_absent() {
        let (m, cluster, r) = setup();
        let c = ViewCollector {
            metrics: m,
            cluster: cluster.clone(),
            pods: Arc::new(Pods(Arc::new(PodIndex::new(
                1,
                vec![pod("ml", "vllm-0", "uid-a")],
            )))),
        };
        cluster.write(|v| {
            v.nodes[0].connected = true;
            v.update(0, snapshot(), Instant::now());
        });
        let rows = c.rows(Instant::now());
        assert_eq!(rows.pods.len(), 1);
        assert!(rows.pods[0].1[0].is_some(), "sm_active");
        assert!(c
            .rows(Instant::now() + Duration::from_secs(11))
            .pods
            .is_empty());
        cluster.write(|v| v.nodes[0].connected = false);
        assert!(c.rows(Instant::now()).pods.is_empty());
        assert!(gpuscale_health::encode(&r)
            .unwrap()
            .contains("gpuscale_collector_pod_gpu_sm_active gauge"));
    }

    #[test]
    fn scaled_object_values_show_the_last_answer_and_vanish_after_an_error() {
        let (m, _, r) = setup();
        m.observe_scaled_object("ml", "vllm", "gpuscale-sm-active-avg-30s-sum", 61.5);
        let s = r#"gpuscale_collector_scaledobject_value{namespace="ml",scaledobject="vllm",metric="gpuscale-sm-active-avg-30s-sum"}"#;
        assert_eq!(value(&gpuscale_health::encode(&r).unwrap(), s), Some(61.5));
        m.scaled_object_unavailable("ml", "vllm", "gpuscale-sm-active-avg-30s-sum");
        assert_eq!(value(&gpuscale_health::encode(&r).unwrap(), s), None);
        m.observe_scaled_object("ml", "vllm", "gpuscale-sm-active-avg-30s-sum", f64::NAN);
        assert_eq!(
            value(&gpuscale_health::encode(&r).unwrap(), s),
            None,
            "NaN is not a value"
        );
    }

    #[test]
    fn keda_requests_are_counted_by_rpc_and_status() {
        let (m, _, r) = setup();
        m.observe_keda_request(
            rpc_name("/externalscaler.ExternalScaler/GetMetrics"),
            "OK",
            0.0002,
        );
        m.observe_keda_request(
            rpc_name("/externalscaler.ExternalScaler/GetMetrics"),
            code_name(14),
            0.0003,
        );
        m.observe_keda_request(
            rpc_name("/externalscaler.ExternalScaler/Nope"),
            code_name(12),
            0.0,
        );
        let t = gpuscale_health::encode(&r).unwrap();
        assert_eq!(
            value(
                &t,
                r#"gpuscale_collector_keda_requests_total{rpc="GetMetrics",code="OK"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_collector_keda_requests_total{rpc="GetMetrics",code="UNAVAILABLE"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_collector_keda_requests_total{rpc="other",code="UNIMPLEMENTED"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_collector_keda_request_duration_seconds_bucket{rpc="GetMetrics",code="OK",le="0.00025"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_collector_keda_request_duration_seconds_count{rpc="GetMetrics",code="OK"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn the_status_is_read_from_headers_or_trailers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
        assert_eq!(grpc_status(&h), Some("INVALID_ARGUMENT"));
        h.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(grpc_status(&h), Some("UNKNOWN"));
    }
}

#[cfg(test)]
mod layer_tests {
    use super::*;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    /// The layer around a real tonic service (grpc.health.v1 stands in for the scaler: any
    /// tonic service has the same response shapes), over a real socket.
    #[test]
    fn the_layer_counts_ok_answers_from_trailers_and_errors_from_headers() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let metrics = Arc::new(CollectorMetrics::default());
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("known", tonic_health::ServingStatus::Serving)
                .await;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(KedaMetrics::new(health, metrics.clone()))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            let channel = crate::endpoint(&addr.to_string())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = HealthClient::new(channel);
            let check = |s: &str| HealthCheckRequest { service: s.into() };
            client.check(check("known")).await.unwrap();
            client.check(check("known")).await.unwrap();
            let e = client.check(check("unknown")).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound);
            let count = |code| {
                metrics
                    .requests
                    .get(&[("rpc", "other"), ("code", code)])
                    .map(|c| c.get())
            };
            assert_eq!(count("NOT_FOUND"), Some(1));
            assert_eq!(count("OK"), Some(2));
        });
    }
}
