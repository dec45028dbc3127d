//! Pod metadata (namespace, name, labels, owner, node, phase) behind one small interface,
//! [`PodSource`], so the KEDA scaler never cares where it comes from. This module owns the
//! `--pods-file` source: a Kubernetes `PodList` JSON (`kubectl get pods -A -o json`), reloaded
//! when the file changes, keeping the last good list when a reload fails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::{Error, Result};

/// What the collector knows about one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodMeta {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (dashed form), the key agents report.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Node the pod is scheduled on (empty while pending).
    pub node: String,
    /// `Running`, `Pending`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    /// The top of the owner chain this source knows, like `Deployment/vllm`.
    pub owner: String,
    /// The IDs of its containers (without the `containerd://` scheme), as agents see them in
    /// cgroup paths.
    pub container_ids: Vec<String>,
}

/// An immutable snapshot of the pods a source knows, indexed for the scaler.
#[derive(Debug, Default)]
pub struct PodIndex {
    /// Increases whenever the pod list changes (selection caches key on it).
    pub version: u64,
    /// Pods by UID.
    pub by_uid: HashMap<String, Arc<PodMeta>>,
    /// Pods by namespace.
    pub by_namespace: HashMap<String, Vec<Arc<PodMeta>>>,
}

impl PodIndex {
    /// Indexes `pods` as `version`.
    pub fn new(version: u64, pods: Vec<PodMeta>) -> PodIndex {
        Self::from_shared(version, pods.into_iter().map(Arc::new))
    }

    /// Indexes shared `pods` as `version`.
    pub fn from_shared(version: u64, pods: impl IntoIterator<Item = Arc<PodMeta>>) -> PodIndex {
        let mut index = PodIndex {
            version,
            ..PodIndex::default()
        };
        for p in pods {
            index
                .by_namespace
                .entry(p.namespace.clone())
                .or_default()
                .push(p.clone());
            index.by_uid.insert(p.uid.clone(), p);
        }
        index
    }
}

/// Where pod metadata comes from.
pub trait PodSource: Send + Sync {
    /// The current pods.
    fn index(&self) -> Arc<PodIndex>;
    /// A short description for logs and dumps (`pods-file /etc/pods.json`).
    fn describe(&self) -> String;
    /// Whether the list can be trusted now (a file source always can once loaded).
    fn health(&self) -> SourceHealth {
        SourceHealth::default()
    }
}

/// How far a pod source can be trusted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceHealth {
    /// `Some(why)` until the first complete list arrived: no answer may rely on it yet.
    pub unsynced: Option<String>,
    /// How long the source has been out of contact (`None` while it is in contact), and why:
    /// the last list stays in use, but a trigger's `staleAfter` bounds how long.
    pub out_of_contact: Option<(Duration, String)>,
}

fn owner_of(item: &Value) -> String {
    let refs = item["metadata"]["ownerReferences"].as_array();
    let Some(owner) = refs.and_then(|r| {
        r.iter()
            .find(|o| o["controller"] == true)
            .or_else(|| r.first())
    }) else {
        return String::new();
    };
    let kind = owner["kind"].as_str().unwrap_or_default();
    let name = owner["name"].as_str().unwrap_or_default();
    // A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>.
    if kind == "ReplicaSet" {
        if let Some(hash) = item["metadata"]["labels"]["pod-template-hash"].as_str() {
            if let Some(dep) = name.strip_suffix(hash).and_then(|n| n.strip_suffix('-')) {
                return format!("Deployment/{dep}");
            }
        }
    }
    format!("{kind}/{name}")
}

