//! gpuscale's gRPC APIs, generated from `proto/*.proto` at build time.
//!
//! [`agent`]: the node agent's API (`gpuscale.agent.v1`), served by `gpuscale-agent run --listen`
//! and consumed by the collector. [`collector`]: the collector's debug API (`dump`).
//! [`externalscaler`]: KEDA's external-scaler API, served by the collector. Owns no logic but
//! the wire's own: [`delta`], how a stream of the agent API sends only what changed, and
//! [`series`], which series it carries.

pub mod delta;
pub mod series;

/// Generated code, nested like the protobuf packages so cross-package references resolve.
#[allow(missing_docs, clippy::all)]
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
#[allow(missing_docs, clippy::all)]
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

impl externalscaler::ScaledObjectRef {
    /// The reference KEDA sends for ScaledObject `namespace/name` whose trigger has `metadata`,
    /// on the scaler at `scaler_address`: KEDA adds `scalerAddress` to the metadata it passes.
    pub fn as_keda_sends(
        namespace: &str,
        name: &str,
        metadata: &[(&str, &str)],
        scaler_address: &str,
    ) -> externalscaler::ScaledObjectRef {
        let mut scaler_metadata: std::collections::HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        scaler_metadata.insert("scalerAddress".into(), scaler_address.into());
        externalscaler::ScaledObjectRef {
            name: name.into(),
            namespace: namespace.into(),
            scaler_metadata,
        }
    }
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

    /// `metric` at a steady `v`: its last value and every statistic of every window are `v`,
    /// each window holding `count(window)` samples (what an agent sends for a constant load;
    /// simulators and tests build snapshots from it).
    pub fn steady(
        metric: vocab::Metric,
        v: f64,
        count: impl Fn(vocab::Window) -> u32,
    ) -> agent::MetricSummary {
        agent::MetricSummary {
            metric: agent::Metric::from(metric) as i32,
            last: Some(v),
            windows: vocab::Window::ALL
                .map(|w| agent::WindowStats {
                    window_s: w.secs(),
                    avg: v,
                    min: v,
                    max: v,
                    p95: v,
                    count: count(w),
                })
                .to_vec(),
        }
    }
}

impl From<vocab::GpuState> for agent::GpuState {
    fn from(s: vocab::GpuState) -> agent::GpuState {
        use vocab::GpuState as V;
        match s {
            V::Starting => agent::GpuState::Starting,
            V::Ok => agent::GpuState::Ok,
            V::Lost => agent::GpuState::Lost,
            V::Error => agent::GpuState::Error,
        }
    }
}

impl agent::GpuState {
    /// The vocabulary's state of a wire value; `None` for `GPU_STATE_UNSPECIFIED` or a value
    /// this build does not know (a newer agent).
    pub fn vocab(code: i32) -> Option<vocab::GpuState> {
        use vocab::GpuState as V;
        Some(match agent::GpuState::try_from(code).ok()? {
            agent::GpuState::Unspecified => return None,
            agent::GpuState::Starting => V::Starting,
            agent::GpuState::Ok => V::Ok,
            agent::GpuState::Lost => V::Lost,
            agent::GpuState::Error => V::Error,
        })
    }

    /// The name dumps print for a wire value: the vocabulary's (`starting`, `ok`, `lost`,
    /// `error`), or `unknown` for `GPU_STATE_UNSPECIFIED` or a value this build does not know.
    pub fn name_of(code: i32) -> &'static str {
        Self::vocab(code).map_or("unknown", vocab::GpuState::name)
    }
}

impl From<vocab::Attribution> for agent::Attribution {
    fn from(a: vocab::Attribution) -> agent::Attribution {
        use vocab::Attribution as V;
        match a {
            V::None => agent::Attribution::None,
            V::Procfs => agent::Attribution::Procfs,
            V::Ebpf => agent::Attribution::Ebpf,
            V::Unknown => agent::Attribution::Unknown,
        }
    }
}

