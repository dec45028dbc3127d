//! KEDA trigger metadata → a validated [`Trigger`], and the HPA arithmetic it feeds.
//!
//! KEDA hands the collector all of a `ScaledObject` trigger's `metadata` as
//! `ScaledObjectRef.scalerMetadata`. This module owns reading that map:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `metric` | one of [`Metric::TRIGGER`] (`sm_active`, `gpu_util`, …) | required |
//! | `podSelector` | label selector over pods in the ScaledObject's namespace | none (see [`Trigger::require_selector`]) |
//! | `window` | smoothing window: `10s`, `30s`, `1m` or `5m` (any spelling of those) | `30s` |
//! | `timeAggregation` | over the window: `avg`, `max`, `min`, `p95`, `last` | `avg` |
//! | `gpuAggregation` | a replica's GPUs into its one value: `avg`, `max`, `sum` | `avg` for percentages, `sum` for `vram_used_bytes` and `power_watts` |
//! | `replicaLabel` | pods with the same value of this label are one replica | none: each pod is a replica |
//! | `aggregation` | across replicas: `sum`, `avg`, `max`, `min` | `sum` |
//! | `targetValue` | number > 0, returned in `GetMetricSpec` | required |
//! | `activationThreshold` | `IsActive` is true when the value is strictly greater | `0` |
//! | `staleAfter` | data older than this is not trusted (> 0, ≤ 10m) | `10s` |
//! | `activeAfterOpen` | a pod that opened the GPU this recently counts as active | `0s` |
//!
//! KEDA's own keys for the `external` / `external-push` trigger arrive in the same map and
//! are accepted and ignored ([`KEDA_KEYS`]); any other key is an error that names it and
//! lists the accepted keys, so a typo such as `targetvalue` is caught, not defaulted.
//!
//! It also owns what the aggregation names mean: [`aggregate_gpus`] within a replica and
//! [`aggregate`] across replicas. The HPA's formula is in [`crate::model::hpa`].
//!
//! It must never do I/O, read the cluster or the agents, or decide gRPC status codes:
//! callers turn a [`MetadataError`] into `INVALID_ARGUMENT`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use strum::{Display, EnumString, IntoStaticStr, VariantArray};

use crate::model::selector::Selector;
use crate::model::Named;

/// The gpuscale keys of a trigger's metadata, in the order errors list them.
pub const KEYS: [&str; 11] = [
    "metric",
    "podSelector",
    "window",
    "timeAggregation",
    "gpuAggregation",
    "replicaLabel",
    "aggregation",
    "targetValue",
    "activationThreshold",
    "staleAfter",
    "activeAfterOpen",
];

/// KEDA's own metadata keys for the `external` and `external-push` triggers, which KEDA
/// passes on in `scalerMetadata` with everything else; gpuscale ignores them.
///
/// From KEDA's scaler docs (keda.sh/docs/latest/scalers/external and external-push:
/// `scalerAddress`, `tlsCertFile` (deprecated), `unsafeSsl`, and the TLS parameters
/// `caCert`, `tlsClientCert`, `tlsClientKey`, which older docs put in `metadata`) and
/// KEDA's source (`pkg/scalers/external_scaler.go` also reads `enableTLS`).
pub const KEDA_KEYS: [&str; 7] = [
    "scalerAddress",
    "enableTLS",
    "unsafeSsl",
    "tlsCertFile",
    "caCert",
    "tlsClientCert",
    "tlsClientKey",
];

/// The windows the agent keeps; `window` must be (any spelling of) one of them.
pub use vocab::Window;

/// The longest `staleAfter` accepted.
pub const MAX_STALE_AFTER: Duration = Duration::from_secs(600);

/// The smallest `targetValue` accepted: KEDA hands the target to the HPA as a
/// milli-quantity, so anything smaller would reach the HPA as 0.
pub const MIN_TARGET_VALUE: f64 = 0.001;

const DEFAULT_WINDOW: Window = Window::S30;
const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(10);

