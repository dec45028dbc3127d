//! gpuscale's installer, run by `cargo xtask deploy`: renders the manifests in `deploy/`,
//! builds an OCI image of the agent and the collector without a Docker daemon, pushes it,
//! applies the manifests with server-side apply and waits for the rollout.
//!
//! It lives in its own package so that `cargo xtask` itself (the demo, the tests) never
//! compiles kube or the registry client.
//!
//! Modules: [`kinds`] (the Kubernetes kinds `deploy/` may hold), [`render`] (a kustomize
//! subset: `deploy/` → objects), [`checks`] (the least-privilege rules every render must pass),
//! [`image`] (binaries + the libraries they load → OCI layers), [`registry`] (push and pull
//! through the OCI distribution API), [`cluster`] (apply, rollout, uninstall), [`certificates`]
//! (the CA, the TLS Secrets and KEDA's authentication), [`snippet`] (the ScaledObject printed at
//! the end).
#![deny(missing_docs)]

pub mod certificates;
pub mod checks;
pub mod cluster;
pub mod image;
pub mod kinds;
pub mod registry;
pub mod render;
pub mod snippet;

use std::path::PathBuf;

/// What went wrong, with the input at fault and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file under `deploy/` is unreadable or not what the renderer accepts.
    #[error("{path}: {why}")]
    Manifest {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong and what to write instead.
        why: String,
    },
    /// The rendered manifests break one of the least-privilege rules of [`checks`].
    #[error("the rendered manifests break {} rule(s):\n  {}", .0.len(), .0.join("\n  "))]
    Checks(Vec<String>),
    /// The image could not be built from the binaries.
    #[error("building the image: {0}")]
    Image(String),
    /// The registry could not be reached or refused a request.
    #[error("registry {registry}: {why}")]
    Registry {
        /// The registry (host[:port]).
        registry: String,
        /// What failed and what to do.
        why: String,
    },
    /// No usable Kubernetes context, or the API server refused a request.
    #[error("{0}")]
    Kube(String),
    /// The DaemonSet or the Deployment did not become ready.
    #[error("{0}")]
    Rollout(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The default namespace of the manifests (`deploy/base/kustomization.yaml`).
pub const DEFAULT_NAMESPACE: &str = "gpuscale-system";

/// The image name the manifests use before it is pinned (`image: gpuscale`).
pub const IMAGE_NAME: &str = "gpuscale";

/// Installs rendered `objects` into `namespace`: everything up to the workloads, then the TLS
/// Secrets and KEDA's authentication ([`certificates::ensure`]), then the workloads, so their
/// pods find their Secrets at once. Returns warnings to print. What `cargo xtask deploy` does
/// after its preflight, and what the local cluster's `up` does.
pub async fn install(
    client: &kube::Client,
    objects: &[serde_json::Value],
    namespace: &str,
    keda_namespace: &str,
    timeout: std::time::Duration,
    progress: &mut dyn FnMut(String),
) -> Result<Vec<String>> {
    let issuance = certificates::Issuance::of(objects);
    certificates::preflight(client, issuance).await?;
    let is_workload = |o: &serde_json::Value| o["kind"] == "DaemonSet" || o["kind"] == "Deployment";
    let first_workload = objects
        .iter()
        .position(is_workload)
        .unwrap_or(objects.len());
    let (early, late) = objects.split_at(first_workload);
    cluster::apply(client, early, progress).await?;
    let warnings = certificates::ensure(
        client,
        namespace,
        keda_namespace,
        issuance,
        timeout,
        progress,
    )
    .await?;
    cluster::apply(client, late, progress).await?;
    Ok(warnings)
}

/// Builds the image from `binaries` and pushes it to `registry` (`host[:port][/path]`) as
/// `<registry>/gpuscale:<version>`. Returns the image and its pinned reference
/// `<registry>/gpuscale@sha256:…`. What `cargo xtask deploy --registry` does, and what the image
/// test runs against a registry on loopback.
pub async fn build_and_push(
    binaries: &[PathBuf],
    registry: &str,
    plain_http: bool,
    progress: &mut dyn FnMut(String),
) -> Result<(image::Image, String)> {
    let version = env!("CARGO_PKG_VERSION");
    let image = image::build(binaries, version, progress)?;
    progress(format!(
        "image {} ({} paths)",
        image.digest,
        image.paths.len()
    ));
    let tagged = format!(
        "{}/{}:{version}",
        registry.trim_end_matches('/'),
        registry::REPOSITORY
    );
    let client = registry::Registry::new(&tagged, plain_http)?;
    progress(format!("pushing to {tagged}"));
    let pinned = client.push(&tagged, &image, progress).await?;
    Ok((image, pinned))
}
