//! What an agent sends, checked before it enters the view. An agent is a process on a node the
//! collector does not control: a bug, a bad NVML reading or a hostile pod with the agent's port
//! could send NaN (which KEDA would read as "inactive" and scale to zero), infinity, a
//! utilization of 4,294,967,296 %, the same GPU or pod twice (a value counted twice), or a
//! megabyte-long name. [`check`] refuses such a snapshot whole, with a reason that names the
//! field and quotes at most a short prefix of what it held; the node's pods then read
//! `UNAVAILABLE` until a good snapshot arrives (see `View::refuse`). Pure: no I/O, no clock.

use std::collections::{HashMap, HashSet};

use proto::agent::{GpuSummary, MetricSummary, NodeSnapshot};
use vocab::Metric;

use crate::quote;

/// Longest node name accepted: a Kubernetes node name is a DNS subdomain.
pub const MAX_NODE_NAME: usize = 253;
/// Longest GPU UUID accepted (`GPU-` or `MIG-` and a UUID are 40 bytes).
pub const MAX_UUID: usize = 96;
/// Longest pod UID accepted (Kubernetes UIDs are 36 bytes).
pub const MAX_POD_UID: usize = 64;
/// Longest container ID accepted (runtimes use 64 hex digits).
pub const MAX_CONTAINER_ID: usize = 128;
/// How far over its bound a window statistic may read from float rounding alone (a mean of
/// values that are all 100 can come out a few ulps above 100).
const ROUNDING: f64 = 1e-9;
/// The most windows one metric may list (the agent keeps four; room for a newer agent's).
const MAX_WINDOWS: usize = 16;
/// How far the newest sample may be after the snapshot's own time (one agent clock, so only
/// rounding separates them).
const SAMPLE_AHEAD_NS: u64 = 1_000_000_000;

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot refused: {0}")]
pub struct Refused(pub String);

/// `s` is at most `max` bytes; `what` names it (built only for the reason).
fn bounded(what: impl Fn() -> String, s: &str, max: usize) -> Result<(), Refused> {
    if s.len() > max {
        return Err(Refused(format!(
            "{} {} is longer than {max} bytes",
            what(),
            quote(s)
        )));
    }
    Ok(())
}

/// Checks one value of `metric` at `at` (for the reason).
fn value(at: &dyn Fn() -> String, metric: Metric, v: f64, vram_total: u64) -> Result<(), Refused> {
    let bad = |why: &str| Err(Refused(format!("{} is {v}: {why}", at())));
    if !v.is_finite() {
        return bad("not a finite number");
    }
    if metric.is_percent() && !(0.0..=100.0 * (1.0 + ROUNDING)).contains(&v) {
        return bad("a percentage must be within 0..100");
    }
    match metric {
        Metric::VramUsedBytes if v < 0.0 => bad("memory in use cannot be negative"),
        Metric::VramUsedBytes if vram_total > 0 && v > vram_total as f64 * (1.0 + ROUNDING) => {
            Err(Refused(format!(
                "{} is {v}: more than the GPU's {vram_total} bytes",
                at()
            )))
        }
        Metric::PowerWatts if v < 0.0 => bad("power cannot be negative"),
        Metric::PowerWatts if v > vocab::MAX_POWER_WATTS => Err(Refused(format!(
            "{} is {v}: more than any board draws ({} W)",
            at(),
            vocab::MAX_POWER_WATTS
        ))),
        Metric::TemperatureC if v > vocab::MAX_TEMPERATURE_C => Err(Refused(format!(
            "{} is {v}: hotter than a working GPU reads ({} °C)",
            at(),
            vocab::MAX_TEMPERATURE_C
        ))),
        _ => Ok(()),
    }
}

/// Checks the metrics of one GPU or pod entry, named `owner` in reasons.
fn metrics(
    owner: &dyn Fn() -> String,
    ms: &[MetricSummary],
    vram_total: u64,
) -> Result<(), Refused> {
    // Runs for every pod of every snapshot: no allocation unless refused.
    let mut seen = 0u32;
    for m in ms {
        // A value this build does not know (a newer agent) is skipped by every reader.
        let Some(metric) = m.vocab_metric() else {
            continue;
        };
        if seen & (1 << metric.index()) != 0 {
            return Err(Refused(format!("{} lists {metric} twice", owner())));
        }
        seen |= 1 << metric.index();
        if let Some(v) = m.last {
            value(
                &|| format!("{} {metric} last", owner()),
                metric,
                v,
                vram_total,
            )?;
        }
        if m.windows.len() > MAX_WINDOWS {
            return Err(Refused(format!(
                "{} {metric} lists {} windows, more than {MAX_WINDOWS}",
                owner(),
                m.windows.len()
            )));
        }
        for (j, w) in m.windows.iter().enumerate() {
            if m.windows[..j].iter().any(|o| o.window_s == w.window_s) {
                return Err(Refused(format!(
                    "{} {metric} lists window {}s twice",
                    owner(),
                    w.window_s
                )));
            }
            for (stat, v) in [
                ("avg", w.avg),
                ("min", w.min),
                ("max", w.max),
                ("p95", w.p95),
            ] {
                let at = || format!("{} {metric} {}s {stat}", owner(), w.window_s);
                value(&at, metric, v, vram_total)?;
            }
        }
    }
    Ok(())
}