/// A trigger's metadata was missing a key, had an unknown key, or had a bad value.
///
/// Its message names the key, quotes the value, and says what to write instead:
/// `trigger metadata "targetValue": "abc" is not a number; write a number > 0 such as 80`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trigger metadata {key:?}: {message}")]
pub struct MetadataError {
    /// The metadata key at fault, as written in the `ScaledObject`.
    pub key: String,
    /// What is wrong with it and what to write instead.
    pub message: String,
}

impl MetadataError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        MetadataError {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// What is measured (`metric`): one of [`Metric::TRIGGER`], named once for every crate.
pub use vocab::Metric;

/// How one series is summarised over the window (`timeAggregation`). The agent
/// computes these; this module only names them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, EnumString, Display, VariantArray,
)]
#[strum(serialize_all = "lowercase")]
pub enum TimeAggregation {
    /// Mean over the window.
    Avg,
    /// Largest sample in the window.
    Max,
    /// Smallest sample in the window.
    Min,
    /// 95th percentile of the window's samples.
    P95,
    /// Latest sample.
    Last,
}

/// How one replica's GPUs combine into the replica's value (`gpuAggregation`); see
/// [`aggregate_gpus`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, EnumString, Display, VariantArray,
)]
#[strum(serialize_all = "lowercase")]
pub enum GpuAggregation {
    /// Mean over the replica's GPUs: the default for the percentage metrics.
    Avg,
    /// The busiest GPU: the bottleneck of a tensor-parallel replica.
    Max,
    /// Total: the default for the absolute metrics (`vram_used_bytes`, `power_watts`).
    Sum,
}

/// How a replica's GPUs combine when the trigger does not say: `avg` for percentages, `sum` for
/// bytes and watts.
pub fn default_gpu_aggregation(metric: Metric) -> GpuAggregation {
    if metric.is_percent() {
        GpuAggregation::Avg
    } else {
        GpuAggregation::Sum
    }
}

/// How the replicas' values combine into the one value KEDA gets (`aggregation`); see
/// [`aggregate`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, IntoStaticStr, EnumString, Display, VariantArray,
)]
#[strum(serialize_all = "lowercase")]
pub enum Aggregation {
    /// Total: goes with KEDA's default `metricType: AverageValue`.
    Sum,
    /// Mean: goes with `metricType: Value`.
    Avg,
    /// Largest: goes with `metricType: Value`.
    Max,
    /// Smallest: goes with `metricType: Value`.
    Min,
}

impl Named for TimeAggregation {}
impl Named for GpuAggregation {}
impl Named for Aggregation {}

/// A validated trigger: what to measure, over which pods, and the scaling thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// What is measured.
    pub metric: Metric,
    /// Which pods in the ScaledObject's namespace count; `None` when `podSelector` is
    /// absent. `Some` of an empty selector (`podSelector: ""`) matches every pod.
    pub pod_selector: Option<Arc<Selector>>,
    /// Smoothing window.
    pub window: Window,
    /// How each series is summarised over the window.
    pub time_aggregation: TimeAggregation,
    /// How one replica's GPUs combine into its value.
    pub gpu_aggregation: GpuAggregation,
    /// Pods with the same value of this label are one replica; `None`: each pod is one.
    pub replica_label: Option<String>,
    /// How the replicas' values combine.
    pub aggregation: Aggregation,
    /// The HPA target returned in `GetMetricSpec`; finite and ≥ [`MIN_TARGET_VALUE`].
    pub target_value: f64,
    /// `IsActive` is true when the value is strictly greater than this; finite, ≥ 0.
    pub activation_threshold: f64,
    /// Data older than this is not trusted; > 0 and ≤ [`MAX_STALE_AFTER`].
    pub stale_after: Duration,
    /// A pod whose process opened the GPU within this long counts as active.
    pub active_after_open: Duration,
}

