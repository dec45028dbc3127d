//! Pods from the API server ([`KubePods`]): a watch of every pod of the cluster, converted once
//! into [`PodMeta`] and indexed on demand, behind the same [`PodSource`] interface as
//! `--pods-file`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use gpuscale_health::ops::lock;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;

use super::watch::{follow, Change, Contact};
use crate::sources::pods::{PodIndex, PodMeta, PodSource, SourceHealth};

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
            PodMeta::try_from(pod)
                .map_err(|why| tracing::debug!(%why, "skipping a pod"))
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

#[cfg(test)]
mod tests {
    use super::*;

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
