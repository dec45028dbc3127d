//! The metrics gpuscale measures, named once: the names the agent reports on the wire, the
//! `metric` of KEDA trigger metadata, and the dumps and Prometheus labels all come from here.

use std::fmt;

/// A metric the agent reports; [`Metric::TRIGGER`] are the ones a trigger may scale on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// GPM SM activity, % (Hopper and newer): the honest compute-saturation signal.
    SmActive,
    /// NVML GPU utilization, %: time any kernel ran; overstates saturation.
    GpuUtil,
    /// GPM SM occupancy, %: resident warps against the maximum.
    SmOccupancy,
    /// GPM tensor-pipe activity, %.
    TensorActive,
    /// GPM DRAM activity, %: memory bandwidth in use.
    DramActive,
    /// NVML memory utilization, %: time device memory was read or written.
    MemUtil,
    /// Device memory in use, bytes.
    VramUsedBytes,
    /// Device memory in use, % of the GPU's (or MIG instance's) total.
    VramUsedPct,
    /// Board power draw, watts.
    PowerWatts,
    /// GPU temperature, °C (reported, not a trigger metric).
    TemperatureC,
}

impl Metric {
    /// Every metric, in the order dumps print them (and [`Metric::index`] counts).
    pub const ALL: [Metric; 10] = [
        Metric::SmActive,
        Metric::GpuUtil,
        Metric::SmOccupancy,
        Metric::TensorActive,
        Metric::DramActive,
        Metric::MemUtil,
        Metric::VramUsedBytes,
        Metric::VramUsedPct,
        Metric::PowerWatts,
        Metric::TemperatureC,
    ];

    /// Number of metrics.
    pub const COUNT: usize = Self::ALL.len();

    /// The metrics a trigger's `metric` may name, in the order error messages list them:
    /// [`Metric::ALL`] but the last, temperature.
    pub const TRIGGER: [Metric; Self::COUNT - 1] = {
        let mut t = [Metric::SmActive; Self::COUNT - 1];
        let mut i = 0;
        while i < t.len() {
            t[i] = Self::ALL[i];
            i += 1;
        }
        t
    };

    /// The name as users write it and agents report it (`sm_active`, `vram_used_bytes`, …).
    pub fn name(self) -> &'static str {
        match self {
            Metric::SmActive => "sm_active",
            Metric::GpuUtil => "gpu_util",
            Metric::SmOccupancy => "sm_occupancy",
            Metric::TensorActive => "tensor_active",
            Metric::DramActive => "dram_active",
            Metric::MemUtil => "mem_util",
            Metric::VramUsedBytes => "vram_used_bytes",
            Metric::VramUsedPct => "vram_used_pct",
            Metric::PowerWatts => "power_watts",
            Metric::TemperatureC => "temperature_c",
        }
    }

    /// The metric with this exact (case-sensitive) name.
    pub fn from_name(name: &str) -> Option<Metric> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Position in [`Metric::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether a trigger may scale on it.
    pub fn is_trigger(self) -> bool {
        self != Metric::TemperatureC
    }

    /// Whether it is a percentage (0–100 per GPU), which a replica's GPUs average rather than
    /// add.
    pub fn is_percent(self) -> bool {
        !matches!(
            self,
            Metric::VramUsedBytes | Metric::PowerWatts | Metric::TemperatureC
        )
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_positions_follow_all() {
        for (i, m) in Metric::ALL.into_iter().enumerate() {
            assert_eq!(Metric::from_name(m.name()), Some(m));
            assert_eq!(m.index(), i);
            assert_eq!(m.to_string(), m.name());
        }
        assert_eq!(Metric::from_name("SM_ACTIVE"), None);
        assert!(Metric::TRIGGER.iter().all(|m| m.is_trigger()));
        assert!(!Metric::TemperatureC.is_trigger());
        assert_eq!(Metric::TRIGGER.len(), Metric::COUNT - 1);
    }
}
