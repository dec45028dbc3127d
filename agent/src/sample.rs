//! The sample record the sampler writes into the ring, and the metric names users see.
//!
//! This module owns the byte layout of one sample ([`Sample`], 64 bytes, `#[repr(C)]`) and the
//! mapping from [`Metric`] names (the `metric` names of KEDA trigger metadata) to values. It does
//! no I/O.

use bytemuck::{Pod, Zeroable};

/// The metrics, named once for every crate (`vocab`).
pub use vocab::Metric;

/// Health of one GPU as the sampler last saw it: the vocabulary's (`vocab`).
pub use vocab::GpuState;

/// Index of each `f32` value in [`Sample::values`].
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub enum Slot {
    /// GPU utilization, percent.
    GpuUtil = 0,
    /// Memory-controller utilization, percent.
    MemUtil,
    /// GPM SM activity, percent.
    SmActive,
    /// GPM SM occupancy, percent.
    SmOccupancy,
    /// GPM tensor activity, percent.
    TensorActive,
    /// GPM DRAM activity, percent.
    DramActive,
    /// Power, watts.
    PowerWatts,
    /// Temperature, °C.
    TemperatureC,
}

impl Slot {
    /// The metric the slot holds.
    pub fn metric(self) -> Metric {
        match self {
            Slot::GpuUtil => Metric::GpuUtil,
            Slot::MemUtil => Metric::MemUtil,
            Slot::SmActive => Metric::SmActive,
            Slot::SmOccupancy => Metric::SmOccupancy,
            Slot::TensorActive => Metric::TensorActive,
            Slot::DramActive => Metric::DramActive,
            Slot::PowerWatts => Metric::PowerWatts,
            Slot::TemperatureC => Metric::TemperatureC,
        }
    }
}

/// `valid` bit for `vram_used_bytes` (bits 0..8 are the [`Slot`]s).
const VRAM_BIT: u32 = 1 << 8;

/// One device sample as stored in a ring slot. 64 bytes, no implicit padding.
///
/// A value is present only if its bit in `valid` is set: an absent value (GPM unsupported, a
/// failed call, a lost GPU) is never stored as 0.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable, Default)]
#[repr(C)]
pub struct Sample {
    /// Wall-clock time of the sample, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Bit `i` set: `values[i]` is present; bit 8: `vram_used_bytes` is present.
    pub valid: u32,
    /// [`GpuState`] code at the time of the sample.
    pub state: u32,
    /// The `f32` metrics, indexed by [`Slot`].
    pub values: [f32; 8],
    /// Device memory in use, bytes.
    pub vram_used_bytes: u64,
    /// Running compute processes seen in this sample.
    pub process_count: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
}

const _: () = assert!(std::mem::size_of::<Sample>() == 64);

/// Number of `u64` words a [`Sample`] occupies in a ring slot.
pub const SAMPLE_WORDS: usize = std::mem::size_of::<Sample>() / 8;

impl Sample {
    /// An empty sample at `ts_ns` in `state` with no values present.
    pub fn empty(ts_ns: u64, state: GpuState) -> Sample {
        Sample {
            ts_ns,
            state: state as u32,
            ..Sample::default()
        }
    }

    /// Sets an `f32` value and marks it present.
    pub fn set(&mut self, slot: Slot, value: f32) {
        self.values[slot as usize] = value;
        self.valid |= 1 << slot as u32;
    }

    /// Sets the VRAM in use and marks it present.
    pub fn set_vram_used(&mut self, bytes: u64) {
        self.vram_used_bytes = bytes;
        self.valid |= VRAM_BIT;
    }

    /// The state recorded with the sample.
    pub fn state(&self) -> GpuState {
        GpuState::from_code(self.state.into())
    }

    fn slot(&self, slot: Slot) -> Option<f64> {
        (self.valid & (1 << slot as u32) != 0).then(|| f64::from(self.values[slot as usize]))
    }

    /// The value of `metric`, or `None` when it was not measured. `vram_total_bytes` turns
    /// used bytes into a percentage; 0 means unknown.
    pub fn get(&self, metric: Metric, vram_total_bytes: u64) -> Option<f64> {
        match metric {
            Metric::SmActive => self.slot(Slot::SmActive),
            Metric::GpuUtil => self.slot(Slot::GpuUtil),
            Metric::SmOccupancy => self.slot(Slot::SmOccupancy),
            Metric::TensorActive => self.slot(Slot::TensorActive),
            Metric::DramActive => self.slot(Slot::DramActive),
            Metric::MemUtil => self.slot(Slot::MemUtil),
            Metric::PowerWatts => self.slot(Slot::PowerWatts),
            Metric::TemperatureC => self.slot(Slot::TemperatureC),
            Metric::VramUsedBytes => {
                (self.valid & VRAM_BIT != 0).then_some(self.vram_used_bytes as f64)
            }
            Metric::VramUsedPct => (self.valid & VRAM_BIT != 0 && vram_total_bytes > 0)
                .then(|| self.vram_used_bytes as f64 * 100.0 / vram_total_bytes as f64),
        }
    }

    /// All metrics of the sample, indexed like [`Metric::ALL`].
    pub fn metrics(&self, vram_total_bytes: u64) -> [Option<f64>; Metric::COUNT] {
        Metric::ALL.map(|m| self.get(m, vram_total_bytes))
    }

    /// The sample as ring words.
    pub fn to_words(&self) -> [u64; SAMPLE_WORDS] {
        bytemuck::cast(*self)
    }

    /// A sample from ring words.
    pub fn from_words(words: &[u64; SAMPLE_WORDS]) -> Sample {
        bytemuck::cast(*words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
            assert_eq!(Metric::ALL[m.index()], m);
        }
        assert_eq!(Metric::from_name("gpu_utilization"), None);
    }

    #[test]
    fn absent_values_read_as_none_not_zero() {
        let mut s = Sample::empty(5, GpuState::Ok);
        assert_eq!(s.get(Metric::SmActive, 0), None);
        s.set(Slot::SmActive, 0.0);
        assert_eq!(s.get(Metric::SmActive, 0), Some(0.0));
        assert_eq!(s.get(Metric::VramUsedPct, 100), None);
        s.set_vram_used(25);
        assert_eq!(s.get(Metric::VramUsedPct, 100), Some(25.0));
        assert_eq!(
            s.get(Metric::VramUsedPct, 0),
            None,
            "unknown total is not 0 %"
        );
    }

    #[test]
    fn sample_survives_the_word_round_trip() {
        let mut s = Sample::empty(123_456_789, GpuState::Lost);
        s.set(Slot::PowerWatts, 351.5);
        s.set_vram_used(20 << 30);
        s.process_count = 3;
        assert_eq!(Sample::from_words(&s.to_words()), s);
    }
}
