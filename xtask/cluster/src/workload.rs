//! The GPU workloads the demo and the tests run on the cluster: vLLM-like Deployments whose
//! pods ask for `nvidia.com/gpu`, their running pods, and their simulated load.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

use crate::load::ANNOTATION;

/// A vLLM-like Deployment `ns/name`: `replicas` pods labelled `app=<name>` (plus `labels`), of one
/// container asking for `gpus` GPUs.
pub fn deployment(
    ns: &str,
    name: &str,
    replicas: i32,
    gpus: u32,
    labels: &[(&str, &str)],
) -> Value {
    let mut pod_labels = json!({"app": name});
    for (k, v) in labels {
        pod_labels[*k] = json!(v);
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "runtimeClassName": "nvidia",
                    "containers": [{
                        "name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                        "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}
                    }]
                }
            }
        }
    })
}

/// The Running, not deleting, pods labelled `app=<app>` in `ns`.
pub async fn running_pods(client: &Client, ns: &str, app: &str) -> kube::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect())
}

/// Sets `pod`'s simulated load (its `gpuscale.dev/simulated-load` annotation), as
/// `kubectl annotate --overwrite` would; nothing is sent when it already has that load.
pub async fn set_load(client: &Client, pod: &Pod, load: &str) -> kube::Result<()> {
    let current = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION));
    if current.map(String::as_str) == Some(load) {
        return Ok(());
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.patch(
        pod.metadata.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION: load}}})),
    )
    .await?;
    Ok(())
}