impl Trigger {
    /// Reads and validates a trigger's `scalerMetadata`.
    ///
    /// Keys are case-sensitive. Unknown keys are rejected before values are read; then
    /// the first bad value, in the order of [`KEYS`], is reported.
    pub fn parse(meta: &HashMap<String, String>) -> Result<Trigger, MetadataError> {
        let mut keys: Vec<&String> = meta.keys().collect();
        keys.sort();
        for key in keys {
            if !KEYS.contains(&key.as_str()) && !KEDA_KEYS.contains(&key.as_str()) {
                return Err(unknown_key(key));
            }
        }
        let get = |key: &str| meta.get(key).map(String::as_str);

        let metric = match get("metric") {
            None => {
                return Err(MetadataError::new(
                    "metric",
                    format!("is required; write one of: {}", list(&Metric::TRIGGER)),
                ))
            }
            Some(v) => Metric::from_name(v)
                .filter(|m| m.is_trigger())
                .ok_or_else(|| {
                    MetadataError::new(
                        "metric",
                        format!(
                            "{v:?} is not a metric; write one of: {}",
                            list(&Metric::TRIGGER)
                        ),
                    )
                })?,
        };

        let pod_selector = get("podSelector")
            .map(Selector::parse)
            .transpose()
            .map_err(|e| MetadataError::new("podSelector", e.to_string()))?
            .map(Arc::new);

        let window = match get("window") {
            None => DEFAULT_WINDOW,
            Some(v) => {
                let accepted = format!(
                    "write one of {} (the windows the agent keeps)",
                    list(&Window::ALL.map(Window::label))
                );
                let d = vocab::duration::parse(v)
                    .map_err(|why| MetadataError::new("window", format!("{why}; {accepted}")))?;
                Window::of(d).ok_or_else(|| {
                    MetadataError::new(
                        "window",
                        format!("{v:?} is not a window the agent keeps; {accepted}"),
                    )
                })?
            }
        };

        let time_aggregation = parse_named(
            get("timeAggregation"),
            "timeAggregation",
            TimeAggregation::ALL,
        )?
        .unwrap_or(TimeAggregation::Avg);
        let gpu_aggregation =
            parse_named(get("gpuAggregation"), "gpuAggregation", GpuAggregation::ALL)?
                .unwrap_or(default_gpu_aggregation(metric));
        let replica_label = match get("replicaLabel") {
            None => None,
            Some(v) => {
                let hint = "write a label key such as leaderworkerset.sigs.k8s.io/group-key \
                            (pods with the same value of it are one replica), or leave \
                            replicaLabel out (each pod is a replica)";
                crate::model::selector::validate_key(v).map_err(|why| {
                    MetadataError::new("replicaLabel", format!("{v:?} {why}; {hint}"))
                })?;
                Some(v.to_owned())
            }
        };
        let aggregation = parse_named(get("aggregation"), "aggregation", Aggregation::ALL)?
            .unwrap_or(Aggregation::Sum);

        let target_value = match get("targetValue") {
            None => {
                return Err(MetadataError::new(
                    "targetValue",
                    "is required; write a number > 0 such as 80",
                ))
            }
            Some(v) => {
                let n = parse_number(v, "targetValue", "write a number > 0 such as 80")?;
                if n < MIN_TARGET_VALUE {
                    let why = if n <= 0.0 {
                        format!("{v:?} is not greater than 0")
                    } else {
                        format!(
                            "{v:?} is below {MIN_TARGET_VALUE}, the smallest target KEDA can hand \
                             to the HPA (it passes thousandths)"
                        )
                    };
                    return Err(MetadataError::new(
                        "targetValue",
                        format!("{why}; write a number > 0 such as 80"),
                    ));
                }
                n
            }
        };

        let activation_threshold = match get("activationThreshold") {
            None => 0.0,
            Some(v) => {
                let hint = "write a number ≥ 0 such as 5 (IsActive is true above it)";
                let n = parse_number(v, "activationThreshold", hint)?;
                if n < 0.0 {
                    return Err(MetadataError::new(
                        "activationThreshold",
                        format!("{v:?} is negative; {hint}"),
                    ));
                }
                n
            }
        };

        let stale_after = match get("staleAfter") {
            None => DEFAULT_STALE_AFTER,
            Some(v) => {
                let hint = "write a duration > 0 and ≤ 10m such as 10s";
                let d = vocab::duration::parse(v)
                    .map_err(|why| MetadataError::new("staleAfter", format!("{why}; {hint}")))?;
                if d.is_zero() {
                    return Err(MetadataError::new(
                        "staleAfter",
                        format!("{v:?} is zero, so no data would be trusted; {hint}"),
                    ));
                }
                if d > MAX_STALE_AFTER {
                    return Err(MetadataError::new(
                        "staleAfter",
                        format!("{v:?} is longer than 10m; {hint}"),
                    ));
                }
                d
            }
        };

        let active_after_open = match get("activeAfterOpen") {
            None => Duration::ZERO,
            Some(v) => vocab::duration::parse(v).map_err(|why| {
                MetadataError::new(
                    "activeAfterOpen",
                    format!("{why}; write a duration such as 0s (off) or 2m"),
                )
            })?,
        };

        Ok(Trigger {
            metric,
            pod_selector,
            window,
            time_aggregation,
            gpu_aggregation,
            replica_label,
            aggregation,
            target_value,
            activation_threshold,
            stale_after,
            active_after_open,
        })
    }

