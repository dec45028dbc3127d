//! Freshness: how long after the load changes does KEDA's `GetMetrics` report it, through real
//! `gpuscale-agent` and `gpuscale-collector` processes (docs/BENCHMARKS.md has the numbers).
//! Target: p99 ≤ 2 × interval + 50 ms.
//!
//! One pod (a real `sleep` in a kubelet-shaped cgroup, so the agent attributes it through procfs)
//! has fake GPU 0 to itself, so its values are the GPU's. Two ScaledObjects select it, one on
//! `sm_active` (the GPM metric, which the agent samples at most every 100 ms whatever the
//! interval) and one on `gpu_util` (sampled every interval); both use `timeAggregation: last`,
//! so the value follows the newest sample. The scenario is rewritten (temp file + rename) 30
//! times, alternating both metrics 20 ↔ 80, each after a random pause of up to 200 ms (so
//! rewrites land at every phase of the agent's sampling, GPM and snapshot ticks). After each
//! rewrite a KEDA-shaped client calls `GetMetrics` for each ScaledObject every 2 ms until it
//! shows the new value; the latency is from just after the rename to that answer. In the same
//! loop the agent's own ring (`ShmReader`, `SampleReader::latest`) is read every ~0.2 ms: the
//! time it shows the new sample is the same-run baseline, and the difference is what the
//! snapshot stream and the collector add.
//!
//! Runs at `--interval 100ms` and `--interval 10ms`, a fresh agent each. The agent sends
//! snapshots on its own timer, which starts when the collector subscribes, so how stale each
//! snapshot's newest sample is depends on that moment's phase against the sampling ticks and
//! stays fixed while the stream lasts. So that one lucky or unlucky phase does not decide the
//! result, the 30 steps are 6 sessions of 5, each with a new collector started after a random
//! pause; the per-session medians are printed too. The harness runs the debug builds of the agent and collector (`target/debug`, as the e2e tests
//! do). Needs root (pod cgroups); says why and exits 0 otherwise.
//!
//! Run: `cargo bench -p e2e --bench freshness`. Under `cargo test` (no `--bench`) it does a
//! quick run: 3 steps at 100 ms.

use std::path::Path;
use std::time::{Duration, Instant};

use agent::sample::Metric;
use agent::shm::ShmReader;
use e2e::keda::{scaled_object, Keda};
use e2e::pod::{privileged, PodProcess};
use e2e::{collector_bin, free_port, gpu, write_scenario, Agent, Daemon, Scratch};
use proto::externalscaler::ScaledObjectRef;
use serde_json::{json, Value};

/// Collectors started one after the other per interval (each subscribes at its own phase).
const SESSIONS: usize = 6;
/// Load steps per collector: 6 × 5 = 30 per interval.
const STEPS_PER_SESSION: usize = 5;
const LOW: f64 = 20.0;
const HIGH: f64 = 80.0;
/// Each rewrite waits a random pause below this first, so that rewrites fall at every phase
/// of the periodic work downstream: sampling ticks, GPM samples (at least 100 ms apart), the
/// agent's snapshot ticks. (Rewriting right after the previous change was seen would keep
/// them in step.)
const PAUSE_SPAN: Duration = Duration::from_millis(200);
const RPC_PERIOD: Duration = Duration::from_millis(2);
const RING_PERIOD: Duration = Duration::from_micros(200);
/// Longest wait for one step before the run is declared broken.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A small xorshift generator for the pauses (no dependency, seeded from the clock).
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
        Jitter(seed | 1)
    }

    /// A duration uniformly in [0, max).
    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// One metric followed through the pipeline.
struct Series {
    /// The trigger's `metric`.
    metric: &'static str,
    /// The same metric in the agent's ring.
    ring_metric: Metric,
    /// Rename → first `GetMetrics` answer showing the value, per step.
    keda: Vec<Duration>,
    /// Rename → the agent's ring showing the value, per step.
    ring: Vec<Duration>,
}

