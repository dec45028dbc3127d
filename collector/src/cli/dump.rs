//! `gpuscale-collector dump`: asks a running collector for its cluster view and prints it as a
//! table or JSON ([`DumpJson`]). Owns the rendering only.

use std::collections::BTreeMap;

use proto::agent::{GpuSummary, MetricSummary, PodSummary};
use proto::collector::collector_client::CollectorClient;
use proto::collector::{ClusterView, ClusterViewRequest, NodeView};
use serde::Serialize;
use vocab::Metric;

use crate::{Error, Result};
use gpuscale_health::tls::ClientFiles;

/// Fetches the view from the collector at `addr` (`host:port`), over TLS with `tls`.
pub async fn fetch(addr: &str, tls: Option<&ClientFiles>) -> Result<ClusterView> {
    let timeout = Some(std::time::Duration::from_secs(5));
    let channel = crate::connect_collector(addr, tls, timeout).await?;
    CollectorClient::new(channel)
        .get_cluster_view(ClusterViewRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| Error::Connect {
            addr: addr.to_owned(),
            why: s.message().to_owned(),
        })
}

/// `gpuscale-collector dump`: fetches the view from the collector at `addr` and prints it to
/// stdout, as a table or (`json`) as [`to_json`].
pub async fn print(addr: &str, tls: Option<&ClientFiles>, json: bool) -> Result<()> {
    let view = fetch(addr, tls).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&to_json(addr, &view))?);
    } else {
        print!("{}", render_table(addr, &view));
    }
    Ok(())
}

/// A window's name as dumps print it (`10s`, `5m`); a length no window has (a newer agent's)
/// in seconds.
fn window_name(secs: u32) -> String {
    match vocab::Window::from_secs(secs) {
        Some(w) => w.name().to_owned(),
        None => format!("{secs}s"),
    }
}

// The `--json` shape. Fields are declared in alphabetical order: the output has always listed
// keys sorted, and scripts and tests (tests/e2e, xtask/cluster) read it. An absent value is
// `null`, never left out and never 0.

/// `dump --json`: the whole view.
#[derive(Debug, Serialize)]
pub struct DumpJson<'a> {
    /// The collector asked (`--collector`).
    pub collector: &'a str,
    /// One per agent.
    pub nodes: Vec<NodeJson<'a>>,
    /// Where pod metadata comes from (`pods-file …`, the Kubernetes API).
    pub pod_source: &'a str,
    /// Pods using GPUs that the pod source knows.
    pub pods: Vec<PodJson<'a>>,
    /// What the agent streams carry; `null` with `--agent-stream full` (everything).
    pub streamed: Option<StreamedJson<'a>>,
    /// Pods using GPUs that the pod source does not know.
    pub unknown_pod_uids: &'a [String],
}

/// What the collector asks its agents to stream: the series its triggers read, and each
/// metric's last value.
#[derive(Debug, Serialize)]
pub struct StreamedJson<'a> {
    /// Changes go out at every sample (a `StreamIsActive` stream is open), not once per pace.
    pub every_sample: bool,
    /// The pace: one message per this many ms, what changed or a heartbeat (proving the node
    /// still samples).
    pub heartbeat_ms: u32,
    /// `sm_active 30s`, `gpu_util last`…: a window no series lists is absent from `metrics`.
    pub series: &'a [String],
}

/// One agent.
#[derive(Debug, Serialize)]
pub struct NodeJson<'a> {
    /// The address the collector dials.
    pub address: &'a str,
    /// Milliseconds since its newest snapshot; `null` when none arrived.
    pub age_ms: Option<f64>,
    /// Whether its stream is open.
    pub connected: bool,
    /// Its GPUs and MIG instances.
    pub gpus: Vec<GpuJson<'a>>,
    /// The last connection or stream error.
    pub last_error: &'a str,
    /// The node name the agent reports.
    pub node: &'a str,
    /// Times its stream was re-established.
    pub reconnects: u32,
}

