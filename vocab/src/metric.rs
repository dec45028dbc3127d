//! The metrics gpuscale measures, named once: the names the agent reports on the wire, the
//! `metric` of KEDA trigger metadata, and the dumps and Prometheus labels all come from here.

use strum::{Display, EnumCount, EnumString, IntoStaticStr, VariantArray};

/// The most power a board can draw, watts (today's largest boards draw about 1.2 kW): a reading
/// above it is a driver's error, refused by the agent and by the collector.
pub const MAX_POWER_WATTS: f64 = 10_000.0;
/// The hottest a GPU can read and still be working, °C (they throttle near 90 and shut down
/// near 100): a reading above it is refused likewise.
pub const MAX_TEMPERATURE_C: f64 = 200.0;

/// A metric the agent reports; [`Metric::TRIGGER`] are the ones a trigger may scale on. Its
/// name (`sm_active`, …, from strum: the variant in snake case) is a contract: KEDA trigger
/// metadata, dumps and Prometheus labels spell it so.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    IntoStaticStr,
    EnumString,
    Display,
    EnumCount,
    VariantArray,
)]
#[strum(serialize_all = "snake_case")]
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
    /// Number of metrics.
    pub const COUNT: usize = <Metric as strum::EnumCount>::COUNT;

    /// Every metric, in the order dumps print them (and [`Metric::index`] counts): the order of
    /// declaration.
    pub const ALL: [Metric; Self::COUNT] = {
        let variants = <Metric as strum::VariantArray>::VARIANTS;
        let mut all = [Metric::SmActive; Self::COUNT];
        let mut i = 0;
        while i < all.len() {
            all[i] = variants[i];
            i += 1;
        }
        all
    };

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
        self.into()
    }

    /// The metric with this exact (case-sensitive) name.
    pub fn from_name(name: &str) -> Option<Metric> {
        name.parse().ok()
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

    #[test]
    fn the_names_are_the_documented_ones() {
        // The contract users write in ScaledObjects (README, docs/API.md): a rename of a variant
        // must not rename a metric.
        let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(
            names,
            [
                "sm_active",
                "gpu_util",
                "sm_occupancy",
                "tensor_active",
                "dram_active",
                "mem_util",
                "vram_used_bytes",
                "vram_used_pct",
                "power_watts",
                "temperature_c",
            ]
        );
    }
}