/// Latencies of one run.
struct Run {
    interval: Duration,
    /// Consecutive steps shared one collector (one snapshot-stream phase).
    steps_per_session: usize,
    series: Vec<Series>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p90, p99, max of `d`.
fn stats(d: &[Duration]) -> [Duration; 4] {
    let mut s = d.to_vec();
    s.sort_unstable();
    [pct(&s, 0.5), pct(&s, 0.9), pct(&s, 0.99), s[s.len() - 1]]
}

fn pod_list(uid: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "ml", "name": "fresh-5d9c7f-aaaaa", "uid": uid,
                     "labels": {"app": "fresh", "pod-template-hash": "5d9c7f"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "fresh-5d9c7f",
                                          "controller": true}]},
        "spec": {"nodeName": "e2e-node"}, "status": {"phase": "Running"}}]})
}

/// GPU 0 at `sm` % sm_active, used by `pod` alone.
fn scenario(pod: &PodProcess, sm: f64) -> Vec<Value> {
    let mut g = gpu(0);
    g["sm_active"] = json!(sm);
    g["gpu_util"] = json!(sm);
    g["processes"] = json!([{"pid": pod.pid(), "used_memory_mib": 18000, "sm_util": sm}]);
    vec![g]
}

/// The newest value of `metric` in the agent's ring for GPU 0.
fn ring_value(reader: &ShmReader, metric: Metric) -> Option<f64> {
    reader.regions().first()?.ring().latest()?.get(metric, 0)
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

/// Where one series stands in the current step.
#[derive(Default)]
struct Pending {
    ring_at: Option<Duration>,
    keda_at: Option<Duration>,
    next_rpc: Option<Instant>,
}

/// A collector following the agent, and a KEDA-shaped client with one ScaledObject per series.
struct Session {
    collector: Daemon,
    keda: Keda,
    /// (ScaledObject, metric name) per series.
    objects: Vec<(ScaledObjectRef, String)>,
}

impl Session {
    /// Starts a collector on the agent at `agent_addr` and waits until every series shows
    /// `value`.
    fn start(
        dir: &Scratch,
        agent: &Agent,
        agent_addr: &str,
        pods: &Path,
        series: &[Series],
        value: f64,
    ) -> Session {
        let collector_addr = format!("127.0.0.1:{}", free_port());
        let collector = Daemon::spawn(
            dir,
            "collector",
            std::process::Command::new(collector_bin())
                .args(["serve", "--agents", agent_addr, "--listen", &collector_addr])
                .arg("--pods-file")
                .arg(pods),
        );
        let mut keda = Keda::connect(&collector_addr);
        let objects = series
            .iter()
            .map(|s| {
                let so = scaled_object(
                    &format!("fresh-{}", s.metric.replace('_', "-")),
                    &[
                        ("metric", s.metric),
                        ("podSelector", "app=fresh"),
                        ("targetValue", "80"),
                        ("timeAggregation", "last"),
                    ],
                );
                let (name, _, _) = keda.metric_spec(&so).expect("GetMetricSpec");
                let got = keda.wait_metrics(
                    &so,
                    &name,
                    START_TIMEOUT,
                    |r| matches!(r, Ok((v, _)) if same(*v, value)),
                );
                if !matches!(got, Ok((v, _)) if same(v, value)) {
                    panic!(
                        "GetMetrics of {} never showed {value} (last: {got:?})\nagent log:\n{}\n\
                         collector log:\n{}",
                        s.metric,
                        agent.log(),
                        collector.log()
                    );
                }
                (so, name)
            })
            .collect();
        Session {
            collector,
            keda,
            objects,
        }
    }
}

/// Starts an agent at `interval`; then `sessions` times starts a collector (after a random
/// pause, so that its snapshot stream starts at a random phase of the agent's sampling) and
/// steps the load `steps_per_session` times.
fn run(interval: &str, sessions: usize, steps_per_session: usize, uid: &str) -> Run {
    let interval_d = vocab::duration::parse(interval).expect("interval");
    let dir = Scratch::new(&format!("freshness-{interval}"));
    let pod = PodProcess::start(uid, &"f".repeat(64));
    let scenario_path = dir.path("scenario.json");
    write_scenario(&scenario_path, &scenario(&pod, LOW));
    let pods = dir.path("pods.json");
    std::fs::write(&pods, pod_list(uid).to_string()).expect("writing the pod list");

    let ring_path = dir.path("agent.ring");
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let mut agent = Agent::start(
        &dir,
        &scenario_path,
        &ring_path,
        &["--listen", &agent_addr, "--interval", interval],
    );
    let mut series: Vec<Series> = [
        ("sm_active", Metric::SmActive),
        ("gpu_util", Metric::GpuUtil),
    ]
    .into_iter()
    .map(|(metric, ring_metric)| Series {
        metric,
        ring_metric,
        keda: vec![],
        ring: vec![],
    })
    .collect();
    let reader = open_ring(&ring_path);
    let mut jitter = Jitter::new();
    let mut value = LOW;
    for session in 0..sessions {
        std::thread::sleep(jitter.below(PAUSE_SPAN));
        let mut sess = Session::start(&dir, &agent, &agent_addr, &pods, &series, value);
        for step in 0..steps_per_session {
            value = if value == LOW { HIGH } else { LOW };
            std::thread::sleep(jitter.below(PAUSE_SPAN));
            write_scenario(&scenario_path, &scenario(&pod, value));
            let t0 = Instant::now();
            let mut pending: Vec<Pending> = series.iter().map(|_| Pending::default()).collect();
            while pending.iter().any(|p| p.keda_at.is_none()) {
                for (s, p) in series.iter().zip(&mut pending) {
                    if p.ring_at.is_none()
                        && ring_value(&reader, s.ring_metric).is_some_and(|v| same(v, value))
                    {
                        p.ring_at = Some(t0.elapsed());
                    }
                }
                for ((so, name), p) in sess.objects.iter().zip(&mut pending) {
                    let now = Instant::now();
                    if p.keda_at.is_some() || p.next_rpc.is_some_and(|at| now < at) {
                        continue;
                    }
                    p.next_rpc = Some(now + RPC_PERIOD);
                    if matches!(sess.keda.metrics(so, name), Ok((v, _)) if same(v, value)) {
                        p.keda_at = Some(t0.elapsed());
                    }
                }
                if t0.elapsed() > STEP_TIMEOUT {
                    agent.daemon.check_alive().expect("agent");
                    sess.collector.check_alive().expect("collector");
                    panic!(
                        "session {session} step {step}: GetMetrics did not show {value} within \
                         {STEP_TIMEOUT:?}\nagent log:\n{}\ncollector log:\n{}",
                        agent.log(),
                        sess.collector.log()
                    );
                }
                std::thread::sleep(RING_PERIOD);
            }
            for (s, p) in series.iter_mut().zip(pending) {
                // The ring shows a value no later than the collector can; wait if the loop
                // missed it.
                let ring_at = p.ring_at.unwrap_or_else(|| {
                    while !ring_value(&reader, s.ring_metric).is_some_and(|v| same(v, value)) {
                        std::thread::sleep(RING_PERIOD);
                    }
                    t0.elapsed()
                });
                s.ring.push(ring_at);
                s.keda
                    .push(p.keda_at.expect("the loop ends when all are seen"));
            }
        }
        sess.collector.terminate();
    }
    drop(reader);
    agent.terminate();
    Run {
        interval: interval_d,
        steps_per_session,
        series,
    }
}

/// Opens the agent's ring once it has a sample (the agent creates it at start).
fn open_ring(path: &Path) -> ShmReader {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let why = match ShmReader::open(path) {
            Ok(r) if ring_value(&r, Metric::GpuUtil).is_some() => return r,
            Ok(_) => "it has no sample yet".to_owned(),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            panic!("cannot read the ring at {}: {why}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn print(runs: &[Run]) {
    println!();
    println!("Freshness: scenario rename → first answer showing the new value, ms");
    println!();
    println!(
        "| interval | metric | steps | seen by | p50 | p90 | p99 | max | target (2 × interval + 50 ms) |"
    );
    println!("|---:|---|---:|---|---:|---:|---:|---:|---|");
    for r in runs {
        let target = r.interval * 2 + Duration::from_millis(50);
        for s in &r.series {
            let added: Vec<Duration> = s
                .keda
                .iter()
                .zip(&s.ring)
                .map(|(k, g)| k.saturating_sub(*g))
                .collect();
            for (what, d) in [
                ("GetMetrics (collector)", &s.keda),
                ("agent ring (baseline)", &s.ring),
                ("difference (stream + collector)", &added),
            ] {
                let [p50, p90, p99, max] = stats(d);
                let verdict = if what.starts_with("GetMetrics") {
                    format!(
                        "{:.0} ms: {}",
                        ms(target),
                        if p99 <= target { "met" } else { "NOT met" }
                    )
                } else {
                    String::new()
                };
                println!(
                    "| {:.0} ms | {} | {} | {what} | {:.1} | {:.1} | {:.1} | {:.1} | {verdict} |",
                    ms(r.interval),
                    s.metric,
                    d.len(),
                    ms(p50),
                    ms(p90),
                    ms(p99),
                    ms(max),
                );
            }
        }
    }
    println!();
    println!("| interval | metric | GetMetrics p50 / ring p50 | GetMetrics p99 / ring p99 |");
    println!("|---:|---|---:|---:|");
    for r in runs {
        for s in &r.series {
            let (k, g) = (stats(&s.keda), stats(&s.ring));
            println!(
                "| {:.0} ms | {} | {:.2}× | {:.2}× |",
                ms(r.interval),
                s.metric,
                k[0].as_secs_f64() / g[0].as_secs_f64(),
                k[2].as_secs_f64() / g[2].as_secs_f64(),
            );
        }
    }
    println!();
    println!("Difference (GetMetrics − ring) per collector session, median, ms:");
    println!();
    println!("| interval | metric | per session |");
    println!("|---:|---|---|");
    for r in runs {
        for s in &r.series {
            let per: Vec<String> = s
                .keda
                .chunks(r.steps_per_session)
                .zip(s.ring.chunks(r.steps_per_session))
                .map(|(k, g)| {
                    let d: Vec<Duration> =
                        k.iter().zip(g).map(|(k, g)| k.saturating_sub(*g)).collect();
                    format!("{:.1}", ms(stats(&d)[0]))
                })
                .collect();
            println!(
                "| {:.0} ms | {} | {} |",
                ms(r.interval),
                s.metric,
                per.join(", ")
            );
        }
    }
    println!();
    println!(
        "(With fewer than 100 steps p99 is the maximum. The agent and collector are debug builds.)"
    );
}

fn main() {
    if let Some(why) = privileged() {
        println!("freshness: skipped: {why}");
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let started = Instant::now();
    let runs: Vec<Run> = if bench {
        vec![
            run(
                "100ms",
                SESSIONS,
                STEPS_PER_SESSION,
                "0f0f0f0f-1111-4222-8333-000000000100",
            ),
            run(
                "10ms",
                SESSIONS,
                STEPS_PER_SESSION,
                "0f0f0f0f-1111-4222-8333-000000000010",
            ),
        ]
    } else {
        // cargo test: a quick run that the whole path works.
        println!("freshness: test mode (no --bench): a quick run, 3 steps at 100 ms");
        vec![run("100ms", 1, 3, "0f0f0f0f-1111-4222-8333-000000000003")]
    };
    print(&runs);
    eprintln!("freshness: done in {:.1}s", started.elapsed().as_secs_f64());
}
