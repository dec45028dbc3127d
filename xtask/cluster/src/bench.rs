//! `gpuscale-cluster bench` (`cargo xtask bench --cluster`): a GPU load step → the Deployment's
//! `spec.replicas` changes, through two chains side by side in one run, on the same cluster,
//! the same KEDA and the same HPA:
//!
//! - **gpuscale**: KEDA's `external` trigger on the collector (`sm_active`, 10 s average);
//! - **the usual chain**: a real Prometheus (Debian's package) scraping every agent's
//!   `/metrics` every 15 s, and KEDA's `prometheus` trigger querying it
//!   (`sum(gpuscale_gpu_sm_active{node=…})`) at its default 30 s polling.
//!
//! Each chain scales its own Deployment of one pod, pinned to its own node, with
//! `targetValue`/`threshold` 40 and `minReplicaCount` 1: a step of that pod from 0 to 90 % SM
//! activity asks for ceil(90 / 40) = 3 replicas. For every step the bench records when the
//! chain's signal first shows the step (the collector's answer, or Prometheus's query, above
//! 44 = 40 × the HPA's 10 % tolerance) and when `spec.replicas` first moves; then it steps back
//! to 0, waits for both Deployments to return to 1 replica, and waits a random 0–15 s so the
//! steps fall at every phase of the scrape and HPA periods.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::Client;
use serde_json::{json, Value};

use crate::process::{self, Proc};
use crate::state::ClusterInfo;
use crate::{kube_util, workload};

const NS: &str = "bench";
const TARGET: f64 = 40.0;
/// The HPA acts once the ratio to the target is above 1.1 (its default tolerance).
const SIGNAL: f64 = TARGET * 1.1;

/// One chain's timings for one step, in seconds from the load step.
#[derive(Debug, Clone, Copy, Default)]
struct Step {
    signal: Option<f64>,
    scaled: Option<f64>,
}

/// Reproducible pseudo-random waits (a 64-bit LCG), so each run samples the same phases.
struct Jitter(u64);

impl Jitter {
    /// A wait between 0 and `max`.
    fn up_to(&mut self, max: Duration) -> Duration {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let max_ms = max.as_millis().max(1) as u64;
        Duration::from_millis((self.0 >> 33) % max_ms)
    }
}

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} s"))
}

fn pinned(name: &str, node: &str) -> Value {
    let mut d = workload::deployment(NS, name, 1, 1, &[]);
    d["spec"]["template"]["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    d
}

fn scaled_object(name: &str, trigger: Value) -> Value {
    json!({
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": 1, "maxReplicaCount": 4,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {"stabilizationWindowSeconds": 0}}}},
            "triggers": [trigger]
        }
    })
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus's answer to an instant query, as a number (`None`: no sample).
fn prom_value(addr: &str, query: &str) -> Result<Option<f64>> {
    let (code, body) = crate::ops::http(
        "GET",
        &format!("http://{addr}/api/v1/query?query={}", encode(query)),
        "",
    )?;
    if code != 200 {
        bail!("Prometheus: HTTP {code}: {body}");
    }
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok()))
}

/// The collector's answer for the gpuscale chain's trigger.
fn collector_value(info: &ClusterInfo) -> Result<Option<f64>> {
    let out = std::process::Command::new(&info.collector_bin)
        .args([
            "query",
            "--collector",
            &info.collector,
            "--namespace",
            NS,
            "--name",
            "gs",
        ])
        .args(["--meta", "metric=sm_active", "--meta", "podSelector=app=gs"])
        .args(["--meta", "targetValue=40", "--meta", "window=10s", "--json"])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("query printed no JSON")?;
    Ok(v["value"].as_f64())
}

async fn replicas(api: &Api<Deployment>, name: &str) -> Result<i32> {
    Ok(api
        .get(name)
        .await?
        .spec
        .and_then(|s| s.replicas)
        .unwrap_or(0))
}

