//! gpuscale cluster collector: follows every agent's snapshot stream, keeps a cluster view
//! (node → GPUs → pods, with freshness), joins it with pod metadata, and answers KEDA's
//! external-scaler API and `gpuscale-collector dump`.
//!
//! Modules: [`agents`] (agent streams), [`view`] (the in-memory view), [`pods`] (pod metadata
//! sources), [`selector`] (label selectors), [`trigger`] (trigger metadata and HPA math),
//! [`evaluate`] (a trigger's value), [`scaler`] (KEDA's gRPC service), [`debug`] (the dump API),
//! [`dump`] (the dump client), [`query`] (what KEDA would be told), [`serve`] (wiring it
//! together).
#![deny(missing_docs)]

pub mod agents;
pub mod debug;
pub mod dump;
pub mod evaluate;
pub mod pods;
pub mod query;
pub mod scaler;
pub mod selector;
pub mod serve;
pub mod trigger;
pub mod view;

use std::path::PathBuf;

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
    /// The gRPC server failed.
    #[error("the collector's gRPC server failed: {0}")]
    Serve(String),
}

/// Result with the collector's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