/// Checks `snap`'s header (the node and the time), all a heartbeat brings.
pub fn header(snap: &NodeSnapshot) -> Result<(), Refused> {
    if snap.node_name.is_empty() {
        return Err(Refused("node_name is empty".into()));
    }
    bounded(|| "node_name".into(), &snap.node_name, MAX_NODE_NAME)?;
    if snap.taken_unix_ns == 0 {
        return Err(Refused("taken_unix_ns is 0".into()));
    }
    Ok(())
}

/// Checks `snap` as the collector is about to take it; `Err` says what is wrong.
pub fn check(snap: &NodeSnapshot) -> Result<(), Refused> {
    header(snap)?;
    // GPU UUID → memory total. A GPU lost before its UUID was read has none (its entry still
    // says it is lost); such entries are not indexed, and no pod can be on them.
    let mut totals: HashMap<&str, u64> = HashMap::with_capacity(snap.gpus.len());
    for (i, g) in snap.gpus.iter().enumerate() {
        gpu(i, g, snap.taken_unix_ns)?;
        if g.uuid.is_empty() {
            continue;
        }
        if totals.insert(&g.uuid, g.memory_total_bytes).is_some() {
            return Err(Refused(format!("GPU {} is listed twice", quote(&g.uuid))));
        }
    }
    let mut pods: HashSet<(&str, &str)> = HashSet::with_capacity(snap.pods.len());
    for (i, p) in snap.pods.iter().enumerate() {
        bounded(|| format!("pods[{i}].pod_uid"), &p.pod_uid, MAX_POD_UID)?;
        bounded(|| format!("pods[{i}].gpu_uuid"), &p.gpu_uuid, MAX_UUID)?;
        if p.pod_uid.is_empty() {
            return Err(Refused(format!("pods[{i}].pod_uid is empty")));
        }
        for c in &p.container_ids {
            bounded(|| format!("pods[{i}].container_ids"), c, MAX_CONTAINER_ID)?;
        }
        let Some(&total) = totals.get(p.gpu_uuid.as_str()) else {
            return Err(Refused(format!(
                "pod {} is on GPU {}, which the snapshot does not list",
                quote(&p.pod_uid),
                quote(&p.gpu_uuid)
            )));
        };
        if !pods.insert((&p.pod_uid, &p.gpu_uuid)) {
            return Err(Refused(format!(
                "pod {} on GPU {} is listed twice",
                quote(&p.pod_uid),
                quote(&p.gpu_uuid)
            )));
        }
        if p.newest_sample_unix_ns > snap.taken_unix_ns.saturating_add(SAMPLE_AHEAD_NS) {
            return Err(Refused(format!(
                "pod {} has a sample from after the snapshot was taken",
                quote(&p.pod_uid)
            )));
        }
        let owner = || format!("pod {} on GPU {}", quote(&p.pod_uid), quote(&p.gpu_uuid));
        metrics(&owner, &p.metrics, total)?;
    }
    Ok(())
}

