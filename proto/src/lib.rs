//! gpuscale's gRPC APIs, generated from `proto/*.proto` at build time.
//!
//! [`agent`]: the node agent's API (`gpuscale.agent.v1`), served by `gpuscale-agent run --listen`
//! and consumed by the collector. [`collector`]: the collector's debug API (`dump`).
//! [`externalscaler`]: KEDA's external-scaler API, served by the collector. Owns no logic.
#![allow(missing_docs, clippy::all)]

/// Generated code, nested like the protobuf packages so cross-package references resolve.
pub mod gpuscale {
    /// `gpuscale.agent.*`
    pub mod agent {
        /// `gpuscale.agent.v1`
        pub mod v1 {
            tonic::include_proto!("gpuscale.agent.v1");
        }
    }
    /// `gpuscale.collector.*`
    pub mod collector {
        /// `gpuscale.collector.v1`
        pub mod v1 {
            tonic::include_proto!("gpuscale.collector.v1");
        }
    }
}

/// The agent API, `gpuscale.agent.v1`.
pub use gpuscale::agent::v1 as agent;
/// The collector's debug API, `gpuscale.collector.v1`.
pub use gpuscale::collector::v1 as collector;

/// KEDA's external scaler API, package `externalscaler`.
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}
