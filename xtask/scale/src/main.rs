//! `gpuscale-scale` (`cargo xtask bench-scale`): one real collector following many simulated
//! nodes under a KEDA-like load, measured.
//!
//! This process runs the simulated agents ([`gpuscale_scale::sim`], one loopback address each,
//! on a thread of their own) and the KEDA-like client (on another); the collector is the
//! release binary in a process of its own, so its CPU and memory are its own. The load:
//! `--scaled-objects` ScaledObjects over the simulated pods, each with a `StreamIsActive` stream
//! open (as KEDA holds one per `external-push` trigger; none with `--trigger-type external`) and
//! a `GetMetrics` every 15 s (the HPA's period), spread evenly. Once every ScaledObject has been
//! answered (and, with `StreamIsActive` streams of changes, once the collector has asked every
//! agent again for changes at every sample and taken in the whole states they answered with),
//! for `--duration`:
//!
//! - the collector's CPU (utime + stime from `/proc`) in cores, its RSS at the end and its peak;
//! - `GetMetrics` latency inside the collector (its histogram
//!   `gpuscale_collector_keda_request_duration_seconds`, interpolated within buckets as
//!   Prometheus's `histogram_quantile` does) and at the client;
//! - freshness: a pod's value changed at its simulated agent → the new value in `GetMetrics`
//!   (ScaledObjects of one pod each with `timeAggregation: last`, polled every 10 ms);
//! - activation: a pod's value raised over `activationThreshold` → `StreamIsActive` says true
//!   (`IsActive`, polled every 10 ms, with `--trigger-type external`);
//! - the bytes per node per second the agents sent, and whether the simulator kept up.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gpuscale_scale::sim::{self, Node, Sent, Shape};
use proto::externalscaler::external_scaler_client::ExternalScalerClient;
use proto::externalscaler::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// Options of `cargo xtask bench-scale`.
#[derive(Parser)]
#[command(
    name = "cargo xtask bench-scale",
    about = "One real collector following many simulated GPU nodes under a KEDA-like load: its CPU, memory, GetMetrics latency, freshness and activation time"
)]
struct Options {
    /// The collector binary (`cargo xtask bench-scale` passes the release build).
    #[arg(long)]
    collector: PathBuf,
    /// Simulated nodes, each an agent on an address of its own.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Pods per GPU (one process each; more than one: shared GPUs).
    #[arg(long, default_value_t = 2)]
    pods_per_gpu: usize,
    /// ScaledObjects asking about the pods (each matches every pod whose number is its own
    /// modulo this).
    #[arg(long, default_value_t = 1000)]
    scaled_objects: usize,
    /// How long to measure, once every ScaledObject has been answered.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// The agents' sampling interval (one snapshot per interval on each stream).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    interval: Duration,
    /// Print the results as one line of JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// What the collector asks the agents for (its `--agent-stream`): `changes` (only what
    /// changed, and heartbeats: agent API revision 3) or `full` (every series, every tick: the
    /// baseline).
    #[arg(long, default_value = "changes", value_parser = ["changes", "full"])]
    mode: String,
    /// The ScaledObjects' trigger type: `external-push` (KEDA holds a `StreamIsActive` stream
    /// per ScaledObject, and the collector's streams send changes at every sample) or
    /// `external` (KEDA polls `IsActive`; no stream is held, so the agents send once per pace;
    /// activation is timed by polling `IsActive` every 10 ms).
    #[arg(long, default_value = "external-push", value_parser = ["external-push", "external"])]
    trigger_type: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match vocab::duration::parse(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("{s:?} is zero; write a duration like 30s or 100ms")),
        Err(why) => Err(format!("{why}; write a duration like 30s or 100ms")),
    }
}

/// The longest argument Linux passes to a program (`MAX_ARG_STRLEN`): the agents' addresses
/// go to the collector in one `--agents`.
const MAX_ARG: usize = 128 << 10;
/// Probe ScaledObjects of each kind (freshness, activation).
const PROBES: usize = 10;
/// The HPA asks for every ScaledObject's metric this often.
const HPA_PERIOD: Duration = Duration::from_secs(15);
/// How long the collector may take to ask every agent again once KEDA's streams open.
const SETTLE_WITHIN: Duration = Duration::from_secs(15);
/// How long after that the measurement starts.
const SETTLE_AFTER: Duration = Duration::from_secs(1);
/// How often a freshness probe polls `GetMetrics`.
const POLL: Duration = Duration::from_millis(10);
/// A probe that has not seen its change after this long counts as missed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The namespace of every simulated pod and ScaledObject.
const NS: &str = "bench";