/// Parses a `PodList` (or a `List` of pods) as `kubectl get pods -A -o json` prints it.
pub fn parse_pod_list(path: &Path, text: &str) -> Result<Vec<PodMeta>> {
    let bad = |why: String| Error::PodsFile {
        path: path.to_owned(),
        why,
    };
    let doc: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let kind = doc["kind"].as_str().unwrap_or_default();
    if kind != "PodList" && kind != "List" {
        return Err(bad(format!(
            "its kind is {:?}, not PodList; write it with `kubectl get pods -A -o json`",
            doc["kind"]
        )));
    }
    let items = doc["items"]
        .as_array()
        .ok_or_else(|| bad("it has no `items` array".into()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| pod_from_json(item).map_err(|why| bad(format!("items[{i}] {why}"))))
        .collect()
}

/// One pod object (as the API server or `kubectl -o json` writes it) as a [`PodMeta`]; the
/// error says what is missing ("has no metadata.uid").
pub fn pod_from_json(item: &Value) -> std::result::Result<PodMeta, String> {
    let field = |f: &str| -> std::result::Result<String, String> {
        item["metadata"][f]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("has no metadata.{f}"))
    };
    if !matches!(item["kind"].as_str(), None | Some("Pod")) {
        return Err(format!("is a {}, not a Pod", item["kind"]));
    }
    let labels = item["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    // `containerd://<64 hex>` and the like: the ID agents see in cgroup paths.
    let container_ids = ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|k| item["status"][k].as_array())
        .flatten()
        .filter_map(|c| c["containerID"].as_str())
        .filter_map(|id| id.split_once("://").map(|(_, id)| id.to_owned()))
        .collect();
    Ok(PodMeta {
        namespace: field("namespace")?,
        name: field("name")?,
        uid: field("uid")?,
        labels,
        node: item["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        phase: item["status"]["phase"]
            .as_str()
            .unwrap_or("Unknown")
            .to_owned(),
        owner: owner_of(item),
        container_ids,
    })
}

/// File identity used to notice changes (an atomic rename changes the inode): inode, length,
/// modification time.
type Stamp = (u64, u64, SystemTime);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// Pods from a `PodList` file, reloaded when it changes.
pub struct PodsFile {
    path: PathBuf,
    current: RwLock<(Option<Stamp>, Arc<PodIndex>)>,
}

impl PodsFile {
    /// Loads `path`; a missing or invalid file is an error at start.
    pub fn load(path: &Path) -> Result<PodsFile> {
        let st = stamp(path);
        let text = std::fs::read_to_string(path).map_err(|e| Error::PodsFile {
            path: path.to_owned(),
            why: format!("cannot read it: {e}"),
        })?;
        let pods = parse_pod_list(path, &text)?;
        tracing::info!(path = %path.display(), pods = pods.len(), "loaded pods file");
        Ok(PodsFile {
            path: path.to_owned(),
            current: RwLock::new((st, Arc::new(PodIndex::new(1, pods)))),
        })
    }

    /// Re-reads the file if it changed. A bad reload keeps the last good list and logs why.
    pub fn reload_if_changed(&self) {
        let st = stamp(&self.path);
        let (old_st, old) = {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            (cur.0, cur.1.clone())
        };
        if st == old_st {
            return;
        }
        let result = std::fs::read_to_string(&self.path)
            .map_err(|e| Error::PodsFile {
                path: self.path.clone(),
                why: format!("cannot read it: {e}"),
            })
            .and_then(|t| parse_pod_list(&self.path, &t));
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Remember the stamp either way, so a bad file is reported once, not every poll.
        cur.0 = st;
        match result {
            Ok(pods) => {
                tracing::info!(path = %self.path.display(), pods = pods.len(), "reloaded pods file");
                cur.1 = Arc::new(PodIndex::new(old.version + 1, pods));
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the last good pod list");
            }
        }
    }

    /// Polls the file every `period` until `stop` resolves.
    pub async fn watch(
        self: Arc<Self>,
        period: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }
}

impl PodSource for PodsFile {
    fn index(&self) -> Arc<PodIndex> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    fn describe(&self) -> String {
        format!("pods-file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, uid: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"namespace": ns, "name": name, "uid": uid, "labels": labels,
                            "ownerReferences": [{"kind": "ReplicaSet", "name": "vllm-5d9c7f", "controller": true}]},
               "spec": {"nodeName": "gpu-1"}, "status": {"phase": "Running"}})
    }

    fn list(items: Vec<Value>) -> String {
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    }

    #[test]
    fn a_kubectl_pod_list_parses_with_owner_and_labels() {
        let text = list(vec![pod(
            "ml",
            "vllm-5d9c7f-abcde",
            "11111111-2222-3333-4444-555555555555",
            json!({"app": "vllm", "pod-template-hash": "5d9c7f"}),
        )]);
        let pods = parse_pod_list(Path::new("p.json"), &text).unwrap();
        assert_eq!(pods.len(), 1);
        let p = &pods[0];
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("ml", "vllm-5d9c7f-abcde")
        );
        assert_eq!(p.labels["app"], "vllm");
        assert_eq!(p.owner, "Deployment/vllm");
        assert_eq!((p.node.as_str(), p.phase.as_str()), ("gpu-1", "Running"));
        let idx = PodIndex::new(1, pods);
        assert_eq!(idx.by_namespace["ml"].len(), 1);
        assert!(idx
            .by_uid
            .contains_key("11111111-2222-3333-4444-555555555555"));
    }

    #[test]
    fn a_file_that_is_not_a_pod_list_is_refused_clearly() {
        let p = Path::new("x.json");
        let e = parse_pod_list(p, "{").unwrap_err().to_string();
        assert!(e.contains("invalid JSON") && e.contains("x.json"), "{e}");
        let e = parse_pod_list(p, r#"{"kind": "Deployment"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not PodList"), "{e}");
        let e = parse_pod_list(
            p,
            &list(vec![json!({"kind": "Pod", "metadata": {"name": "a"}})]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("items[0] has no metadata.namespace"), "{e}");
    }

    #[test]
    fn a_bad_reload_keeps_the_last_good_list() {
        let dir = std::env::temp_dir().join(format!("gpuscale-pods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pods.json");
        let write = |text: &str| {
            let tmp = dir.join("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write(&list(vec![pod("a", "p1", "u1", json!({}))]));
        let src = PodsFile::load(&path).unwrap();
        assert_eq!(src.index().by_uid.len(), 1);
        write("not json");
        src.reload_if_changed();
        assert_eq!(
            src.index().by_uid.len(),
            1,
            "bad reload must keep the old list"
        );
        assert_eq!(src.index().version, 1);
        write(&list(vec![
            pod("a", "p1", "u1", json!({})),
            pod("a", "p2", "u2", json!({})),
        ]));
        src.reload_if_changed();
        assert_eq!(src.index().by_uid.len(), 2);
        assert_eq!(src.index().version, 2);
        assert!(PodsFile::load(&dir.join("missing.json")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