impl agent::Attribution {
    /// The vocabulary's attribution of a wire value; `None` for `ATTRIBUTION_UNSPECIFIED` or a
    /// value this build does not know.
    pub fn vocab(code: i32) -> Option<vocab::Attribution> {
        use vocab::Attribution as V;
        Some(match agent::Attribution::try_from(code).ok()? {
            agent::Attribution::Unspecified => return None,
            agent::Attribution::None => V::None,
            agent::Attribution::Procfs => V::Procfs,
            agent::Attribution::Ebpf => V::Ebpf,
            agent::Attribution::Unknown => V::Unknown,
        })
    }

    /// The name dumps print for a wire value: the vocabulary's (`procfs`, `ebpf`, `unknown`,
    /// `none`), or `unspecified` from a sender that set none (or a value this build does not
    /// know).
    pub fn name_of(code: i32) -> &'static str {
        Self::vocab(code).map_or("unspecified", vocab::Attribution::name)
    }
}

impl From<vocab::EbpfState> for agent::EbpfState {
    fn from(e: vocab::EbpfState) -> agent::EbpfState {
        use vocab::EbpfState as V;
        match e {
            V::Unknown => agent::EbpfState::Unspecified,
            V::On => agent::EbpfState::On,
            V::Off => agent::EbpfState::Off,
            V::Unavailable => agent::EbpfState::Unavailable,
        }
    }
}

impl agent::EbpfState {
    /// The vocabulary's state of a wire value; unspecified or unknown values read as
    /// [`vocab::EbpfState::Unknown`].
    pub fn vocab(code: i32) -> vocab::EbpfState {
        use vocab::EbpfState as V;
        match agent::EbpfState::try_from(code) {
            Ok(agent::EbpfState::On) => V::On,
            Ok(agent::EbpfState::Off) => V::Off,
            Ok(agent::EbpfState::Unavailable) => V::Unavailable,
            Ok(agent::EbpfState::Unspecified) | Err(_) => V::Unknown,
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

    #[test]
    fn every_state_of_the_vocabulary_has_its_own_wire_value_and_back() {
        use super::agent;
        let mut seen = std::collections::HashSet::new();
        for &s in vocab::GpuState::ALL {
            let w = agent::GpuState::from(s);
            assert_ne!(w, agent::GpuState::Unspecified);
            assert!(seen.insert(w as i32), "{s:?} shares a wire value");
            assert_eq!(agent::GpuState::vocab(w as i32), Some(s));
            assert_eq!(
                w.as_str_name(),
                format!("GPU_STATE_{}", s.name().to_uppercase())
            );
        }
        assert_eq!(agent::GpuState::vocab(0), None);
        assert_eq!(agent::GpuState::vocab(99), None);
        assert_eq!(
            agent::GpuState::name_of(agent::GpuState::Lost as i32),
            "lost"
        );
        assert_eq!(agent::GpuState::name_of(0), "unknown");

        seen.clear();
        for &a in vocab::Attribution::ALL {
            let w = agent::Attribution::from(a);
            assert_ne!(w, agent::Attribution::Unspecified);
            assert!(seen.insert(w as i32), "{a:?} shares a wire value");
            assert_eq!(agent::Attribution::vocab(w as i32), Some(a));
            assert_eq!(agent::Attribution::name_of(w as i32), a.name());
            assert_eq!(
                w.as_str_name(),
                format!("ATTRIBUTION_{}", a.name().to_uppercase())
            );
        }
        assert_eq!(agent::Attribution::name_of(0), "unspecified");
        assert_eq!(agent::Attribution::name_of(99), "unspecified");

        for &e in vocab::EbpfState::ALL {
            assert_eq!(agent::EbpfState::vocab(agent::EbpfState::from(e) as i32), e);
        }
        assert_eq!(agent::EbpfState::vocab(99), vocab::EbpfState::Unknown);
    }
}