impl Options {
    fn check(&self) -> Result<()> {
        let pods = self.nodes * self.gpus_per_node * self.pods_per_gpu;
        if !(1..=64).contains(&self.gpus_per_node) {
            bail!("--gpus-per-node {} is outside 1 to 64", self.gpus_per_node);
        }
        if !(1..=16).contains(&self.pods_per_gpu) {
            bail!("--pods-per-gpu {} is outside 1 to 16", self.pods_per_gpu);
        }
        if self.nodes == 0 || self.scaled_objects == 0 {
            bail!("--nodes and --scaled-objects must be at least 1");
        }
        if pods < 2 {
            bail!("{pods} pods are too few: at least 2 are needed (one per probe kind)");
        }
        if self.scaled_objects > pods {
            bail!(
                "--scaled-objects {} is more than the {pods} simulated pods: each ScaledObject \
                 needs a pod (raise --nodes or lower --scaled-objects)",
                self.scaled_objects
            );
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&self.interval) {
            bail!("--interval {:?} is outside 10ms to 10s", self.interval);
        }
        let agents = agents_arg(self.nodes).len();
        if agents >= MAX_ARG {
            bail!(
                "--nodes {}: the agents' addresses take {agents} bytes, more than Linux passes in \
                 one argument ({MAX_ARG}); run at most {} nodes",
                self.nodes,
                MAX_ARG / (agents / self.nodes) - 1
            );
        }
        if !self.collector.is_file() {
            bail!(
                "--collector {}: no such file (cargo xtask bench-scale builds it)",
                self.collector.display()
            );
        }
        Ok(())
    }

    fn shape(&self) -> Shape {
        Shape {
            gpus: self.gpus_per_node,
            pods_per_gpu: self.pods_per_gpu,
            interval: self.interval,
        }
    }
}

fn agents_arg(nodes: usize) -> String {
    (0..nodes)
        .map(|n| sim::address(n).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn progress(what: impl std::fmt::Display) {
    eprintln!("bench-scale: {what}");
}

/// A pod the load changes: pod `pod` of node `node`, alone under ScaledObject `name`.
#[derive(Clone, Debug)]
struct Probe {
    name: String,
    node: usize,
    pod: usize,
}

/// The ScaledObjects: `so-K` over the pods numbered K modulo their count; `fresh-J` and `act-J`
/// over one pod each.
struct Plan {
    regular: Vec<ScaledObjectRef>,
    fresh: Vec<Probe>,
    act: Vec<Probe>,
}

fn scaled_object(name: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef::as_keda_sends(NS, name, meta, "gpuscale-collector.gpuscale-system:7700")
}

/// The label every probe pod carries (its probe's name).
const PROBE_LABEL: &str = "gpuscale.dev/bench-probe";

impl Plan {
    fn new(o: &Options) -> Plan {
        let per_node = o.gpus_per_node * o.pods_per_gpu;
        let total = o.nodes * per_node;
        let n = PROBES.min(total / 2).max(1);
        let at = |g: usize| (g / per_node, g % per_node);
        let probe = |kind: &str, j: usize, g: usize| {
            let (node, pod) = at(g % total);
            Probe {
                name: format!("{kind}-{j}"),
                node,
                pod,
            }
        };
        Plan {
            regular: (0..o.scaled_objects)
                .map(|k| {
                    scaled_object(
                        &format!("so-{k}"),
                        &[
                            ("metric", "sm_active"),
                            ("podSelector", &format!("app=so-{k}")),
                            ("targetValue", "60"),
                            ("activationThreshold", "5"),
                        ],
                    )
                })
                .collect(),
            fresh: (0..n).map(|j| probe("fresh", j, j * total / n)).collect(),
            act: (0..n).map(|j| probe("act", j, j * total / n + 1)).collect(),
        }
    }

    fn probe_object(p: &Probe, activation: bool) -> ScaledObjectRef {
        let selector = format!("{PROBE_LABEL}={}", p.name);
        let mut meta = vec![
            ("metric", "gpu_util"),
            ("podSelector", selector.as_str()),
            ("timeAggregation", "last"),
            ("targetValue", "80"),
        ];
        if activation {
            meta.push(("activationThreshold", "50"));
        }
        scaled_object(&p.name, &meta)
    }

    /// Every ScaledObject, regular ones first.
    fn all(&self) -> Vec<ScaledObjectRef> {
        let mut all = self.regular.clone();
        all.extend(self.fresh.iter().map(|p| Plan::probe_object(p, false)));
        all.extend(self.act.iter().map(|p| Plan::probe_object(p, true)));
        all
    }

    /// The pods file: every simulated pod, running on its node.
    fn pods_file(&self, o: &Options) -> Value {
        let per_node = o.gpus_per_node * o.pods_per_gpu;
        let probes: HashMap<(usize, usize), &str> = self
            .fresh
            .iter()
            .chain(&self.act)
            .map(|p| ((p.node, p.pod), p.name.as_str()))
            .collect();
        let items: Vec<Value> = (0..o.nodes)
            .flat_map(|node| (0..per_node).map(move |pod| (node, pod)))
            .map(|(node, pod)| {
                let g = node * per_node + pod;
                let mut labels = json!({"app": format!("so-{}", g % o.scaled_objects)});
                if let Some(name) = probes.get(&(node, pod)) {
                    labels[PROBE_LABEL] = json!(name);
                }
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"namespace": NS, "name": format!("pod-{g}"),
                                 "uid": sim::pod_uid(node, pod), "labels": labels},
                    "spec": {"nodeName": sim::node_name(node)},
                    "status": {"phase": "Running"}
                })
            })
            .collect();
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    }
}

