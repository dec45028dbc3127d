//! Server-side cost of answering KEDA's `GetMetrics` from the in-memory view
//! (docs/BENCHMARKS.md has the numbers).
//!
//! The fixture is a cluster of N nodes (N = 10, 100, 1000), each a `NodeSnapshot` as an agent
//! sends it: 8 GPUs and 16 `PodSummary` entries (2 pods per GPU, `shared`), every one carrying
//! the agent's 10 metrics with `last` and the 4 windows. The pod list has the 16·N pods spread
//! over 20 namespaces, labelled `app=svc-<k>` for 200 apps; 200 ScaledObjects select one app each
//! (`podSelector: app=svc-<k>` in the app's namespace), so each matches 16·N/200 pods (80 at
//! N = 1000) spread over as many nodes. Triggers cycle through the metrics, time aggregations,
//! windows and aggregations. `staleAfter` is `10m` only so that data written once at setup stays
//! fresh for the whole run; its value does not change the cost.
//!
//! What is measured is `Scaler::value` (look up the trigger, parsed once per metadata; find the
//! matched pods; evaluate over the view under its read lock): exactly what `GetMetrics` runs,
//! minus gRPC framing. A cold call parses the metadata too.
//!
//! - `get_metrics/warm/N`: round-robin over the 200 ScaledObjects with the selection cache warm.
//! - `get_metrics/cold/N`: the first call for a ScaledObject (fresh `Scaler`, empty cache), which
//!   also filters the namespace's pods by the selector.
//! - `get_metrics/naive_scan/N`: the same-run baseline: what an unindexed implementation does on
//!   every call: filter *all* pods of the cluster by namespace and selector, then evaluate.
//!
//! Criterion prints means and medians; after it, a custom loop times single calls (20,000 warm,
//! 2,000 cold, 2,000 naive per N) and prints p50/p90/p99/max to stdout, with the naive/warm
//! ratio. Target: p99 < 200 µs at N = 1000.
//!
//! Run: `cargo bench -p collector --bench get_metrics`. Under `cargo test` (no `--bench`) only
//! N = 10 is built, each criterion bench runs once and the custom loop is short.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use collector::api::scaler::Scaler;
use collector::model::evaluate::{evaluate, Evaluation, Unavailable};
use collector::model::trigger::Trigger;
use collector::sources::pods::{PodIndex, PodMeta, PodSource};
use collector::sources::view::Cluster;
use criterion::{BatchSize, BenchmarkId, Criterion};
use proto::agent::{
    GpuState, GpuSummary, MetricSummary, NodeSnapshot, PodSummary, ProcessUsage, WindowStats,
};
use proto::externalscaler::ScaledObjectRef;

const GPUS_PER_NODE: usize = 8;
const PODS_PER_GPU: usize = 2;
const PODS_PER_NODE: usize = GPUS_PER_NODE * PODS_PER_GPU;
const NAMESPACES: usize = 20;
const SCALED_OBJECTS: usize = 200;

const TIME_AGGREGATIONS: [&str; 5] = ["avg", "max", "p95", "last", "min"];
/// Window spellings as users write them (`1m` and `60s` name the same window).
const WINDOWS: [&str; 4] = ["30s", "1m", "10s", "5m"];

/// Pod metadata that never changes (the bench's `PodSource`).
struct StaticPods(Arc<PodIndex>);

impl PodSource for StaticPods {
    fn index(&self) -> Arc<PodIndex> {
        self.0.clone()
    }

    fn describe(&self) -> String {
        "bench pods".into()
    }
}

fn node_name(node: usize) -> String {
    format!("gpu-node-{node:04}")
}

fn gpu_uuid(node: usize, gpu: usize) -> String {
    format!("GPU-{node:08x}-0000-4000-8000-{gpu:012x}")
}

fn pod_uid(pod: usize) -> String {
    format!("{pod:08x}-1111-4222-8333-444444444444")
}

/// Pod `i` runs app `i mod 200`, in that app's namespace, on node `i / 16`, GPU `(i mod 16) / 2`.
fn app_of(pod: usize) -> usize {
    pod % SCALED_OBJECTS
}

fn namespace_of_app(app: usize) -> String {
    format!("ns-{:02}", app % NAMESPACES)
}

/// One metric with `last` and the 4 windows, as the agent fills them.
fn metric(m: vocab::Metric, v: f64) -> MetricSummary {
    MetricSummary {
        metric: proto::agent::Metric::from(m) as i32,
        last: Some(v),
        windows: vocab::Window::ALL
            .map(|w| w.secs())
            .into_iter()
            .map(|w| WindowStats {
                window_s: w,
                avg: v,
                min: v * 0.5,
                max: (v * 1.5).min(100.0),
                p95: (v * 1.4).min(100.0),
                count: w * 10,
            })
            .collect(),
    }
}

