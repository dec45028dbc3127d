//! Talking to the cluster: connect through a kubeconfig context, check what the install needs,
//! server-side apply the rendered objects, wait for the DaemonSet and the Deployment to roll
//! out (saying why a pod is stuck when one is), and delete everything again for `--uninstall`.
//!
//! What a rollout means and why a pod is stuck are pure functions of API objects
//! ([`daemonset_progress`], [`deployment_progress`], [`pod_problem`]), tested against recorded
//! objects; the rest is thin kube-rs calls.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config};
use serde_json::Value;

use crate::kinds;
use crate::render::{describe, str_at};
use crate::{Error, Result};

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "gpuscale-deploy";

/// Connects to the cluster of `context` (or the kubeconfig's current context, or the cluster
/// this runs in) and checks that the API server answers. Returns the client and a name for the
/// cluster in messages.
pub async fn connect(context: Option<&str>) -> Result<(Client, String)> {
    let config = match context {
        Some(ctx) => {
            let options = KubeConfigOptions {
                context: Some(ctx.to_owned()),
                ..KubeConfigOptions::default()
            };
            Config::from_kubeconfig(&options).await.map_err(|e| {
                let known = Kubeconfig::read()
                    .map(|k| {
                        k.contexts
                            .iter()
                            .map(|c| c.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                Error::Kube(format!(
                    "kube context {ctx:?}: {e}; the kubeconfig has: {}; pick one with --context \
                     (`kubectl config get-contexts` lists them)",
                    if known.is_empty() { "none" } else { &known }
                ))
            })?
        }
        None => Config::infer().await.map_err(|e| {
            Error::Kube(format!(
                "no Kubernetes context: {e}; point KUBECONFIG at your cluster's kubeconfig (or \
                 write ~/.kube/config), or pass --context; --dry-run needs no cluster"
            ))
        })?,
    };
    let url = config.cluster_url.to_string();
    let name = match context {
        Some(c) => format!("context {c} ({url})"),
        None => url.clone(),
    };
    let client = Client::try_from(config)
        .map_err(|e| Error::Kube(format!("cannot set up a client for {name}: {e}")))?;
    let version = client.apiserver_version().await.map_err(|e| {
        Error::Kube(format!(
            "cannot reach the API server of {name}: {e}; check it with `kubectl{} get nodes`",
            context
                .map(|c| format!(" --context {c}"))
                .unwrap_or_default()
        ))
    })?;
    let name = format!("{name}, Kubernetes {}", version.git_version);
    Ok((client, name))
}

/// A warning when the API server is older than the oldest Kubernetes the manifests are checked
/// against (1.29), from its `/version` answer's major and minor (`"1"`, `"28+"`).
pub fn version_warning(major: &str, minor: &str) -> Option<String> {
    let minor: u32 = minor.trim_end_matches('+').parse().ok()?;
    (major == "1" && minor < 29).then(|| {
        format!(
            "the cluster runs Kubernetes 1.{minor}; the manifests are checked against 1.29 and \
             1.33 and may be refused by older API servers"
        )
    })
}

fn api_resource(obj: &Value) -> Result<(ApiResource, bool)> {
    let (api, kind) = (
        str_at(obj, &["apiVersion"]).unwrap_or_default(),
        str_at(obj, &["kind"]).unwrap_or_default(),
    );
    let (_, k) = kinds::lookup(api, kind).ok_or_else(|| {
        Error::Kube(format!(
            "{}: not a kind the installer knows ({})",
            describe(obj),
            kinds::accepted()
        ))
    })?;
    let gvk = GroupVersionKind::gvk(k.group, k.version, k.kind);
    Ok((
        ApiResource::from_gvk_with_plural(&gvk, k.plural),
        k.namespaced,
    ))
}

fn dynamic_api(client: &Client, obj: &Value) -> Result<Api<DynamicObject>> {
    let (ar, namespaced) = api_resource(obj)?;
    Ok(if namespaced {
        let ns = str_at(obj, &["metadata", "namespace"]).unwrap_or("default");
        Api::namespaced_with(client.clone(), ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

fn api_error(doing: &str, e: kube::Error) -> Error {
    let hint = match &e {
        kube::Error::Api(s) if s.code == 403 => {
            "; your user may not do this: apply as a cluster admin (the install creates a \
             ClusterRole and a PriorityClass)"
        }
        kube::Error::Api(s) if s.code == 422 => {
            "; the API server refused the object: is the cluster older than Kubernetes 1.29?"
        }
        _ => "",
    };
    Error::Kube(format!("{doing}: {e}{hint}"))
}

/// Warnings about what the install needs but does not install: a recent enough Kubernetes,
/// the RuntimeClass the agent
/// names, GPU nodes carrying `nvidia.com/gpu.present=true`, KEDA. Each is a line to print;
/// a check the user may not run is skipped.
pub async fn preflight(client: &Client, objects: &[Value]) -> Vec<String> {
    let mut notes = Vec::new();
    if let Ok(v) = client.apiserver_version().await {
        notes.extend(version_warning(&v.major, &v.minor));
    }
    let runtime_class = objects
        .iter()
        .filter(|o| o["kind"] == "DaemonSet")
        .find_map(|o| str_at(o, &["spec", "template", "spec", "runtimeClassName"]));
    if let Some(rc) = runtime_class {
        let gvk = GroupVersionKind::gvk("node.k8s.io", "v1", "RuntimeClass");
        let api: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, "runtimeclasses"),
        );
        if let Ok(None) = api.get_opt(rc).await {
            notes.push(format!(
                "no RuntimeClass {rc:?}: the agent pods will not start. Install the NVIDIA GPU \
                 operator or the NVIDIA container toolkit (which create it), or deploy with \
                 --overlay cdi (docs/INSTALL.md)"
            ));
        }
    }
    let nodes: Api<Node> = Api::all(client.clone());
    if let Ok(list) = nodes
        .list_metadata(&ListParams::default().labels("nvidia.com/gpu.present=true"))
        .await
    {
        if list.items.is_empty() {
            notes.push(
                "no node is labelled nvidia.com/gpu.present=true, so no agent will be scheduled: \
                 install GPU feature discovery (part of the GPU operator) or label your GPU \
                 nodes: kubectl label node NODE nvidia.com/gpu.present=true"
                    .into(),
            );
        }
    }
    let gvk = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "customresourcedefinitions"),
    );
    if let Ok(None) = crds.get_opt("scaledobjects.keda.sh").await {
        notes.push(
            "KEDA is not installed (no scaledobjects.keda.sh CRD): the collector will run, but \
             nothing will call it until KEDA is installed (docs/INSTALL.md)"
                .into(),
        );
    }
    notes
}

/// Server-side applies every object, in order, as [`FIELD_MANAGER`] (forcing ownership of the
/// fields it sets).
pub async fn apply(
    client: &Client,
    objects: &[Value],
    progress: &mut dyn FnMut(String),
) -> Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for obj in objects {
        let api = dynamic_api(client, obj)?;
        let name = str_at(obj, &["metadata", "name"]).unwrap_or_default();
        api.patch(name, &params, &Patch::Apply(obj))
            .await
            .map_err(|e| api_error(&format!("applying {}", describe(obj)), e))?;
        progress(format!("  applied {}", describe(obj)));
    }
    Ok(())
}

/// Deletes every object, last first; objects already gone are fine. Then waits up to
/// `timeout` for the namespace to finish terminating.
pub async fn delete(
    client: &Client,
    objects: &[Value],
    timeout: Duration,
    progress: &mut dyn FnMut(String),
) -> Result<()> {
    for obj in objects.iter().rev() {
        let api = dynamic_api(client, obj)?;
        let name = str_at(obj, &["metadata", "name"]).unwrap_or_default();
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => progress(format!("  deleted {}", describe(obj))),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                progress(format!("  {} was not there", describe(obj)))
            }
            Err(e) => return Err(api_error(&format!("deleting {}", describe(obj)), e)),
        }
    }
    let Some(ns) = objects
        .iter()
        .find(|o| o["kind"] == "Namespace")
        .and_then(|o| str_at(o, &["metadata", "name"]))
    else {
        return Ok(());
    };
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        match api.get_opt(ns).await {
            Ok(None) => {
                progress(format!("  namespace {ns} is gone"));
                return Ok(());
            }
            Ok(Some(_)) if start.elapsed() < timeout => {
                if start.elapsed().as_secs() % 10 < 2 {
                    progress(format!(
                        "  namespace {ns} is terminating ({}s)",
                        start.elapsed().as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(Some(_)) => {
                return Err(Error::Kube(format!(
                    "namespace {ns} is still terminating after {}s; see what holds it with \
                     `kubectl get namespace {ns} -o yaml` (status.conditions)",
                    timeout.as_secs()
                )))
            }
            Err(e) => return Err(api_error(&format!("reading namespace {ns}"), e)),
        }
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Every pod is updated and available.
    pub done: bool,
    /// One line for the user: `DaemonSet gpuscale-agent: 2/3 updated, 1/3 available`.
    pub line: String,
    /// Something the user should know even though it is done (no node matched).
    pub warning: Option<String>,
}

/// A DaemonSet's rollout, judged as `kubectl rollout status` does.
pub fn daemonset_progress(ds: &DaemonSet) -> Progress {
    let name = ds.metadata.name.clone().unwrap_or_default();
    let generation = ds.metadata.generation.unwrap_or(0);
    let Some(s) = &ds.status else {
        return Progress {
            done: false,
            line: format!("DaemonSet {name}: no status yet"),
            warning: None,
        };
    };
    let desired = s.desired_number_scheduled;
    let updated = s.updated_number_scheduled.unwrap_or(0);
    let available = s.number_available.unwrap_or(0);
    let observed = s.observed_generation.unwrap_or(0) >= generation;
    let line =
        format!("DaemonSet {name}: {updated}/{desired} updated, {available}/{desired} available");
    let warning = (observed && desired == 0).then(|| {
        format!(
            "DaemonSet {name} matches no node: no GPU node carries nvidia.com/gpu.present=true \
             (install GPU feature discovery or label the nodes), so no agent runs"
        )
    });
    Progress {
        done: observed && updated >= desired && available >= desired,
        line,
        warning,
    }
}

/// A Deployment's rollout, judged as `kubectl rollout status` does. `Err` when the Deployment
/// exceeded its progress deadline.
pub fn deployment_progress(d: &Deployment) -> std::result::Result<Progress, String> {
    let name = d.metadata.name.clone().unwrap_or_default();
    let generation = d.metadata.generation.unwrap_or(0);
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(s) = &d.status else {
        return Ok(Progress {
            done: false,
            line: format!("Deployment {name}: no status yet"),
            warning: None,
        });
    };
    if let Some(c) = s.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    }) {
        return Err(format!(
            "Deployment {name} exceeded its progress deadline: {}",
            c.message.clone().unwrap_or_default()
        ));
    }
    let updated = s.updated_replicas.unwrap_or(0);
    let total = s.replicas.unwrap_or(0);
    let available = s.available_replicas.unwrap_or(0);
    let observed = s.observed_generation.unwrap_or(0) >= generation;
    Ok(Progress {
        done: observed && updated >= want && total <= updated && available >= updated,
        line: format!(
            "Deployment {name}: {updated}/{want} updated, {available}/{want} available{}",
            if total > updated {
                format!(", {} old terminating", total - updated)
            } else {
                String::new()
            }
        ),
        warning: None,
    })
}

/// Why a pod is not ready, if it is not: unschedulable (with the scheduler's message), a
/// container waiting (`ImagePullBackOff`, `CrashLoopBackOff` with its last exit), or running
/// but failing its readiness probe.
pub fn pod_problem(pod: &Pod) -> Option<String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .map(|n| format!(" on node {n}"))
        .unwrap_or_default();
    let status = pod.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return Some(format!(
            "pod {name} cannot be scheduled: {}",
            c.message
                .clone()
                .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
        ));
    }
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for cs in statuses {
        let state = cs.state.as_ref();
        if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            if reason == "ContainerCreating" || reason == "PodInitializing" {
                continue;
            }
            let mut msg = format!("pod {name}{node}: container {}: {reason}", cs.name);
            if let Some(m) = w.message.as_deref().filter(|m| !m.is_empty()) {
                msg.push_str(&format!(": {m}"));
            }
            if let Some(t) = cs.last_state.as_ref().and_then(|l| l.terminated.as_ref()) {
                msg.push_str(&format!(
                    "; last exit code {} ({}){}",
                    t.exit_code,
                    t.reason.clone().unwrap_or_default(),
                    t.message
                        .as_deref()
                        .map(|m| format!(": {}", m.trim()))
                        .unwrap_or_default()
                ));
            }
            return Some(msg);
        }
        if state.and_then(|s| s.running.as_ref()).is_some() && !cs.ready {
            return Some(format!(
                "pod {name}{node}: container {} runs but is not ready (its readiness probe fails; \
                 see its log)",
                cs.name
            ));
        }
    }
    None
}

