//! Pod metadata (namespace, name, labels, owner, node, phase) behind one small interface,
//! [`PodSource`], so the KEDA scaler never cares where it comes from. A typed Kubernetes
//! [`Pod`] becomes a [`PodMeta`] in one place (`PodMeta: TryFrom<&Pod>`), for the Kubernetes
//! watch ([`crate::kube::pods`]) and for the file alike, and both read a pod's JSON by the same
//! fields ([`read_pod`]), skipping the rest. This module owns the `--pods-file`
//! source: a Kubernetes `PodList` JSON (`kubectl get pods -A -o json`), read into typed
//! structs, reloaded when the file changes, keeping the last good list when a reload fails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Deserialize;
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
    /// `Some(why)` while the newest input was refused (a pods file that no longer parses): the
    /// last good list stays in use, and readiness fails so that someone fixes it.
    pub refused: Option<String>,
    /// Inputs refused since start.
    pub refused_total: u64,
}

/// Why a Pod object cannot be a [`PodMeta`]: it lacks what the collector indexes pods by.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotIndexable {
    /// `metadata.namespace`, `metadata.name` or `metadata.uid` is missing or empty.
    #[error("has no metadata.{0}")]
    Missing(&'static str),
}

/// `TryFrom`, not `From`: every field of a typed [`Pod`] is optional, and a pod without a
/// namespace, name or UID cannot be matched, named or joined with what agents report. The
/// rest has a meaning when absent (no node yet, phase `Unknown`, no owner, no containers).
impl TryFrom<&Pod> for PodMeta {
    type Error = NotIndexable;

    fn try_from(pod: &Pod) -> std::result::Result<PodMeta, NotIndexable> {
        let m = &pod.metadata;
        let field = |v: &Option<String>, name| {
            v.clone()
                .filter(|s| !s.is_empty())
                .ok_or(NotIndexable::Missing(name))
        };
        let labels = m.labels.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        // `containerd://<64 hex>` and the like: the ID agents see in cgroup paths.
        let container_ids = status
            .into_iter()
            .flat_map(|s| {
                let init = s.init_container_statuses.iter().flatten();
                init.chain(s.container_statuses.iter().flatten())
            })
            .filter_map(|c| c.container_id.as_deref())
            .filter_map(|id| id.split_once("://").map(|(_, id)| id.to_owned()))
            .collect();
        Ok(PodMeta {
            namespace: field(&m.namespace, "namespace")?,
            name: field(&m.name, "name")?,
            uid: field(&m.uid, "uid")?,
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            phase: status
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Unknown".to_owned()),
            owner: owner_of(m.owner_references.as_deref().unwrap_or_default(), &labels),
            labels,
            container_ids,
        })
    }
}

/// The top of the owner chain a pod shows: its controller (else its first owner), a
/// Deployment's ReplicaSet read as the Deployment; empty without owners.
fn owner_of(refs: &[OwnerReference], labels: &BTreeMap<String, String>) -> String {
    let Some(owner) = refs
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| refs.first())
    else {
        return String::new();
    };
    // A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>.
    if owner.kind == "ReplicaSet" {
        if let Some(hash) = labels.get("pod-template-hash") {
            if let Some(dep) = owner
                .name
                .strip_suffix(hash.as_str())
                .and_then(|n| n.strip_suffix('-'))
            {
                return format!("Deployment/{dep}");
            }
        }
    }
    format!("{}/{}", owner.kind, owner.name)
}

/// A `--pods-file` as read: `kind` and the items, each read on its own so that an error names
/// the item and its pod.
#[derive(Deserialize)]
struct ListFile {
    kind: Option<String>,
    items: Option<Vec<Value>>,
}

/// One pod as the collector reads it, from a `--pods-file` item or the Kubernetes watch: the
/// fields a [`PodMeta`] needs, typed, in the shape of a [`Pod`]. Not [`Pod`] itself, which
/// insists on what files written by hand or by our own tools leave out (`apiVersion` and `uid`
/// of an owner reference) and which the collector never reads, and which builds every field of
/// a pod (managed fields, annotations, the whole spec and status: about ten times what a
/// [`PodMeta`] keeps) only for the conversion to drop it; but as strict on what it does read (a
/// label value must be a string).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FilePod {
    kind: Option<String>,
    #[serde(default)]
    metadata: FileMeta,
    spec: Option<FileSpec>,
    status: Option<FileStatus>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileMeta {
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    /// Not part of a [`PodMeta`]: the watch resumes from the newest one it saw. Kept only when
    /// a string (the API server always sends one), so a pods file written by hand with
    /// anything there still loads, as it did before the watch read pods this way.
    #[serde(default, deserialize_with = "string_or_nothing")]
    resource_version: Option<String>,
    #[serde(default, deserialize_with = "string_labels")]
    labels: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<FileOwner>>,
}

