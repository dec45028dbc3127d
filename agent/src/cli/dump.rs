//! `gpuscale-agent dump`: what a running agent's ring says, as a table or JSON.
//!
//! Reads the ring file only (no network, no NVML) and rebuilds the windows from the ring's
//! history with the same code the agent uses. Never writes to the file.

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

use crate::sample::Metric;
use crate::shm::ShmReader;
use crate::window::{GpuWindows, Summary, Window};
use crate::Result;

/// Runs `gpuscale-agent dump`: maps the ring file at `shm` read-only and prints its [`Report`]
/// to stdout, as JSON when `json`, else as a table.
pub fn run(shm: &Path, json: bool) -> Result<()> {
    let reader = ShmReader::open(shm)?;
    let report = collect(&reader, crate::unix_now_ns());
    if reader.truncated() {
        return Err(crate::Error::BadRingFile {
            path: shm.to_owned(),
            why: "it was truncated while dump read it (an agent writing it stops and its restart \
                  writes a new one); run dump again"
                .into(),
        });
    }
    if json {
        let text = serde_json::to_string_pretty(&report)
            .expect("a report serializes: its maps have string keys");
        println!("{text}");
    } else {
        print!("{}", render_table(&report));
    }
    Ok(())
}

/// The whole dump; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Node name the agent was given.
    pub node: String,
    /// NVIDIA driver version.
    pub driver_version: String,
    /// Whether an agent holds the ring's writer lock now.
    pub agent_running: bool,
    /// The agent's sampling interval, milliseconds.
    pub interval_ms: f64,
    /// Ring slots per GPU.
    pub ring_capacity: u32,
    /// One entry per GPU.
    pub gpus: Vec<GpuReport>,
    /// The eBPF device-open tracker: `on`, `off`, `unavailable` or `unknown`.
    pub ebpf: &'static str,
    /// Why eBPF is unavailable (empty otherwise).
    pub ebpf_reason: String,
    /// Device-open events the kernel side sent.
    pub ebpf_events: u64,
    /// Events lost because the kernel ring buffer was full (attribution then falls back to
    /// procfs for those processes).
    pub ebpf_dropped: u64,
    /// Recent opens of GPU device files, newest last, including processes that already exited.
    pub device_opens: Vec<DeviceOpenReport>,
}

/// One process that opened a GPU device file.
#[derive(Debug, Serialize)]
pub struct DeviceOpenReport {
    /// Process ID.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// The device path after the prefix (`0`, `ctl`, `-uvm`).
    pub device: String,
    /// The pod's UID; `null` outside pods or when the cgroup is gone (`cgroup_known` false).
    pub pod_uid: Option<String>,
    /// The container's ID, when known.
    pub container_id: Option<String>,
    /// Whether the process's cgroup still existed at lookup.
    pub cgroup_known: bool,
    /// Latest open, milliseconds ago.
    pub age_ms: f64,
    /// Whether the process has exited.
    pub exited: bool,
}

/// One GPU, or one MIG instance of a GPU (listed after its parent, with `parent` set).
#[derive(Debug, Serialize)]
pub struct GpuReport {
    /// NVML index (a MIG instance: its parent's).
    pub index: u32,
    /// UUID (`GPU-…`; a MIG instance's `MIG-…`).
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// MIG: the UUID of the physical GPU this instance is part of; `null` for a physical GPU.
    pub parent: Option<String>,
    /// MIG: the instance's GPU instance ID on its parent; `null` for a physical GPU.
    pub gpu_instance_id: Option<u32>,
    /// MIG mode of a physical GPU is enabled (its instances follow it).
    pub mig_enabled: bool,
    /// `ok`, `lost`, `error` or `starting`.
    pub state: &'static str,
    /// Whether GPM metrics (sm_active …) are available.
    pub gpm_supported: bool,
    /// Total device memory, bytes.
    pub memory_total_bytes: u64,
    /// Age of the newest sample, milliseconds (`null` when there is none).
    pub age_ms: Option<f64>,
    /// Samples written since the ring was created.
    pub samples_written: u64,
    /// Samples overwritten by the writer (the ring keeps the newest `ring_capacity`).
    pub samples_dropped: u64,
    /// Every metric by name.
    pub metrics: BTreeMap<&'static str, MetricReport>,
    /// Running compute processes.
    pub processes: Vec<ProcessReport>,
    /// Processes beyond what the ring keeps per GPU.
    pub processes_truncated: u32,
}

