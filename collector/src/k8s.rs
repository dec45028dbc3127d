//! In-cluster mode (`serve --kube`): everything the collector learns from the Kubernetes API.
//!
//! - [`KubePods`]: a watch of every pod (namespace, name, UID, labels, owner, node, phase,
//!   container IDs) behind the same [`PodSource`] interface as `--pods-file`. Until its first
//!   complete list it is unsynced (KEDA gets `UNAVAILABLE`, never a value over no pods); when
//!   the API server is out of contact it keeps serving the last list and says for how long, so
//!   a trigger's `staleAfter` turns it into `UNAVAILABLE`, as for agents.
//! - [`discover_agents`]: a watch of the EndpointSlices of the agents' headless Service
//!   (`--agent-service NAMESPACE/NAME`), feeding the [`Fleet`] as agents join and leave.
//! - [`KubeTargets`]: the pod selector of a ScaledObject's target when a trigger has no
//!   `podSelector`: watches of ScaledObjects (`keda.sh/v1alpha1`), Deployments and
//!   StatefulSets; any other kind through its `/scale` subresource (`status.selector`), read in
//!   the background and refreshed every [`SCALE_REFRESH`]. KEDA calls only read memory.
//!
//! Every watch re-lists after a `410 Gone` and retries with backoff after errors (kube-rs's
//! watcher). Errors are logged once per change of message; RBAC refusals name the verb and the
//! resource to grant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Resource;
use tokio_stream::StreamExt;

use crate::agents::Fleet;
use crate::pods::{pod_from_json, PodIndex, PodMeta, PodSource, SourceHealth};
use crate::scaler::{TargetError, Targets};
use crate::{Error, Result};

/// How often a target read through `/scale` is read again.
pub const SCALE_REFRESH: Duration = Duration::from_secs(30);

/// A client from the in-cluster service account or the kubeconfig (`KUBECONFIG`,
/// `~/.kube/config`); an error says which was tried.
pub async fn client() -> Result<kube::Client> {
    let config = kube::Config::infer().await.map_err(|e| {
        Error::Config(format!(
            "--kube: no Kubernetes API to talk to: not running in a cluster \
             (KUBERNETES_SERVICE_HOST is unset) and no usable kubeconfig (KUBECONFIG or \
             ~/.kube/config): {e}. Run inside the cluster, point KUBECONFIG at a kubeconfig, or \
             use --pods-file and --agents instead"
        ))
    })?;
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| {
        Error::Config(format!(
            "--kube: cannot build a client for the API server {server}: {e}"
        ))
    })?;
    tracing::info!(%server, "using the Kubernetes API");
    Ok(client)
}

/// Whether a watch can be trusted: synced once, and in contact now.
#[derive(Debug, Default)]
struct Contact {
    synced: bool,
    /// Since when the watch has been failing, and why.
    out_since: Option<(Instant, String)>,
}

impl Contact {
    fn ok(&mut self) {
        if self.out_since.take().is_some() {
            tracing::info!("back in contact with the Kubernetes API");
        }
    }

    fn failed(&mut self, why: String) {
        match &mut self.out_since {
            Some((_, last)) if *last == why => {}
            Some((_, last)) => {
                tracing::warn!("{why}");
                *last = why;
            }
            None => {
                tracing::warn!("{why}");
                self.out_since = Some((Instant::now(), why));
            }
        }
    }

    fn health(&self, what: &str) -> SourceHealth {
        let out = self
            .out_since
            .as_ref()
            .map(|(since, why)| (since.elapsed(), why.clone()));
        SourceHealth {
            unsynced: (!self.synced).then(|| match &out {
                Some((_, why)) => format!("{what} not listed from the Kubernetes API yet: {why}"),
                None => format!("{what} not listed from the Kubernetes API yet"),
            }),
            out_of_contact: out,
        }
    }
}

use gpuscale_health::ops::lock;

/// What a watch tells its owner.
enum Change<K> {
    /// The complete list (after the first list and after every re-list).
    Reset(Vec<K>),
    Apply(K),
    Delete(K),
}

