//! Pods from the API server ([`KubePods`]): a watch of every pod of the cluster, converted once
//! into [`PodMeta`] and indexed on demand, behind the same [`PodSource`] interface as
//! `--pods-file`.
//!
//! Memory is what bounds a large cluster (issue 15: 100,000 pods in at most 300 MiB). A pod is
//! read off the wire with only the fields a [`PodMeta`] needs ([`WatchedPod`]) and converted
//! the moment it arrives (see [`follow`]), so no full Pod object is ever built, not even while
//! a list is paged in. `cargo bench -p collector --bench kube_pods` measures it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use gpuscale_health::ops::lock;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::watcher;
use kube::Resource;

use super::watch::{follow, Change, Contact};
use crate::sources::pods::{read_pod, PodIndex, PodMeta, PodSource, SourceHealth};

/// A pod as the watch reads it: a [`Pod`] holding only what a [`PodMeta`] needs and the
/// resource version the watcher resumes from ([`read_pod`]). Managed fields, annotations and
/// the rest of the spec and status (most of a pod's JSON, and more of its size once built) are
/// skipped while the JSON is read. To the API it is a Pod: same group, version, kind and path.
#[derive(Clone, Debug)]
pub struct WatchedPod(pub Pod);

impl<'de> serde::Deserialize<'de> for WatchedPod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        read_pod(d).map(WatchedPod)
    }
}

impl Resource for WatchedPod {
    type DynamicType = ();
    type Scope = <Pod as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
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

    /// Watches every pod of the cluster until the task is dropped. Each pod is converted into
    /// a [`PodMeta`] the moment it arrives, so not even the initial list holds full `Pod`
    /// objects.
    pub async fn run(self: Arc<Self>, client: kube::Client) {
        let api: Api<WatchedPod> = Api::all(client);
        follow(
            api,
            watcher::Config::default(),
            "pods",
            "cluster-wide",
            &self.contact,
            meta,
            |change| self.apply(change),
        )
        .await;
    }

    fn apply(&self, change: Change<PodMeta>) {
        let mut pods = lock(&self.pods);
        match change {
            Change::Reset(all) => {
                *pods = all
                    .into_iter()
                    .map(|m| (m.uid.clone(), Arc::new(m)))
                    .collect();
            }
            Change::Apply(m) => {
                pods.insert(m.uid.clone(), Arc::new(m));
            }
            Change::Delete(m) => {
                pods.remove(&m.uid);
            }
        }
        // Release: the rebuild that sees the flag (Acquire) sees this change too; it also takes
        // the `pods` lock.
        self.dirty.store(true, Ordering::Release);
    }
}

/// A pod as the collector keeps it; `None` (logged at debug) for one it cannot index. A pod
/// that cannot be indexed was never kept, so its deletion has nothing to remove either
/// (namespace, name and UID never change).
fn meta(pod: WatchedPod) -> Option<PodMeta> {
    PodMeta::try_from(&pod.0)
        .map_err(|why| tracing::debug!(%why, "skipping a pod"))
        .ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str) -> PodMeta {
        let pod: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ml", "name": name, "uid": format!("uid-{name}"),
                "labels": {"app": app}},
            "status": {"phase": "Running"}}))
        .unwrap();
        meta(pod).unwrap()
    }

    #[test]
    fn the_watch_reads_pods_at_the_pod_path_and_keeps_the_resource_version_it_resumes_from() {
        assert_eq!(
            WatchedPod::url_path(&(), None),
            Pod::url_path(&(), None),
            "/api/v1/pods"
        );
        assert_eq!(WatchedPod::api_version(&()), "v1");
        assert_eq!(WatchedPod::kind(&()), "Pod");
        // A watch event as the API server streams it: the watcher needs the resource version
        // (without one it fails and lists again); the pod needs its identity.
        let line = r#"{"type": "MODIFIED", "object": {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "ml", "name": "a", "uid": "u-a", "resourceVersion": "812",
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"nodeName": "gpu-1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running"}}}"#;
        let event: kube::core::WatchEvent<WatchedPod> = serde_json::from_str(line).unwrap();
        let kube::core::WatchEvent::Modified(pod) = event else {
            panic!("not read as a modification: {event:?}")
        };
        assert_eq!(pod.meta().resource_version.as_deref(), Some("812"));
        assert_eq!(pod.meta().managed_fields, None, "skipped, never built");
        let m = meta(pod).unwrap();
        assert_eq!((m.uid.as_str(), m.node.as_str()), ("u-a", "gpu-1"));
        // A pod that cannot be indexed is skipped, not kept.
        let nameless: WatchedPod =
            serde_json::from_str(r#"{"metadata": {"namespace": "ml", "uid": "u"}}"#).unwrap();
        assert_eq!(meta(nameless), None);
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
