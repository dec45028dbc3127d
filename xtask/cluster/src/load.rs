//! The simulated load of a pod: its annotation `gpuscale.dev/simulated-load`, e.g.
//! `sm_active=80,gpu_util=90,vram_used_pct=60`, with the metric names of the trigger reference.

use std::collections::BTreeMap;

/// The annotation a pod's simulated load is read from.
pub const ANNOTATION: &str = "gpuscale.dev/simulated-load";

/// The metrics a load may set, and the largest value each accepts.
pub const METRICS: &[(&str, f64)] = &[
    ("sm_active", 100.0),
    ("gpu_util", 100.0),
    ("sm_occupancy", 100.0),
    ("tensor_active", 100.0),
    ("dram_active", 100.0),
    ("mem_util", 100.0),
    ("vram_used_pct", 100.0),
    ("vram_used_bytes", 1e15),
    ("power_watts", 2000.0),
    ("temperature_c", 150.0),
];

/// A parsed load: metric → value. Metrics not named are idle (0, or the GPU's idle power and
/// temperature).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load(pub BTreeMap<String, f64>);

impl Load {
    /// The value of `metric`, if the load sets it.
    pub fn get(&self, metric: &str) -> Option<f64> {
        self.0.get(metric).copied()
    }
}

/// Parses an annotation value. Errors name the bad part and what is accepted.
pub fn parse(text: &str) -> Result<Load, String> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!(
                "{ANNOTATION}: {part:?} is not metric=value (e.g. sm_active=80,vram_used_pct=60)"
            ));
        };
        let key = key.trim();
        let Some(&(_, max)) = METRICS.iter().find(|(m, _)| *m == key) else {
            return Err(format!(
                "{ANNOTATION}: unknown metric {key:?}; use one of {}",
                METRICS
                    .iter()
                    .map(|(m, _)| *m)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let v: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("{ANNOTATION}: {key}={value:?} is not a number"))?;
        if !v.is_finite() || v < 0.0 || v > max {
            return Err(format!(
                "{ANNOTATION}: {key}={value} is out of range (0 to {max})"
            ));
        }
        if out.insert(key.to_owned(), v).is_some() {
            return Err(format!("{ANNOTATION}: {key} is given twice"));
        }
    }
    Ok(Load(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_names_metrics_of_the_trigger_reference() {
        let l = parse("sm_active=80, gpu_util=90,vram_used_pct=60").unwrap();
        assert_eq!(l.get("sm_active"), Some(80.0));
        assert_eq!(l.get("gpu_util"), Some(90.0));
        assert_eq!(l.get("vram_used_pct"), Some(60.0));
        assert_eq!(l.get("tensor_active"), None);
        assert_eq!(parse("").unwrap(), Load::default());
    }

    #[test]
    fn a_bad_load_is_refused_with_the_part_at_fault() {
        assert!(parse("sm_active").unwrap_err().contains("not metric=value"));
        assert!(parse("sm_busy=3")
            .unwrap_err()
            .contains("unknown metric \"sm_busy\""));
        assert!(parse("sm_active=lots")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse("sm_active=101").unwrap_err().contains("out of range"));
        assert!(parse("sm_active=-1").unwrap_err().contains("out of range"));
        assert!(parse("sm_active=NaN").unwrap_err().contains("out of range"));
        assert!(parse("sm_active=1,sm_active=2")
            .unwrap_err()
            .contains("twice"));
    }
}