/// Explains a watch error; a refusal by RBAC names the verb and resource to grant.
fn explain(e: &watcher::Error, resource: &str, scope: &str) -> String {
    let (verb, err) = match e {
        watcher::Error::InitialListFailed(err) => ("list", err),
        watcher::Error::WatchStartFailed(err) | watcher::Error::WatchFailed(err) => ("watch", err),
        watcher::Error::WatchError(status) => {
            return format!(
                "watching {resource} {scope}: the API server said {} ({})",
                status.message, status.code
            )
        }
        watcher::Error::NoResourceVersion => {
            return format!("watching {resource} {scope}: the list had no resourceVersion")
        }
    };
    match err {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden by RBAC: the collector may not {verb} {resource} {scope}; grant its \
             ServiceAccount get, list and watch on {resource} (docs/INSTALL.md lists the \
             ClusterRole) [API server: {}]",
            status.message
        ),
        other => format!("cannot {verb} {resource} {scope}: {other}"),
    }
}

/// Runs a watch of `api` until the task is dropped, handing changes to `on` and keeping
/// `contact` up to date.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: &str,
    scope: &str,
    contact: &Mutex<Contact>,
    mut on: impl FnMut(Change<K>),
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<Vec<K>> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                lock(contact).ok();
                match event {
                    watcher::Event::Init => listing = Some(Vec::new()),
                    watcher::Event::InitApply(k) => listing.get_or_insert_with(Vec::new).push(k),
                    watcher::Event::InitDone => {
                        let all = listing.take().unwrap_or_default();
                        tracing::info!(resource, scope, objects = all.len(), "listed");
                        on(Change::Reset(all));
                        lock(contact).synced = true;
                    }
                    watcher::Event::Apply(k) => on(Change::Apply(k)),
                    watcher::Event::Delete(k) => on(Change::Delete(k)),
                }
            }
            Err(e) => lock(contact).failed(explain(&e, resource, scope)),
        }
    }
}

/// Pods from the API server, as a [`PodSource`].
pub struct KubePods {
    pods: Mutex<HashMap<String, Arc<PodMeta>>>,
    /// `pods` changed since `index` was built: the next [`PodSource::index`] rebuilds it, so a
    /// burst of pod events costs one rebuild, not one per event.
    dirty: AtomicBool,
    index: RwLock<Arc<PodIndex>>,
    contact: Mutex<Contact>,
}

impl KubePods {
    /// No pods yet, unsynced.
    pub fn new() -> Arc<KubePods> {
        Arc::new(KubePods {
            pods: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            index: RwLock::new(Arc::new(PodIndex::default())),
            contact: Mutex::new(Contact::default()),
        })
    }

    /// Watches every pod of the cluster until the task is dropped.
    pub async fn run(self: Arc<Self>, client: kube::Client) {
        let api: Api<Pod> = Api::all(client);
        follow(
            api,
            watcher::Config::default(),
            "pods",
            "cluster-wide",
            &self.contact,
            |change| self.apply(change),
        )
        .await;
    }

    fn apply(&self, change: Change<Pod>) {
        let meta = |pod: &Pod| -> Option<PodMeta> {
            let json = serde_json::to_value(pod).ok()?;
            pod_from_json(&json)
                .map_err(|why| tracing::debug!(why, "skipping a pod"))
                .ok()
        };
        let mut pods = lock(&self.pods);
        match change {
            Change::Reset(all) => {
                *pods = all
                    .iter()
                    .filter_map(meta)
                    .map(|m| (m.uid.clone(), Arc::new(m)))
                    .collect();
            }
            Change::Apply(pod) => {
                if let Some(m) = meta(&pod) {
                    pods.insert(m.uid.clone(), Arc::new(m));
                }
            }
            Change::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    pods.remove(uid);
                }
            }
        }
        // Release: the rebuild that sees the flag (Acquire) sees this change too; it also takes
        // the `pods` lock.
        self.dirty.store(true, Ordering::Release);
    }
}

impl PodSource for KubePods {
    fn index(&self) -> Arc<PodIndex> {
        // AcqRel: pairs with the Release in `apply`; one caller rebuilds, the others answer
        // from the index as it was a moment ago.
        if self.dirty.swap(false, Ordering::AcqRel) {
            let pods = lock(&self.pods);
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            *index = Arc::new(PodIndex::from_shared(
                index.version + 1,
                pods.values().cloned(),
            ));
        }
        self.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn describe(&self) -> String {
        "the Kubernetes API (pods, cluster-wide)".to_owned()
    }

    fn health(&self) -> SourceHealth {
        lock(&self.contact).health("pods")
    }
}

/// `NAMESPACE/NAME` of `--agent-service`.
pub fn parse_service(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!(
            "--agent-service {s:?}: write NAMESPACE/NAME of the agents' headless Service, such \
             as gpuscale-system/gpuscale-agent"
        )),
    }
}