/// One GPU or MIG instance.
#[derive(Debug, Serialize)]
pub struct GpuJson<'a> {
    /// Whether GPM (the SM-activity counters) works.
    pub gpm_supported: bool,
    /// A MIG instance's GPU instance ID.
    pub gpu_instance_id: Option<u32>,
    /// NVML index.
    pub index: u32,
    /// VRAM.
    pub memory_total_bytes: u64,
    /// Its metrics by name.
    pub metrics: MetricsJson<'a>,
    /// Whether MIG mode is on.
    pub mig_enabled: bool,
    /// With MIG on: the UUIDs of its instances; `null` otherwise.
    pub mig_instances: Option<Vec<&'a str>>,
    /// Model name.
    pub name: &'a str,
    /// A MIG instance's parent GPU; `null` for a physical GPU.
    pub parent_uuid: Option<&'a str>,
    /// Its processes.
    pub processes: Vec<ProcessJson<'a>>,
    /// `ok`, `lost`, `error`, `starting` or `unknown`.
    pub state: &'static str,
    /// `GPU-…` or `MIG-…`.
    pub uuid: &'a str,
}

/// One process on a GPU.
#[derive(Debug, Serialize)]
pub struct ProcessJson<'a> {
    /// How it was attributed to its pod.
    pub attribution: &'static str,
    /// Its container, when attributed.
    pub container_id: Option<&'a str>,
    /// PID.
    pub pid: u32,
    /// Its pod, when attributed.
    pub pod_uid: Option<&'a str>,
    /// Its SM utilization.
    pub sm_util: Option<f64>,
    /// Its VRAM.
    pub used_memory_bytes: Option<u64>,
}

/// One pod the pod source knows.
#[derive(Debug, Serialize)]
pub struct PodJson<'a> {
    /// Its values per GPU.
    pub gpus: Vec<PodGpuJson<'a>>,
    /// Labels, sorted.
    pub labels: BTreeMap<&'a str, &'a str>,
    /// Name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Node.
    pub node: &'a str,
    /// Owner, like `Deployment/vllm`.
    pub owner: &'a str,
    /// Phase.
    pub phase: &'a str,
    /// UID.
    pub uid: &'a str,
}

/// One pod's use of one GPU.
#[derive(Debug, Serialize)]
pub struct PodGpuJson<'a> {
    /// How its processes were attributed.
    pub attribution: &'static str,
    /// Its containers on the GPU.
    pub container_ids: &'a [String],
    /// The GPU.
    pub gpu_uuid: &'a str,
    /// Its metrics by name.
    pub metrics: MetricsJson<'a>,
    /// Its processes on the GPU.
    pub pids: &'a [u32],
    /// Whether others use the GPU too.
    pub shared: bool,
}

/// Metrics by name.
pub type MetricsJson<'a> = BTreeMap<&'a str, MetricJson>;

/// One metric: its newest value and its windows by name (`10s`, `5m`).
#[derive(Debug, Serialize)]
pub struct MetricJson {
    /// The newest value; `null` when not measured.
    pub last: Option<f64>,
    /// The windows by name.
    pub windows: BTreeMap<String, WindowJson>,
}

/// One window's statistics.
#[derive(Debug, Serialize)]
pub struct WindowJson {
    /// Mean.
    pub avg: f64,
    /// Samples.
    pub count: u32,
    /// Largest.
    pub max: f64,
    /// Smallest.
    pub min: f64,
    /// 95th percentile.
    pub p95: f64,
}

