//! Thin kube-rs helpers: a client from a kubeconfig file, server-side apply of any object
//! (kinds found through discovery, so CRDs applied a moment ago work), and polling.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::{Client, Config};
use serde_json::Value;

/// The field manager of the cluster's own applies.
pub const FIELD_MANAGER: &str = "gpuscale-cluster";

/// A client for the kubeconfig at `path`.
pub async fn client(path: &Path) -> Result<Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("{} is not a usable kubeconfig", path.display()))?;
    Client::try_from(config).context("setting up the Kubernetes client")
}

/// Whether the API server answers `/readyz` with `ok`.
pub async fn ready(client: &Client) -> bool {
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    client
        .request_text(req)
        .await
        .is_ok_and(|t| t.trim() == "ok")
}

/// Server-side applies `obj` (any kind the API server serves) as [`FIELD_MANAGER`].
pub async fn apply(client: &Client, obj: &Value) -> Result<()> {
    apply_with(client, obj, &PatchParams::apply(FIELD_MANAGER).force()).await
}

/// What the API server makes of `obj` in a server-side dry run with strict field validation: an
/// error names every field its schema does not know (a CRD's own schema, for custom kinds).
/// Nothing is stored.
pub async fn dry_run_strict(client: &Client, obj: &Value) -> Result<()> {
    let params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .dry_run()
        .validation_strict();
    apply_with(client, obj, &params).await
}

async fn apply_with(client: &Client, obj: &Value, params: &PatchParams) -> Result<()> {
    let api_version = obj["apiVersion"]
        .as_str()
        .context("object without apiVersion")?;
    let kind = obj["kind"].as_str().context("object without kind")?;
    let name = obj["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?;
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("the API server does not serve {api_version} {kind}"))?;
    let api: Api<DynamicObject> = match (&caps.scope, obj["metadata"]["namespace"].as_str()) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    api.patch(name, params, &Patch::Apply(obj))
        .await
        .with_context(|| format!("applying {kind} {name}"))?;
    Ok(())
}

/// Applies every object of a YAML stream (documents separated by `---`).
pub async fn apply_yaml(client: &Client, yaml: &str, origin: &Path) -> Result<usize> {
    let objects = gpuscale_deploy::render::parse_documents(yaml, origin)
        .with_context(|| format!("parsing {}", origin.display()))?;
    for obj in &objects {
        apply(client, obj).await?;
    }
    Ok(objects.len())
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `timeout` with `what`
/// and the last reason `check` gave (through `Err`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {} s (last: {last})", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
