//! The agent's health, readiness and Prometheus metrics (`--http-listen`, served by the
//! `gpuscale-health` crate), and the same readiness for `grpc.health.v1` on `--listen`.
//!
//! Turns the node's state and the loops' [`crate::stats`] into checks and, at scrape time, into
//! series ([`AgentCollector`]). It never calls NVML and holds a GPU's lock only while copying that
//! GPU's newest values out.
//!
//! A value the agent cannot trust right now (not measured in the newest sample, a GPU that is
//! lost or failing, a sampler that stopped ticking) is absent from `/metrics`, never 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuscale_health::{counter_family, gauge_family, Check, Endpoints, Labels};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::ebpf::EbpfState;
use crate::node::Node;
use crate::sample::{GpuState, Metric};
use crate::sampler::proc_util_period;
use crate::stop::Stop;

/// How long a loop that runs every `period` may go without a beat before `/healthz` fails:
/// ten periods, and never less than 5 s.
pub fn stall_limit(period: Duration) -> Duration {
    (period * 10).max(Duration::from_secs(5))
}

/// `/healthz`: every sampler thread ticked, and the status and per-process loops ran, within
/// their [`stall_limit`] before `now`.
pub fn liveness(agent: &Node, now: Instant) -> Check {
    let limit = stall_limit(agent.interval);
    for (g, s) in agent.gpus.iter().zip(&agent.stats.gpus) {
        let age = s.tick.age_at(now);
        if age > limit {
            return Err(format!(
                "the sampler of GPU {} ({}) has not ticked for {:.1}s (limit {:.1}s): an NVML call \
                 may be hanging",
                g.index,
                g.uuid,
                age.as_secs_f64(),
                limit.as_secs_f64()
            ));
        }
    }
    let status_limit = stall_limit(Duration::from_secs(1)).max(limit);
    let age = agent.stats.status.age_at(now);
    if age > status_limit {
        return Err(format!(
            "the status loop (eBPF counters, device opens) has not run for {:.1}s (limit {:.1}s)",
            age.as_secs_f64(),
            status_limit.as_secs_f64()
        ));
    }
    if !agent.gpus.is_empty() {
        let pu_limit = stall_limit(proc_util_period(agent.interval));
        let age = agent.stats.proc_util.age_at(now);
        if age > pu_limit {
            return Err(format!(
                "the per-process utilization loop has not run for {:.1}s (limit {:.1}s): an NVML \
                 call may be hanging",
                age.as_secs_f64(),
                pu_limit.as_secs_f64()
            ));
        }
    }
    Ok(())
}

/// `/readyz` and `grpc.health.v1`: every GPU was sampled at least once or reported lost or
/// failing (an agent with no GPUs is ready: it reports none).
pub fn readiness(agent: &Node) -> Check {
    let waiting: Vec<String> = (0..agent.gpus.len())
        .filter(|&i| agent.with_live(i, |l| l.state) == GpuState::Starting)
        .map(|i| agent.gpus[i].index.to_string())
        .collect();
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "waiting for the first sample of GPU {} of {}",
            waiting.join(", "),
            agent.gpus.len()
        ))
    }
}

/// The endpoints `--http-listen` serves: liveness, readiness (false once `stop` fired) and
/// [`registry`].
pub fn endpoints(agent: Arc<Node>, stop: Arc<Stop>) -> Endpoints {
    let live = agent.clone();
    let ready = agent.clone();
    Endpoints::new(
        move || liveness(&live, Instant::now()),
        move || {
            if stop.is_stopped() {
                return Err("shutting down".into());
            }
            readiness(&ready)
        },
        registry(agent),
    )
}

/// A registry whose every series is computed from `agent` at scrape time.
pub fn registry(agent: Arc<Node>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(AgentCollector { agent }));
    r
}

/// Help text of a metric's gauge.
fn help(m: Metric) -> &'static str {
    match m {
        Metric::SmActive => "GPM SM activity in the newest sample, percent (Hopper and newer)",
        Metric::GpuUtil => {
            "NVML GPU utilization (time any kernel ran) in the newest sample, percent"
        }
        Metric::SmOccupancy => "GPM SM occupancy in the newest sample, percent",
        Metric::TensorActive => "GPM tensor-core activity in the newest sample, percent",
        Metric::DramActive => "GPM DRAM bandwidth utilization in the newest sample, percent",
        Metric::MemUtil => "NVML memory-controller utilization in the newest sample, percent",
        Metric::VramUsedBytes => "Device memory in use in the newest sample, bytes",
        Metric::VramUsedPct => "Device memory in use in the newest sample, percent of total",
        Metric::PowerWatts => "Board power draw in the newest sample, watts",
        Metric::TemperatureC => "GPU temperature in the newest sample, degrees Celsius",
    }
}