/// The newest Warning event's message for an object (`kind`, `name`), e.g. a DaemonSet whose
/// pods the API server refused to create.
pub fn latest_warning(events: &[Event], kind: &str, name: &str) -> Option<String> {
    events
        .iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.involved_object.kind.as_deref() == Some(kind)
                && e.involved_object.name.as_deref() == Some(name)
        })
        .max_by_key(|e| {
            e.last_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(0)
        })
        .map(|e| {
            format!(
                "{kind} {name}: {}: {}",
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            )
        })
}

/// Why the workload `name` (with pod label `app.kubernetes.io/name=name`) is not ready: the
/// first failing pod's reason, else the workload's newest warning event.
async fn diagnose(client: &Client, ns: &str, kind: &str, name: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/name={name}"));
    if let Ok(list) = pods.list(&lp).await {
        if let Some(p) = list.items.iter().find_map(pod_problem) {
            return Some(format!(
                "{p} (`kubectl -n {ns} describe pod` and `kubectl -n {ns} logs` show more)"
            ));
        }
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
    let list = events.list(&lp).await.ok()?;
    latest_warning(&list.items, kind, name)
}

/// Waits until the DaemonSet and the Deployment (both named after their pods'
/// `app.kubernetes.io/name`) in `ns` are rolled out, printing progress when it changes and the
/// reason a pod is stuck. Fails after `timeout` with the failing pod's reason.
pub async fn wait_rollout(
    client: &Client,
    ns: &str,
    daemonset: &str,
    deployment: &str,
    timeout: Duration,
    progress: &mut dyn FnMut(String),
) -> Result<Vec<String>> {
    let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let dep_api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    let mut last = String::new();
    let mut last_problem = String::new();
    loop {
        let ds = ds_api
            .get(daemonset)
            .await
            .map_err(|e| api_error(&format!("reading DaemonSet {ns}/{daemonset}"), e))?;
        let dep = dep_api
            .get(deployment)
            .await
            .map_err(|e| api_error(&format!("reading Deployment {ns}/{deployment}"), e))?;
        let a = daemonset_progress(&ds);
        let b = deployment_progress(&dep).map_err(|why| {
            Error::Rollout(format!(
                "{why}; see `kubectl -n {ns} describe deployment {deployment}`"
            ))
        })?;
        let line = format!("{} · {}", a.line, b.line);
        if line != last {
            progress(format!("  [{:>3}s] {line}", start.elapsed().as_secs()));
            last = line;
        }
        if a.done && b.done {
            return Ok(a.warning.into_iter().collect());
        }
        let stuck = [(&a, "DaemonSet", daemonset), (&b, "Deployment", deployment)];
        let mut problem = None;
        for (p, kind, name) in stuck {
            // Give pods a moment to start before asking why they have not (less when the
            // whole wait is shorter).
            if !p.done && start.elapsed() >= timeout.min(Duration::from_secs(10)) {
                problem = diagnose(client, ns, kind, name).await;
                if problem.is_some() {
                    break;
                }
            }
        }
        if let Some(p) = &problem {
            if *p != last_problem {
                progress(format!("        waiting on: {p}"));
                last_problem = p.clone();
            }
        }
        if start.elapsed() > timeout {
            let which = if a.done { b.line } else { a.line };
            return Err(Error::Rollout(format!(
                "the rollout did not finish in {}s ({which}){}",
                timeout.as_secs(),
                problem.map(|p| format!(": {p}")).unwrap_or_else(|| format!(
                    "; see `kubectl -n {ns} get pods` and `kubectl -n {ns} get events`"
                ))
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/recorded")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
    }

    #[test]
    fn a_daemonset_mid_rollout_is_not_done_and_says_how_far_it_is() {
        let p = daemonset_progress(&recorded("daemonset-rolling.json"));
        assert!(!p.done);
        assert!(p.line.contains("1/3 updated, 2/3 available"), "{}", p.line);
    }

    #[test]
    fn a_rolled_out_daemonset_is_done() {
        let p = daemonset_progress(&recorded("daemonset-ready.json"));
        assert!(p.done, "{}", p.line);
        assert_eq!(p.warning, None);
    }

    #[test]
    fn a_daemonset_matching_no_node_is_done_with_a_warning_about_the_gpu_label() {
        let p = daemonset_progress(&recorded("daemonset-no-nodes.json"));
        assert!(p.done);
        assert!(p.warning.unwrap().contains("nvidia.com/gpu.present"));
    }

    #[test]
    fn a_daemonset_whose_new_generation_is_not_observed_yet_is_not_done() {
        let mut ds: DaemonSet = recorded("daemonset-ready.json");
        ds.metadata.generation = Some(5);
        assert!(!daemonset_progress(&ds).done);
    }

    #[test]
    fn a_deployment_with_old_replicas_terminating_is_not_done() {
        let p = deployment_progress(&recorded("deployment-rolling.json")).unwrap();
        assert!(!p.done);
        assert!(p.line.contains("old terminating"), "{}", p.line);
    }

    #[test]
    fn a_rolled_out_deployment_is_done() {
        assert!(
            deployment_progress(&recorded("deployment-ready.json"))
                .unwrap()
                .done
        );
    }

    #[test]
    fn a_deployment_past_its_progress_deadline_is_an_error_with_the_controllers_message() {
        let e = deployment_progress(&recorded("deployment-deadline.json")).unwrap_err();
        assert!(e.contains("ProgressDeadlineExceeded") || e.contains("progress deadline"));
        assert!(e.contains("gpuscale-collector-6d9f"), "{e}");
    }

    #[test]
    fn a_crash_looping_agent_is_reported_with_its_last_exit() {
        let why = pod_problem(&recorded("pod-crashloop.json")).unwrap();
        assert!(why.contains("CrashLoopBackOff"), "{why}");
        assert!(why.contains("exit code 1"), "{why}");
        assert!(why.contains("libnvidia-ml.so.1"), "{why}");
        assert!(why.contains("gpu-node-1"), "{why}");
    }

    #[test]
    fn an_image_pull_failure_is_reported_with_the_kubelets_message() {
        let why = pod_problem(&recorded("pod-imagepull.json")).unwrap();
        assert!(why.contains("ImagePullBackOff"), "{why}");
        assert!(why.contains("127.0.0.1:5000/gpuscale@sha256"), "{why}");
    }

    #[test]
    fn an_unschedulable_pod_is_reported_with_the_schedulers_message() {
        let why = pod_problem(&recorded("pod-unschedulable.json")).unwrap();
        assert!(why.contains("cannot be scheduled"), "{why}");
        assert!(why.contains("Insufficient memory"), "{why}");
    }

    #[test]
    fn clusters_older_than_1_29_get_a_warning() {
        assert!(version_warning("1", "28+").unwrap().contains("1.28"));
        assert_eq!(version_warning("1", "29"), None);
        assert_eq!(version_warning("1", "33"), None);
    }

    #[test]
    fn a_ready_pod_has_no_problem() {
        assert_eq!(pod_problem(&recorded("pod-ready.json")), None);
    }

    #[test]
    fn a_refused_pod_creation_is_found_in_the_daemonsets_events() {
        let events: k8s_openapi::List<Event> = recorded("events-runtimeclass.json");
        let why = latest_warning(&events.items, "DaemonSet", "gpuscale-agent").unwrap();
        assert!(why.contains("FailedCreate"), "{why}");
        assert!(why.contains("RuntimeClass"), "{why}");
    }
}