    /// The pod selector, or the error to answer with (as `INVALID_ARGUMENT`) when the
    /// trigger has none and the caller cannot read the target's own selector.
    pub fn require_selector(&self) -> Result<&Selector, MetadataError> {
        self.pod_selector
            .as_deref()
            .ok_or_else(Trigger::selector_required)
    }

    /// The error [`Trigger::require_selector`] answers with when there is no `podSelector`.
    pub fn selector_required() -> MetadataError {
        MetadataError::new(
            "podSelector",
            "podSelector is required: write a label selector over the pods to measure, \
             such as app=vllm (reading the selector from the ScaledObject's target needs --kube)",
        )
    }

    /// A stable metric name for `GetMetricSpec`, built from what shapes the value:
    /// `gpuscale-<metric>-<timeAggregation>-<window>-<aggregation>`, for example
    /// `gpuscale-sm-active-avg-30s-sum`.
    ///
    /// Only `[a-z0-9-]`: underscores in metric names become `-`, and the window is
    /// written `10s`, `30s`, `1m` or `5m` however the metadata spelled it. KEDA prefixes
    /// the name with `s<N>-` and strips that again before `GetMetrics`.
    pub fn metric_name(&self) -> String {
        format!(
            "gpuscale-{}-{}-{}-{}",
            self.metric.name().replace('_', "-"),
            self.time_aggregation.name(),
            self.window.label(),
            self.aggregation.name(),
        )
    }
}

/// Combines one replica's per-GPU values into the replica's value (`gpuAggregation`): a
/// tensor-parallel replica on four GPUs at 70 % reads 70 with `avg` (the default for
/// percentages), 70 with `max` (95 when one of them runs at 95), and 280 with `sum`. An empty
/// slice (a running replica that uses no GPU) gives 0.0.
pub fn aggregate_gpus(agg: GpuAggregation, values: &[f64]) -> f64 {
    aggregate(
        match agg {
            GpuAggregation::Avg => Aggregation::Avg,
            GpuAggregation::Max => Aggregation::Max,
            GpuAggregation::Sum => Aggregation::Sum,
        },
        values,
    )
}

/// Combines the replicas' values into the one value reported to KEDA.
///
/// `sum` adds, `avg` takes the mean, `max`/`min` the extremes: over [90, 90, 90, 90],
/// `sum` is 360 and `avg`, `max` and `min` are 90. An empty slice gives 0.0 for every
/// aggregation: zero matched pods means value 0 (nothing runs, nothing to scale on), and
/// the caller tells that apart from stale or missing data, which must be an error.
/// Values are expected finite, as the agent reports them.
pub fn aggregate(agg: Aggregation, values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    match agg {
        Aggregation::Sum => values.iter().sum(),
        Aggregation::Avg => values.iter().sum::<f64>() / values.len() as f64,
        Aggregation::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Aggregation::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
    }
}

/// `a, b, c` from a list of names.
fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The error for a key that is neither gpuscale's nor KEDA's, with a suggestion when
/// the key differs from a known one only in case.
fn unknown_key(key: &str) -> MetadataError {
    let mut known = KEYS.iter().chain(KEDA_KEYS.iter());
    let hint = if let Some(k) = known.find(|k| k.eq_ignore_ascii_case(key)) {
        format!("keys are case-sensitive: did you mean {k:?}? ")
    } else if key == "metricType" {
        "metricType is a field of the trigger, next to `metadata`, not inside it. ".to_owned()
    } else if let Some(stem) = key.strip_suffix("FromEnv").filter(|s| KEYS.contains(s)) {
        format!("gpuscale does not read values from the target's env; write {stem:?} itself. ")
    } else {
        String::new()
    };
    MetadataError::new(
        key,
        format!(
            "unknown key; {hint}accepted keys: {} (and KEDA's own {})",
            KEYS.join(", "),
            KEDA_KEYS.join(", ")
        ),
    )
}