/// CPU time of process `pid` (`"self"` for this one) so far, seconds.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let (Some(u), Some(s)) = (ticks(11), ticks(12)) else {
        bail!("/proc/{pid}/stat has no utime and stime: {stat:?}");
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((u + s) as f64 / hz)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("/proc/{pid}/status has no {key}"))
}

/// Waits for the collector to ask every agent again after KEDA's first `StreamIsActive` (its
/// streams then send changes at every sample): each node opens a new stream and answers with its
/// whole state, a wave spread over a second that is a transition, not the steady state measured.
/// Gives up after [`SETTLE_WITHIN`], saying so.
async fn settle(sent: &Sent, before: u64, nodes: usize, interval: Duration) {
    let started = Instant::now();
    loop {
        let asked = sent.streams.load(Ordering::Relaxed).saturating_sub(before) as usize;
        if asked >= nodes {
            break;
        }
        if started.elapsed() > SETTLE_WITHIN {
            progress(format!(
                "only {asked} of {nodes} agents were asked again within {SETTLE_WITHIN:?}; \
                 measuring anyway"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Their whole states, sent at once, taken in.
    tokio::time::sleep(SETTLE_AFTER.max(interval * 5)).await;
    progress(format!(
        "the agents' streams changed pace ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));
}

/// The collector's `GetMetrics` (code OK) latency histogram: (upper bound s, cumulative count).
/// Read with HTTP/1.0 (a body without chunks) line by line: the page lists every pod.
fn latency_buckets(http: &str) -> Result<Vec<(f64, f64)>> {
    let mut s = TcpStream::connect(http).with_context(|| format!("connecting to {http}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: collector\r\n\r\n")?;
    let mut out = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.context("reading /metrics")?;
        let Some(rest) =
            line.strip_prefix("gpuscale_collector_keda_request_duration_seconds_bucket{")
        else {
            continue;
        };
        if !rest.contains("rpc=\"GetMetrics\"") || !rest.contains("code=\"OK\"") {
            continue;
        }
        let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
        let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok());
        let le = match le {
            Some("+Inf") => Some(f64::INFINITY),
            Some(v) => v.parse().ok(),
            None => None,
        };
        if let (Some(le), Some(count)) = (le, count) {
            out.push((le, count));
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out)
}

/// Quantile `q` of the histogram difference `after - before`, seconds, interpolated linearly
/// within the bucket it falls in (as `histogram_quantile` does); `None` without observations.
fn histogram_quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let was = |le: f64| {
        before
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, c)| *c)
    };
    let cum: Vec<(f64, f64)> = after.iter().map(|&(le, c)| (le, c - was(le))).collect();
    let total = cum.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, c) in &cum {
        if c >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let span = c - lower.1;
            let within = if span > 0.0 {
                (rank - lower.1) / span
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, c);
    }
    Some(lower.0)
}

/// Quantile `q` of `v` (sorted here), nearest rank.
fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// The simulated agents, served from a thread of their own until dropped.
struct Simulator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Simulator {
    fn start(nodes: &[Arc<Node>], sent: &Arc<Sent>) -> Result<Simulator> {
        let listeners = (0..nodes.len())
            .map(sim::bind)
            .collect::<Result<Vec<_>>>()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let services: Vec<_> = nodes
            .iter()
            .map(|n| sim::AgentService::new(n.clone(), sent.clone()))
            .collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("simulated-agents".into())
            .spawn(move || {
                rt.block_on(async move {
                    for (l, svc) in listeners.into_iter().zip(services) {
                        tokio::spawn(async move {
                            if let Err(e) = sim::serve(l, svc).await {
                                eprintln!("bench-scale: a simulated agent stopped: {e:#}");
                            }
                        });
                    }
                    let _ = stopped.await;
                });
            })?;
        Ok(Simulator {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The collector process, killed when dropped.
struct Collector {
    child: Child,
    log: PathBuf,
    listen: String,
    http: String,
}

impl Collector {
    fn start(o: &Options, pods: &Path, dir: &Path) -> Result<Collector> {
        let port = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let listen = format!("127.0.0.1:{}", port()?);
        let http = format!("127.0.0.1:{}", port()?);
        let log = dir.join("collector.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&o.collector)
            .arg("serve")
            .arg("--agents")
            .arg(agents_arg(o.nodes))
            .arg("--pods-file")
            .arg(pods)
            .args(["--listen", &listen, "--http-listen", &http])
            .args(["--agent-stream", &o.mode])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", o.collector.display()))?;
        Ok(Collector {
            child,
            log,
            listen,
            http,
        })
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the collector exited ({status}); its log ends:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One ScaledObject as KEDA holds it: its reference and the metric name `GetMetricSpec` gave.
#[derive(Clone)]
struct Asked {
    so: ScaledObjectRef,
    metric: String,
}

/// `GetMetrics` with KEDA's 3 s deadline: the value, or the error's code and message.
async fn get_metrics(c: &mut ExternalScalerClient<Channel>, a: &Asked) -> Result<f64, String> {
    let mut req = tonic::Request::new(GetMetricsRequest {
        scaled_object_ref: Some(a.so.clone()),
        metric_name: a.metric.clone(),
    });
    req.set_timeout(Duration::from_secs(3));
    match c.get_metrics(req).await {
        Ok(r) => r
            .into_inner()
            .metric_values
            .first()
            .map(|v| v.metric_value_float)
            .ok_or_else(|| "no metric value".to_owned()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

async fn connect(addr: &str) -> Result<ExternalScalerClient<Channel>> {
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ExternalScalerClient::connect(url.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                bail!("the collector at {addr} never accepted a connection: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Asks `GetMetricSpec` for every ScaledObject, then `GetMetrics` until each has answered once
/// (every node then reports: the ScaledObjects cover every pod).
async fn wait_answered(
    c: &ExternalScalerClient<Channel>,
    all: Vec<ScaledObjectRef>,
    collector: &mut Collector,
    within: Duration,
) -> Result<Vec<Asked>> {
    let mut asked = Vec::with_capacity(all.len());
    for so in all {
        let spec = c
            .clone()
            .get_metric_spec(so.clone())
            .await
            .with_context(|| format!("GetMetricSpec {}", so.name))?
            .into_inner();
        let metric = spec
            .metric_specs
            .first()
            .map(|s| s.metric_name.clone())
            .context("GetMetricSpec answered no metric")?;
        asked.push(Asked { so, metric });
    }
    let started = Instant::now();
    let mut waiting: Vec<usize> = (0..asked.len()).collect();
    let mut last_error = String::new();
    let mut reported = Instant::now();
    while !waiting.is_empty() {
        collector.check_alive()?;
        if started.elapsed() > within {
            bail!(
                "{} of {} ScaledObjects still had no value after {:?} (the collector has not \
                 heard from every simulated node); the last error: {last_error}\ncollector log:\n{}",
                waiting.len(),
                asked.len(),
                within,
                collector.log_tail()
            );
        }
        let mut still = Vec::new();
        let mut c = c.clone();
        for (k, &i) in waiting.iter().enumerate() {
            // An overloaded collector answers each call late: keep to the deadline mid-round.
            if started.elapsed() > within {
                still.extend_from_slice(&waiting[k..]);
                break;
            }
            if let Err(e) = get_metrics(&mut c, &asked[i]).await {
                last_error = e;
                still.push(i);
            }
        }
        waiting = still;
        if reported.elapsed() > Duration::from_secs(5) && !waiting.is_empty() {
            progress(format!(
                "{}/{} ScaledObjects answered ({:.0} s)",
                asked.len() - waiting.len(),
                asked.len(),
                started.elapsed().as_secs_f64()
            ));
            reported = Instant::now();
        }
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(asked)
}

/// Sets probe `p`'s pod to `value` and polls `GetMetrics` until it reads it: the time taken.
async fn freshness(
    c: &mut ExternalScalerClient<Channel>,
    nodes: &[Arc<Node>],
    p: &Probe,
    a: &Asked,
    value: f64,
) -> Option<Duration> {
    nodes[p.node].set_gpu_util(p.pod, value);
    let t = Instant::now();
    while t.elapsed() < PROBE_TIMEOUT {
        if get_metrics(c, a).await == Ok(value) {
            return Some(t.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

/// How an activation probe learns whether its ScaledObject is active.
enum Activation {
    /// Its `StreamIsActive` stream (`external-push`).
    Push(tonic::Streaming<IsActiveResponse>),
    /// `IsActive`, polled every 10 ms (`external`).
    Poll(ExternalScalerClient<Channel>, ScaledObjectRef),
}

impl Activation {
    /// Waits until the ScaledObject reads `want` (true), or the stream ends or
    /// [`PROBE_TIMEOUT`] passes (false).
    async fn until(&mut self, want: bool) -> bool {
        let said = async {
            match self {
                Activation::Push(stream) => loop {
                    match stream.message().await {
                        Ok(Some(r)) if r.result == want => return true,
                        Ok(Some(_)) => {}
                        _ => return false,
                    }
                },
                Activation::Poll(client, so) => loop {
                    if let Ok(r) = client.is_active(so.clone()).await {
                        if r.into_inner().result == want {
                            return true;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                },
            }
        };
        tokio::time::timeout(PROBE_TIMEOUT, said)
            .await
            .unwrap_or(false)
    }
}

/// What one run measured.
#[derive(Default)]
struct Samples {
    client_us: Vec<f64>,
    errors: u64,
    fresh_ms: Vec<f64>,
    fresh_missed: u64,
    act_ms: Vec<f64>,
    act_missed: u64,
}

async fn measure(
    o: &Options,
    nodes: &[Arc<Node>],
    sent: &Sent,
    collector: &mut Collector,
    plan: &Plan,
) -> Result<Value> {
    let client = connect(&collector.listen).await?;
    let within = Duration::from_secs(60) + Duration::from_millis(20 * o.nodes as u64);
    progress(format!(
        "waiting for the collector to answer all {} ScaledObjects (up to {:.0} s)",
        plan.regular.len() + plan.fresh.len() + plan.act.len(),
        within.as_secs_f64()
    ));
    let asked = wait_answered(&client, plan.all(), collector, within).await?;
    let (regular, probes) = asked.split_at(plan.regular.len());
    let fresh = &probes[..plan.fresh.len()];

    // With external-push triggers KEDA holds a StreamIsActive stream per ScaledObject; the
    // activation probes' are read. With external ones it polls IsActive.
    let push = o.trigger_type == "external-push";
    let mut act_streams = Vec::new();
    let streams_before = sent.streams.load(Ordering::Relaxed);
    if push {
        progress(format!("opening {} StreamIsActive streams", asked.len()));
    }
    for (i, a) in asked.iter().enumerate() {
        let probe = i >= regular.len() + fresh.len();
        if !push {
            if probe {
                act_streams.push(Activation::Poll(client.clone(), a.so.clone()));
            }
            continue;
        }
        let mut stream = client
            .clone()
            .stream_is_active(a.so.clone())
            .await
            .with_context(|| format!("StreamIsActive {}", a.so.name))?
            .into_inner();
        if probe {
            act_streams.push(Activation::Push(stream));
        } else {
            tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        }
    }
    // Streams of whole snapshots (`--mode full`) carry everything at every sample already:
    // the collector does not ask again.
    if push && o.mode == "changes" {
        settle(sent, streams_before, nodes.len(), o.interval).await;
    }

    progress(format!("measuring for {:?}", o.duration));
    let before = latency_buckets(&collector.http)?;
    let pid = collector.child.id();
    let (cpu0, self0, t0) = (
        cpu_seconds(&pid.to_string())?,
        cpu_seconds("self")?,
        Instant::now(),
    );
    let (bytes0, snaps0, skipped0) = (
        sent.bytes.load(Ordering::Relaxed),
        sent.snapshots.load(Ordering::Relaxed),
        sent.skipped.load(Ordering::Relaxed),
    );
    let samples = Arc::new(Mutex::new(Samples::default()));
    let deadline = tokio::time::Instant::now() + o.duration;

    // The HPA: every ScaledObject's metric once per HPA_PERIOD, evenly spread.
    let hpa = {
        let (client, regular, samples) = (client.clone(), regular.to_vec(), samples.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HPA_PERIOD / regular.len() as u32);
            for a in regular.iter().cycle() {
                tick.tick().await;
                let (mut c, a, samples) = (client.clone(), a.clone(), samples.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = get_metrics(&mut c, &a).await;
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(_) => s.client_us.push(us),
                        Err(_) => s.errors += 1,
                    }
                });
            }
        })
    };
    // Freshness: change one probe pod at a time, alternating its value.
    let fresher = {
        let (mut c, fresh, samples) = (client.clone(), fresh.to_vec(), samples.clone());
        let (nodes, probes) = (nodes.to_vec(), plan.fresh.clone());
        tokio::spawn(async move {
            for (round, (p, a)) in probes.iter().zip(&fresh).cycle().enumerate() {
                let value = if (round / probes.len()) % 2 == 0 {
                    70.0
                } else {
                    30.0
                };
                let took = freshness(&mut c, &nodes, p, a, value).await;
                {
                    let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                    match took {
                        Some(d) => s.fresh_ms.push(d.as_secs_f64() * 1e3),
                        None => s.fresh_missed += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Activation: a probe pod at 0 (inactive), then at 90: how long until the stream says so.
    let activator = {
        let (nodes, probes, samples) = (nodes.to_vec(), plan.act.clone(), samples.clone());
        tokio::spawn(async move {
            let mut streams = act_streams;
            for i in (0..probes.len()).cycle() {
                let (p, stream) = (&probes[i], &mut streams[i]);
                nodes[p.node].set_gpu_util(p.pod, 0.0);
                if !stream.until(false).await {
                    continue;
                }
                nodes[p.node].set_gpu_util(p.pod, 90.0);
                let t = Instant::now();
                let ok = stream.until(true).await;
                let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                if ok {
                    s.act_ms.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    s.act_missed += 1;
                }
            }
        })
    };
    let mut reported = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep_until(deadline.min(reported + Duration::from_secs(10))).await;
        collector.check_alive()?;
        if tokio::time::Instant::now() < deadline {
            progress(format!(
                "{:.0} s of {:.0} s",
                t0.elapsed().as_secs_f64(),
                o.duration.as_secs_f64()
            ));
        }
        reported = tokio::time::Instant::now();
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, self1) = (cpu_seconds(&pid.to_string())?, cpu_seconds("self")?);
    let (bytes1, snaps1, skipped1) = (
        sent.bytes.load(Ordering::Relaxed),
        sent.snapshots.load(Ordering::Relaxed),
        sent.skipped.load(Ordering::Relaxed),
    );
    hpa.abort();
    fresher.abort();
    activator.abort();
    let rss = status_kib(pid, "VmRSS")?;
    let peak = status_kib(pid, "VmHWM")?;
    let after = latency_buckets(&collector.http)?;

    let mut s = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let us = |q: f64| histogram_quantile(q, &before, &after).map(|s| (s * 1e6).round() as u64);
    let round1 = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
    let n = o.nodes as f64;
    Ok(json!({
        "mode": o.mode,
        "trigger_type": o.trigger_type,
        "nodes": o.nodes,
        "gpus": o.nodes * o.gpus_per_node,
        "pods": o.nodes * o.gpus_per_node * o.pods_per_gpu,
        "scaled_objects": regular.len(),
        "interval_ms": o.interval.as_millis() as u64,
        "duration_s": (wall * 10.0).round() / 10.0,
        "collector_cpu_cores": ((cpu1 - cpu0) / wall * 1000.0).round() / 1000.0,
        "collector_rss_mib": rss / 1024,
        "collector_peak_rss_mib": peak / 1024,
        "get_metrics_p50_us": us(0.5),
        "get_metrics_p99_us": us(0.99),
        "get_metrics_client_p50_us": quantile(&mut s.client_us, 0.5).map(|v| v.round() as u64),
        "get_metrics_client_p99_us": quantile(&mut s.client_us, 0.99).map(|v| v.round() as u64),
        "get_metrics_calls": s.client_us.len(),
        "get_metrics_errors": s.errors,
        "freshness_p50_ms": round1(quantile(&mut s.fresh_ms, 0.5)),
        "freshness_p99_ms": round1(quantile(&mut s.fresh_ms, 0.99)),
        "freshness_probes": s.fresh_ms.len(),
        "freshness_missed": s.fresh_missed,
        "activation_p50_ms": round1(quantile(&mut s.act_ms, 0.5)),
        "activation_p99_ms": round1(quantile(&mut s.act_ms, 0.99)),
        "activation_probes": s.act_ms.len(),
        "activation_missed": s.act_missed,
        "bytes_per_node_per_s": ((bytes1 - bytes0) as f64 / n / wall).round() as u64,
        "snapshots_per_node_per_s": round1(Some((snaps1 - snaps0) as f64 / n / wall)),
        "snapshots_skipped": skipped1 - skipped0,
        "simulator_cpu_cores": ((self1 - self0) / wall * 1000.0).round() / 1000.0,
    }))
}

fn run(o: &Options) -> Result<Value> {
    o.check()?;
    let dir = tempfile::Builder::new()
        .prefix("gpuscale-scale-")
        .tempdir()
        .context("making a scratch directory")?;
    let plan = Plan::new(o);
    let pods = dir.path().join("pods.json");
    std::fs::write(&pods, serde_json::to_vec(&plan.pods_file(o))?)
        .with_context(|| format!("writing {}", pods.display()))?;
    progress(format!(
        "{} simulated nodes × {} GPUs × {} pods per GPU on 127.1.0.0/16:7701",
        o.nodes, o.gpus_per_node, o.pods_per_gpu
    ));
    let nodes: Vec<Arc<Node>> = (0..o.nodes)
        .map(|i| Arc::new(Node::new(i, o.shape())))
        .collect();
    let sent = Arc::new(Sent::default());
    let _sim = Simulator::start(&nodes, &sent)?;
    let mut collector = Collector::start(o, &pods, dir.path())?;
    progress(format!(
        "collector {} (pid {}, log {})",
        o.collector.display(),
        collector.child.id(),
        collector.log.display()
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(measure(o, &nodes, &sent, &mut collector, &plan))
}

fn text(r: &Value) -> String {
    let f = |k: &str| match &r[k] {
        Value::Null => "n/a".to_owned(),
        v => v.to_string(),
    };
    format!(
        "{} nodes, {} GPUs, {} pods, {} ScaledObjects ({}), {} s\n\
         collector: {} cores, RSS {} MiB (peak {})\n\
         GetMetrics in the collector: p50 {} µs, p99 {} µs; at the client p50 {} µs, p99 {} µs ({} calls, {} errors)\n\
         freshness: p50 {} ms, p99 {} ms ({} probes, {} missed)\n\
         activation: p50 {} ms, p99 {} ms ({} probes, {} missed)\n\
         agents sent {} bytes per node per s, {} snapshots per node per s ({} skipped); simulator {} cores",
        f("nodes"), f("gpus"), f("pods"), f("scaled_objects"), f("trigger_type"), f("duration_s"),
        f("collector_cpu_cores"), f("collector_rss_mib"), f("collector_peak_rss_mib"),
        f("get_metrics_p50_us"), f("get_metrics_p99_us"), f("get_metrics_client_p50_us"),
        f("get_metrics_client_p99_us"), f("get_metrics_calls"), f("get_metrics_errors"),
        f("freshness_p50_ms"), f("freshness_p99_ms"), f("freshness_probes"), f("freshness_missed"),
        f("activation_p50_ms"), f("activation_p99_ms"), f("activation_probes"), f("activation_missed"),
        f("bytes_per_node_per_s"), f("snapshots_per_node_per_s"), f("snapshots_skipped"),
        f("simulator_cpu_cores"),
    )
}

fn main() {
    let o = Options::parse();
    match run(&o) {
        Ok(r) if o.json => println!("{r}"),
        Ok(r) => println!("{}", text(&r)),
        Err(e) => {
            eprintln!("bench-scale: error: {e:#}");
            std::process::exit(1);
        }
    }
}