fn gpu(i: usize, g: &GpuSummary, taken: u64) -> Result<(), Refused> {
    bounded(|| format!("gpus[{i}].uuid"), &g.uuid, MAX_UUID)?;
    bounded(
        || format!("gpus[{i}].parent_uuid"),
        &g.parent_uuid,
        MAX_UUID,
    )?;
    if g.newest_sample_unix_ns > taken.saturating_add(SAMPLE_AHEAD_NS) {
        return Err(Refused(format!(
            "GPU {} has a sample from after the snapshot was taken",
            quote(&g.uuid)
        )));
    }
    for p in &g.processes {
        bounded(
            || format!("GPU {} process pod_uid", quote(&g.uuid)),
            &p.pod_uid,
            MAX_POD_UID,
        )?;
        bounded(
            || format!("GPU {} process container_id", quote(&g.uuid)),
            &p.container_id,
            MAX_CONTAINER_ID,
        )?;
    }
    metrics(
        &|| format!("GPU {}", quote(&g.uuid)),
        &g.metrics,
        g.memory_total_bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::PodSummary;

    const GIB: u64 = 1 << 30;

    fn summary(m: Metric, v: f64) -> MetricSummary {
        MetricSummary::steady(m, v, |_| 10)
    }

    /// A good snapshot: one GPU, one pod on it.
    fn good() -> NodeSnapshot {
        let ms = || {
            vec![
                summary(Metric::SmActive, 40.0),
                summary(Metric::VramUsedBytes, (20 * GIB) as f64),
                summary(Metric::PowerWatts, 300.0),
            ]
        };
        NodeSnapshot {
            api_version: 2,
            node_name: "gpu-node-1".into(),
            taken_unix_ns: 1_800_000_000_000_000_000,
            interval_ns: 100_000_000,
            gpus: vec![GpuSummary {
                uuid: "GPU-a".into(),
                memory_total_bytes: 80 * GIB,
                newest_sample_unix_ns: 1_800_000_000_000_000_000,
                metrics: ms(),
                ..GpuSummary::default()
            }],
            pods: vec![PodSummary {
                pod_uid: "0a0a0a0a-1111-4222-8333-444444444444".into(),
                gpu_uuid: "GPU-a".into(),
                metrics: ms(),
                ..PodSummary::default()
            }],
            ..NodeSnapshot::default()
        }
    }

    #[test]
    fn a_node_of_64_mig_instances_shared_by_8_pods_each_is_valid_and_fits_the_agent_message_limit()
    {
        use prost::Message as _;
        // Every metric, every window, values that take all their bytes on the wire.
        let ms = || {
            Metric::ALL
                .map(|m| match m {
                    Metric::VramUsedBytes => summary(m, (20 * GIB) as f64 + 0.5),
                    Metric::PowerWatts => summary(m, 301.25),
                    Metric::TemperatureC => summary(m, 61.5),
                    _ => summary(m, 40.125),
                })
                .to_vec()
        };
        let taken = 1_800_000_000_000_000_000;
        let mut snap = NodeSnapshot {
            api_version: 2,
            node_name: "ip-10-0-123-45.eu-west-1.compute.internal".into(),
            taken_unix_ns: taken,
            interval_ns: 100_000_000,
            ..NodeSnapshot::default()
        };
        for g in 0..64u32 {
            let uuid = format!("MIG-{:08x}-1111-4222-8333-{:012x}", g, g);
            snap.gpus.push(GpuSummary {
                index: g,
                uuid: uuid.clone(),
                name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb".into(),
                memory_total_bytes: 80 * GIB,
                newest_sample_unix_ns: taken,
                metrics: ms(),
                ..GpuSummary::default()
            });
            for p in 0..8u32 {
                snap.pods.push(PodSummary {
                    pod_uid: format!("{:08x}-1111-4222-8333-{:012x}", g, p),
                    gpu_uuid: uuid.clone(),
                    container_ids: vec![format!("{:064x}", u64::from(g * 8 + p))],
                    pids: vec![100_000 + g * 8 + p],
                    shared: true,
                    newest_sample_unix_ns: taken,
                    metrics: ms(),
                    ..PodSummary::default()
                });
            }
        }
        check(&snap).expect("a big but real node is valid");
        let bytes = snap.encoded_len();
        eprintln!(
            "{} GPUs, {} (pod, GPU) pairs: {bytes} bytes",
            snap.gpus.len(),
            snap.pods.len()
        );
        assert!(
            bytes * 2 < crate::sources::agents::MAX_AGENT_MESSAGE,
            "{bytes} bytes leave less than half the limit free"
        );
    }

    fn refused(change: impl FnOnce(&mut NodeSnapshot)) -> String {
        let mut s = good();
        change(&mut s);
        check(&s).expect_err("refused").0
    }

    #[test]
    fn a_good_snapshot_passes_and_an_unknown_metric_is_skipped() {
        assert_eq!(check(&good()), Ok(()));
        let mut s = good();
        s.gpus[0].metrics.push(MetricSummary {
            metric: 99,
            last: Some(f64::NAN),
            windows: vec![],
        });
        assert_eq!(
            check(&s),
            Ok(()),
            "a newer agent's metric is not read, so not checked"
        );
    }

    #[test]
    fn numbers_that_would_mislead_keda_are_refused_naming_the_field() {
        let why = refused(|s| s.pods[0].metrics[0].last = Some(f64::NAN));
        assert!(
            why.contains("sm_active last") && why.contains("not a finite number"),
            "{why}"
        );
        let why = refused(|s| s.pods[0].metrics[0].windows[1].avg = f64::INFINITY);
        assert!(why.contains("sm_active 30s avg is inf"), "{why}");
        let why = refused(|s| s.gpus[0].metrics[0].last = Some(4_294_967_295.0));
        assert!(
            why.contains("GPU \"GPU-a\" sm_active") && why.contains("0..100"),
            "{why}"
        );
        let why = refused(|s| s.gpus[0].metrics[0].windows[0].min = -1.0);
        assert!(why.contains("0..100"), "{why}");
        // A mean a rounding over 100 is a mean of 100s, not a bad number.
        let mut ok = good();
        ok.gpus[0].metrics[0].windows[0].avg = 100.0 + 1e-12;
        assert_eq!(check(&ok), Ok(()));
        let why = refused(|s| s.gpus[0].metrics[0].windows[0].avg = 100.001);
        assert!(why.contains("0..100"), "{why}");
        let why = refused(|s| s.pods[0].metrics[1].windows[3].max = (81 * GIB) as f64);
        assert!(
            why.contains("vram_used_bytes 300s max") && why.contains("more than the GPU's"),
            "{why}"
        );
        let why = refused(|s| s.gpus[0].metrics[2].last = Some(-5.0));
        assert!(why.contains("power cannot be negative"), "{why}");
        // Two such pods would add up to infinity; one is already no board's power.
        let why = refused(|s| s.pods[0].metrics[2].windows[0].avg = 1e308);
        assert!(why.contains("more than any board draws"), "{why}");
    }

    #[test]
    fn duplicates_that_would_count_a_value_twice_are_refused() {
        let why = refused(|s| {
            let g = s.gpus[0].clone();
            s.gpus.push(g);
        });
        assert_eq!(why, "GPU \"GPU-a\" is listed twice");
        let why = refused(|s| {
            let p = s.pods[0].clone();
            s.pods.push(p);
        });
        assert!(why.contains("listed twice"), "{why}");
        let why = refused(|s| {
            let m = s.pods[0].metrics[0].clone();
            s.pods[0].metrics.push(m);
        });
        assert!(why.contains("lists sm_active twice"), "{why}");
        let why = refused(|s| {
            let w = s.gpus[0].metrics[0].windows[0];
            s.gpus[0].metrics[0].windows.push(w);
        });
        assert!(why.contains("lists window 10s twice"), "{why}");
        let why = refused(|s| {
            let w = s.gpus[0].metrics[0].windows[0];
            s.gpus[0].metrics[0].windows = vec![w; 100_000];
        });
        assert!(why.contains("100000 windows, more than 16"), "{why}");
        let why = refused(|s| s.pods[0].gpu_uuid = "GPU-elsewhere".into());
        assert!(why.contains("which the snapshot does not list"), "{why}");
    }

    #[test]
    fn names_and_times_are_bounded_and_a_reason_quotes_only_a_prefix() {
        let why = refused(|s| s.node_name = "n".repeat(3 << 20));
        assert!(
            why.contains("node_name") && why.contains("3145728 bytes"),
            "{why}"
        );
        assert!(
            why.len() < 200,
            "the reason quotes a prefix, not 3 MB: {} bytes",
            why.len()
        );
        assert_eq!(refused(|s| s.node_name.clear()), "node_name is empty");
        let why = refused(|s| s.pods[0].pod_uid = "ü".repeat(100));
        assert!(why.contains("pods[0].pod_uid") && why.len() < 200, "{why}");
        let why = refused(|s| s.gpus[0].newest_sample_unix_ns = s.taken_unix_ns + 5_000_000_000);
        assert!(why.contains("after the snapshot was taken"), "{why}");
        assert_eq!(refused(|s| s.taken_unix_ns = 0), "taken_unix_ns is 0");
        assert!(refused(|s| s.pods[0].pod_uid.clear()).contains("pod_uid is empty"));
        // GPUs lost before NVML gave their UUIDs have none: they are reported, not refused,
        // and no pod can be on them.
        let mut lost = good();
        for _ in 0..2 {
            lost.gpus.push(GpuSummary {
                state: proto::agent::GpuState::Lost as i32,
                ..GpuSummary::default()
            });
        }
        assert_eq!(check(&lost), Ok(()));
        lost.pods[0].gpu_uuid.clear();
        assert!(check(&lost)
            .unwrap_err()
            .0
            .contains("which the snapshot does not list"));
    }
}