fn metrics(base: f64) -> Vec<MetricSummary> {
    // Every metric an agent reports, in its order.
    vocab::Metric::ALL
        .into_iter()
        .enumerate()
        .map(|(i, m)| metric(m, base + i as f64))
        .collect()
}

fn snapshot(node: usize) -> NodeSnapshot {
    let now_ns = 1_800_000_000_000_000_000u64;
    let first_pod = node * PODS_PER_NODE;
    let gpus = (0..GPUS_PER_NODE)
        .map(|g| GpuSummary {
            index: g as u32,
            uuid: gpu_uuid(node, g),
            name: "NVIDIA H100 80GB HBM3".into(),
            state: GpuState::Ok as i32,
            gpm_supported: true,
            memory_total_bytes: 81_559 << 20,
            newest_sample_unix_ns: now_ns,
            metrics: metrics(40.0 + g as f64),
            processes: (0..PODS_PER_GPU)
                .map(|p| ProcessUsage {
                    pid: (10_000 + g * PODS_PER_GPU + p) as u32,
                    used_memory_bytes: Some(18_000 << 20),
                    sm_util: Some(20.0),
                    pod_uid: pod_uid(first_pod + g * PODS_PER_GPU + p),
                    container_id: format!("{:064x}", first_pod + g * PODS_PER_GPU + p),
                    attribution: proto::agent::Attribution::Procfs as i32,
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let pods = (0..PODS_PER_NODE)
        .map(|p| {
            let i = first_pod + p;
            PodSummary {
                pod_uid: pod_uid(i),
                gpu_uuid: gpu_uuid(node, p / PODS_PER_GPU),
                container_ids: vec![format!("{i:064x}")],
                pids: vec![(10_000 + p) as u32],
                shared: true,
                newest_sample_unix_ns: now_ns,
                metrics: metrics(10.0 + (i % 50) as f64),
                attribution: proto::agent::Attribution::Procfs as i32,
            }
        })
        .collect();
    NodeSnapshot {
        api_version: 2,
        node_name: node_name(node),
        agent_version: "0.1.0".into(),
        driver_version: "580.159.04".into(),
        taken_unix_ns: now_ns,
        interval_ns: 100_000_000,
        seq: 1,
        gpus,
        pods,
        opens: Vec::new(),
        ebpf: "on".into(),
        ebpf_state: proto::agent::EbpfState::On as i32,
        ebpf_detail: String::new(),
    }
}

fn pod_meta(i: usize) -> PodMeta {
    let app = app_of(i);
    let labels = BTreeMap::from([
        ("app".to_owned(), format!("svc-{app}")),
        (
            "app.kubernetes.io/part-of".to_owned(),
            format!("team-{}", app % 7),
        ),
        ("pod-template-hash".to_owned(), "5d9c7f8b4".to_owned()),
        ("version".to_owned(), "v1".to_owned()),
    ]);
    PodMeta {
        namespace: namespace_of_app(app),
        name: format!("svc-{app}-5d9c7f8b4-{i:05x}"),
        uid: pod_uid(i),
        labels,
        node: node_name(i / PODS_PER_NODE),
        phase: "Running".into(),
        owner: format!("Deployment/svc-{app}"),
        container_ids: Vec::new(),
    }
}

fn scaled_object(k: usize) -> ScaledObjectRef {
    let meta: HashMap<String, String> = [
        (
            "scalerAddress",
            "gpuscale-collector.gpuscale-system:7700".to_owned(),
        ),
        (
            "metric",
            vocab::Metric::TRIGGER[k % vocab::Metric::TRIGGER.len()]
                .name()
                .to_owned(),
        ),
        ("podSelector", format!("app=svc-{k}")),
        (
            "timeAggregation",
            TIME_AGGREGATIONS[k % TIME_AGGREGATIONS.len()].to_owned(),
        ),
        ("window", WINDOWS[k % WINDOWS.len()].to_owned()),
        (
            "aggregation",
            if k.is_multiple_of(2) { "sum" } else { "avg" }.to_owned(),
        ),
        ("targetValue", "80".to_owned()),
        ("staleAfter", "10m".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    ScaledObjectRef {
        name: format!("svc-{k}"),
        namespace: namespace_of_app(k),
        scaler_metadata: meta,
    }
}

/// A cluster of `nodes` nodes with its pods and the 200 ScaledObjects.
struct Fixture {
    nodes: usize,
    cluster: Arc<Cluster>,
    pods: Arc<StaticPods>,
    refs: Vec<ScaledObjectRef>,
    /// Kept so that the scalers' stop channel stays open.
    _stop: tokio::sync::watch::Sender<bool>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
}

impl Fixture {
    fn new(nodes: usize) -> Fixture {
        let addresses: Vec<String> = (0..nodes)
            .map(|n| format!("10.{}.{}.{}:7701", n >> 16, (n >> 8) & 255, n & 255))
            .collect();
        let cluster = Arc::new(Cluster::new(&addresses));
        let now = Instant::now();
        for n in 0..nodes {
            let snap = snapshot(n);
            cluster.write(|v| {
                v.nodes[n].connected = true;
                v.update(n, snap, now);
            });
        }
        let pods = (0..nodes * PODS_PER_NODE).map(pod_meta).collect();
        let pods = Arc::new(StaticPods(Arc::new(PodIndex::new(1, pods))));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let f = Fixture {
            nodes,
            cluster,
            pods,
            refs: (0..SCALED_OBJECTS).map(scaled_object).collect(),
            _stop: stop,
            stop_rx,
        };
        f.check();
        f
    }

    fn scaler(&self) -> Scaler {
        Scaler::new(
            self.cluster.clone(),
            self.pods.clone(),
            None,
            self.stop_rx.clone(),
        )
    }

    /// The fixture means what it says: every ScaledObject has a value, all pods are matched
    /// once, and the naive baseline agrees with the scaler.
    fn check(&self) {
        let scaler = self.scaler();
        let index = self.pods.index();
        let mut running = 0;
        for r in &self.refs {
            let (_, e) = scaler
                .value(r)
                .unwrap_or_else(|s| panic!("{}: {}", r.name, s.message()));
            let naive = naive_value(&index, &self.cluster, r).expect("naive value");
            assert_eq!(
                (e.running_pods, e.values),
                (naive.running_pods, naive.values),
                "{}",
                r.name
            );
            assert!((e.value - naive.value).abs() < 1e-6, "{}", r.name);
            running += e.running_pods;
        }
        assert_eq!(
            running,
            self.nodes * PODS_PER_NODE,
            "every pod is selected once"
        );
    }

    fn pod_count(&self) -> usize {
        self.nodes * PODS_PER_NODE
    }
}

/// What an unindexed implementation does per call: parse the metadata, filter every pod of
/// the cluster by namespace and selector, evaluate.
fn naive_value(
    index: &PodIndex,
    cluster: &Cluster,
    r: &ScaledObjectRef,
) -> Result<Evaluation, Unavailable> {
    let trigger = Trigger::parse(&r.scaler_metadata).expect("valid metadata");
    let selector = trigger.require_selector().expect("a selector");
    let matched: Vec<Arc<PodMeta>> = index
        .by_namespace
        .values()
        .flatten()
        .filter(|p| p.namespace == r.namespace && selector.matches(&p.labels))
        .cloned()
        .collect();
    let now = Instant::now();
    cluster.read(|v| evaluate(v, &matched, &trigger, now))
}

fn has_arg(a: &str) -> bool {
    std::env::args().any(|x| x == a)
}

/// Benchmarking proper, as under `cargo bench` (criterion's own rule), not listing.
fn bench_mode() -> bool {
    has_arg("--bench") && !has_arg("--test") && !has_arg("--list")
}

fn sizes() -> &'static [usize] {
    if bench_mode() {
        &[10, 100, 1000]
    } else {
        &[10]
    }
}

fn criterion_benches(c: &mut Criterion, fixtures: &[Fixture]) {
    let mut group = c.benchmark_group("get_metrics");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for f in fixtures {
        let scaler = f.scaler();
        for r in &f.refs {
            scaler.value(r).expect("warming the cache");
        }
        let mut k = 0;
        group.bench_with_input(BenchmarkId::new("warm", f.nodes), f, |b, f| {
            b.iter(|| {
                k = (k + 1) % SCALED_OBJECTS;
                black_box(scaler.value(black_box(&f.refs[k])).is_ok())
            })
        });
        let mut k = 0;
        group.bench_with_input(BenchmarkId::new("cold", f.nodes), f, |b, f| {
            b.iter_batched_ref(
                || {
                    k = (k + 1) % SCALED_OBJECTS;
                    (f.scaler(), k)
                },
                |(scaler, k)| black_box(scaler.value(black_box(&f.refs[*k])).is_ok()),
                BatchSize::SmallInput,
            )
        });
        let index = f.pods.index();
        let mut k = 0;
        group.bench_with_input(BenchmarkId::new("naive_scan", f.nodes), f, |b, f| {
            b.iter(|| {
                k = (k + 1) % SCALED_OBJECTS;
                black_box(naive_value(&index, &f.cluster, black_box(&f.refs[k])).is_ok())
            })
        });
    }
    group.finish();
}

/// Single-call durations, sorted.
struct Timings(Vec<Duration>);

impl Timings {
    fn new(mut d: Vec<Duration>) -> Timings {
        d.sort_unstable();
        Timings(d)
    }

    fn pct(&self, p: f64) -> Duration {
        let i = ((self.0.len() as f64 * p).ceil() as usize).clamp(1, self.0.len()) - 1;
        self.0[i]
    }

    fn mean(&self) -> Duration {
        self.0.iter().sum::<Duration>() / self.0.len() as u32
    }

    fn row(&self, nodes: usize, pods: usize, what: &str) {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "| {nodes:>5} | {pods:>6} | {what:<10} | {:>6} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} |",
            self.0.len(),
            us(self.mean()),
            us(self.pct(0.50)),
            us(self.pct(0.90)),
            us(self.pct(0.99)),
            us(*self.0.last().expect("timings")),
        );
    }
}

fn time_calls(calls: usize, mut f: impl FnMut(usize)) -> Timings {
    let mut d = Vec::with_capacity(calls);
    for i in 0..calls {
        let t = Instant::now();
        f(i);
        d.push(t.elapsed());
    }
    Timings::new(d)
}

/// Times single calls and prints percentiles (criterion does not print p99).
fn percentiles(fixtures: &[Fixture]) {
    let (warm_calls, cold_rounds, naive_calls) = if bench_mode() {
        (20_000, 10, 2_000)
    } else {
        (400, 1, 50)
    };
    println!();
    if !bench_mode() {
        println!("(test mode: a short run of an unoptimized build; the numbers mean nothing)");
    }
    println!(
        "GetMetrics server-side cost per call (Scaler::value), µs; 200 ScaledObjects round-robin"
    );
    println!();
    println!("| nodes |   pods | variant    |  calls |     mean |      p50 |      p90 |      p99 |      max |");
    println!("|------:|-------:|------------|-------:|---------:|---------:|---------:|---------:|---------:|");
    let mut ratios = vec![];
    for f in fixtures {
        let index = f.pods.index();
        // Cold: the first call per ScaledObject on a fresh scaler, `cold_rounds` times over.
        let mut cold = vec![];
        for _ in 0..cold_rounds {
            let scaler = f.scaler();
            cold.extend(
                time_calls(SCALED_OBJECTS, |k| {
                    black_box(scaler.value(black_box(&f.refs[k])).is_ok());
                })
                .0,
            );
        }
        let cold = Timings::new(cold);
        let scaler = f.scaler();
        for r in &f.refs {
            scaler.value(r).expect("warming the cache");
        }
        let warm = time_calls(warm_calls, |i| {
            black_box(scaler.value(black_box(&f.refs[i % SCALED_OBJECTS])).is_ok());
        });
        let naive = time_calls(naive_calls, |i| {
            black_box(
                naive_value(&index, &f.cluster, black_box(&f.refs[i % SCALED_OBJECTS])).is_ok(),
            );
        });
        warm.row(f.nodes, f.pod_count(), "warm");
        cold.row(f.nodes, f.pod_count(), "cold");
        naive.row(f.nodes, f.pod_count(), "naive_scan");
        ratios.push((
            f.nodes,
            naive.mean().as_secs_f64() / warm.mean().as_secs_f64(),
            naive.pct(0.5).as_secs_f64() / warm.pct(0.5).as_secs_f64(),
            naive.pct(0.99).as_secs_f64() / warm.pct(0.99).as_secs_f64(),
            warm.pct(0.99),
        ));
    }
    println!();
    println!(
        "| nodes | naive/warm mean | naive/warm p50 | naive/warm p99 | warm p99 vs 200 µs target |"
    );
    println!(
        "|------:|----------------:|---------------:|---------------:|---------------------------|"
    );
    for (nodes, mean, p50, p99, warm_p99) in ratios {
        let verdict = if warm_p99 < Duration::from_micros(200) {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "| {nodes:>5} | {mean:>14.1}× | {p50:>13.1}× | {p99:>13.1}× | {:.1} µs: {verdict} |",
            warm_p99.as_secs_f64() * 1e6
        );
    }
    println!();
}

fn main() {
    let started = Instant::now();
    let fixtures: Vec<Fixture> = sizes().iter().map(|&n| Fixture::new(n)).collect();
    eprintln!(
        "built fixtures for {:?} nodes in {:.1}s",
        sizes(),
        started.elapsed().as_secs_f64()
    );
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &fixtures);
    c.final_summary();
    // `--profile-time` (profiling one bench) and `--list` want criterion's part only.
    if !has_arg("--list") && !has_arg("--profile-time") {
        percentiles(&fixtures);
    }
}
