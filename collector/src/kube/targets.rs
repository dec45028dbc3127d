//! The pod selector of a ScaledObject's target ([`KubeTargets`]), for a trigger without
//! `podSelector`: watches of ScaledObjects (`keda.sh/v1alpha1`), Deployments and StatefulSets;
//! any other kind through its `/scale` subresource (`status.selector`), read in the background
//! and refreshed every [`SCALE_REFRESH`]. KEDA calls only read memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpuscale_health::ops::lock;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::Resource;

use super::watch::{follow, Change, Contact};
use crate::api::scaler::{TargetError, Targets};
use crate::model::selector::Selector;
use crate::model::trigger::Trigger;
use crate::sources::demand::Demand;

/// How often a target read through `/scale` is read again.
pub const SCALE_REFRESH: Duration = Duration::from_secs(30);

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
type ScaleAnswer = (Result<TargetSelector, TargetError>, Instant);

/// A target's pod selector as the API server gave it, parsed once when it was read (not on
/// every KEDA call).
#[derive(Clone, Debug)]
struct TargetSelector {
    text: String,
    parsed: Result<Arc<Selector>, String>,
}

impl TargetSelector {
    fn parse(text: String) -> TargetSelector {
        let parsed = Selector::parse(&text)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        TargetSelector { text, parsed }
    }

    /// The selector, or why ScaledObject `namespace/scaled_object` cannot use it.
    fn for_scaled_object(
        &self,
        namespace: &str,
        scaled_object: &str,
    ) -> Result<Arc<Selector>, TargetError> {
        self.parsed.clone().map_err(|e| {
            TargetError::Invalid(format!(
                "the pod selector of ScaledObject {namespace}/{scaled_object}'s target, {:?}, is \
                 not usable: {e}; set podSelector",
                self.text
            ))
        })
    }
}

