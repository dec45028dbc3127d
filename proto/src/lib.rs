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

impl From<vocab::Metric> for agent::Metric {
    fn from(m: vocab::Metric) -> agent::Metric {
        use vocab::Metric as V;
        match m {
            V::SmActive => agent::Metric::SmActive,
            V::GpuUtil => agent::Metric::GpuUtil,
            V::SmOccupancy => agent::Metric::SmOccupancy,
            V::TensorActive => agent::Metric::TensorActive,
            V::DramActive => agent::Metric::DramActive,
            V::MemUtil => agent::Metric::MemUtil,
            V::VramUsedBytes => agent::Metric::VramUsedBytes,
            V::VramUsedPct => agent::Metric::VramUsedPct,
            V::PowerWatts => agent::Metric::PowerWatts,
            V::TemperatureC => agent::Metric::TemperatureC,
        }
    }
}

impl agent::Metric {
    /// The metric a trigger names `name` (`sm_active`, …).
    pub fn named(name: &str) -> Option<agent::Metric> {
        vocab::Metric::from_name(name).map(Into::into)
    }

    /// The vocabulary's metric; `None` for `METRIC_UNSPECIFIED`.
    pub fn vocab(self) -> Option<vocab::Metric> {
        use vocab::Metric as V;
        Some(match self {
            agent::Metric::Unspecified => return None,
            agent::Metric::SmActive => V::SmActive,
            agent::Metric::GpuUtil => V::GpuUtil,
            agent::Metric::SmOccupancy => V::SmOccupancy,
            agent::Metric::TensorActive => V::TensorActive,
            agent::Metric::DramActive => V::DramActive,
            agent::Metric::MemUtil => V::MemUtil,
            agent::Metric::VramUsedBytes => V::VramUsedBytes,
            agent::Metric::VramUsedPct => V::VramUsedPct,
            agent::Metric::PowerWatts => V::PowerWatts,
            agent::Metric::TemperatureC => V::TemperatureC,
        })
    }
}

impl agent::MetricSummary {
    /// The metric summarised; `None` when the sender used a value this build does not know.
    pub fn vocab_metric(&self) -> Option<vocab::Metric> {
        agent::Metric::try_from(self.metric).ok()?.vocab()
    }
}

impl agent::Attribution {
    /// The name dumps print (`procfs`, `ebpf`, `unknown`, `none`; `unspecified` from a sender
    /// that set none).
    pub fn name(self) -> &'static str {
        match self {
            agent::Attribution::Unspecified => "unspecified",
            agent::Attribution::None => "none",
            agent::Attribution::Procfs => "procfs",
            agent::Attribution::Ebpf => "ebpf",
            agent::Attribution::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_of_the_vocabulary_has_its_own_wire_value_and_back() {
        let mut seen = std::collections::HashSet::new();
        for m in vocab::Metric::ALL {
            let w = super::agent::Metric::from(m);
            assert_ne!(w, super::agent::Metric::Unspecified);
            assert!(seen.insert(w as i32), "{m:?} shares a wire value");
            assert_eq!(w.vocab(), Some(m));
            // The wire name is the trigger name, upper-cased, with the enum's prefix.
            assert_eq!(
                w.as_str_name(),
                format!("METRIC_{}", m.name().to_uppercase())
            );
        }
        assert_eq!(super::agent::Metric::Unspecified.vocab(), None);
    }
}
