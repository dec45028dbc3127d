//! KEDA's external-scaler gRPC service (`externalscaler.ExternalScaler`): `GetMetricSpec`,
//! `GetMetrics`, `IsActive` and `StreamIsActive`, answered from memory only (never network,
//! never NVML), one tracing span per request.
//!
//! Each distinct trigger metadata is parsed once ([`CompiledTriggers`]); a target's selector is
//! parsed where it is read ([`Targets`]).
//!
//! Errors: bad trigger metadata → `INVALID_ARGUMENT` naming the key and the accepted values;
//! data that cannot be trusted → `UNAVAILABLE` naming the nodes, so KEDA's `fallback` acts.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proto::externalscaler::external_scaler_server::ExternalScaler;
use proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::limits;
use crate::api::metrics::CollectorMetrics;
use crate::model::compiled::CompiledTriggers;
use crate::model::evaluate::{
    evaluate_located, locate, opened_within, Detail, Evaluation, Located, Unavailable,
};
use crate::model::selector::Selector;
use crate::model::trigger::Trigger;
use crate::sources::demand::{Demand, FIRST_READ_WITHIN};
use crate::sources::pods::{PodMeta, PodSource};
use crate::sources::view::{Cluster, View};

type Matches = Arc<Vec<Arc<PodMeta>>>;

/// The pods a selector matched in one version of the pod list, and where they were last found
/// in the view.
struct Selection {
    version: u64,
    pods: Matches,
    located: Mutex<Option<Arc<Located>>>,
}

impl Selection {
    /// Where the pods are in `view`: found again only when the view's indexes changed since.
    fn located(&self, view: &View) -> Arc<Located> {
        let last = self
            .located
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match last {
            Some(l) if l.structure == view.structure => l,
            _ => {
                let l = Arc::new(locate(view, &self.pods));
                *self.located.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.clone());
                l
            }
        }
    }
}

/// `StreamIsActive` re-evaluates at most this often.
const STREAM_MIN_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);
/// How often a `StreamIsActive` stream looks again with no change in the view when time alone
/// may change its answer: with `activeAfterOpen` (an open ages past it), or after a look that
/// found no answer (a node stale then may be fresh again with the same data: agents'
/// heartbeats wake nobody).
const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the pod selector of a trigger without `podSelector` comes from: the ScaledObject's
/// target (in-cluster mode). Answers from memory.
pub trait Targets: Send + Sync {
    /// The pod selector of the target of ScaledObject `namespace/scaled_object`, parsed once
    /// when the target was read (a selector that does not parse is [`TargetError::Invalid`]).
    fn selector(&self, namespace: &str, scaled_object: &str) -> Result<Arc<Selector>, TargetError>;
}

/// Why a target's selector is not known.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetError {
    /// The ScaledObject or its target is wrong (missing, no selector): `INVALID_ARGUMENT`.
    Invalid(String),
    /// Not known yet or not readable now: `UNAVAILABLE`, so KEDA's fallback acts.
    Unavailable(String),
}

impl From<TargetError> for Status {
    fn from(e: TargetError) -> Status {
        match e {
            TargetError::Invalid(why) => Status::invalid_argument(why),
            TargetError::Unavailable(why) => Status::unavailable(why),
        }
    }
}

/// Most (namespace, selector) pairs whose matched pods are cached (one per distinct trigger
/// selector in use; the cache restarts empty when full).
const MAX_SELECTIONS: usize = 1024;
/// Most matched pods the cached selections hold together (about 70 bytes each with where
/// they are in the view, so at most about 70 MiB): a thousand ScaledObjects of 80 pods each
/// hold 80,000; ScaledObjects whose selectors each match a whole namespace of 100,000 pods
/// cannot make the cache hold more than ten of them (it restarts empty).
const MAX_SELECTED_PODS: usize = 1_000_000;

/// The cached selections, bounded in number and in the pods they hold together.
#[derive(Default)]
struct Selections {
    by_key: HashMap<(String, String), Arc<Selection>>,
    pods: usize,
}