/// One of `all` by name, or `None` when the key is absent.
fn parse_named<T: Copy + fmt::Display>(
    value: Option<&str>,
    key: &str,
    all: &[T],
) -> Result<Option<T>, MetadataError> {
    let Some(v) = value else {
        return Ok(None);
    };
    all.iter()
        .copied()
        .find(|t| t.to_string() == v)
        .map(Some)
        .ok_or_else(|| {
            MetadataError::new(
                key,
                format!("{v:?} is not accepted; write one of: {}", list(all)),
            )
        })
}

/// A finite number, or an error that says why not followed by `hint`.
fn parse_number(v: &str, key: &str, hint: &str) -> Result<f64, MetadataError> {
    let bad = |why: &str| MetadataError::new(key, format!("{v:?} {why}; {hint}"));
    match v.trim().parse::<f64>() {
        Ok(n) if n.is_finite() => Ok(n),
        Ok(_) => Err(bad("is not a finite number")),
        Err(_) if v.trim().is_empty() => Err(bad("is empty")),
        Err(_) => Err(bad("is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The smallest valid metadata plus `extra` (which may override).
    fn with(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m = meta(&[
            ("metric", "sm_active"),
            ("targetValue", "80"),
            ("podSelector", "app=vllm"),
        ]);
        m.extend(meta(extra));
        m
    }

    fn ok(m: &HashMap<String, String>) -> Trigger {
        Trigger::parse(m).unwrap_or_else(|e| panic!("{m:?} should parse: {e}"))
    }

    fn err(m: &HashMap<String, String>) -> MetadataError {
        match Trigger::parse(m) {
            Ok(t) => panic!("{m:?} should be rejected, parsed as {t:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn gpu_aggregation_defaults_by_metric_and_is_validated() {
        assert_eq!(ok(&with(&[])).gpu_aggregation, GpuAggregation::Avg);
        for m in ["vram_used_bytes", "power_watts"] {
            assert_eq!(
                ok(&with(&[("metric", m)])).gpu_aggregation,
                GpuAggregation::Sum,
                "{m}"
            );
        }
        for m in [
            "sm_active",
            "gpu_util",
            "sm_occupancy",
            "tensor_active",
            "dram_active",
            "mem_util",
            "vram_used_pct",
        ] {
            assert_eq!(
                ok(&with(&[("metric", m)])).gpu_aggregation,
                GpuAggregation::Avg,
                "{m}"
            );
        }
        let t = ok(&with(&[("gpuAggregation", "max")]));
        assert_eq!(t.gpu_aggregation, GpuAggregation::Max);
        let e = err(&with(&[("gpuAggregation", "min")]));
        assert_eq!(e.key, "gpuAggregation");
        assert_eq!(
            e.to_string(),
            r#"trigger metadata "gpuAggregation": "min" is not accepted; write one of: avg, max, sum"#
        );
    }

    #[test]
    fn replica_label_is_a_label_key() {
        assert_eq!(ok(&with(&[])).replica_label, None);
        let key = "leaderworkerset.sigs.k8s.io/group-key";
        assert_eq!(
            ok(&with(&[("replicaLabel", key)])).replica_label.as_deref(),
            Some(key)
        );
        for bad in ["", "a b", "Example.com/x", "x/", "-x"] {
            let e = err(&with(&[("replicaLabel", bad)]));
            assert_eq!(e.key, "replicaLabel", "{bad:?}");
            assert!(e.message.contains("write a label key such as"), "{e}");
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn minimal_metadata_gets_the_documented_defaults() {
        let t = ok(&with(&[]));
        assert_eq!(t.metric, Metric::SmActive);
        assert_eq!(t.pod_selector.as_ref().unwrap().to_string(), "app=vllm");
        assert_eq!(t.window, Window::S30);
        assert_eq!(t.time_aggregation, TimeAggregation::Avg);
        assert_eq!(t.aggregation, Aggregation::Sum);
        assert_eq!(t.target_value, 80.0);
        assert_eq!(t.activation_threshold, 0.0);
        assert_eq!(t.stale_after, Duration::from_secs(10));
        assert_eq!(t.active_after_open, Duration::ZERO);
    }

    #[test]
    fn every_key_is_read() {
        let t = ok(&meta(&[
            ("metric", "vram_used_pct"),
            ("podSelector", "tier in (a,b)"),
            ("window", "5m"),
            ("timeAggregation", "p95"),
            ("aggregation", "max"),
            ("targetValue", "0.5"),
            ("activationThreshold", "2.5"),
            ("staleAfter", "500ms"),
            ("activeAfterOpen", "2m"),
        ]));
        assert_eq!(t.metric, Metric::VramUsedPct);
        assert_eq!(t.pod_selector.unwrap().to_string(), "tier in (a,b)");
        assert_eq!(t.window, Window::M5);
        assert_eq!(t.time_aggregation, TimeAggregation::P95);
        assert_eq!(t.aggregation, Aggregation::Max);
        assert_eq!(t.target_value, 0.5);
        assert_eq!(t.activation_threshold, 2.5);
        assert_eq!(t.stale_after, Duration::from_millis(500));
        assert_eq!(t.active_after_open, Duration::from_secs(120));
    }

    #[test]
    fn every_metric_name_round_trips() {
        assert_eq!(Metric::TRIGGER.len(), 9);
        for m in Metric::TRIGGER {
            assert_eq!(ok(&with(&[("metric", m.name())])).metric, m);
        }
        // Reported by agents, but nothing to scale on.
        let e = err(&with(&[("metric", "temperature_c")]));
        assert!(e.message.contains("is not a metric"), "{e}");
        for t in TimeAggregation::ALL {
            assert_eq!(TimeAggregation::from_name(t.name()), Some(*t));
        }
        for a in Aggregation::ALL {
            assert_eq!(Aggregation::from_name(a.name()), Some(*a));
        }
        assert_eq!(Metric::from_name("SM_ACTIVE"), None);
    }

    #[test]
    fn unknown_metric_lists_the_accepted_ones() {
        let e = err(&with(&[("metric", "sm-active")]));
        assert_eq!(e.key, "metric");
        assert!(
            e.to_string().contains("\"sm-active\" is not a metric"),
            "{e}"
        );
        assert!(e.message.contains("sm_active, gpu_util, sm_occupancy, tensor_active, dram_active, mem_util, vram_used_bytes, vram_used_pct, power_watts"), "{e}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let e = err(&meta(&[("targetValue", "80")]));
        assert_eq!(e.key, "metric");
        assert!(e.message.contains("is required"));
        let e = err(&meta(&[("metric", "gpu_util")]));
        assert_eq!(e.key, "targetValue");
        assert_eq!(
            e.to_string(),
            "trigger metadata \"targetValue\": is required; write a number > 0 such as 80"
        );
    }

    #[test]
    fn bad_aggregations_list_the_accepted_values() {
        let e = err(&with(&[("timeAggregation", "mean")]));
        assert_eq!(e.key, "timeAggregation");
        assert!(e.message.contains("avg, max, min, p95, last"), "{e}");
        let e = err(&with(&[("aggregation", "p95")]));
        assert_eq!(e.key, "aggregation");
        assert!(e.message.contains("sum, avg, max, min"), "{e}");
    }

    #[test]
    fn keda_keys_are_accepted_and_ignored() {
        let mut m = with(&[]);
        for k in KEDA_KEYS {
            m.insert(k.to_string(), "whatever".to_string());
        }
        assert_eq!(ok(&m), ok(&with(&[])));
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_accepted_list() {
        let e = err(&with(&[("podselector", "app=x")]));
        assert_eq!(e.key, "podselector");
        assert!(e.message.contains("did you mean \"podSelector\""), "{e}");
        let e = err(&with(&[("targetvalue", "80")]));
        assert!(e.message.contains("did you mean \"targetValue\""), "{e}");
        let e = err(&with(&[("threshold", "5")]));
        assert!(e.to_string().starts_with("trigger metadata \"threshold\": unknown key; accepted keys: metric, podSelector, window,"), "{e}");
        assert!(e.message.contains("scalerAddress"), "{e}");
        assert!(err(&with(&[("metricType", "Value")]))
            .message
            .contains("field of the trigger"));
        assert!(err(&with(&[("targetValueFromEnv", "80")]))
            .message
            .contains("write \"targetValue\" itself"));
    }

    #[test]
    fn window_accepts_any_spelling_of_the_agent_windows() {
        for (v, secs) in [
            ("10s", 10),
            ("10000ms", 10),
            ("30s", 30),
            ("0.5m", 30),
            ("60s", 60),
            ("1m", 60),
            ("300s", 300),
            ("5m", 300),
            (" 5m ", 300),
        ] {
            assert_eq!(
                ok(&with(&[("window", v)])).window,
                Window::from_secs(secs).unwrap(),
                "{v}"
            );
        }
    }

    #[test]
    fn window_rejects_other_durations_and_lists_the_accepted_ones() {
        for v in ["45s", "2m", "0s", "1h", "30", "abc", "", "-30s", "1m30s"] {
            let e = err(&with(&[("window", v)]));
            assert_eq!(e.key, "window");
            assert!(
                e.message.contains("write one of 10s, 30s, 1m, 5m"),
                "{v}: {e}"
            );
        }
        assert!(err(&with(&[("window", "30")]))
            .message
            .contains("has no unit"));
        assert!(err(&with(&[("window", "45s")]))
            .message
            .contains("not a window the agent keeps"));
    }

    #[test]
    fn duration_keys_take_what_kubernetes_users_type() {
        // The grammar itself is tested in `vocab::duration`; here, that every key reads it.
        let t = ok(&with(&[
            ("window", "1m"),
            ("staleAfter", "1m30s"),
            ("activeAfterOpen", "2m30s"),
        ]));
        assert_eq!(t.window, Window::S60);
        assert_eq!(t.stale_after, Duration::from_secs(90));
        assert_eq!(t.active_after_open, Duration::from_secs(150));
        assert_eq!(ok(&with(&[("window", "0h5m")])).window, Window::M5);
        let e = err(&with(&[("staleAfter", "1m30")]));
        assert_eq!(e.key, "staleAfter");
        assert!(e.message.contains("no unit after"), "{e}");
        assert!(e.message.contains("such as 10s"), "{e}");
    }

    #[test]
    fn target_value_must_be_a_finite_number_above_zero() {
        for v in ["0", "-1", "abc", "NaN", "inf", "-inf", "", "0.0001"] {
            let e = err(&with(&[("targetValue", v)]));
            assert_eq!(e.key, "targetValue", "{v}");
            assert!(
                e.message.ends_with("write a number > 0 such as 80"),
                "{v}: {e}"
            );
        }
        assert_eq!(
            err(&with(&[("targetValue", "abc")])).to_string(),
            "trigger metadata \"targetValue\": \"abc\" is not a number; write a number > 0 such as 80"
        );
        assert!(err(&with(&[("targetValue", "inf")]))
            .message
            .contains("not a finite number"));
        assert!(err(&with(&[("targetValue", "0")]))
            .message
            .contains("not greater than 0"));
        for (v, n) in [
            ("80", 80.0),
            ("0.5", 0.5),
            ("1e3", 1000.0),
            ("0.001", 0.001),
            (" 80 ", 80.0),
        ] {
            assert_eq!(ok(&with(&[("targetValue", v)])).target_value, n, "{v}");
        }
    }

    #[test]
    fn activation_threshold_must_be_a_finite_number_not_below_zero() {
        for (v, n) in [("0", 0.0), ("5.5", 5.5)] {
            assert_eq!(
                ok(&with(&[("activationThreshold", v)])).activation_threshold,
                n
            );
        }
        for v in ["-1", "NaN", "inf", "five"] {
            let e = err(&with(&[("activationThreshold", v)]));
            assert_eq!(e.key, "activationThreshold", "{v}");
            assert!(e.message.contains("write a number ≥ 0"), "{v}: {e}");
        }
    }

    #[test]
    fn stale_after_must_be_positive_and_at_most_ten_minutes() {
        assert_eq!(
            ok(&with(&[("staleAfter", "10m")])).stale_after,
            Duration::from_secs(600)
        );
        assert_eq!(
            ok(&with(&[("staleAfter", "1s")])).stale_after,
            Duration::from_secs(1)
        );
        assert!(err(&with(&[("staleAfter", "0s")]))
            .message
            .contains("is zero"));
        assert!(err(&with(&[("staleAfter", "601s")]))
            .message
            .contains("longer than 10m"));
        assert_eq!(err(&with(&[("staleAfter", "soon")])).key, "staleAfter");
    }

    #[test]
    fn active_after_open_is_parsed_and_kept() {
        assert_eq!(
            ok(&with(&[("activeAfterOpen", "90s")])).active_after_open,
            Duration::from_secs(90)
        );
        assert_eq!(
            ok(&with(&[("activeAfterOpen", "0")])).active_after_open,
            Duration::ZERO
        );
        assert_eq!(
            err(&with(&[("activeAfterOpen", "later")])).key,
            "activeAfterOpen"
        );
    }

    #[test]
    fn bad_pod_selector_reports_the_selector_error() {
        let e = err(&with(&[("podSelector", "app in vllm")]));
        assert_eq!(e.key, "podSelector");
        assert!(
            e.to_string().starts_with("trigger metadata \"podSelector\": bad label selector \"app in vllm\": expected \"(\""),
            "{e}"
        );
        assert!(e.message.contains("write it like: tier in (a,b)"), "{e}");
    }

    #[test]
    fn absent_pod_selector_is_none_and_require_selector_says_what_to_do() {
        let t = ok(&meta(&[("metric", "gpu_util"), ("targetValue", "50")]));
        assert!(t.pod_selector.is_none());
        let e = t.require_selector().unwrap_err();
        assert_eq!(e.key, "podSelector");
        assert!(e.message.starts_with("podSelector is required"), "{e}");
        assert!(
            e.message
                .ends_with("(reading the selector from the ScaledObject's target needs --kube)"),
            "{e}"
        );
        let t = ok(&with(&[]));
        assert_eq!(t.require_selector().unwrap().to_string(), "app=vllm");
    }

    #[test]
    fn empty_pod_selector_is_kept_and_matches_every_pod() {
        let t = ok(&with(&[("podSelector", "")]));
        let s = t.require_selector().unwrap();
        assert!(s.is_empty());
        assert!(s.matches(&Default::default()));
    }

    #[test]
    fn metric_name_is_stable_and_kubernetes_safe() {
        assert_eq!(
            ok(&with(&[])).metric_name(),
            "gpuscale-sm-active-avg-30s-sum"
        );
        assert_eq!(
            ok(&with(&[("window", "60s")])).metric_name(),
            ok(&with(&[("window", "1m")])).metric_name()
        );
        let mut names = std::collections::HashSet::new();
        for m in Metric::TRIGGER {
            for t in TimeAggregation::ALL {
                for a in Aggregation::ALL {
                    for w in ["10s", "30s", "1m", "5m"] {
                        let trig = ok(&with(&[
                            ("metric", m.name()),
                            ("timeAggregation", t.name()),
                            ("aggregation", a.name()),
                            ("window", w),
                        ]));
                        let name = trig.metric_name();
                        assert!(
                            name.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                            "{name}"
                        );
                        assert!(name.ends_with(&format!("-{w}-{}", a.name())), "{name}");
                        assert!(names.insert(name), "names must be distinct");
                    }
                }
            }
        }
    }

    #[test]
    fn aggregate_sums_averages_and_picks_extremes() {
        let v = [10.0, 40.0, 25.0];
        assert_eq!(aggregate(Aggregation::Sum, &v), 75.0);
        assert_eq!(aggregate(Aggregation::Avg, &v), 25.0);
        assert_eq!(aggregate(Aggregation::Max, &v), 40.0);
        assert_eq!(aggregate(Aggregation::Min, &v), 10.0);
        assert_eq!(aggregate(Aggregation::Min, &[7.0]), 7.0);
    }
}