/// The agent addresses an EndpointSlice lists: ready endpoints on its port named `grpc` (or
/// its only port).
pub fn slice_addresses(slice: &EndpointSlice) -> Vec<String> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .or(if ports.len() == 1 {
            ports.first()
        } else {
            None
        })
        .and_then(|p| p.port);
    let Some(port) = port else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter())
        .map(|a| {
            if a.contains(':') {
                format!("[{a}]:{port}")
            } else {
                format!("{a}:{port}")
            }
        })
        .collect()
}

/// Follows the EndpointSlices of Service `namespace/service` and keeps `fleet` on the agents
/// they list, until the task is dropped; `contact` says whether they were listed and the last
/// error.
pub async fn discover_agents(
    client: kube::Client,
    namespace: String,
    service: String,
    fleet: Arc<Fleet>,
    contact: Arc<AgentDiscovery>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let scope = format!("in namespace {namespace} (Service {service})");
    let mut slices: HashMap<String, Vec<String>> = HashMap::new();
    follow(
        api,
        config,
        "endpointslices.discovery.k8s.io",
        &scope,
        &contact.contact,
        |change| {
            let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
            match change {
                Change::Reset(all) => {
                    slices = all.iter().map(|s| (name(s), slice_addresses(s))).collect();
                }
                Change::Apply(s) => {
                    slices.insert(name(&s), slice_addresses(&s));
                }
                Change::Delete(s) => {
                    slices.remove(&name(&s));
                }
            }
            let mut addresses: Vec<String> = slices.values().flatten().cloned().collect();
            addresses.sort();
            addresses.dedup();
            fleet.set(&addresses);
        },
    )
    .await;
}

/// The health of agent discovery.
#[derive(Default)]
pub struct AgentDiscovery {
    contact: Mutex<Contact>,
}

impl AgentDiscovery {
    /// Whether the agents' EndpointSlices were listed, and the last error.
    pub fn health(&self) -> SourceHealth {
        lock(&self.contact).health("agent endpoints")
    }
}

/// A ScaledObject's `spec.scaleTargetRef`.
#[derive(Clone, Debug, PartialEq)]
struct TargetRef {
    api_version: String,
    kind: String,
    name: String,
}

/// A workload watched directly: (kind, namespace, name).
type WorkloadKey = (&'static str, String, String);
/// A target read through `/scale`: (apiVersion, kind, namespace, name).
type ScaleKey = (String, String, String, String);
/// A `/scale` answer and when it was read.
type ScaleAnswer = (Result<String, TargetError>, Instant);

/// Pod selectors of ScaledObjects' targets, from watches (and `/scale` reads).
pub struct KubeTargets {
    client: kube::Client,
    scaled: Mutex<HashMap<(String, String), Result<TargetRef, String>>>,
    scaled_contact: Mutex<Contact>,
    /// (kind, namespace, name) → the selector string, or `None` when it has none.
    workloads: Mutex<HashMap<WorkloadKey, Option<String>>>,
    deployments_contact: Mutex<Contact>,
    statefulsets_contact: Mutex<Contact>,
    /// (apiVersion, kind, namespace, name) → the answer and when it was read.
    scale: Mutex<HashMap<ScaleKey, ScaleAnswer>>,
    scale_requests: tokio::sync::mpsc::UnboundedSender<ScaleKey>,
    scale_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ScaleKey>>>,
}

/// A `LabelSelector` as a selector string (`app=vllm,tier in (a,b)`); `None` when empty.
pub fn label_selector_string(sel: &LabelSelector) -> Option<String> {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => format!("{} {other} ({values})", e.key),
        });
    }
    (!parts.is_empty()).then(|| parts.join(","))
}