/// One GPU's series, copied out under its lock.
struct GpuRow {
    labels: Labels,
    name: String,
    gpm: bool,
    state: GpuState,
    age: Option<f64>,
    values: [Option<f64>; Metric::COUNT],
    pods: Vec<(String, [Option<f64>; Metric::COUNT])>,
}

/// A prometheus-client collector that reads the agent's state on every scrape.
pub struct AgentCollector {
    agent: Arc<Node>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCollector")
            .field("node", &self.agent.node_name)
            .finish()
    }
}

impl AgentCollector {
    fn rows(&self, now: Instant) -> Vec<GpuRow> {
        let a = &self.agent;
        let limit = stall_limit(a.interval);
        a.gpus
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let labels = vec![
                    ("node", a.node_name.clone()),
                    ("gpu", info.index.to_string()),
                    ("uuid", info.uuid.clone()),
                ];
                let (state, latest, pods) = a.with_live(i, |live| {
                    let latest = a.stats.gpus[i].latest();
                    // Values of the newest sample, if it is recent and the GPU was ok in it.
                    let values = latest
                        .filter(|(s, at)| {
                            s.state() == GpuState::Ok && now.saturating_duration_since(*at) <= limit
                        })
                        .map(|(s, _)| s.metrics(info.memory_total_bytes));
                    // Each pod's share of the newest sample, as the sampler attributed it.
                    let pods = match values {
                        None => Vec::new(),
                        Some(_) => live
                            .pods
                            .iter()
                            .map(|(uid, pod)| {
                                let v: [Option<f64>; Metric::COUNT] =
                                    std::array::from_fn(|m| pod.windows.last(m).map(f64::from));
                                (uid.clone(), v)
                            })
                            .collect(),
                    };
                    (live.state, latest.map(|l| (l, values)), pods)
                });
                GpuRow {
                    labels,
                    name: info.name.clone(),
                    gpm: info.gpm_supported,
                    state,
                    age: latest
                        .as_ref()
                        .map(|((_, at), _)| now.saturating_duration_since(*at).as_secs_f64()),
                    values: latest.and_then(|(_, v)| v).unwrap_or([None; Metric::COUNT]),
                    pods,
                }
            })
            .collect()
    }
}