fn metrics_json(ms: &[MetricSummary]) -> MetricsJson<'_> {
    ms.iter()
        // A metric this build does not know (a newer agent's) is left out.
        .filter_map(|m| Some((m.vocab_metric()?, m)))
        .map(|(metric, m)| {
            let windows = m
                .windows
                .iter()
                .map(|w| {
                    (
                        window_name(w.window_s),
                        WindowJson {
                            avg: w.avg,
                            count: w.count,
                            max: w.max,
                            min: w.min,
                            p95: w.p95,
                        },
                    )
                })
                .collect();
            (
                metric.name(),
                MetricJson {
                    last: m.last,
                    windows,
                },
            )
        })
        .collect()
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn gpu_json<'a>(n: &'a NodeView, g: &'a GpuSummary) -> GpuJson<'a> {
    GpuJson {
        gpm_supported: g.gpm_supported,
        gpu_instance_id: g.gpu_instance_id,
        index: g.index,
        memory_total_bytes: g.memory_total_bytes,
        metrics: metrics_json(&g.metrics),
        mig_enabled: g.mig_enabled,
        mig_instances: g.mig_enabled.then(|| {
            n.gpus
                .iter()
                .filter(|i| i.parent_uuid == g.uuid)
                .map(|i| i.uuid.as_str())
                .collect()
        }),
        name: &g.name,
        parent_uuid: non_empty(&g.parent_uuid),
        processes: g
            .processes
            .iter()
            .map(|p| ProcessJson {
                attribution: proto::agent::Attribution::name_of(p.attribution),
                container_id: non_empty(&p.container_id),
                pid: p.pid,
                pod_uid: non_empty(&p.pod_uid),
                sm_util: p.sm_util,
                used_memory_bytes: p.used_memory_bytes,
            })
            .collect(),
        state: proto::agent::GpuState::name_of(g.state),
        uuid: &g.uuid,
    }
}

fn pod_gpu_json(p: &PodSummary) -> PodGpuJson<'_> {
    PodGpuJson {
        attribution: proto::agent::Attribution::name_of(p.attribution),
        container_ids: &p.container_ids,
        gpu_uuid: &p.gpu_uuid,
        metrics: metrics_json(&p.metrics),
        pids: &p.pids,
        shared: p.shared,
    }
}

/// The view as `--json` prints it.
pub fn to_json<'a>(addr: &'a str, v: &'a ClusterView) -> DumpJson<'a> {
    DumpJson {
        collector: addr,
        nodes: v
            .nodes
            .iter()
            .map(|n| NodeJson {
                address: &n.address,
                age_ms: n.age_ms,
                connected: n.connected,
                gpus: n.gpus.iter().map(|g| gpu_json(n, g)).collect(),
                last_error: &n.last_error,
                node: &n.node_name,
                reconnects: n.reconnects,
            })
            .collect(),
        pod_source: &v.pod_source,
        pods: v
            .pods
            .iter()
            .map(|p| PodJson {
                gpus: p.gpus.iter().map(pod_gpu_json).collect(),
                labels: p
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
                name: &p.name,
                namespace: &p.namespace,
                node: &p.node,
                owner: &p.owner,
                phase: &p.phase,
                uid: &p.uid,
            })
            .collect(),
        streamed: v.streamed.as_ref().map(|s| StreamedJson {
            every_sample: s.every_sample,
            heartbeat_ms: s.heartbeat_ms,
            series: &s.series,
        }),
        unknown_pod_uids: &v.unknown_pod_uids,
    }
}