fn target_ref(obj: &DynamicObject) -> Result<TargetRef, String> {
    let r = &obj.data["spec"]["scaleTargetRef"];
    let name = r["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or("its spec.scaleTargetRef has no name")?;
    Ok(TargetRef {
        api_version: r["apiVersion"].as_str().unwrap_or("apps/v1").to_owned(),
        kind: r["kind"].as_str().unwrap_or("Deployment").to_owned(),
        name: name.to_owned(),
    })
}

fn key_of<K: Resource>(k: &K) -> (String, String) {
    (
        k.meta().namespace.clone().unwrap_or_default(),
        k.meta().name.clone().unwrap_or_default(),
    )
}

impl KubeTargets {
    /// Nothing known yet.
    pub fn new(client: kube::Client) -> Arc<KubeTargets> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(KubeTargets {
            client,
            scaled: Mutex::new(HashMap::new()),
            scaled_contact: Mutex::new(Contact::default()),
            workloads: Mutex::new(HashMap::new()),
            deployments_contact: Mutex::new(Contact::default()),
            statefulsets_contact: Mutex::new(Contact::default()),
            scale: Mutex::new(HashMap::new()),
            scale_requests: tx,
            scale_rx: Mutex::new(Some(rx)),
        })
    }

    /// Runs the watches and the `/scale` reader until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let scaled = {
            let gvk = GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject");
            let ar = ApiResource::from_gvk_with_plural(&gvk, "scaledobjects");
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            follow(
                api,
                watcher::Config::default(),
                "scaledobjects.keda.sh",
                "cluster-wide",
                &self.scaled_contact,
                |change| {
                    let mut map = lock(&self.scaled);
                    match change {
                        Change::Reset(all) => {
                            *map = all.iter().map(|o| (key_of(o), target_ref(o))).collect();
                        }
                        Change::Apply(o) => {
                            map.insert(key_of(&o), target_ref(&o));
                        }
                        Change::Delete(o) => {
                            map.remove(&key_of(&o));
                        }
                    }
                },
            )
        };
        let deployments = follow(
            Api::<Deployment>::all(self.client.clone()),
            watcher::Config::default(),
            "deployments.apps",
            "cluster-wide",
            &self.deployments_contact,
            |change| {
                self.workload_change("Deployment", change, |d| {
                    d.spec
                        .as_ref()
                        .and_then(|s| label_selector_string(&s.selector))
                })
            },
        );
        let statefulsets = follow(
            Api::<StatefulSet>::all(self.client.clone()),
            watcher::Config::default(),
            "statefulsets.apps",
            "cluster-wide",
            &self.statefulsets_contact,
            |change| {
                self.workload_change("StatefulSet", change, |s| {
                    s.spec
                        .as_ref()
                        .and_then(|s| label_selector_string(&s.selector))
                })
            },
        );
        let rx = lock(&self.scale_rx).take();
        let scale_reader = async {
            if let Some(rx) = rx {
                self.read_scales(rx).await;
            }
        };
        tokio::join!(scaled, deployments, statefulsets, scale_reader);
    }

    fn workload_change<K: Resource>(
        &self,
        kind: &'static str,
        change: Change<K>,
        selector: impl Fn(&K) -> Option<String>,
    ) {
        let mut map = lock(&self.workloads);
        match change {
            Change::Reset(all) => {
                map.retain(|(k, _, _), _| *k != kind);
                for w in &all {
                    let (ns, name) = key_of(w);
                    map.insert((kind, ns, name), selector(w));
                }
            }
            Change::Apply(w) => {
                let (ns, name) = key_of(&w);
                map.insert((kind, ns, name), selector(&w));
            }
            Change::Delete(w) => {
                let (ns, name) = key_of(&w);
                map.remove(&(kind, ns, name));
            }
        }
    }

    async fn read_scales(&self, mut rx: tokio::sync::mpsc::UnboundedReceiver<ScaleKey>) {
        while let Some(key) = rx.recv().await {
            let fresh = lock(&self.scale)
                .get(&key)
                .is_some_and(|(_, at)| at.elapsed() < SCALE_REFRESH);
            if fresh {
                continue;
            }
            let answer = self.read_scale(&key).await;
            lock(&self.scale).insert(key, (answer, Instant::now()));
        }
    }

    async fn read_scale(
        &self,
        (api_version, kind, namespace, name): &ScaleKey,
    ) -> Result<String, TargetError> {
        let what = format!("{kind} {namespace}/{name} ({api_version})");
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (ar, _) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => TargetError::Invalid(format!(
                    "the ScaledObject's target kind {kind} ({api_version}) is not served by \
                     this cluster"
                )),
                e => TargetError::Unavailable(format!("discovering {kind} ({api_version}): {e}")),
            })?;
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        let scale = api.get_scale(name).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => TargetError::Invalid(format!(
                "the ScaledObject's target {what} does not exist or has no /scale subresource"
            )),
            kube::Error::Api(s) if s.code == 403 => TargetError::Unavailable(format!(
                "forbidden by RBAC: the collector may not get {}/scale in namespace \
                 {namespace}; grant its ServiceAccount get on that subresource [API server: {}]",
                ar.plural, s.message
            )),
            e => TargetError::Unavailable(format!("reading {what}/scale: {e}")),
        })?;
        scale
            .status
            .and_then(|s| s.selector)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                TargetError::Invalid(format!(
                    "the ScaledObject's target {what} reports no pod selector (status.selector \
                     of its /scale subresource); set podSelector in the trigger"
                ))
            })
    }

    fn unavailable(contact: &Mutex<Contact>, what: &str) -> Option<TargetError> {
        let h = lock(contact).health(what);
        h.unsynced.map(TargetError::Unavailable)
    }
}