#[derive(Deserialize)]
struct FileOwner {
    kind: String,
    name: String,
    controller: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileSpec {
    node_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileStatus {
    phase: Option<String>,
    container_statuses: Option<Vec<FileContainer>>,
    init_container_statuses: Option<Vec<FileContainer>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileContainer {
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

/// A string, or `None` for any other value.
fn string_or_nothing<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// Labels, refusing a value that is not a string and naming its key (a bare `replicas: 2` in
/// hand-written YAML turned JSON is the usual cause).
fn string_labels<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<BTreeMap<String, String>>, D::Error> {
    let Some(raw) = Option::<BTreeMap<String, Value>>::deserialize(d)? else {
        return Ok(None);
    };
    raw.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(serde::de::Error::custom(format!(
                "label {k:?} is {other}, not a string; quote label values"
            ))),
        })
        .collect::<std::result::Result<_, _>>()
        .map(Some)
}

impl From<FilePod> for Pod {
    fn from(f: FilePod) -> Pod {
        use k8s_openapi::api::core::v1::{ContainerStatus, PodSpec, PodStatus};
        let containers = |cs: Option<Vec<FileContainer>>| {
            cs.map(|cs| {
                cs.into_iter()
                    .map(|c| ContainerStatus {
                        container_id: c.container_id,
                        ..ContainerStatus::default()
                    })
                    .collect()
            })
        };
        Pod {
            metadata: ObjectMeta {
                namespace: f.metadata.namespace,
                name: f.metadata.name,
                uid: f.metadata.uid,
                resource_version: f.metadata.resource_version,
                labels: f.metadata.labels,
                owner_references: f.metadata.owner_references.map(|os| {
                    os.into_iter()
                        .map(|o| OwnerReference {
                            kind: o.kind,
                            name: o.name,
                            controller: o.controller,
                            ..OwnerReference::default()
                        })
                        .collect()
                }),
                ..ObjectMeta::default()
            },
            spec: f.spec.map(|s| PodSpec {
                node_name: s.node_name,
                ..PodSpec::default()
            }),
            status: f.status.map(|s| PodStatus {
                phase: s.phase,
                container_statuses: containers(s.container_statuses),
                init_container_statuses: containers(s.init_container_statuses),
                ..PodStatus::default()
            }),
        }
    }
}

/// Reads one Pod's JSON as the API server sends it into a [`Pod`] holding only what a
/// [`PodMeta`] needs (namespace, name, UID, labels, owners, node, phase, container IDs) and
/// `metadata.resourceVersion`; everything else is skipped as it is read, never built. The
/// Kubernetes watch reads pods this way, so that a page of a list (500 pods) costs what 500
/// [`PodMeta`]s do rather than 500 full objects; `--pods-file` items are read by the same
/// fields.
pub fn read_pod<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Pod, D::Error> {
    FilePod::deserialize(d).map(Pod::from)
}

/// ` (pod namespace/name)` of a raw item, as far as it has them, for error messages.
fn item_name(item: &Value) -> String {
    let m = &item["metadata"];
    match (m["namespace"].as_str(), m["name"].as_str()) {
        (Some(ns), Some(name)) => format!(" (pod {ns}/{name})"),
        (None, Some(name)) => format!(" (pod {name})"),
        _ => String::new(),
    }
}

/// Parses a `PodList` (or a `List` of pods) as `kubectl get pods -A -o json` prints it.
pub fn parse_pod_list(path: &Path, text: &str) -> Result<Vec<PodMeta>> {
    let bad = |why: String| Error::PodsFile {
        path: path.to_owned(),
        why,
    };
    let fix = "write it with `kubectl get pods -A -o json`";
    let doc: ListFile = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => bad(format!("it is not a PodList: {e}; {fix}")),
        _ => bad(format!("invalid JSON: {e}")),
    })?;
    let kind = doc.kind.as_deref().unwrap_or_default();
    if kind != "PodList" && kind != "List" {
        return Err(bad(format!(
            "its kind is {:?}, not PodList; {fix}",
            doc.kind.as_deref().unwrap_or("missing")
        )));
    }
    let items = doc
        .items
        .ok_or_else(|| bad("it has no `items` array".into()))?;
    let mut seen: HashMap<String, (usize, String)> = HashMap::with_capacity(items.len());
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |why: String| bad(format!("items[{i}] {why}{}", item_name(&item)));
            let pod = FilePod::deserialize(&item).map_err(|e| at(format!("is not a Pod: {e}")))?;
            if let Some(kind) = pod.kind.as_deref().filter(|k| *k != "Pod") {
                return Err(at(format!("is a {kind:?}, not a Pod")));
            }
            let meta = PodMeta::try_from(&Pod::from(pod)).map_err(|e| at(e.to_string()))?;
            if let Some((j, other)) = seen.insert(meta.uid.clone(), (i, item_name(&item))) {
                // Two pods with one UID would both take that UID's GPU values.
                return Err(at(format!(
                    "has metadata.uid {:?}, as items[{j}]{other} has: a UID names one pod; \
                     {fix}",
                    meta.uid
                )));
            }
            Ok(meta)
        })
        .collect()
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
    /// Why the newest version of the file was refused, while it is; and refusals since start.
    refused: RwLock<(Option<String>, u64)>,
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
            refused: RwLock::new((None, 0)),
        })
    }

    /// Re-reads the file if it changed. A bad reload keeps the last good list, logs why, and
    /// fails readiness ([`SourceHealth::refused`]) until a good one.
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
        let mut refused = self.refused.write().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(pods) => {
                tracing::info!(path = %self.path.display(), pods = pods.len(), "reloaded pods file");
                cur.1 = Arc::new(PodIndex::new(old.version + 1, pods));
                refused.0 = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the last good pod list");
                refused.0 = Some(format!(
                    "{e}; answering from the last good list ({} pods) until the file is fixed",
                    old.by_uid.len()
                ));
                refused.1 += 1;
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

    fn health(&self) -> SourceHealth {
        let refused = self.refused.read().unwrap_or_else(|e| e.into_inner());
        SourceHealth {
            refused: refused.0.clone(),
            refused_total: refused.1,
            ..SourceHealth::default()
        }
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
    fn a_uid_listed_twice_is_refused_naming_both_pods() {
        let e = parse_pod_list(
            Path::new("pods.json"),
            &list(vec![
                pod("ml", "a", "u1", json!({})),
                pod("ml", "b", "u2", json!({})),
                pod("ml", "c", "u1", json!({})),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("items[2] has metadata.uid \"u1\", as items[0] (pod ml/a) has")
                && e.ends_with("(pod ml/c)"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_reload_keeps_the_last_good_list() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("pods.json");
        let write = |text: &str| {
            let tmp = dir.join("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write(&list(vec![pod("a", "p1", "u1", json!({}))]));
        let src = PodsFile::load(&path).unwrap();
        assert_eq!(src.index().by_uid.len(), 1);
        assert_eq!(src.health(), SourceHealth::default());
        write("not json");
        src.reload_if_changed();
        assert_eq!(
            src.index().by_uid.len(),
            1,
            "bad reload must keep the old list"
        );
        assert_eq!(src.index().version, 1);
        // …and says so until the file is fixed: readiness fails on `refused`.
        let h = src.health();
        let why = h.refused.expect("a refused reload shows");
        assert!(
            why.contains("invalid JSON") && why.contains("last good list (1 pods)"),
            "{why}"
        );
        assert_eq!(h.refused_total, 1);
        write(&list(vec![
            pod("a", "p1", "u1", json!({})),
            pod("a", "p2", "u2", json!({})),
        ]));
        src.reload_if_changed();
        assert_eq!(src.index().by_uid.len(), 2);
        assert_eq!(src.index().version, 2);
        assert_eq!(src.health().refused, None, "fixed");
        assert_eq!(src.health().refused_total, 1, "the count stays");
        assert!(PodsFile::load(&dir.join("missing.json")).is_err());
    }

    #[test]
    fn a_pods_file_with_a_resource_version_that_is_not_a_string_still_loads() {
        let mut p = pod("ml", "vllm-0", "u1", json!({"app": "vllm"}));
        p["metadata"]["resourceVersion"] = json!(42);
        let pods = parse_pod_list(Path::new("pods.json"), &list(vec![p])).unwrap();
        assert_eq!(pods[0].name, "vllm-0");
    }

    #[test]
    fn a_label_value_that_is_not_a_string_is_refused_naming_the_file_the_pod_and_the_label() {
        let mut p = pod("ml", "vllm-0", "u1", json!({"app": "vllm", "replicas": 2}));
        let e = parse_pod_list(Path::new("pods.json"), &list(vec![p.clone()]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pods file \"pods.json\": items[0] is not a Pod"),
            "{e}"
        );
        assert!(
            e.contains("label \"replicas\" is 2, not a string; quote label values"),
            "{e}"
        );
        assert!(e.ends_with("(pod ml/vllm-0)"), "{e}");
        p["metadata"]["labels"]["replicas"] = json!("2");
        let pods = parse_pod_list(Path::new("pods.json"), &list(vec![p])).unwrap();
        assert_eq!(pods[0].labels["replicas"], "2");
    }

    #[test]
    fn the_file_and_the_watch_read_a_pod_the_same_way() {
        let item = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "ml", "name": "vllm-5d9c7f-abcde", "uid": "u1",
                "labels": {"app": "vllm", "pod-template-hash": "5d9c7f"},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "x"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "vllm-5d9c7f",
                     "uid": "y", "controller": true}]},
            "spec": {"nodeName": "gpu-1", "containers": []},
            "status": {"phase": "Running",
                "initContainerStatuses": [{"name": "i", "image": "i", "imageID": "",
                    "ready": true, "restartCount": 0, "containerID": "containerd://init0"}],
                "containerStatuses": [{"name": "c", "image": "c", "imageID": "", "ready": true,
                    "restartCount": 0, "containerID": "containerd://c0ffee"}]}});
        let from_file = parse_pod_list(Path::new("p.json"), &list(vec![item.clone()])).unwrap();
        let typed: Pod = serde_json::from_value(item.clone()).unwrap();
        let from_watch = PodMeta::try_from(&typed).unwrap();
        assert_eq!(from_file, vec![from_watch.clone()]);
        let slim = read_pod(&item).unwrap();
        assert_eq!(PodMeta::try_from(&slim).unwrap(), from_watch);
        assert_eq!(from_watch.owner, "Deployment/vllm");
        assert_eq!(from_watch.container_ids, ["init0", "c0ffee"]);
        // What a pod without its identity cannot be, and what absent fields mean.
        let bare = Pod::default();
        assert_eq!(
            PodMeta::try_from(&bare).unwrap_err().to_string(),
            "has no metadata.namespace"
        );
        // What the slim read skips: everything a PodMeta does not keep.
        let mut full = item.clone();
        full["metadata"]["resourceVersion"] = json!("4711");
        full["metadata"]["annotations"] = json!({"a": "b"});
        full["metadata"]["managedFields"] = json!([{"manager": "kubelet", "operation": "Update",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}]);
        full["spec"]["containers"] = json!([{"name": "c", "image": "vllm",
            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]);
        full["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        let slim = read_pod(&full).unwrap();
        assert_eq!(PodMeta::try_from(&slim).unwrap(), from_watch);
        assert_eq!(slim.metadata.resource_version.as_deref(), Some("4711"));
        assert_eq!(slim.metadata.annotations, None);
        assert_eq!(slim.metadata.managed_fields, None);
        assert_eq!(slim.spec.map(|s| s.containers), Some(vec![]));
        assert_eq!(slim.status.and_then(|s| s.conditions), None);
        let mut minimal = Pod::default();
        minimal.metadata.namespace = Some("ml".into());
        minimal.metadata.name = Some("p".into());
        minimal.metadata.uid = Some("u".into());
        let m = PodMeta::try_from(&minimal).unwrap();
        assert_eq!(
            (m.node.as_str(), m.phase.as_str(), m.owner.as_str()),
            ("", "Unknown", "")
        );
    }
}
