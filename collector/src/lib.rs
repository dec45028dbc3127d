//! gpuscale cluster collector: follows every agent's snapshot stream, keeps a cluster view
//! (node → GPUs → pods, with freshness), joins it with pod metadata, and answers KEDA's
//! external-scaler API, `gpuscale-collector dump` and `gpuscale-collector query`.
//!
//! Modules, one folder per concern:
//!
//! - [`model`]: pure logic: [`model::trigger`] (trigger metadata), [`model::selector`] (label
//!   selectors), [`model::evaluate`] (a trigger's value), [`model::hpa`] (the HPA's replica
//!   count).
//! - [`sources`]: [`sources::agents`] (agent streams), [`sources::view`] (the in-memory view),
//!   [`sources::pods`] (pod metadata sources and `--pods-file`).
//! - [`kube`]: in-cluster mode (`--kube`): watches of pods, agent EndpointSlices and
//!   ScaledObjects' targets.
//! - [`api`]: what is served: [`api::scaler`] (KEDA's gRPC service), [`api::debug`] (the dump and
//!   evaluate API), [`api::http`] (health and readiness), [`api::metrics`] (Prometheus series).
//! - [`cli`]: the clients: [`cli::dump`] (the cluster view) and [`cli::query`] (what KEDA would
//!   be told).
//! - [`serve`]: the composition root that wires them together for `gpuscale-collector serve`.
#![deny(missing_docs)]

pub mod api;
pub mod cli;
pub mod kube;
pub mod model;
pub mod serve;
pub mod sources;

use std::path::PathBuf;

/// How many bytes of an oversized or bad input a message quotes.
const QUOTE: usize = 40;

/// `s` quoted for a message or a log line, cut to a short prefix (and its length) when long: what
/// the network sends is never echoed back whole.
pub fn quote(s: &str) -> String {
    if s.len() <= QUOTE {
        return format!("{s:?}");
    }
    let mut end = QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Errors the collector reports to users.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--pods-file` is missing or not a PodList.
    #[error("pods file {path:?}: {why}")]
    PodsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A flag value is unusable.
    #[error("{0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (--listen): {error}; pick a free address")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// The collector could not be reached by `dump`.
    #[error("cannot reach the collector at {addr} (--collector): {why}")]
    Connect {
        /// The address.
        addr: String,
        /// What failed.
        why: String,
    },
    /// An answer could not be printed as JSON.
    #[error("cannot print the answer as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The gRPC server failed.
    #[error("the collector's gRPC server failed: {0}")]
    Serve(String),
}

/// Result with the collector's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A gRPC endpoint for `address`, written `host:port` (or as a URL).
pub fn endpoint(address: &str) -> std::result::Result<tonic::transport::Endpoint, String> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| format!("{address:?} is not an address ({e}); write host:port"))
}

/// Connects to the collector at `addr` for a command-line client (`dump`, `query`), over TLS
/// when `tls` is given (the collector's certificate must name the host of `addr`), with an
/// optional deadline on every request.
pub async fn connect_collector(
    addr: &str,
    tls: Option<&gpuscale_health::tls::ClientFiles>,
    request_timeout: Option<std::time::Duration>,
) -> Result<tonic::transport::Channel> {
    let fail = |why: String| Error::Connect {
        addr: addr.to_owned(),
        why,
    };
    let mut ep = endpoint(addr)
        .map_err(fail)?
        .connect_timeout(std::time::Duration::from_secs(3));
    if let Some(t) = request_timeout {
        ep = ep.timeout(t);
    }
    let config = tls
        .map(|files| files.config(gpuscale_health::tls::ServerNames::Checked))
        .transpose()
        .map_err(|e| Error::Config(e.to_string()))?;
    gpuscale_health::tls::channel_to(&ep, config.map(std::sync::Arc::new))
        .await
        .map(|(channel, _)| channel)
        .map_err(fail)
}