impl Selections {
    /// Caches `selection` under `key`, first emptying the cache when it would hold more than
    /// `max` selections or `max_pods` matched pods (one selection alone may hold more: it is
    /// the answer being computed).
    fn insert(
        &mut self,
        key: (String, String),
        selection: Arc<Selection>,
        max: usize,
        max_pods: usize,
    ) {
        let n = selection.pods.len();
        // A new pod list's selection replaces the key's old one, and its pods.
        if let Some(old) = self.by_key.remove(&key) {
            self.pods -= old.pods.len();
        }
        if self.by_key.len() >= max || self.pods.saturating_add(n) > max_pods {
            self.by_key.clear();
            self.pods = 0;
        }
        self.by_key.insert(key, selection);
        self.pods += n;
    }
}

/// What a `StreamIsActive` stream's last evaluation read ([`Scaler::moved`]): the pod list's
/// version, the view's indexes, and the generation of each node its pods are on.
#[derive(Debug)]
struct Seen {
    /// The selector (in-cluster, the ScaledObject's target's may change).
    selector: Arc<Selector>,
    pods: u64,
    structure: u64,
    nodes: Vec<(usize, u64)>,
}

/// The KEDA-facing service.
pub struct Scaler {
    cluster: Arc<Cluster>,
    pods: Arc<dyn PodSource>,
    targets: Option<Arc<dyn Targets>>,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Where `GetMetrics` answers are recorded for `/metrics`, when served.
    metrics: std::sync::OnceLock<Arc<CollectorMetrics>>,
    /// Parsed triggers by metadata.
    triggers: CompiledTriggers,
    /// (namespace, selector) → the pods it matched in the newest pod list asked about.
    selections: Mutex<Selections>,
    /// The series of the triggers asked for, which the agent streams carry.
    demand: Arc<Demand>,
}