fn with(labels: &Labels, more: &[(&'static str, &str)]) -> Labels {
    let mut l = labels.clone();
    l.extend(more.iter().map(|(k, v)| (*k, (*v).to_owned())));
    l
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let a = &self.agent;
        let rows = self.rows(Instant::now());
        let status = a.status();
        let node: Labels = vec![("node", a.node_name.clone())];

        gauge_family(
            &mut encoder,
            "gpuscale_agent_info",
            "The agent: version, NVIDIA driver, eBPF state (on, off, unavailable); always 1",
            [(
                with(
                    &node,
                    &[
                        ("version", env!("CARGO_PKG_VERSION")),
                        ("driver_version", &a.driver_version),
                        ("ebpf", status.ebpf.name()),
                    ],
                ),
                1i64,
            )],
        )?;
        gauge_family(
            &mut encoder,
            "gpuscale_gpu_info",
            "A GPU the agent samples: its name and whether it has GPM; always 1",
            rows.iter().map(|r| {
                (
                    with(
                        &r.labels,
                        &[
                            ("name", &r.name),
                            ("gpm", if r.gpm { "true" } else { "false" }),
                        ],
                    ),
                    1i64,
                )
            }),
        )?;
        gauge_family(
            &mut encoder,
            "gpuscale_gpu_state",
            "The GPU's state in the newest sample: 1 for the current one of starting, ok, lost, \
             error; 0 for the others",
            rows.iter().flat_map(|r| {
                GpuState::ALL.iter().map(|s| {
                    (
                        with(&r.labels, &[("state", s.name())]),
                        i64::from(*s == r.state),
                    )
                })
            }),
        )?;
        gauge_family(
            &mut encoder,
            "gpuscale_gpu_sample_age_seconds",
            "Time since the GPU's newest sample; absent before the first",
            rows.iter()
                .filter_map(|r| r.age.map(|age| (r.labels.clone(), age))),
        )?;
        for m in Metric::ALL {
            gauge_family(
                &mut encoder,
                &format!("gpuscale_gpu_{}", m.name()),
                &format!("{}; absent when not measured", help(m)),
                rows.iter()
                    .filter_map(|r| r.values[m.index()].map(|v| (r.labels.clone(), v))),
            )?;
        }
        for m in Metric::ALL {
            gauge_family(
                &mut encoder,
                &format!("gpuscale_pod_gpu_{}", m.name()),
                &format!(
                    "{}, attributed to the pod (by pod UID; the collector's \
                     gpuscale_collector_pod_gpu_* series carry namespace and pod); absent when \
                     not measured or not attributable",
                    help(m)
                ),
                rows.iter().flat_map(|r| {
                    r.pods.iter().filter_map(move |(uid, values)| {
                        values[m.index()].map(|v| {
                            let labels = vec![
                                ("node", r.labels[0].1.clone()),
                                ("gpu", r.labels[1].1.clone()),
                                ("pod_uid", uid.clone()),
                            ];
                            (labels, v)
                        })
                    })
                }),
            )?;
        }
        {
            let mut e = encoder.encode_descriptor(
                "gpuscale_agent_sample_duration_seconds",
                "Time one tick's NVML sampling of the GPU took (utilization, memory, power, \
                 temperature, GPM, processes, their attribution)",
                None,
                MetricType::Histogram,
            )?;
            for (r, s) in rows.iter().zip(&a.stats.gpus) {
                s.sample_seconds.encode(e.encode_family(&r.labels)?)?;
            }
        }
        counter_family(
            &mut encoder,
            "gpuscale_agent_nvml_errors",
            "Sampling rounds of the GPU that failed, by kind: lost (GPU_IS_LOST) or error (any \
             other NVML error); a failing GPU is retried with backoff from 1 s to 30 s",
            rows.iter().zip(&a.stats.gpus).flat_map(|(r, s)| {
                [
                    (with(&r.labels, &[("kind", "lost")]), s.lost.get()),
                    (with(&r.labels, &[("kind", "error")]), s.errors.get()),
                ]
            }),
        )?;
        counter_family(
            &mut encoder,
            "gpuscale_agent_nvml_out_of_range",
            "Values NVML reported that their metric cannot have (a utilization over 100 %, more \
             memory in use than the GPU has, NaN), left unmeasured for that sample",
            rows.iter()
                .zip(&a.stats.gpus)
                .map(|(r, s)| (r.labels.clone(), s.out_of_range.get())),
        )?;
        // eBPF counters exist only while the tracker runs.
        let ebpf_on = status.ebpf == EbpfState::On;
        counter_family(
            &mut encoder,
            "gpuscale_agent_ebpf_events",
            "GPU device-open events received from the eBPF program; absent without eBPF",
            ebpf_on.then(|| (node.clone(), status.events)),
        )?;
        counter_family(
            &mut encoder,
            "gpuscale_agent_ebpf_dropped",
            "eBPF events the kernel dropped because its ring buffer was full (those processes \
             fall back to procfs); absent without eBPF",
            ebpf_on.then(|| (node.clone(), status.dropped)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Attribution;
    use crate::sample::{Sample, Slot};
    use crate::shm::{AgentStatus, GpuInfo, ProcessEntry};

    const INTERVAL: Duration = Duration::from_millis(100);

    fn info(index: u32, gpm: bool) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            gpm_supported: gpm,
            ..GpuInfo::default()
        }
    }

    /// A sample as the fake NVML's default GPU gives it; GPM values only with `gpm`.
    fn sample(gpm: bool) -> Sample {
        let mut s = Sample::empty(crate::unix_now_ns(), GpuState::Ok);
        s.set(Slot::GpuUtil, 37.0);
        s.set(Slot::MemUtil, 12.0);
        s.set(Slot::PowerWatts, 350.0);
        s.set(Slot::TemperatureC, 60.0);
        s.set_vram_used(20 << 30);
        if gpm {
            s.set(Slot::SmActive, 30.0);
            s.set(Slot::SmOccupancy, 10.0);
            s.set(Slot::TensorActive, 25.0);
            s.set(Slot::DramActive, 15.0);
        }
        s
    }

    fn proc(pid: u32, pod: &str, sm: Option<f32>) -> ProcessEntry {
        ProcessEntry {
            pid,
            used_memory_bytes: Some(4 << 30),
            sm_util: sm,
            pod_uid: Some(pod.into()),
            container_id: None,
            attribution: Attribution::Procfs,
        }
    }

    fn text(agent: &Arc<Node>) -> String {
        gpuscale_health::encode(&registry(agent.clone())).unwrap()
    }

    /// The value of the series whose line starts with `series` (name and labels), if present.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    const G0: &str = r#"{node="test-node",gpu="0",uuid="GPU-0"}"#;
    const G1: &str = r#"{node="test-node",gpu="1",uuid="GPU-1"}"#;

    #[test]
    fn gpu_gauges_carry_the_newest_values_and_omit_what_was_not_measured() {
        let agent = Arc::new(Node::for_tests(
            vec![info(0, true), info(1, false)],
            INTERVAL,
        ));
        agent.record(0, &sample(true), vec![]);
        agent.record(1, &sample(false), vec![]);
        let t = text(&agent);
        assert_eq!(
            value(&t, &format!("gpuscale_gpu_sm_active{G0}")),
            Some(30.0)
        );
        assert_eq!(value(&t, &format!("gpuscale_gpu_gpu_util{G0}")), Some(37.0));
        assert_eq!(value(&t, &format!("gpuscale_gpu_gpu_util{G1}")), Some(37.0));
        assert_eq!(
            value(&t, &format!("gpuscale_gpu_vram_used_bytes{G0}")),
            Some((20u64 << 30) as f64)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_gpu_vram_used_pct{G0}")),
            Some(25.0)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_gpu_power_watts{G1}")),
            Some(350.0)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_gpu_temperature_c{G1}")),
            Some(60.0)
        );
        // GPU 1 has no GPM: its SM activity is absent, not 0.
        for m in ["sm_active", "sm_occupancy", "tensor_active", "dram_active"] {
            assert!(!t.contains(&format!("gpuscale_gpu_{m}{G1}")), "{m}:\n{t}");
            assert!(t.contains(&format!("# TYPE gpuscale_gpu_{m} gauge")), "{t}");
        }
        assert_eq!(
            value(
                &t,
                r#"gpuscale_gpu_state{node="test-node",gpu="0",uuid="GPU-0",state="ok"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_gpu_state{node="test-node",gpu="0",uuid="GPU-0",state="lost"}"#
            ),
            Some(0.0)
        );
        assert!(value(&t, &format!("gpuscale_gpu_sample_age_seconds{G0}")).is_some());
        assert!(
            t.contains(&format!(
                "gpuscale_agent_sample_duration_seconds_count{G0} 0"
            )),
            "{t}"
        );
        let info1 = concat!(
            r#"gpuscale_gpu_info{node="test-node",gpu="1",uuid="GPU-1","#,
            r#"name="NVIDIA H100 80GB HBM3",gpm="false"} 1"#
        );
        assert!(t.contains(info1), "{t}");
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                line.starts_with("gpuscale_"),
                "every series is gpuscale_…: {line}"
            );
        }
    }

    #[test]
    fn a_lost_gpu_shows_its_state_and_error_count_and_no_values() {
        let agent = Arc::new(Node::for_tests(vec![info(0, true)], INTERVAL));
        agent.record(0, &sample(true), vec![proc(1, "pod-a", None)]);
        agent.stats.gpus[0].lost.inc();
        agent.record(
            0,
            &Sample::empty(crate::unix_now_ns(), GpuState::Lost),
            vec![],
        );
        let t = text(&agent);
        assert_eq!(
            value(
                &t,
                r#"gpuscale_gpu_state{node="test-node",gpu="0",uuid="GPU-0",state="lost"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_gpu_state{node="test-node",gpu="0",uuid="GPU-0",state="ok"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_agent_nvml_errors_total{node="test-node",gpu="0",uuid="GPU-0",kind="lost"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"gpuscale_agent_nvml_errors_total{node="test-node",gpu="0",uuid="GPU-0",kind="error"}"#
            ),
            Some(0.0)
        );
        for m in Metric::ALL {
            assert!(
                !t.contains(&format!("gpuscale_gpu_{}{{", m.name())),
                "{}:\n{t}",
                m.name()
            );
            assert!(
                !t.contains(&format!("gpuscale_pod_gpu_{}{{", m.name())),
                "{}:\n{t}",
                m.name()
            );
        }
    }

    #[test]
    fn values_of_a_sampler_that_stopped_ticking_are_absent() {
        let agent = Arc::new(Node::for_tests(vec![info(0, true)], INTERVAL));
        agent.record(0, &sample(true), vec![proc(1, "pod-a", None)]);
        let c = AgentCollector { agent };
        let now = c.rows(Instant::now());
        assert_eq!(now[0].values[Metric::SmActive.index()], Some(30.0));
        assert_eq!(now[0].pods.len(), 1);
        let later = c.rows(Instant::now() + Duration::from_secs(60));
        assert_eq!(later[0].values, [None; Metric::COUNT]);
        assert!(later[0].pods.is_empty());
        assert!(later[0].age.unwrap() >= 60.0);
    }

    #[test]
    fn pod_gauges_are_labelled_by_pod_uid_and_absent_when_the_split_is_unknown() {
        let agent = Arc::new(Node::for_tests(
            vec![info(0, true), info(1, true)],
            INTERVAL,
        ));
        // GPU 0: pod a alone. GPU 1: pods b and c, b's SM share measured, c's not yet.
        agent.record(0, &sample(true), vec![proc(1, "a", None)]);
        agent.record(
            1,
            &sample(true),
            vec![proc(2, "b", Some(20.0)), proc(3, "c", None)],
        );
        let t = text(&agent);
        let a = r#"{node="test-node",gpu="0",pod_uid="a"}"#;
        let b = r#"{node="test-node",gpu="1",pod_uid="b"}"#;
        let c = r#"{node="test-node",gpu="1",pod_uid="c"}"#;
        assert_eq!(
            value(&t, &format!("gpuscale_pod_gpu_sm_active{a}")),
            Some(30.0)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_pod_gpu_vram_used_bytes{a}")),
            Some((20u64 << 30) as f64)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_pod_gpu_vram_used_bytes{b}")),
            Some((4u64 << 30) as f64)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_pod_gpu_vram_used_bytes{c}")),
            Some((4u64 << 30) as f64)
        );
        assert_eq!(
            value(&t, &format!("gpuscale_pod_gpu_sm_active{b}")),
            None,
            "{t}"
        );
        assert_eq!(
            value(&t, &format!("gpuscale_pod_gpu_sm_active{c}")),
            None,
            "{t}"
        );
    }

    #[test]
    fn ebpf_counters_appear_only_while_ebpf_runs() {
        let agent = Arc::new(Node::for_tests(vec![], INTERVAL));
        let t = text(&agent);
        assert!(!t.contains("gpuscale_agent_ebpf_events_total{"), "{t}");
        agent.set_status(AgentStatus {
            ebpf: EbpfState::On,
            events: 7,
            dropped: 2,
            ..AgentStatus::default()
        });
        let t = text(&agent);
        assert_eq!(
            value(&t, r#"gpuscale_agent_ebpf_events_total{node="test-node"}"#),
            Some(7.0)
        );
        assert_eq!(
            value(&t, r#"gpuscale_agent_ebpf_dropped_total{node="test-node"}"#),
            Some(2.0)
        );
        assert!(t.contains(r#"ebpf="on""#), "{t}");
    }

    #[test]
    fn ready_once_every_gpu_reported_even_lost() {
        let agent = Node::for_tests(vec![info(0, true), info(1, true)], INTERVAL);
        let e = readiness(&agent).unwrap_err();
        assert!(e.contains("GPU 0, 1 of 2"), "{e}");
        agent.record(0, &sample(true), vec![]);
        let e = readiness(&agent).unwrap_err();
        assert!(e.contains("GPU 1 of 2"), "{e}");
        agent.record(
            1,
            &Sample::empty(crate::unix_now_ns(), GpuState::Lost),
            vec![],
        );
        assert_eq!(readiness(&agent), Ok(()));
        assert_eq!(
            readiness(&Node::for_tests(vec![], INTERVAL)),
            Ok(()),
            "no GPUs: nothing to wait for"
        );
    }

    #[test]
    fn unhealthy_when_a_loop_stops_making_progress() {
        let agent = Node::for_tests(vec![info(0, true)], INTERVAL);
        let now = Instant::now();
        assert_eq!(liveness(&agent, now), Ok(()));
        let e = liveness(&agent, now + Duration::from_secs(6)).unwrap_err();
        assert!(e.contains("sampler of GPU 0 (GPU-0) has not ticked"), "{e}");
        assert_eq!(stall_limit(INTERVAL), Duration::from_secs(5));
        assert_eq!(stall_limit(Duration::from_secs(2)), Duration::from_secs(20));
        // No sampler to stall, but the status loop (every 1 s, so 10 s allowed) hangs.
        let agent = Node::for_tests(vec![], INTERVAL);
        assert_eq!(
            liveness(&agent, Instant::now() + Duration::from_secs(6)),
            Ok(())
        );
        let e = liveness(&agent, Instant::now() + Duration::from_secs(11)).unwrap_err();
        assert!(e.contains("status loop"), "{e}");
    }
}