fn stat(ms: &[MetricSummary], metric: Metric, window_s: Option<u32>) -> Option<f64> {
    let m = ms.iter().find(|m| m.vocab_metric() == Some(metric))?;
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
    if let Some(s) = &v.streamed {
        let windows: Vec<&str> = s
            .series
            .iter()
            .filter(|s| !s.ends_with(" last"))
            .map(String::as_str)
            .collect();
        let _ = writeln!(
            out,
            "agents stream each metric's last value{}, {} (windows no trigger reads show -)",
            if windows.is_empty() {
                " and no window (no trigger asked yet)".to_owned()
            } else {
                format!(" and {}", windows.join(", "))
            },
            if s.every_sample {
                format!(
                    "changes at every sample (activation is watched), a heartbeat every {} ms",
                    s.heartbeat_ms
                )
            } else {
                format!("once every {} ms (changes or a heartbeat)", s.heartbeat_ms)
            }
        );
    }
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
                proto::agent::GpuState::name_of(g.state),
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
                    proto::agent::GpuState::name_of(i.state),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::{GpuSummary, ProcessUsage, WindowStats};
    use proto::collector::{NodeView, PodView};

    fn metrics() -> Vec<MetricSummary> {
        let w = |window_s, avg| WindowStats {
            window_s,
            avg,
            min: avg - 1.0,
            max: avg + 1.5,
            p95: avg + 1.0,
            count: 300,
        };
        vec![
            MetricSummary {
                metric: proto::agent::Metric::SmActive as i32,
                last: Some(71.5),
                windows: vec![w(10, 70.0), w(30, 69.25), w(300, 60.0)],
            },
            MetricSummary {
                metric: proto::agent::Metric::GpuUtil as i32,
                last: None,
                windows: vec![w(60, f64::NAN)],
            },
        ]
    }

    /// Every shape `--json` prints: a physical GPU with MIG instances, an instance whose
    /// parent is not listed, processes with and without a pod, a node never heard from, a
    /// pod with labels, and a pod UID the pod source does not know.
    fn view() -> ClusterView {
        let gpu = GpuSummary {
            index: 0,
            uuid: "GPU-0".into(),
            name: "NVIDIA H100".into(),
            state: 2,
            gpm_supported: true,
            memory_total_bytes: 80 << 30,
            mig_enabled: true,
            metrics: metrics(),
            processes: vec![
                ProcessUsage {
                    pid: 42,
                    used_memory_bytes: Some(1 << 30),
                    sm_util: Some(33.0),
                    pod_uid: "uid-a".into(),
                    container_id: "c0ffee".into(),
                    attribution: proto::agent::Attribution::Procfs as i32,
                },
                ProcessUsage {
                    pid: 7,
                    attribution: proto::agent::Attribution::Unknown as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mig = |uuid: &str, parent: &str, id| GpuSummary {
            index: 1,
            uuid: uuid.into(),
            name: "1g.10gb".into(),
            state: 3,
            parent_uuid: parent.into(),
            gpu_instance_id: Some(id),
            ..Default::default()
        };
        ClusterView {
            taken_unix_ns: 1,
            pod_source: "pods-file /etc/pods.json".into(),
            nodes: vec![
                NodeView {
                    address: "10.0.0.1:7701".into(),
                    node_name: "gpu-1".into(),
                    connected: true,
                    age_ms: Some(12.5),
                    last_error: String::new(),
                    gpus: vec![gpu, mig("MIG-1", "GPU-0", 7), mig("MIG-2", "GPU-9", 9)],
                    reconnects: 2,
                },
                NodeView {
                    address: "10.0.0.2:7701".into(),
                    last_error: "connect: refused".into(),
                    ..Default::default()
                },
            ],
            pods: vec![PodView {
                namespace: "ml".into(),
                name: "vllm-0".into(),
                uid: "uid-a".into(),
                node: "gpu-1".into(),
                phase: "Running".into(),
                labels: [("app", "vllm"), ("tier", "a")]
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                owner: "Deployment/vllm".into(),
                gpus: vec![PodSummary {
                    pod_uid: "uid-a".into(),
                    gpu_uuid: "GPU-0".into(),
                    container_ids: vec!["c0ffee".into()],
                    pids: vec![42],
                    shared: true,
                    metrics: metrics(),
                    attribution: proto::agent::Attribution::Procfs as i32,
                    ..Default::default()
                }],
            }],
            unknown_pod_uids: vec!["uid-z".into()],
            streamed: Some(proto::collector::Streamed {
                series: vec!["sm_active last".into(), "sm_active 30s".into()],
                heartbeat_ms: 250,
                every_sample: true,
            }),
        }
    }

    #[test]
    fn dump_json_prints_every_shape_exactly_as_before() {
        // testdata/dump.json is what the `json!`-assembled output printed for this view, and
        // `streamed` since: keys, order, nulls and number formats must not change, keys are only
        // added (tests/e2e and xtask/cluster read it).
        let text = serde_json::to_string_pretty(&to_json("127.0.0.1:7700", &view())).unwrap();
        assert_eq!(text, include_str!("testdata/dump.json"));
    }
}