/// Why an evaluation has no answer: the status for KEDA, and whether it may come once the
/// agents stream the series just asked for.
struct Failure {
    status: Status,
    not_streamed: bool,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Failure {
        Failure {
            status,
            not_streamed: false,
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

impl Scaler {
    /// A scaler over `cluster` with pod metadata from `pods` and, in-cluster, the selectors of
    /// ScaledObjects' targets from `targets`, recording the triggers asked for in `demand`;
    /// open streams end when `stop` turns true (so a graceful shutdown does not wait for KEDA
    /// to hang up).
    pub fn new(
        cluster: Arc<Cluster>,
        pods: Arc<dyn PodSource>,
        targets: Option<Arc<dyn Targets>>,
        demand: Arc<Demand>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Scaler {
        Scaler {
            cluster,
            pods,
            targets,
            stop,
            metrics: std::sync::OnceLock::new(),
            triggers: CompiledTriggers::default(),
            selections: Mutex::default(),
            demand,
        }
    }

    /// The series KEDA's triggers read, for the agent streams to ask for.
    pub fn demand(&self) -> Arc<Demand> {
        self.demand.clone()
    }

    /// Records every `GetMetrics` answer in `metrics` (the per-ScaledObject value series).
    pub fn observe_with(&self, metrics: Arc<CollectorMetrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The parsed trigger of `r` (from the cache when its metadata was seen before), recorded
    /// as asked for (its series stream, see [`Demand`]); bad metadata is `INVALID_ARGUMENT`
    /// naming the key.
    fn compiled(&self, r: &ScaledObjectRef) -> Result<Arc<Trigger>, Status> {
        limits::check(r)?;
        let trigger = self.triggers.get(&r.scaler_metadata).map_err(invalid)?;
        self.demand.asked(&trigger, Instant::now());
        Ok(trigger)
    }

    /// `f`'s answer, waiting up to [`FIRST_READ_WITHIN`] while its only trouble is series not
    /// streamed yet (a trigger's first call: its agents were asked for them a moment ago).
    async fn settled<T>(&self, mut f: impl FnMut() -> Result<T, Failure>) -> Result<T, Status> {
        let deadline = tokio::time::Instant::now() + FIRST_READ_WITHIN;
        let mut changes = self.cluster.subscribe();
        loop {
            changes.borrow_and_update();
            match f() {
                Err(e) if e.not_streamed && tokio::time::Instant::now() < deadline => {
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                other => return other.map_err(|e| e.status),
            }
        }
    }

    /// [`Scaler::value`], waiting for series just asked for ([`Scaler::settled`]).
    pub async fn value_settled(
        &self,
        r: &ScaledObjectRef,
        detail: Detail,
    ) -> Result<(Arc<Trigger>, Evaluation), Status> {
        let trigger = self.compiled(r)?;
        self.settled(|| self.evaluate_with(r, &trigger, detail))
            .await
            .map(|(_, eval)| (trigger.clone(), eval))
    }

    /// The parsed triggers, for tests and benchmarks: how many are cached and parses ran.
    pub fn triggers(&self) -> &CompiledTriggers {
        &self.triggers
    }

    /// Records `GetMetrics`'s answer for `r`: its value, or none after an error (public for the
    /// benchmarks, which measure what `GetMetrics` keeps).
    pub fn observe(
        &self,
        r: &ScaledObjectRef,
        answer: &Result<(Arc<Trigger>, Evaluation), Status>,
    ) {
        let Some(m) = self.metrics.get() else { return };
        match answer {
            Ok((t, eval)) => {
                m.observe_scaled_object(&r.namespace, &r.name, &t.metric_name(), eval.value)
            }
            Err(_) => {
                if let Ok(t) = self.compiled(r) {
                    m.scaled_object_unavailable(&r.namespace, &r.name, &t.metric_name());
                }
            }
        }
    }

    /// The trigger of `r` and its pod selector: `podSelector`, else (in-cluster) the selector
    /// of the ScaledObject's target.
    fn trigger(&self, r: &ScaledObjectRef) -> Result<(Arc<Trigger>, Arc<Selector>), Status> {
        let t = self.compiled(r)?;
        let selector = self.selector(r, &t)?;
        Ok((t, selector))
    }

    /// The pod selector of `r`'s parsed trigger `t`: `podSelector`, else (in-cluster) the
    /// selector of the ScaledObject's target, which may change, so it is read each time.
    fn selector(&self, r: &ScaledObjectRef, t: &Trigger) -> Result<Arc<Selector>, Status> {
        match (&t.pod_selector, &self.targets) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(targets)) => Ok(targets.selector(&r.namespace, &r.name)?),
            (None, None) => Err(invalid(Trigger::selector_required())),
        }
    }

    /// `UNAVAILABLE` when the pod list cannot be trusted for `trigger`: never listed, or out of
    /// contact for longer than its `staleAfter`.
    fn check_pods(&self, trigger: &Trigger) -> Result<(), Status> {
        let h = self.pods.health();
        if let Some(why) = h.unsynced {
            return Err(Status::unavailable(why));
        }
        match h.out_of_contact {
            Some((d, why)) if d > trigger.stale_after => Err(Status::unavailable(format!(
                "pod metadata is stale: out of contact for {:.1}s (staleAfter {:?}): {why}",
                d.as_secs_f64(),
                trigger.stale_after
            ))),
            _ => Ok(()),
        }
    }

    /// The pods of `namespace` that `selector` matches, cached per pod-list version.
    fn matches(&self, namespace: &str, selector: &Selector) -> Arc<Selection> {
        let index = self.pods.index();
        let key = (namespace.to_owned(), selector.to_string());
        let mut cache = self.selections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.by_key.get(&key) {
            if s.version == index.version {
                return s.clone();
            }
        }
        let matched: Matches = Arc::new(
            index
                .by_namespace
                .get(namespace)
                .into_iter()
                .flatten()
                .filter(|p| selector.matches(&p.labels))
                .cloned()
                .collect(),
        );
        let selection = Arc::new(Selection {
            version: index.version,
            pods: matched,
            located: Mutex::new(None),
        });
        // Bounded: each key holds a selector of at most the metadata limit (16 KiB).
        cache.insert(key, selection.clone(), MAX_SELECTIONS, MAX_SELECTED_PODS);
        selection
    }

    /// Evaluates the trigger of `r` now, keeping `detail`.
    pub fn value(
        &self,
        r: &ScaledObjectRef,
        detail: Detail,
    ) -> Result<(Arc<Trigger>, Evaluation), Status> {
        let trigger = self.compiled(r)?;
        let (_, eval) = self
            .evaluate_with(r, &trigger, detail)
            .map_err(|e| e.status)?;
        Ok((trigger, eval))
    }

    /// [`Scaler::evaluate`] of an already parsed trigger (a stream holds its trigger for life).
    fn evaluate_with(
        &self,
        r: &ScaledObjectRef,
        trigger: &Trigger,
        detail: Detail,
    ) -> Result<(Matches, Evaluation), Failure> {
        let selector = self.selector(r, trigger)?;
        self.check_pods(trigger)?;
        let selection = self.matches(&r.namespace, &selector);
        let now = Instant::now();
        let eval = self
            .cluster
            .read(|v| {
                let located = selection.located(v);
                evaluate_located(v, &selection.pods, &located, trigger, now, detail)
            })
            .map_err(|u: Unavailable| Failure {
                status: Status::unavailable(format!(
                    "{}/{} {}: {u}",
                    r.namespace,
                    r.name,
                    trigger.metric.name()
                )),
                not_streamed: u.not_streamed,
            })?;
        Ok((selection.pods.clone(), eval))
    }

    /// `IsActive`: the value is above `activationThreshold`, or (with `activeAfterOpen`) a
    /// matched pod opened a GPU recently, so a replica still loading its model is not scaled
    /// to zero.
    async fn active(&self, r: &ScaledObjectRef) -> Result<bool, Status> {
        let trigger = self.compiled(r)?;
        self.settled(|| self.active_with(r, &trigger)).await
    }

    /// Whether an evaluation of `trigger` may answer differently from the one `seen` records
    /// (and records this one): the selector, the pod list or the view's indexes changed, or a
    /// node of its pods did. Cheap while nothing moved: no hashing, no allocation, only each node's
    /// generation read. Time passing is not seen here (see [`STREAM_RECHECK`]).
    fn moved(&self, r: &ScaledObjectRef, trigger: &Trigger, seen: &mut Option<Seen>) -> bool {
        let pods = self.pods.index().version;
        let Ok(selector) = self.selector(r, trigger) else {
            *seen = None;
            return true;
        };
        if let Some(s) = seen.as_mut() {
            let same = self.cluster.read(|v| {
                s.pods == pods
                    && *s.selector == *selector
                    && s.structure == v.structure
                    && s.nodes
                        .iter()
                        .all(|&(n, g)| v.nodes.get(n).is_some_and(|n| n.generation == g))
            });
            if same {
                return false;
            }
        }
        let selection = self.matches(&r.namespace, &selector);
        *seen = Some(self.cluster.read(|v| {
            let mut nodes: Vec<(usize, u64)> = selection
                .located(v)
                .nodes()
                .map(|n| (n, v.nodes[n].generation))
                .collect();
            nodes.sort_unstable();
            nodes.dedup();
            Seen {
                selector,
                pods,
                structure: v.structure,
                nodes,
            }
        }));
        true
    }

    /// [`Scaler::active`] of an already parsed trigger.
    fn active_with(&self, r: &ScaledObjectRef, trigger: &Trigger) -> Result<bool, Failure> {
        let (matched, eval) = self.evaluate_with(r, trigger, Detail::Value)?;
        if eval.value > trigger.activation_threshold {
            return Ok(true);
        }
        let now = Instant::now();
        Ok(self
            .cluster
            .read(|v| opened_within(v, &matched, trigger.active_after_open, now)))
    }
}

fn span(rpc: &'static str, r: &ScaledObjectRef) -> tracing::Span {
    tracing::info_span!("keda", rpc, scaled_object = %limits::display(r))
}

fn log_result<T>(result: &Result<T, Status>) {
    if let Err(s) = result {
        tracing::warn!(code = ?s.code(), message = s.message(), "request failed");
    }
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

/// The tonic service around a shared [`Scaler`].
#[derive(Clone)]
pub struct ScalerService(pub Arc<Scaler>);

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let r = request.into_inner();
        let span = span("IsActive", &r);
        let result = self.0.active(&r).instrument(span.clone()).await;
        let _g = span.entered();
        log_result(&result);
        Ok(Response::new(IsActiveResponse { result: result? }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let r = request.into_inner();
        let span = span("StreamIsActive", &r);
        // Bad metadata fails the call at once; missing data just waits for data. The trigger is
        // held for the stream's life (its metadata cannot change on a stream).
        let trigger = self.0.compiled(&r)?;
        if let Err(s) = self.0.selector(&r, &trigger) {
            if s.code() == tonic::Code::InvalidArgument {
                return Err(s);
            }
        }
        let me = self.0.clone();
        let mut changes = self.0.cluster.subscribe();
        let mut stop = self.0.stop.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(
            async move {
                tracing::info!("KEDA subscribed");
                // Its series stream while it is open, however long KEDA goes without a call.
                let _hold = me.demand.hold(&trigger);
                let mut last = None;
                // What the last evaluation read, and whether the timer woke us.
                let mut seen: Option<Seen> = None;
                let mut timed_out = false;
                let mut failed = false;
                loop {
                    // Unless a node of its pods changed, the answer has not either; but an open
                    // ages past activeAfterOpen with time alone, and a node that was stale at
                    // the last look may be fresh again with the same data.
                    let moved = me.moved(&r, &trigger, &mut seen)
                        || (timed_out && (failed || !trigger.active_after_open.is_zero()));
                    let answer = moved.then(|| me.active_with(&r, &trigger).map_err(|e| e.status));
                    if let Some(a) = &answer {
                        failed = a.is_err();
                    }
                    match answer {
                        Some(Ok(active)) if Some(active) != last => {
                            last = Some(active);
                            tracing::info!(active, "activity changed");
                            if tx
                                .send(Ok(IsActiveResponse { result: active }))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                        Some(Ok(_)) | None => {}
                        Some(Err(s)) => tracing::debug!(message = s.message(), "no value yet"),
                    }
                    // Re-evaluate after a change of the view (an agent's new values), at most
                    // every STREAM_MIN_PERIOD: with a thousand agents the view changes thousands
                    // of times a second; and every STREAM_RECHECK regardless.
                    let evaluated = tokio::time::Instant::now();
                    timed_out = false;
                    tokio::select! {
                        changed = changes.changed() => if changed.is_err() { break },
                        _ = tokio::time::sleep(STREAM_RECHECK) => timed_out = true,
                        _ = tx.closed() => break,
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    tokio::time::sleep_until(evaluated + STREAM_MIN_PERIOD).await;
                    changes.borrow_and_update();
                }
                tracing::info!("KEDA stream ended");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let r = request.into_inner();
        let _g = span("GetMetricSpec", &r).entered();
        let result = self.0.trigger(&r);
        log_result(&result);
        let (t, _) = result?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: t.metric_name(),
                target_size: t.target_value.ceil() as i64,
                target_size_float: t.target_value,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let r = req.scaled_object_ref.unwrap_or_default();
        let span = span("GetMetrics", &r);
        limits::check_metric_name(&req.metric_name)?;
        let result = self
            .0
            .value_settled(&r, Detail::Value)
            .instrument(span.clone())
            .await;
        let _g = span.entered();
        log_result(&result);
        self.0.observe(&r, &result);
        let (t, eval) = result?;
        tracing::debug!(value = eval.value, pods = eval.running_pods, "answered");
        let name = if req.metric_name.is_empty() {
            t.metric_name()
        } else {
            req.metric_name
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: name,
                // KEDA reads the float when > 0, else the int: fill both.
                metric_value: eval.value.round() as i64,
                metric_value_float: eval.value,
            }],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::pods::PodIndex;

    struct NoPods;

    impl PodSource for NoPods {
        fn index(&self) -> Arc<crate::sources::pods::PodIndex> {
            Arc::new(PodIndex::default())
        }
        fn describe(&self) -> String {
            "no pods".into()
        }
    }

    fn scaler() -> Scaler {
        let (_, stop) = tokio::sync::watch::channel(false);
        Scaler::new(
            Arc::new(Cluster::new(&[])),
            Arc::new(NoPods),
            None,
            Arc::default(),
            stop,
        )
    }

    fn so(meta: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            namespace: "ml".into(),
            name: "vllm".into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    struct TwoPods;

    impl PodSource for TwoPods {
        fn index(&self) -> Arc<PodIndex> {
            let pod = |name: &str, node: &str| crate::sources::pods::PodMeta {
                namespace: "ml".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
                labels: [("app".to_owned(), "vllm".to_owned())].into(),
                node: node.into(),
                phase: "Running".into(),
                owner: String::new(),
                container_ids: Vec::new(),
            };
            Arc::new(PodIndex::new(1, vec![pod("a", "n0"), pod("b", "n1")]))
        }
        fn describe(&self) -> String {
            "two pods".into()
        }
    }

    #[test]
    fn the_selection_cache_is_bounded_in_selections_and_in_the_pods_they_hold() {
        let selection = |pods: usize| {
            let pod = Arc::new(crate::sources::pods::PodMeta {
                namespace: "ml".into(),
                name: "p".into(),
                uid: "u".into(),
                labels: Default::default(),
                node: "n0".into(),
                phase: "Running".into(),
                owner: String::new(),
                container_ids: Vec::new(),
            });
            Arc::new(Selection {
                version: 1,
                pods: Arc::new(vec![pod; pods]),
                located: Mutex::new(None),
            })
        };
        let key = |k: &str| ("ml".to_owned(), k.to_owned());
        let mut c = Selections::default();
        c.insert(key("a"), selection(40), 3, 100);
        c.insert(key("b"), selection(40), 3, 100);
        assert_eq!((c.by_key.len(), c.pods), (2, 80));
        // The same key again (a new pod list): its old pods are not counted twice.
        c.insert(key("b"), selection(50), 3, 100);
        assert_eq!((c.by_key.len(), c.pods), (2, 90));
        // Past the pods' bound: the cache starts over with the new one.
        c.insert(key("c"), selection(20), 3, 100);
        assert_eq!((c.by_key.len(), c.pods), (1, 20));
        // Past the count: likewise; one selection larger than the bound is still kept.
        c.insert(key("d"), selection(1), 3, 100);
        c.insert(key("e"), selection(1), 3, 100);
        c.insert(key("f"), selection(1), 3, 100);
        assert_eq!((c.by_key.len(), c.pods), (1, 1));
        c.insert(key("g"), selection(500), 3, 100);
        assert_eq!((c.by_key.len(), c.pods), (1, 500));
    }

    /// A scaler over [`TwoPods`] and a view of three agents (none reported yet).
    fn two_pods_on_three_agents() -> (Arc<Cluster>, Scaler) {
        let (_, stop) = tokio::sync::watch::channel(false);
        let cluster = Arc::new(Cluster::new(&["a:1".into(), "b:1".into(), "c:1".into()]));
        let s = Scaler::new(
            cluster.clone(),
            Arc::new(TwoPods),
            None,
            Arc::default(),
            stop,
        );
        (cluster, s)
    }

    #[test]
    fn an_answer_follows_a_pod_to_the_agent_that_reports_its_node_now() {
        use proto::agent::{GpuSummary, MetricSummary, NodeSnapshot, PodSummary};
        let (cluster, s) = two_pods_on_three_agents();
        // Node `name` with pod `uid` at `sm_active` `v` on its only GPU.
        let node = |name: &str, uid: &str, v: f64| NodeSnapshot {
            node_name: name.into(),
            taken_unix_ns: 1,
            gpus: vec![GpuSummary {
                uuid: format!("GPU-{name}"),
                gpm_supported: true,
                ..Default::default()
            }],
            pods: vec![PodSummary {
                pod_uid: uid.into(),
                gpu_uuid: format!("GPU-{name}"),
                metrics: vec![MetricSummary {
                    metric: proto::agent::Metric::SmActive as i32,
                    last: Some(v),
                    windows: vec![],
                }],
                ..Default::default()
            }],
            ..NodeSnapshot::default()
        };
        let now = std::time::Instant::now();
        cluster.write(|v| {
            v.update(0, node("n0", "uid-a", 10.0), now);
            v.update(1, node("n1", "uid-b", 20.0), now);
        });
        let r = so(&[
            ("metric", "sm_active"),
            ("timeAggregation", "last"),
            ("targetValue", "80"),
            ("podSelector", "app=vllm"),
        ]);
        assert_eq!(s.value(&r, Detail::Value).unwrap().1.value, 30.0);
        // New values where the pods were found: read without finding them again.
        cluster.write(|v| v.update(1, node("n1", "uid-b", 25.0), now));
        assert_eq!(s.value(&r, Detail::Value).unwrap().1.value, 35.0);
        // Node n0's agent is replaced by another (a new address): pod a is read there.
        cluster.write(|v| {
            v.retire_node(0);
            v.update(2, node("n0", "uid-a", 40.0), now);
        });
        let (_, e) = s.value(&r, Detail::Full).unwrap();
        assert_eq!(e.value, 65.0);
        assert_eq!(e.replicas[0].gpus[0].gpu_uuid.as_ref(), "GPU-n0");
        assert_eq!(s.value(&r, Detail::Value).unwrap().1.value, 65.0);
    }

    #[test]
    fn a_stream_looks_again_only_when_a_node_of_its_pods_changed() {
        use proto::agent::NodeSnapshot;
        let (cluster, s) = two_pods_on_three_agents();
        let node = |name: &str| NodeSnapshot {
            node_name: name.into(),
            taken_unix_ns: 1,
            ..NodeSnapshot::default()
        };
        let now = std::time::Instant::now();
        cluster.write(|v| {
            v.update(0, node("n0"), now);
            v.update(1, node("n1"), now);
            v.update(2, node("elsewhere"), now);
        });
        let r = so(&[
            ("metric", "sm_active"),
            ("targetValue", "80"),
            ("podSelector", "app=vllm"),
        ]);
        let t = s.compiled(&r).unwrap();
        let mut seen = None;
        assert!(s.moved(&r, &t, &mut seen), "the first look");
        assert!(!s.moved(&r, &t, &mut seen), "nothing changed");
        // Another node's new values, and a heartbeat of one of its own: no need to look.
        cluster.write(|v| v.update(2, node("elsewhere"), now));
        let heartbeat = NodeSnapshot {
            delta: true,
            taken_unix_ns: 2,
            ..node("n0")
        };
        cluster.write_then(|v| v.apply_delta(0, heartbeat, now));
        assert!(!s.moved(&r, &t, &mut seen));
        // New values on a node of its pods: look again, once.
        cluster.write(|v| v.update(1, node("n1"), now));
        assert!(s.moved(&r, &t, &mut seen));
        assert!(!s.moved(&r, &t, &mut seen));
        // Its node's agent gone: look again.
        cluster.write(|v| v.retire_node(0));
        assert!(s.moved(&r, &t, &mut seen));
    }

    #[tokio::test]
    async fn keda_calls_with_the_same_metadata_parse_it_once() {
        let s = scaler();
        let r = so(&[
            ("metric", "sm_active"),
            ("targetValue", "80"),
            ("podSelector", "app=vllm"),
        ]);
        for _ in 0..10 {
            assert_eq!(
                s.value(&r, Detail::Full).unwrap().1.value,
                0.0,
                "no pods match: 0"
            );
            assert!(!s.active(&r).await.unwrap());
            assert_eq!(s.trigger(&r).unwrap().1.to_string(), "app=vllm");
        }
        assert_eq!(s.triggers().parses(), 1);
        assert_eq!(s.triggers().len(), 1);
    }

    #[test]
    fn bad_metadata_gets_the_same_invalid_argument_every_call() {
        let s = scaler();
        let r = so(&[("metric", "sm_active"), ("targetValue", "abc")]);
        let want = Trigger::parse(&r.scaler_metadata).unwrap_err().to_string();
        for _ in 0..3 {
            let e = s.value(&r, Detail::Full).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert_eq!(e.message(), want);
        }
        assert!(s.triggers().is_empty(), "an error is not cached");
        // Without podSelector and without --kube: the error says what to write.
        let r = so(&[("metric", "sm_active"), ("targetValue", "80")]);
        let e = s.value(&r, Detail::Full).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("podSelector is required"), "{e}");
    }
}