impl Targets for KubeTargets {
    fn selector(&self, namespace: &str, scaled_object: &str) -> Result<String, TargetError> {
        if let Some(e) = Self::unavailable(&self.scaled_contact, "ScaledObjects") {
            return Err(e);
        }
        let key = (namespace.to_owned(), scaled_object.to_owned());
        let target = match lock(&self.scaled).get(&key) {
            None => {
                return Err(TargetError::Invalid(format!(
                    "ScaledObject {namespace}/{scaled_object} does not exist (the trigger has \
                     no podSelector, so its target's selector is used); set podSelector or \
                     check the name"
                )))
            }
            Some(Err(why)) => {
                return Err(TargetError::Invalid(format!(
                    "ScaledObject {namespace}/{scaled_object}: {why}; set podSelector"
                )))
            }
            Some(Ok(t)) => t.clone(),
        };
        let what = format!("{} {namespace}/{}", target.kind, target.name);
        let workload = match (target.api_version.as_str(), target.kind.as_str()) {
            ("apps/v1", "Deployment") => Some(("Deployment", &self.deployments_contact)),
            ("apps/v1", "StatefulSet") => Some(("StatefulSet", &self.statefulsets_contact)),
            _ => None,
        };
        if let Some((kind, contact)) = workload {
            if let Some(e) = Self::unavailable(contact, kind) {
                return Err(e);
            }
            return match lock(&self.workloads).get(&(kind, namespace.to_owned(), target.name)) {
                None => Err(TargetError::Invalid(format!(
                    "the target of ScaledObject {namespace}/{scaled_object}, {what}, does not \
                     exist; set podSelector or fix spec.scaleTargetRef"
                ))),
                Some(None) => Err(TargetError::Invalid(format!(
                    "the target of ScaledObject {namespace}/{scaled_object}, {what}, has no pod \
                     selector; set podSelector"
                ))),
                Some(Some(selector)) => Ok(selector.clone()),
            };
        }
        let key = (
            target.api_version.clone(),
            target.kind.clone(),
            namespace.to_owned(),
            target.name.clone(),
        );
        let cached = lock(&self.scale).get(&key).cloned();
        match cached {
            Some((answer, at)) => {
                if at.elapsed() >= SCALE_REFRESH {
                    let _ = self.scale_requests.send(key);
                }
                answer
            }
            None => {
                let _ = self.scale_requests.send(key);
                Err(TargetError::Unavailable(format!(
                    "reading the pod selector of {what} through its /scale subresource; KEDA \
                     will ask again"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn label_selectors_become_selector_strings_the_parser_accepts() {
        let sel = LabelSelector {
            match_labels: Some([("app".to_owned(), "vllm".to_owned())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
                LabelSelectorRequirement {
                    key: "gpu".into(),
                    operator: "Exists".into(),
                    values: None,
                },
            ]),
        };
        let text = label_selector_string(&sel).unwrap();
        assert_eq!(text, "app=vllm,tier in (a,b),!canary,gpu");
        let parsed = crate::selector::Selector::parse(&text).unwrap();
        let labels = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(parsed.matches(&labels(&[("app", "vllm"), ("tier", "a"), ("gpu", "h100")])));
        assert!(!parsed.matches(&labels(&[("app", "vllm"), ("tier", "a")])));
        assert!(!parsed.matches(&labels(&[
            ("app", "vllm"),
            ("tier", "a"),
            ("gpu", "h100"),
            ("canary", "1")
        ])));
        assert_eq!(label_selector_string(&LabelSelector::default()), None);
    }

    fn slice(ports: Vec<(&str, i32)>, endpoints: Vec<(&str, Option<bool>)>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: endpoints
                .into_iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![a.to_owned()],
                    conditions: Some(EndpointConditions {
                        ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.to_owned()),
                        port: Some(port),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn endpoint_slices_give_ready_agents_on_the_grpc_port() {
        let s = slice(
            vec![("http", 7702), ("grpc", 7701)],
            vec![
                ("10.0.0.1", Some(true)),
                ("10.0.0.2", Some(false)),
                ("fd00::3", None),
            ],
        );
        assert_eq!(slice_addresses(&s), ["10.0.0.1:7701", "[fd00::3]:7701"]);
        // One unnamed port is the port; several without `grpc` give nothing rather than a guess.
        let one = slice(vec![("", 9000)], vec![("10.0.0.4", None)]);
        assert_eq!(slice_addresses(&one), ["10.0.0.4:9000"]);
        let ambiguous = slice(vec![("a", 1), ("b", 2)], vec![("10.0.0.5", None)]);
        assert!(slice_addresses(&ambiguous).is_empty());
    }

    #[test]
    fn agent_service_is_namespace_slash_name() {
        assert_eq!(
            parse_service("gpuscale-system/gpuscale-agent").unwrap(),
            ("gpuscale-system".to_owned(), "gpuscale-agent".to_owned())
        );
        for bad in ["gpuscale-agent", "/x", "x/", "a/b/c"] {
            let e = parse_service(bad).unwrap_err();
            assert!(e.contains("NAMESPACE/NAME"), "{e}");
        }
    }

    #[test]
    fn rbac_refusals_name_the_verb_and_resource_to_grant() {
        let forbidden = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "pods is forbidden".into(),
            reason: "Forbidden".into(),
            ..Default::default()
        }));
        let e = explain(
            &watcher::Error::InitialListFailed(forbidden),
            "pods",
            "cluster-wide",
        );
        assert!(
            e.starts_with("forbidden by RBAC: the collector may not list pods cluster-wide"),
            "{e}"
        );
        assert!(
            e.contains("grant its ServiceAccount get, list and watch on pods"),
            "{e}"
        );
    }

    #[test]
    fn contact_is_unsynced_until_listed_and_counts_time_out_of_contact() {
        let mut c = Contact::default();
        assert!(c.health("pods").unsynced.is_some());
        c.failed("connection refused".into());
        let h = c.health("pods");
        assert!(h.unsynced.unwrap().contains("connection refused"));
        assert_eq!(h.out_of_contact.unwrap().1, "connection refused");
        c.synced = true;
        c.ok();
        assert_eq!(c.health("pods"), SourceHealth::default());
    }

    fn pod(name: &str, app: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ml", "name": name, "uid": format!("uid-{name}"),
                "labels": {"app": app}},
            "status": {"phase": "Running"}}))
        .unwrap()
    }

    #[test]
    fn pod_events_are_indexed_once_per_read_and_a_relist_replaces_everything() {
        let pods = KubePods::new();
        assert!(pods.health().unsynced.is_some());
        pods.apply(Change::Reset(vec![pod("a", "x"), pod("b", "x")]));
        let first = pods.index();
        assert_eq!(first.by_uid.len(), 2);
        // A burst of changes between two reads: one rebuild, the last state wins.
        for i in 0..100 {
            pods.apply(Change::Apply(pod("b", &format!("y{i}"))));
        }
        pods.apply(Change::Delete(pod("a", "x")));
        let second = pods.index();
        assert_eq!(second.version, first.version + 1);
        assert_eq!(second.by_uid.len(), 1);
        assert_eq!(second.by_uid["uid-b"].labels["app"], "y99");
        assert_eq!(
            pods.index().version,
            second.version,
            "no change, no rebuild"
        );
        // A re-list (after 410 Gone) drops what it no longer lists.
        pods.apply(Change::Reset(vec![pod("c", "z")]));
        let third = pods.index();
        assert_eq!(third.by_uid.keys().collect::<Vec<_>>(), ["uid-c"]);
    }
}