/// One metric of one GPU.
#[derive(Debug, Serialize)]
pub struct MetricReport {
    /// Value in the newest sample; `null` when it was not measured.
    pub last: Option<f64>,
    /// Window name (`10s`, `30s`, `60s`, `5m`) to its summary; `null` for a window without
    /// values.
    pub windows: BTreeMap<&'static str, Option<WindowReport>>,
}

/// Statistics over one window.
#[derive(Debug, Serialize)]
pub struct WindowReport {
    /// Mean.
    pub avg: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Samples in the window.
    pub count: u32,
}

impl From<Summary> for WindowReport {
    fn from(s: Summary) -> Self {
        WindowReport {
            avg: s.avg,
            min: s.min,
            max: s.max,
            p95: s.p95,
            count: s.count,
        }
    }
}

/// A running process on a GPU.
#[derive(Debug, Serialize)]
pub struct ProcessReport {
    /// Host PID.
    pub pid: u32,
    /// Device memory used, bytes (`null` when NVML could not say).
    pub used_memory_bytes: Option<u64>,
    /// SM utilization percent (`null` when not measured: single-process GPUs, or not yet).
    pub sm_util: Option<f32>,
    /// The pod's UID; `null` when the process is not in a pod (node-level usage) or unknown.
    pub pod_uid: Option<String>,
    /// The container's ID, when known.
    pub container_id: Option<String>,
    /// How the process was attributed: `procfs`, `ebpf`, or `unknown` (its cgroup could not be
    /// read, e.g. it exited or runs in another PID namespace).
    pub attribution: &'static str,
}

/// Builds the report from a mapped ring file, with `now_ns` as the time for ages.
pub fn collect(reader: &ShmReader, now_ns: u64) -> Report {
    let gpus = reader
        .regions()
        .iter()
        .zip(reader.gpus())
        .map(|(region, info)| {
            let ring = region.ring();
            let latest = ring.latest();
            let windows = GpuWindows::from_ring(
                ring,
                info.memory_total_bytes,
                std::time::Duration::from_nanos(reader.interval_ns()),
            );
            let metrics = Metric::ALL
                .into_iter()
                .map(|m| {
                    let report = MetricReport {
                        last: latest.and_then(|s| s.get(m, info.memory_total_bytes)),
                        windows: Window::ALL
                            .into_iter()
                            .map(|w| (w.name(), windows.metric(m, w).map(Into::into)))
                            .collect(),
                    };
                    (m.name(), report)
                })
                .collect();
            let snap = region.processes().unwrap_or_default();
            GpuReport {
                index: info.index,
                uuid: info.uuid.clone(),
                name: info.name.clone(),
                parent: info.is_mig_instance().then(|| info.parent_uuid.clone()),
                gpu_instance_id: info.gpu_instance_id,
                mig_enabled: info.mig_enabled,
                state: region.state().name(),
                gpm_supported: info.gpm_supported,
                memory_total_bytes: info.memory_total_bytes,
                age_ms: latest.map(|s| now_ns.saturating_sub(s.ts_ns) as f64 / 1e6),
                samples_written: ring.head(),
                samples_dropped: ring.dropped(),
                metrics,
                processes: snap
                    .processes
                    .iter()
                    .map(|p| ProcessReport {
                        pid: p.pid,
                        used_memory_bytes: p.used_memory_bytes,
                        sm_util: p.sm_util,
                        pod_uid: p.pod_uid.clone(),
                        container_id: p.container_id.clone(),
                        attribution: p.attribution.name(),
                    })
                    .collect(),
                processes_truncated: snap.truncated,
            }
        })
        .collect();
    let status = reader.agent_status().unwrap_or_default();
    Report {
        ebpf: status.ebpf.name(),
        ebpf_reason: status.ebpf_reason,
        ebpf_events: status.events,
        ebpf_dropped: status.dropped,
        device_opens: status
            .opens
            .into_iter()
            .map(|o| DeviceOpenReport {
                pid: o.tgid,
                comm: o.comm,
                device: o.device,
                pod_uid: o.pod_uid,
                container_id: o.container_id,
                cgroup_known: o.cgroup_known,
                age_ms: now_ns.saturating_sub(o.last_open_ns) as f64 / 1e6,
                exited: o.exited,
            })
            .collect(),
        node: reader.node_name(),
        driver_version: reader.driver_version(),
        agent_running: reader.writer_alive(),
        interval_ms: reader.interval_ns() as f64 / 1e6,
        ring_capacity: reader.capacity(),
        gpus,
    }
}

