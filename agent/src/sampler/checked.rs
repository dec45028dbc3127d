//! NVML's numbers checked before they enter the ring. A driver bug, a counter wrap or a GPU
//! falling off the bus can make NVML report a utilization of 4,294,967,295 %, more memory in use
//! than the GPU has, or a NaN from a GPM ratio; stored, such a value would sit in every window
//! for up to five minutes and reach KEDA. [`accept`] says whether a value can be what it claims
//! to be: a value that cannot is left unmeasured for that sample (absent, never 0), counted in
//! `gpuscale_agent_nvml_out_of_range_total`, and logged once per GPU and metric. Pure.

use crate::sample::Metric;

/// How far over 100 a percentage may read and still count as 100: GPM ratios are computed from
/// two counter samples taken a moment apart and can overshoot by a rounding.
pub const PERCENT_SLACK: f64 = 0.5;
pub use vocab::{MAX_POWER_WATTS, MAX_TEMPERATURE_C};

/// `raw` as `metric` may hold it (a percentage a rounding over 100 reads 100), or `None` when
/// it cannot be that metric. `vram_total_bytes` bounds `vram_used_bytes` (0: unknown, unbounded).
pub fn accept(metric: Metric, raw: f64, vram_total_bytes: u64) -> Option<f64> {
    if !raw.is_finite() || raw < 0.0 {
        return None;
    }
    match metric {
        Metric::VramUsedBytes => {
            (vram_total_bytes == 0 || raw <= vram_total_bytes as f64).then_some(raw)
        }
        Metric::PowerWatts => (raw <= MAX_POWER_WATTS).then_some(raw),
        Metric::TemperatureC => (raw <= MAX_TEMPERATURE_C).then_some(raw),
        _ if metric.is_percent() => (raw <= 100.0 + PERCENT_SLACK).then_some(raw.min(100.0)),
        _ => Some(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_nvml_can_mean_is_kept_and_what_it_cannot_is_left_unmeasured() {
        let gib = (1u64 << 30) as f64;
        assert_eq!(accept(Metric::GpuUtil, 37.0, 0), Some(37.0));
        assert_eq!(accept(Metric::GpuUtil, 100.0, 0), Some(100.0));
        assert_eq!(accept(Metric::GpuUtil, f64::from(u32::MAX), 0), None);
        assert_eq!(
            accept(Metric::SmActive, 100.3, 0),
            Some(100.0),
            "a rounding over"
        );
        assert_eq!(accept(Metric::SmActive, 101.0, 0), None);
        assert_eq!(accept(Metric::SmActive, f64::NAN, 0), None);
        assert_eq!(accept(Metric::TensorActive, -0.1, 0), None);
        assert_eq!(accept(Metric::DramActive, f64::INFINITY, 0), None);
        assert_eq!(
            accept(Metric::VramUsedBytes, 20.0 * gib, 80 << 30),
            Some(20.0 * gib)
        );
        assert_eq!(accept(Metric::VramUsedBytes, 81.0 * gib, 80 << 30), None);
        assert_eq!(
            accept(Metric::VramUsedBytes, 81.0 * gib, 0),
            Some(81.0 * gib)
        );
        assert_eq!(accept(Metric::PowerWatts, 700.0, 0), Some(700.0));
        assert_eq!(accept(Metric::PowerWatts, 4_294_967.295, 0), None);
        assert_eq!(accept(Metric::TemperatureC, 61.0, 0), Some(61.0));
        assert_eq!(accept(Metric::TemperatureC, 4_294_967_295.0, 0), None);
    }
}
