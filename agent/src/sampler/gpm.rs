//! GPM (GPU Performance Monitoring, Hopper and later): SM activity, occupancy, tensor and DRAM
//! activity from two NVML GPM samples about [`GPM_MIN_SPACING`] apart. A value older than
//! [`GPM_MAX_AGE`] is absent rather than held, and a partial answer is absent rather than a mix
//! of old and new values.

use std::time::{Duration, Instant};

use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::{gpm_metrics_get, GpmSample};
use nvml_wrapper::Nvml;

use super::{classify, optional, Failure};
use crate::sample::Slot;

/// GPM needs two samples about this far apart.
pub const GPM_MIN_SPACING: Duration = Duration::from_millis(100);
/// Wake-up jitter tolerated against [`GPM_MIN_SPACING`], so that at a 100 ms interval every tick
/// refreshes GPM instead of every other one.
const GPM_SPACING_SLACK: Duration = Duration::from_millis(10);
/// A GPM value older than this is reported as absent rather than held.
const GPM_MAX_AGE: Duration = Duration::from_secs(2);

/// The GPM metrics read, in the order of [`SLOTS`].
const IDS: [GpmMetricId; 4] = [
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
];

/// Where each of [`IDS`] goes in a sample.
pub const SLOTS: [Slot; 4] = [
    Slot::SmActive,
    Slot::SmOccupancy,
    Slot::TensorActive,
    Slot::DramActive,
];

/// One device's GPM samples and the values last computed from them.
#[derive(Default)]
pub struct Gpm<'n> {
    prev: Option<(GpmSample<'n>, Instant)>,
    values: Option<([f32; 4], Instant)>,
}

impl<'n> Gpm<'n> {
    /// Forgets both samples (the GPU failed): the next values need two fresh ones.
    pub fn reset(&mut self) {
        self.prev = None;
        self.values = None;
    }

    /// The values in the order of [`SLOTS`] at `now`: takes a new sample with `take` when the
    /// last one is old enough (`take` gives `None` where the device has no way to sample GPM).
    pub(super) fn values(
        &mut self,
        nvml: &'n Nvml,
        now: Instant,
        take: impl FnOnce() -> Option<Result<GpmSample<'n>, NvmlError>>,
    ) -> Result<Option<[f32; 4]>, Failure> {
        let due = self
            .prev
            .as_ref()
            .is_none_or(|(_, at)| now.duration_since(*at) + GPM_SPACING_SLACK >= GPM_MIN_SPACING);
        if due {
            let Some(sample) = take() else {
                return Ok(None);
            };
            let Some(sample) = optional(sample)? else {
                return Ok(None);
            };
            if let Some((prev, _)) = &self.prev {
                let results = gpm_metrics_get(nvml, prev, &sample, &IDS).map_err(classify)?;
                let mut values = [0f32; 4];
                let mut all = true;
                for (v, r) in values.iter_mut().zip(results) {
                    match r {
                        Ok(r) => *v = r.value as f32,
                        Err(_) => all = false,
                    }
                }
                // A partial answer is reported as absent rather than mixing old and new values.
                self.values = all.then_some((values, now));
            }
            self.prev = Some((sample, now));
        }
        Ok(self
            .values
            .filter(|(_, at)| now.duration_since(*at) <= GPM_MAX_AGE)
            .map(|(v, _)| v))
    }
}