fn fmt_value(metric: Metric, v: Option<f64>) -> String {
    match (metric, v) {
        (_, None) => "-".into(),
        (Metric::VramUsedBytes, Some(b)) => format!("{:.1} GiB", b / (1u64 << 30) as f64),
        (Metric::PowerWatts, Some(w)) => format!("{w:.0} W"),
        (Metric::TemperatureC, Some(c)) => format!("{c:.0} °C"),
        (_, Some(p)) => format!("{p:.1} %"),
    }
}

/// The report as a terminal table.
pub fn render_table(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} · driver {} · agent {} · interval {}ms · {} GPU(s)",
        r.node,
        r.driver_version,
        if r.agent_running {
            "running"
        } else {
            "NOT running (data below is as of its last sample)"
        },
        r.interval_ms,
        r.gpus.len()
    );
    // Each physical GPU, then its MIG instances indented under it; instances whose parent is
    // not in the file (never written so by the agent) come last.
    let is_child_of =
        |g: &GpuReport, parent: &GpuReport| g.parent.as_deref() == Some(parent.uuid.as_str());
    let mut order: Vec<(&GpuReport, bool)> = Vec::new();
    for p in r.gpus.iter().filter(|g| g.parent.is_none()) {
        order.push((p, false));
        order.extend(
            r.gpus
                .iter()
                .filter(|g| is_child_of(g, p))
                .map(|g| (g, true)),
        );
    }
    let orphans = r.gpus.iter().filter(|g| {
        g.parent.is_some()
            && !r
                .gpus
                .iter()
                .any(|p| p.parent.is_none() && is_child_of(g, p))
    });
    order.extend(orphans.map(|g| (g, true)));
    for (g, nested) in order {
        let pad = if nested { "    " } else { "" };
        let age = g.age_ms.map_or("no samples yet".into(), |a| {
            format!("newest sample {:.1}s ago", a / 1e3)
        });
        let what = match (&g.parent, g.gpu_instance_id) {
            (Some(_), Some(gi)) => format!("MIG instance GI {gi} of GPU {}", g.index),
            (Some(_), None) => format!("MIG instance of GPU {}", g.index),
            (None, _) => format!("GPU {}", g.index),
        };
        let instances = r.gpus.iter().filter(|c| is_child_of(c, g)).count();
        let _ = writeln!(
            out,
            "\n{pad}{what}  {}  {}  [{}]  {}{}{}",
            g.name,
            g.uuid,
            g.state.to_uppercase(),
            age,
            if g.gpm_supported {
                ""
            } else {
                "  (no GPM: sm_* read -)"
            },
            if g.mig_enabled {
                format!("  (MIG mode: {instances} instance(s) below)")
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "{pad}  {:<16}{:>11}  {:>11}{:>11}{:>11}{:>11}  {:>11}{:>11}",
            "metric", "last", "10s avg", "10s min", "10s max", "10s p95", "60s avg", "5m avg"
        );
        for m in Metric::ALL {
            let mr = &g.metrics[m.name()];
            let w = |w: Window, f: fn(&WindowReport) -> f64| {
                fmt_value(m, mr.windows[w.name()].as_ref().map(f))
            };
            let _ = writeln!(
                out,
                "{pad}  {:<16}{:>11}  {:>11}{:>11}{:>11}{:>11}  {:>11}{:>11}",
                m.name(),
                fmt_value(m, mr.last),
                w(Window::S10, |s| s.avg),
                w(Window::S10, |s| s.min),
                w(Window::S10, |s| s.max),
                w(Window::S10, |s| s.p95),
                w(Window::S60, |s| s.avg),
                w(Window::M5, |s| s.avg),
            );
        }
        if g.mig_enabled {
            let _ = writeln!(out, "{pad}  processes: listed under its MIG instances");
        } else if g.processes.is_empty() {
            let _ = writeln!(out, "{pad}  processes: none");
        } else {
            let _ = writeln!(out, "{pad}  processes:");
            for p in &g.processes {
                let pod = match (&p.pod_uid, &p.container_id) {
                    (Some(uid), Some(c)) => format!("pod {uid} container {}", &c[..12]),
                    (Some(uid), None) => format!("pod {uid}"),
                    _ if p.attribution == "unknown" => "pod unknown".to_owned(),
                    _ => "not in a pod".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "{pad}    pid {:<8} vram {:>10}   sm_util {:>5}   {} ({})",
                    p.pid,
                    fmt_value(Metric::VramUsedBytes, p.used_memory_bytes.map(|b| b as f64)),
                    p.sm_util.map_or("-".into(), |u| format!("{u:.0} %")),
                    pod,
                    p.attribution,
                );
            }
            if g.processes_truncated > 0 {
                let _ = writeln!(out, "{pad}    … and {} more", g.processes_truncated);
            }
        }
    }
    let _ = writeln!(
        out,
        "\neBPF device-open tracker: {}{}  ({} events, {} dropped)",
        r.ebpf,
        if r.ebpf_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.ebpf_reason)
        },
        r.ebpf_events,
        r.ebpf_dropped
    );
    if !r.device_opens.is_empty() {
        let _ = writeln!(out, "recent GPU device opens (newest last):");
        for o in &r.device_opens {
            let pod = match (&o.pod_uid, o.cgroup_known) {
                (Some(uid), _) => format!("pod {uid}"),
                (None, true) => "not in a pod".into(),
                (None, false) => "pod unknown (cgroup gone)".into(),
            };
            let _ = writeln!(
                out,
                "  pid {:<8} {:<16} device …{:<8} {}  {:.1}s ago{}",
                o.pid,
                o.comm,
                o.device,
                pod,
                o.age_ms / 1e3,
                if o.exited { "  (exited)" } else { "" }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{GpuState, Sample, Slot};
    use crate::shm::{GpuInfo, Params, ShmWriter};

    fn info(uuid: &str, parent: &str, gi: Option<u32>) -> GpuInfo {
        GpuInfo {
            uuid: uuid.into(),
            name: if parent.is_empty() {
                "NVIDIA H100 80GB HBM3".into()
            } else {
                "NVIDIA H100 80GB HBM3 MIG 1g.10gb".into()
            },
            memory_total_bytes: 10 << 30,
            gpm_supported: true,
            parent_uuid: parent.into(),
            gpu_instance_id: gi,
            mig_enabled: parent.is_empty() && uuid == "GPU-p",
            ..GpuInfo::default()
        }
    }

    #[test]
    fn mig_instances_show_under_their_parent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.ring");
        let params = Params {
            capacity: 1024,
            interval_ns: 100_000_000,
            node_name: "node-a".into(),
            driver_version: "580.159.04".into(),
        };
        // As the sampler lists them, but with a plain GPU between the parent and its instances,
        // which the table must not mix up.
        let gpus = [
            info("GPU-p", "", None),
            info("GPU-plain", "", None),
            info("MIG-a", "GPU-p", Some(7)),
            info("MIG-b", "GPU-p", Some(9)),
        ];
        let mut w = ShmWriter::open(&path, &params, &gpus).unwrap();
        let mut s = Sample::empty(crate::unix_now_ns(), GpuState::Ok);
        s.set(Slot::SmActive, 40.0);
        w.parts().regions[2].ring().push(&s);

        let r = ShmReader::open(&path).unwrap();
        let report = collect(&r, crate::unix_now_ns());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["gpus"][2]["parent"], "GPU-p");
        assert_eq!(json["gpus"][2]["gpu_instance_id"], 7);
        assert_eq!(json["gpus"][0]["parent"], serde_json::Value::Null);
        assert_eq!(json["gpus"][0]["mig_enabled"], true);
        assert_eq!(json["gpus"][2]["metrics"]["sm_active"]["last"], 40.0);

        let table = render_table(&report);
        let line = |needle: &str| {
            table
                .lines()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in\n{table}"))
        };
        let (p, a, b, plain) = (
            line("GPU-p"),
            line("MIG-a"),
            line("MIG-b"),
            line("GPU-plain"),
        );
        assert!(
            p < a && a < b && b < plain,
            "instances right under their parent:\n{table}"
        );
        assert!(
            table.contains("GPU 0  NVIDIA H100 80GB HBM3  GPU-p"),
            "{table}"
        );
        assert!(table.contains("(MIG mode: 2 instance(s) below)"), "{table}");
        assert!(
            table.contains(
                "\n    MIG instance GI 7 of GPU 0  NVIDIA H100 80GB HBM3 MIG 1g.10gb  MIG-a"
            ),
            "{table}"
        );
        assert!(
            table.contains("processes: listed under its MIG instances"),
            "{table}"
        );
        drop(w);
    }
}