async fn set_all(client: &Client, app: &str, load: &str) -> Result<()> {
    for p in workload::running_pods(client, NS, app).await? {
        workload::set_load(client, &p, load).await?;
    }
    Ok(())
}

fn start_prometheus(
    info: &ClusterInfo,
    dir: &std::path::Path,
    targets: &[String],
) -> Result<(Proc, String)> {
    let prom_dir = dir.join("prometheus");
    let _ = std::fs::remove_dir_all(&prom_dir);
    std::fs::create_dir_all(&prom_dir)?;
    let config = prom_dir.join("prometheus.yml");
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    // The agents' /metrics is served over TLS, as in a real install: the install's CA and the
    // agents' shared name.
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 15s, evaluation_interval: 15s}}\nscrape_configs:\n  - \
             job_name: gpuscale-agents\n    scheme: https\n    tls_config: {{ca_file: \"{}\", \
             server_name: \"{}\"}}\n    static_configs:\n      - targets: [{}]\n",
            info.tls_dir.join("collector").join("ca.crt").display(),
            gpuscale_deploy::certificates::agent_name(gpuscale_deploy::DEFAULT_NAMESPACE),
            targets.join(", ")
        ),
    )?;
    let port = process::free_port("127.0.0.1")?;
    let addr = format!("127.0.0.1:{port}");
    let proc = process::spawn(
        &info.logs,
        "prometheus",
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn"),
    )?;
    let ready = format!("http://{addr}/-/ready");
    process::wait_ready(&proc, "/-/ready", Duration::from_secs(60), || {
        crate::ops::http("GET", &ready, "").is_ok_and(|(c, _)| c == 200)
    })?;
    Ok((proc, addr))
}

/// Makes sure Debian's Prometheus is installed (as root with apt-get).
fn ensure_prometheus() -> Result<()> {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Ok(());
    }
    eprintln!("installing Prometheus (apt-get install prometheus), about a minute");
    for args in [
        &["update", "-qq"][..],
        &[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "prometheus",
        ][..],
    ] {
        let s = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !s.success() {
            bail!(
                "apt-get {} failed ({s}); install Debian's prometheus package",
                args.join(" ")
            );
        }
    }
    Ok(())
}

/// Runs `steps` load steps through both chains, then `wakes` wakes from zero, and prints the
/// tables for docs/BENCHMARKS.md.
pub async fn run(
    info: &ClusterInfo,
    dir: &std::path::Path,
    steps: usize,
    wakes: usize,
) -> Result<()> {
    ensure_prometheus()?;
    let client = kube_util::client(&info.kubeconfig).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), "gpuscale-system");
    let agent_ips: Vec<String> = pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=gpuscale-agent"))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.status?.pod_ip)
        .map(|ip| format!("{ip}:7702"))
        .collect();
    if agent_ips.is_empty() {
        bail!("no agent pod has an IP yet");
    }
    let (prom, prom_addr) = start_prometheus(info, dir, &agent_ips)?;
    let mut result = kube_util::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    if result.is_ok() && steps > 0 {
        result = steps_run(info, &client, &prom_addr, steps).await;
    }
    if result.is_ok() && wakes > 0 {
        result = wake_run(info, &client, wakes).await;
    }
    prom.stop(Duration::from_secs(5));
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = nss.delete(NS, &Default::default()).await;
    result
}