/// Pod selectors of ScaledObjects' targets, from watches (and `/scale` reads).
pub struct KubeTargets {
    client: kube::Client,
    scaled: Mutex<HashMap<(String, String), Result<TargetRef, String>>>,
    scaled_contact: Mutex<Contact>,
    /// (kind, namespace, name) → the selector, or `None` when it has none.
    workloads: Mutex<HashMap<WorkloadKey, Option<TargetSelector>>>,
    deployments_contact: Mutex<Contact>,
    statefulsets_contact: Mutex<Contact>,
    /// (apiVersion, kind, namespace, name) → the answer and when it was read.
    scale: Mutex<HashMap<ScaleKey, ScaleAnswer>>,
    scale_requests: tokio::sync::mpsc::UnboundedSender<ScaleKey>,
    scale_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ScaleKey>>>,
    /// Where every ScaledObject's gpuscale triggers are pinned, so their series stream before
    /// KEDA's first call.
    demand: Arc<Demand>,
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

/// The gpuscale triggers of ScaledObject `obj`: those of type `external` or `external-push`
/// whose metadata parses as a gpuscale trigger (another external scaler's does not: gpuscale
/// refuses keys it does not know).
fn gpuscale_triggers(obj: &DynamicObject) -> Vec<Trigger> {
    let Some(triggers) = obj.data["spec"]["triggers"].as_array() else {
        return Vec::new();
    };
    triggers
        .iter()
        .filter(|t| matches!(t["type"].as_str(), Some("external" | "external-push")))
        .filter_map(|t| {
            let meta: HashMap<String, String> = t["metadata"]
                .as_object()?
                .iter()
                .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect::<Option<_>>()?;
            Trigger::parse(&meta).ok()
        })
        .collect()
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

/// A Deployment or StatefulSet as [`KubeTargets`] keeps it: (namespace, name) and its pod
/// selector, parsed (`None` when it has none).
type Workload = ((String, String), Option<TargetSelector>);

fn workload<K: Resource>(k: &K, selector: Option<String>) -> Workload {
    (key_of(k), selector.map(TargetSelector::parse))
}

fn key_of<K: Resource>(k: &K) -> (String, String) {
    (
        k.meta().namespace.clone().unwrap_or_default(),
        k.meta().name.clone().unwrap_or_default(),
    )
}

impl KubeTargets {
    /// Nothing known yet; will pin every ScaledObject's gpuscale triggers in `demand`.
    pub fn new(client: kube::Client, demand: Arc<Demand>) -> Arc<KubeTargets> {
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
            demand,
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
                |o: DynamicObject| Some((key_of(&o), (target_ref(&o), gpuscale_triggers(&o)))),
                |change| {
                    let mut map = lock(&self.scaled);
                    match change {
                        Change::Reset(all) => {
                            let mut pins = Vec::with_capacity(all.len());
                            map.clear();
                            for (key, (target, triggers)) in all {
                                pins.push((key.clone(), triggers));
                                map.insert(key, target);
                            }
                            self.demand.pin_all(pins);
                        }
                        Change::Apply(((ns, name), (target, triggers))) => {
                            self.demand.pin(&ns, &name, &triggers);
                            map.insert((ns, name), target);
                        }
                        Change::Delete(((ns, name), _)) => {
                            self.demand.pin(&ns, &name, &[]);
                            map.remove(&(ns, name));
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
            |d: Deployment| {
                let selector = d
                    .spec
                    .as_ref()
                    .and_then(|s| label_selector_string(&s.selector));
                Some(workload(&d, selector))
            },
            |change| self.workload_change("Deployment", change),
        );
        let statefulsets = follow(
            Api::<StatefulSet>::all(self.client.clone()),
            watcher::Config::default(),
            "statefulsets.apps",
            "cluster-wide",
            &self.statefulsets_contact,
            |s: StatefulSet| {
                let selector = s
                    .spec
                    .as_ref()
                    .and_then(|s| label_selector_string(&s.selector));
                Some(workload(&s, selector))
            },
            |change| self.workload_change("StatefulSet", change),
        );
        let rx = lock(&self.scale_rx).take();
        let scale_reader = async {
            if let Some(rx) = rx {
                self.read_scales(rx).await;
            }
        };
        tokio::join!(scaled, deployments, statefulsets, scale_reader);
    }

    fn workload_change(&self, kind: &'static str, change: Change<Workload>) {
        let mut map = lock(&self.workloads);
        match change {
            Change::Reset(all) => {
                map.retain(|(k, _, _), _| *k != kind);
                for ((ns, name), selector) in all {
                    map.insert((kind, ns, name), selector);
                }
            }
            Change::Apply(((ns, name), selector)) => {
                map.insert((kind, ns, name), selector);
            }
            Change::Delete(((ns, name), _)) => {
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
    ) -> Result<TargetSelector, TargetError> {
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
            .map(TargetSelector::parse)
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
    fn selector(&self, namespace: &str, scaled_object: &str) -> Result<Arc<Selector>, TargetError> {
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
                Some(Some(selector)) => selector.for_scaled_object(namespace, scaled_object),
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
                answer.and_then(|s| s.for_scaled_object(namespace, scaled_object))
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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn a_scaled_objects_gpuscale_triggers_are_found_and_other_scalers_left_alone() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "vllm", "namespace": "ml"},
            "spec": {
                "scaleTargetRef": {"name": "vllm"},
                "triggers": [
                    {"type": "external", "metadata": {
                        "scalerAddress": "gpuscale-collector.gpuscale.svc:7700",
                        "metric": "sm_active", "window": "1m", "targetValue": "80"}},
                    {"type": "external-push", "metadata": {
                        "scalerAddress": "gpuscale-collector.gpuscale.svc:7700",
                        "metric": "power_watts", "targetValue": "600"}},
                    // Another external scaler: keys gpuscale does not know.
                    {"type": "external", "metadata": {
                        "scalerAddress": "other:9090", "query": "up", "threshold": "3"}},
                    // Not external at all; and one whose metadata is not all strings.
                    {"type": "cpu", "metadata": {"value": "50"}},
                    {"type": "external", "metadata": {"metric": "sm_active", "targetValue": 80}},
                ]
            }
        }))
        .unwrap();
        let found: Vec<(&str, u32)> = gpuscale_triggers(&obj)
            .iter()
            .map(|t| (t.metric.name(), t.window.secs()))
            .collect();
        assert_eq!(found, [("sm_active", 60), ("power_watts", 30)]);
        let none: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": "x"}, "spec": {}
        }))
        .unwrap();
        assert!(gpuscale_triggers(&none).is_empty());
    }

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
        let parsed = crate::model::selector::Selector::parse(&text).unwrap();
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

    #[test]
    fn a_target_selector_is_parsed_once_and_a_bad_one_names_the_scaled_object() {
        let good = TargetSelector::parse("app=vllm".into());
        let a = good.for_scaled_object("ml", "vllm").unwrap();
        let b = good.for_scaled_object("ml", "vllm").unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "parsed when read, shared by every call"
        );
        let bad = TargetSelector::parse("app in (a".into());
        let TargetError::Invalid(e) = bad.for_scaled_object("ml", "vllm").unwrap_err() else {
            panic!("a selector that does not parse is the ScaledObject's mistake");
        };
        assert!(
            e.starts_with(
                "the pod selector of ScaledObject ml/vllm's target, \"app in (a\", is not usable: "
            ),
            "{e}"
        );
        assert!(e.ends_with("; set podSelector"), "{e}");
    }
}
