//! `gpuscale-collector dump`: asks a running collector for its cluster view and prints it as a
//! table or JSON. Owns the rendering only.

use std::collections::BTreeMap;

use proto::agent::{MetricSummary, PodSummary};
use proto::collector::collector_client::CollectorClient;
use proto::collector::{ClusterView, ClusterViewRequest};
use serde_json::{json, Value};
use vocab::Metric;

use crate::view::state_name;
use crate::{Error, Result};

/// Fetches the view from the collector at `addr` (`host:port`).
pub async fn fetch(addr: &str) -> Result<ClusterView> {
    let channel = crate::connect_collector(addr, Some(std::time::Duration::from_secs(5))).await?;
    CollectorClient::new(channel)
        .get_cluster_view(ClusterViewRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| Error::Connect {
            addr: addr.to_owned(),
            why: s.message().to_owned(),
        })
}

fn window_name(secs: u32) -> String {
    match secs {
        300 => "5m".into(),
        s => format!("{s}s"),
    }
}

fn metrics_json(ms: &[MetricSummary]) -> Value {
    let map: BTreeMap<&str, Value> = ms
        .iter()
        .map(|m| {
            let windows: BTreeMap<String, Value> = m
                .windows
                .iter()
                .map(|w| {
                    (
                        window_name(w.window_s),
                        json!({"avg": w.avg, "min": w.min, "max": w.max, "p95": w.p95, "count": w.count}),
                    )
                })
                .collect();
            (m.metric.as_str(), json!({"last": m.last, "windows": windows}))
        })
        .collect();
    json!(map)
}

fn pod_gpu_json(p: &PodSummary) -> Value {
    json!({"gpu_uuid": p.gpu_uuid, "shared": p.shared, "attribution": p.attribution,
           "pids": p.pids, "container_ids": p.container_ids, "metrics": metrics_json(&p.metrics)})
}

/// The view as JSON (the shape `--json` prints).
pub fn to_json(addr: &str, v: &ClusterView) -> Value {
    json!({
        "collector": addr,
        "pod_source": v.pod_source,
        "nodes": v.nodes.iter().map(|n| json!({
            "address": n.address, "node": n.node_name, "connected": n.connected,
            "age_ms": n.age_ms, "last_error": n.last_error, "reconnects": n.reconnects,
            "gpus": n.gpus.iter().map(|g| json!({
                "index": g.index, "uuid": g.uuid, "name": g.name, "state": state_name(g.state),
                "gpm_supported": g.gpm_supported, "memory_total_bytes": g.memory_total_bytes,
                "mig_enabled": g.mig_enabled,
                "parent_uuid": (!g.parent_uuid.is_empty()).then_some(&g.parent_uuid),
                "gpu_instance_id": g.gpu_instance_id,
                "mig_instances": g.mig_enabled.then(|| n.gpus.iter()
                    .filter(|i| i.parent_uuid == g.uuid).map(|i| &i.uuid).collect::<Vec<_>>()),
                "metrics": metrics_json(&g.metrics),
                "processes": g.processes.iter().map(|p| json!({
                    "pid": p.pid, "used_memory_bytes": p.used_memory_bytes, "sm_util": p.sm_util,
                    "pod_uid": (!p.pod_uid.is_empty()).then_some(&p.pod_uid),
                    "container_id": (!p.container_id.is_empty()).then_some(&p.container_id),
                    "attribution": p.attribution,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "pods": v.pods.iter().map(|p| json!({
            "namespace": p.namespace, "name": p.name, "uid": p.uid, "node": p.node,
            "phase": p.phase, "owner": p.owner,
            "labels": p.labels.iter().collect::<BTreeMap<_, _>>(),
            "gpus": p.gpus.iter().map(pod_gpu_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "unknown_pod_uids": v.unknown_pod_uids,
    })
}

fn stat(ms: &[MetricSummary], metric: Metric, window_s: Option<u32>) -> Option<f64> {
    let m = ms.iter().find(|m| m.metric == metric.name())?;
    match window_s {
        None => m.last,
        Some(w) => m.windows.iter().find(|x| x.window_s == w).map(|x| x.avg),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} %"))
}

fn gib(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        format!("{:.1} GiB", v / (1u64 << 30) as f64)
    })
}

/// The view as a terminal table.
pub fn render_table(addr: &str, v: &ClusterView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "collector {addr} · pods from {} · {} agent(s) · {} pod(s) using GPUs",
        v.pod_source,
        v.nodes.len(),
        v.pods.len() + v.unknown_pod_uids.len()
    );
    let _ = writeln!(
        out,
        "\n{:<18}{:<24}{:<11}{:>9}  NOTE",
        "NODE", "AGENT", "CONNECTED", "AGE"
    );
    for n in &v.nodes {
        let age = n
            .age_ms
            .map_or("never".into(), |a| format!("{:.1}s", a / 1e3));
        let _ = writeln!(
            out,
            "{:<18}{:<24}{:<11}{:>9}  {}",
            if n.node_name.is_empty() {
                "?"
            } else {
                &n.node_name
            },
            n.address,
            if n.connected { "yes" } else { "NO" },
            age,
            n.last_error
        );
        // Physical GPUs, each followed by its MIG instances; an instance whose parent is not
        // listed still shows, on its own.
        let known = |uuid: &str| {
            n.gpus
                .iter()
                .any(|g| g.uuid == uuid && g.parent_uuid.is_empty())
        };
        for g in n
            .gpus
            .iter()
            .filter(|g| g.parent_uuid.is_empty() || !known(&g.parent_uuid))
        {
            let _ = writeln!(
                out,
                "  GPU {} {:<24} {:<8} sm_active {:>8}  gpu_util {:>8}  vram {:>9}  {} process(es){}",
                g.index,
                g.name,
                state_name(g.state),
                pct(stat(&g.metrics, Metric::SmActive, None)),
                pct(stat(&g.metrics, Metric::GpuUtil, None)),
                gib(stat(&g.metrics, Metric::VramUsedBytes, None)),
                g.processes.len(),
                if g.mig_enabled { "  MIG on" } else { "" },
            );
            for i in n.gpus.iter().filter(|i| i.parent_uuid == g.uuid) {
                let _ = writeln!(
                    out,
                    "    MIG {} {:<40} {:<8} sm_active {:>8}  vram {:>9}  {} process(es)",
                    i.gpu_instance_id.map_or("?".into(), |id| id.to_string()),
                    i.uuid,
                    state_name(i.state),
                    pct(stat(&i.metrics, Metric::SmActive, None)),
                    gib(stat(&i.metrics, Metric::VramUsedBytes, None)),
                    i.processes.len()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n{:<36}{:<18}{:<12}{:<7}{:>10}{:>13}{:>10}{:>11}",
        "POD", "OWNER", "NODE", "SHARED", "sm_active", "sm 30s avg", "gpu_util", "vram"
    );
    for p in &v.pods {
        for g in &p.gpus {
            let _ = writeln!(
                out,
                "{:<36}{:<18}{:<12}{:<7}{:>10}{:>13}{:>10}{:>11}",
                format!("{}/{}", p.namespace, p.name),
                p.owner,
                p.node,
                if g.shared { "yes" } else { "no" },
                pct(stat(&g.metrics, Metric::SmActive, None)),
                pct(stat(&g.metrics, Metric::SmActive, Some(30))),
                pct(stat(&g.metrics, Metric::GpuUtil, None)),
                gib(stat(&g.metrics, Metric::VramUsedBytes, None)),
            );
        }
    }
    for uid in &v.unknown_pod_uids {
        let _ = writeln!(out, "{uid:<36}(not in the pod source)");
    }
    out
}