async fn steps_run(info: &ClusterInfo, client: &Client, prom: &str, steps: usize) -> Result<()> {
    let gs_node = &info.nodes.first().context("no nodes")?.name;
    let prom_node = &info.nodes.get(1).context("the bench needs 2 nodes")?.name;
    let prom_query = format!("sum(gpuscale_gpu_sm_active{{node=\"{prom_node}\"}})");
    kube_util::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await?;
    kube_util::apply(client, &pinned("gs", gs_node)).await?;
    kube_util::apply(client, &pinned("prom", prom_node)).await?;
    kube_util::apply(
        client,
        &scaled_object(
            "gs",
            json!({"type": "external", "metadata": {
                "scalerAddress": info.collector, "metric": "sm_active", "podSelector": "app=gs",
                "targetValue": "40", "window": "10s", "staleAfter": "10s"}}),
        ),
    )
    .await?;
    kube_util::apply(
        client,
        &scaled_object(
            "prom",
            json!({"type": "prometheus", "metadata": {
                "serverAddress": format!("http://{prom}"), "query": prom_query,
                "threshold": "40"}}),
        ),
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let mut jitter = Jitter(0x9e37_79b9_7f4a_7c15);
    let mut gs = Vec::new();
    let mut pr = Vec::new();
    eprintln!("{steps} load steps, both chains at once (about 75 s a step)");
    for i in 0..steps {
        // Back at rest: both at 1 replica, both signals below the target.
        let rest_deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let a = replicas(&deployments, "gs").await?;
            let b = replicas(&deployments, "prom").await?;
            let ga = collector_value(info).ok().flatten().unwrap_or(f64::MAX);
            let pa = prom_value(prom, &prom_query).ok().flatten().unwrap_or(0.0);
            if a == 1
                && b == 1
                && ga < 1.0
                && pa < 1.0
                && !workload::running_pods(client, NS, "gs").await?.is_empty()
                && !workload::running_pods(client, NS, "prom").await?.is_empty()
            {
                break;
            }
            if Instant::now() > rest_deadline {
                bail!("step {i}: not back at rest within 240 s (gs {a}, prom {b} replicas; signals {ga}, {pa})");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(jitter.up_to(Duration::from_secs(15))).await;

        let t0 = Instant::now();
        set_all(client, "gs", "sm_active=90").await?;
        set_all(client, "prom", "sm_active=90").await?;
        let (mut g, mut p) = (Step::default(), Step::default());
        while t0.elapsed() < Duration::from_secs(180) && (g.scaled.is_none() || p.scaled.is_none())
        {
            let t = t0.elapsed().as_secs_f64();
            if g.signal.is_none()
                && collector_value(info)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v > SIGNAL)
            {
                g.signal = Some(t);
            }
            if p.signal.is_none()
                && prom_value(prom, &prom_query)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v > SIGNAL)
            {
                p.signal = Some(t);
            }
            if g.scaled.is_none() && replicas(&deployments, "gs").await? >= 2 {
                g.scaled = Some(t);
            }
            if p.scaled.is_none() && replicas(&deployments, "prom").await? >= 2 {
                p.scaled = Some(t);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "  step {:>2}/{steps}: gpuscale signal {} → replicas {} · Prometheus chain signal {} → replicas {}",
            i + 1,
            fmt_s(g.signal),
            fmt_s(g.scaled),
            fmt_s(p.signal),
            fmt_s(p.scaled)
        );
        gs.push(g);
        pr.push(p);
        set_all(client, "gs", "sm_active=0").await?;
        set_all(client, "prom", "sm_active=0").await?;
    }
    let col =
        |v: &[Step], f: fn(&Step) -> Option<f64>| -> Vec<f64> { v.iter().filter_map(f).collect() };
    println!("\n| chain | steps | signal shows the step p50 / p99 | spec.replicas moves p50 / p99 | signal → replicas p50 |");
    println!("|---|---|---|---|---|");
    for (name, v) in [
        ("gpuscale (external, 10 s avg)", &gs),
        ("Prometheus 15 s scrape + KEDA prometheus", &pr),
    ] {
        let sig = col(v, |s| s.signal);
        let sc = col(v, |s| s.scaled);
        let gap: Vec<f64> = v
            .iter()
            .filter_map(|s| Some(s.scaled? - s.signal?))
            .collect();
        println!(
            "| {name} | {}/{} | {} / {} | {} / {} | {} |",
            sc.len(),
            v.len(),
            fmt_s(percentile(&sig, 50.0)),
            fmt_s(percentile(&sig, 99.0)),
            fmt_s(percentile(&sc, 50.0)),
            fmt_s(percentile(&sc, 99.0)),
            fmt_s(percentile(&gap, 50.0)),
        );
    }
    let ratio = percentile(&col(&pr, |s| s.scaled), 50.0)
        .zip(percentile(&col(&gs, |s| s.scaled), 50.0))
        .map(|(p, g)| p / g);
    if let Some(r) = ratio {
        println!("\np50 step → replicas: the Prometheus chain takes {r:.1}× gpuscale's time");
    }
    Ok(())
}

/// 0 → 1: `external-push` against KEDA's polling (`external`, `pollingInterval` 30 s, the
/// default). Both ScaledObjects select the same always-on pod (`wake-src`); when it is idle,
/// both targets go to zero after `cooldownPeriod`; then it gets busy and the bench times each
/// target's `spec.replicas` leaving 0. A random 0–30 s wait before each wake spreads the wakes
/// over the polling period.
async fn wake_run(info: &ClusterInfo, client: &Client, cycles: usize) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for name in ["gs", "prom"] {
        let sos: Api<kube::api::DynamicObject> = Api::namespaced_with(
            client.clone(),
            NS,
            &kube::core::ApiResource::from_gvk_with_plural(
                &kube::core::GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
                "scaledobjects",
            ),
        );
        let _ = sos.delete(name, &Default::default()).await;
        let _ = deployments.delete(name, &Default::default()).await;
    }
    kube_util::apply(
        client,
        &workload::deployment(NS, "wake-src", 1, 1, &[("part-of", "wake")]),
    )
    .await?;
    for (name, kind) in [("wake-push", "external-push"), ("wake-poll", "external")] {
        kube_util::apply(client, &workload::deployment(NS, name, 1, 1, &[])).await?;
        let mut so = scaled_object(
            name,
            json!({"type": kind, "metadata": {
                "scalerAddress": info.collector, "metric": "sm_active", "podSelector": "part-of=wake",
                "targetValue": "40", "window": "10s", "activationThreshold": "5"}}),
        );
        so["spec"]["minReplicaCount"] = json!(0);
        so["spec"]["cooldownPeriod"] = json!(10);
        kube_util::apply(client, &so).await?;
    }
    let mut jitter = Jitter(0x2545_f491_4f6c_dd1d);
    let (mut push, mut poll) = (Vec::new(), Vec::new());
    eprintln!("{cycles} wakes from zero, external-push and polling at once (about 60 s each)");
    for i in 0..cycles {
        set_all(client, "wake-src", "sm_active=0").await?;
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let a = replicas(&deployments, "wake-push").await?;
            let b = replicas(&deployments, "wake-poll").await?;
            if a == 0
                && b == 0
                && !workload::running_pods(client, NS, "wake-src")
                    .await?
                    .is_empty()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("wake {i}: the targets did not reach 0 within 240 s ({a}, {b})");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(jitter.up_to(Duration::from_secs(30))).await;
        let t0 = Instant::now();
        set_all(client, "wake-src", "sm_active=50").await?;
        let (mut a, mut b) = (None, None);
        while t0.elapsed() < Duration::from_secs(120) && (a.is_none() || b.is_none()) {
            let t = t0.elapsed().as_secs_f64();
            if a.is_none() && replicas(&deployments, "wake-push").await? >= 1 {
                a = Some(t);
            }
            if b.is_none() && replicas(&deployments, "wake-poll").await? >= 1 {
                b = Some(t);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "  wake {:>2}/{cycles}: external-push {} · polling {}",
            i + 1,
            fmt_s(a),
            fmt_s(b)
        );
        push.extend(a);
        poll.extend(b);
    }
    println!("\n| 0 → 1 wake | wakes | p50 | p99 |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("external-push (StreamIsActive)", &push),
        ("external, pollingInterval 30 s", &poll),
    ] {
        println!(
            "| {name} | {}/{cycles} | {} | {} |",
            v.len(),
            fmt_s(percentile(v, 50.0)),
            fmt_s(percentile(v, 99.0))
        );
    }
    Ok(())
}
