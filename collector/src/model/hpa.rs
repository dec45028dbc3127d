//! The HPA's side of a trigger: how it reads the target KEDA gives it ([`MetricType`]) and the
//! replica count it asks for ([`desired_replicas`]), with worked numbers. Pure arithmetic: no
//! I/O, no cluster, no gRPC; `gpuscale-collector query` shows its answer next to KEDA's.

use crate::model::Named;
use strum::{Display, EnumString, IntoStaticStr, VariantArray};

/// How the HPA reads the target KEDA gives it (the trigger's `metricType`), named as a
/// ScaledObject writes it (`AverageValue`, `Value`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, EnumString, Display, VariantArray,
)]
pub enum MetricType {
    /// KEDA's default: the target is per replica, so the HPA wants
    /// `ceil(value / target)` replicas whatever runs now.
    AverageValue,
    /// The target is for the value itself, so the HPA scales the current replicas by
    /// `value / target`.
    Value,
}

impl Named for MetricType {}

impl MetricType {
    /// Parses `--metric-type`: the exact name, or an error with the accepted ones.
    pub fn parse(s: &str) -> Result<MetricType, String> {
        Self::from_name(s).ok_or_else(|| format!("{s:?}: write AverageValue or Value"))
    }
}

/// The replica count the HPA asks for, given the value gpuscale reports.
///
/// - [`MetricType::AverageValue`] (KEDA's default): `ceil(value / target)`, independent
///   of `current_replicas`. Goes with `aggregation: sum`. Worked example: 4 pods at 90 %
///   `sm_active`, `targetValue: 80` → value 4 × 90 = 360 → ceil(360 / 80) = ceil(4.5) =
///   **5** replicas. At 60 % the value is 240 → ceil(3.0) = 3.
/// - [`MetricType::Value`]: `ceil(current_replicas × value / target)`. Goes with
///   `aggregation: avg` or `max`. Worked example: the same 4 pods with `aggregation: avg`
///   → value 90 → ceil(4 × 90 / 80) = ceil(4.5) = **5** replicas. (With 0 current
///   replicas the HPA uses `ceil(value / target)`, and so does this function.)
///
/// Zero matched pods give value 0 ([`aggregate`](crate::model::trigger::aggregate) of nothing), so 0 replicas are wanted;
/// the HPA itself never goes below 1. Scaling to zero is KEDA's work: `IsActive` false
/// (value not above `activationThreshold`) with `minReplicaCount: 0`.
///
/// Both numbers are first rounded to thousandths, the precision at which KEDA hands
/// them to the HPA (as milli-quantities), so float noise such as 240.00000000000003 / 80
/// asks for 3 replicas, not 4. A negative value counts as 0. A target that rounds to 0
/// or a non-finite input gives `current_replicas` (the HPA could not act).
///
/// Not modelled: the HPA's tolerance (it skips scaling when |value / (target ×
/// current) − 1| ≤ 0.1, so 4 pods at 85 % against 80 stay at 4 although ceil(340/80)
/// = 5), that for `Value` it multiplies by the *ready* pods rather than the current
/// replicas, its stabilization windows and scaling policies, and min/max replicas.
pub fn desired_replicas(
    value: f64,
    target: f64,
    metric_type: MetricType,
    current_replicas: u32,
) -> u32 {
    if !value.is_finite() || !target.is_finite() {
        return current_replicas;
    }
    let value_milli = (value * 1000.0).round().max(0.0);
    let target_milli = (target * 1000.0).round();
    if !value_milli.is_finite() || !target_milli.is_finite() || target_milli <= 0.0 {
        return current_replicas;
    }
    let ratio = value_milli / target_milli;
    let wanted = match metric_type {
        MetricType::AverageValue => ratio,
        MetricType::Value if current_replicas == 0 => ratio,
        MetricType::Value => f64::from(current_replicas) * ratio,
    };
    // `as` saturates: a ratio beyond u32 gives u32::MAX.
    wanted.ceil() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::trigger::{aggregate, Aggregation};

    #[test]
    fn sum_of_four_pods_at_90_against_80_asks_for_5_replicas() {
        let value = aggregate(Aggregation::Sum, &[90.0, 90.0, 90.0, 90.0]);
        assert_eq!(value, 360.0);
        assert_eq!(
            desired_replicas(value, 80.0, MetricType::AverageValue, 4),
            5
        );
        assert_eq!(
            desired_replicas(value, 80.0, MetricType::AverageValue, 1),
            5,
            "AverageValue does not depend on the current replicas"
        );
    }

    #[test]
    fn avg_with_metric_type_value_asks_for_5_replicas_from_4() {
        let value = aggregate(Aggregation::Avg, &[90.0, 90.0, 90.0, 90.0]);
        assert_eq!(value, 90.0);
        assert_eq!(desired_replicas(value, 80.0, MetricType::Value, 4), 5);
        assert_eq!(
            desired_replicas(value, 80.0, MetricType::Value, 0),
            2,
            "from zero: ceil(90/80)"
        );
    }

    #[test]
    fn zero_matched_pods_want_zero_replicas() {
        for agg in Aggregation::ALL {
            assert_eq!(aggregate(*agg, &[]), 0.0, "{agg}");
        }
        assert_eq!(desired_replicas(0.0, 80.0, MetricType::AverageValue, 3), 0);
        assert_eq!(desired_replicas(0.0, 80.0, MetricType::Value, 3), 0);
    }

    #[test]
    fn desired_replicas_rounds_up_and_ignores_float_noise() {
        assert_eq!(
            desired_replicas(240.0, 80.0, MetricType::AverageValue, 4),
            3
        );
        assert_eq!(
            desired_replicas(240.000_000_000_000_03, 80.0, MetricType::AverageValue, 4),
            3
        );
        assert_eq!(
            desired_replicas(240.01, 80.0, MetricType::AverageValue, 4),
            4
        );
        assert_eq!(desired_replicas(-5.0, 80.0, MetricType::AverageValue, 4), 0);
        assert_eq!(
            desired_replicas(f64::NAN, 80.0, MetricType::AverageValue, 4),
            4
        );
        assert_eq!(desired_replicas(100.0, 0.0, MetricType::Value, 4), 4);
        assert_eq!(
            desired_replicas(1e30, 1.0, MetricType::AverageValue, 4),
            u32::MAX
        );
    }
}
