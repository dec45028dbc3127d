//! In-cluster mode (`serve --kube`): everything the collector learns from the Kubernetes API.
//!
//! - [`pods::KubePods`]: a watch of every pod (namespace, name, UID, labels, owner, node, phase,
//!   container IDs) behind the same [`PodSource`](crate::sources::pods::PodSource) interface as
//!   `--pods-file`. Until its first complete list it is unsynced (KEDA gets `UNAVAILABLE`, never
//!   a value over no pods); when the API server is out of contact it keeps serving the last list
//!   and says for how long, so a trigger's `staleAfter` turns it into `UNAVAILABLE`, as for
//!   agents.
//! - [`agents::discover_agents`]: a watch of the EndpointSlices of the agents' headless Service
//!   (`--agent-service NAMESPACE/NAME`), feeding the [`Fleet`](crate::sources::agents::Fleet)
//!   as agents join and leave.
//! - [`targets::KubeTargets`]: the pod selector of a ScaledObject's target when a trigger has no
//!   `podSelector`: watches of ScaledObjects (`keda.sh/v1alpha1`), Deployments and
//!   StatefulSets; any other kind through its `/scale` subresource (`status.selector`), read in
//!   the background and refreshed every [`targets::SCALE_REFRESH`]. KEDA calls only read memory.
//! - [`watch`]: what the three share: following one watch and whether it can be trusted.
//!
//! Every watch re-lists after a `410 Gone` and retries with backoff after errors (kube-rs's
//! watcher). Errors are logged once per change of message; RBAC refusals name the verb and the
//! resource to grant. This module never answers KEDA itself and never blocks a KEDA call on the
//! network.

pub mod agents;
pub mod pods;
pub mod targets;
pub mod watch;

use crate::{Error, Result};

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
