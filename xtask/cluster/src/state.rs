//! What `up` leaves in the cluster folder:
//!
//! - `cluster.json` ([`ClusterInfo`]): for users and tests — the admin kubeconfig, the
//!   collector's address for a trigger's `scalerAddress`, the nodes, the versions;
//! - `state.json` ([`State`]): for `down` and a second `up` — every process started, by PID and
//!   start time, and the cgroup folder of the simulated pods.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::process::Proc;

/// One simulated GPU node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name.
    pub name: String,
    /// Its `nvidia.com/gpu` capacity: the fake GPUs its agent sees.
    pub gpus: u32,
    /// Its pod CIDR (inside the pod network namespace).
    pub pod_cidr: String,
    /// The fake NVML scenario its GPUs are read from.
    pub scenario: PathBuf,
}

/// `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The admin kubeconfig (user `admin`, group `system:masters`).
    pub kubeconfig: PathBuf,
    /// The API server's URL.
    pub server: String,
    /// The collector's gRPC address: a trigger's `scalerAddress`.
    pub collector: String,
    /// The collector's `--http-listen` address (`/healthz`, `/readyz`, `/metrics`).
    pub collector_http: String,
    /// The kubeconfig the collector runs with: its ServiceAccount's token.
    pub collector_kubeconfig: PathBuf,
    /// The `gpuscale-collector` binary it runs (for `dump` and `query`).
    pub collector_bin: PathBuf,
    /// The simulated GPU nodes.
    pub nodes: Vec<NodeInfo>,
    /// The version of each component.
    pub versions: serde_json::Map<String, serde_json::Value>,
    /// Every process's log file, by name.
    pub logs: PathBuf,
    /// The pod network namespace (`ip netns exec` it to reach a pod IP as a pod would).
    pub netns: String,
    /// The TLS files of the install's Secrets, for the processes that run here rather than in
    /// pods: `agent/` and `collector/`, each with `tls.crt`, `tls.key` and `ca.crt`.
    #[serde(default)]
    pub tls_dir: PathBuf,
}

/// `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Processes `up` started, in start order.
    pub procs: Vec<Proc>,
    /// The cgroup folder every simulated pod's cgroup is made under.
    pub cgroup_parent: Option<PathBuf>,
    /// Ports chosen at `up`.
    pub ports: serde_json::Map<String, serde_json::Value>,
}

/// Reads a JSON file of the cluster folder, `None` when it is not there.
pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not what `cluster up` writes; remove the folder and rerun",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `value` as JSON to `path` atomically (temp file + rename).
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
