//! End-to-end: `--http-listen` on the real `gpuscale-agent` and `gpuscale-collector`
//! (`/healthz`, `/readyz`, `/metrics` read over HTTP) and `grpc.health.v1` on their gRPC ports,
//! with the fake NVML. Needs no root: the pod's process lives only in the fake NVML and in a
//! procfs tree the agent reads with `--proc-root`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use e2e::keda::{is_code, scaled_object, Keda};
use e2e::{
    agent_cmd, collector_bin, free_port, gpu, http_get, write_scenario, Agent, Collector, Scratch,
};
use serde_json::json;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WAIT: Duration = Duration::from_secs(30);
const POD_UID: &str = "0a0a0a0a-1111-4222-8333-555555555555";
const MIB: f64 = 1024.0 * 1024.0;

/// Polls `fetch` until `pred` holds (up to [`WAIT`]); panics with the last answer otherwise.
fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut fetch: impl FnMut() -> Result<T>,
    pred: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        match fetch() {
            Ok(v) if pred(&v) => return v,
            Ok(v) => last = Some(format!("{v:?}")),
            Err(e) => last = Some(format!("error: {e:#}")),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {WAIT:?}; last: {last:?}");
}

/// One series of a Prometheus text page.
#[derive(Debug)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Series> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("name and value");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once("=\"").expect("label=\"value\"");
                    (k.to_owned(), v.trim_end_matches('"').to_owned())
                })
                .collect();
            Series {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("a number"),
            }
        })
        .collect()
}

/// The value of the one series named `name` whose labels include `labels`; `None` if absent.
fn value(page: &[Series], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Series> = page
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
    found.first().map(|s| s.value)
}

fn metrics(addr: &str) -> Result<Vec<Series>> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    Ok(parse(&body))
}

/// `grpc.health.v1.Health/Check` of `service` at `addr`.
fn grpc_health(addr: &str, service: &str) -> Result<ServingStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(ServingStatus::try_from(r.into_inner().status)?)
    })
}

/// GPU 0: an H100 (GPM) with the pod's process; GPU 1: no GPM, no process; GPU 2: lost.
fn scenario(gpu_util: u32) -> Vec<serde_json::Value> {
    let mut g0 = gpu(0);
    g0["gpu_util"] = json!(gpu_util);
    let mut g1 = gpu(1);
    g1["gpm"] = json!(false);
    g1["processes"] = json!([]);
    let mut g2 = gpu(2);
    g2["fail"] = json!("gpu_lost");
    vec![g0, g1, g2]
}

fn start_agent(dir: &Scratch, grpc: &str, http: &str) -> Agent {
    e2e::fake_proc(&dir.path("proc"), 4242, POD_UID, &"a".repeat(64));
    let scenario_path = dir.path("scenario.json");
    write_scenario(&scenario_path, &scenario(37));
    let proc_root = dir.path("proc");
    Agent::start(
        dir,
        &scenario_path,
        &dir.path("agent.ring"),
        &[
            "--listen",
            grpc,
            "--http-listen",
            http,
            "--ebpf",
            "off",
            "--proc-root",
            proc_root.to_str().unwrap(),
        ],
    )
}

#[test]
fn agent_serves_health_readiness_and_the_scenarios_values_as_metrics() {
    let dir = Scratch::new("health-agent");
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let mut agent = start_agent(&dir, &grpc, &http);

    // Ready with GPU 2 lost: a lost GPU counts as reported.
    wait_for(
        "agent /readyz 200",
        || http_get(&http, "/readyz"),
        |r| r.0 == 200,
    );
    assert_eq!(http_get(&http, "/healthz").unwrap(), (200, "ok\n".into()));
    // grpc.health.v1 follows readiness (it re-reads it every 250 ms).
    for service in ["", "gpuscale.agent.v1.Agent"] {
        wait_for(
            &format!("grpc health of {service:?} SERVING"),
            || grpc_health(&grpc, service),
            |s| *s == ServingStatus::Serving,
        );
    }

    // GPM values need two samples 100 ms apart: wait for them, then check every value.
    let g0 = [("node", "e2e-node"), ("gpu", "0")];
    let g1 = [("node", "e2e-node"), ("gpu", "1")];
    let g2 = [("node", "e2e-node"), ("gpu", "2")];
    let m = wait_for(
        "GPU 0's sm_active",
        || metrics(&http),
        |m| value(m, "gpuscale_gpu_sm_active", &g0).is_some(),
    );
    let uuid0 = "GPU-e2e00000-0000-4000-8000-000000000000";
    let expect = [
        ("sm_active", 30.0),
        ("gpu_util", 37.0),
        ("sm_occupancy", 10.0),
        ("tensor_active", 25.0),
        ("dram_active", 15.0),
        ("mem_util", 12.0),
        ("vram_used_bytes", 20000.0 * MIB),
        ("vram_used_pct", 20000.0 * 100.0 / 81559.0),
        ("power_watts", 350.0),
        ("temperature_c", 60.0),
    ];
    for (metric, want) in expect {
        let got = value(
            &m,
            &format!("gpuscale_gpu_{metric}"),
            &[g0[0], g0[1], ("uuid", uuid0)],
        );
        assert!(
            got.is_some_and(|v| (v - want).abs() < 1e-6),
            "{metric}: {got:?}, want {want}"
        );
    }
    // No GPM on GPU 1: its GPM series are absent, not 0; its NVML values are there.
    for metric in ["sm_active", "sm_occupancy", "tensor_active", "dram_active"] {
        assert_eq!(
            value(&m, &format!("gpuscale_gpu_{metric}"), &g1),
            None,
            "{metric}"
        );
    }
    assert_eq!(value(&m, "gpuscale_gpu_gpu_util", &g1), Some(37.0));
    // GPU 2 is lost: its state says so, its NVML errors count, and it has no values.
    assert_eq!(
        value(&m, "gpuscale_gpu_state", &[g2[0], g2[1], ("state", "lost")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "gpuscale_gpu_state", &[g2[0], g2[1], ("state", "ok")]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "gpuscale_gpu_state", &[g0[0], g0[1], ("state", "ok")]),
        Some(1.0)
    );
    assert!(value(
        &m,
        "gpuscale_agent_nvml_errors_total",
        &[g2[0], g2[1], ("kind", "lost")]
    )
    .is_some_and(|n| n >= 1.0));
    assert_eq!(
        value(
            &m,
            "gpuscale_agent_nvml_errors_total",
            &[g0[0], g0[1], ("kind", "lost")]
        ),
        Some(0.0)
    );
    for (metric, _) in expect {
        assert_eq!(
            value(&m, &format!("gpuscale_gpu_{metric}"), &g2),
            None,
            "{metric}"
        );
    }
    // The pod alone on GPU 0 gets the GPU's values, labelled by its UID.
    let pod = [("node", "e2e-node"), ("gpu", "0"), ("pod_uid", POD_UID)];
    assert_eq!(value(&m, "gpuscale_pod_gpu_sm_active", &pod), Some(30.0));
    assert_eq!(
        value(&m, "gpuscale_pod_gpu_vram_used_bytes", &pod),
        Some(20000.0 * MIB)
    );
    assert!(
        value(&m, "gpuscale_agent_sample_duration_seconds_count", &g0).is_some_and(|n| n >= 1.0)
    );
    assert_eq!(
        value(&m, "gpuscale_agent_ebpf_events_total", &[]),
        None,
        "eBPF is off"
    );
    assert!(m.iter().all(|s| s.name.starts_with("gpuscale_")), "{m:?}");

    // The series follow the scenario.
    write_scenario(&dir.path("scenario.json"), &scenario(80));
    wait_for(
        "gpu_util 80",
        || metrics(&http),
        |m| value(m, "gpuscale_gpu_gpu_util", &g0) == Some(80.0),
    );

    assert!(agent.terminate().success(), "{}", agent.log());
}

#[test]
fn collector_is_ready_once_an_agent_streams_and_counts_keda_requests() {
    let dir = Scratch::new("health-collector");
    let pods = dir.path("pods.json");
    std::fs::write(
        &pods,
        json!({"apiVersion": "v1", "kind": "PodList", "items": [
            {"metadata": {"namespace": "ml", "name": "vllm-0", "uid": POD_UID,
                          "labels": {"app": "vllm"}},
             "spec": {"nodeName": "e2e-node"}, "status": {"phase": "Running"}}]})
        .to_string(),
    )
    .unwrap();
    let agent_grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let pods_arg = pods.to_string_lossy();
    let mut collector = Collector::spawn(
        &dir,
        &[
            "--agents",
            &agent_grpc,
            "--pods-file",
            &pods_arg,
            "--http-listen",
            &http,
        ],
        &[],
    );

    // No agent yet: alive, not ready, NOT_SERVING, and the agent reads disconnected.
    let (_, why) = wait_for(
        "collector /readyz",
        || http_get(&http, "/readyz"),
        |r| r.0 == 503,
    );
    assert!(
        why.starts_with("no agent connected yet: 127.0.0.1:"),
        "{why}"
    );
    assert_eq!(why.lines().count(), 1, "{why}");
    assert_eq!(http_get(&http, "/healthz").unwrap().0, 200);
    let collector_grpc = collector.addr.clone();
    // A client that connects and never starts HTTP/2 is closed after 10 s (checked at the end).
    let silent = {
        let mut tcp = std::net::TcpStream::connect(&collector_grpc).unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let started = std::time::Instant::now();
            // The server's SETTINGS frame comes first; then the end of the connection.
            let closed = loop {
                match tcp.read(&mut [0u8; 64]) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
                }
            };
            (closed, started.elapsed())
        })
    };
    assert_eq!(
        wait_for("grpc health", || grpc_health(&collector_grpc, ""), |_| true),
        ServingStatus::NotServing
    );
    let a = [("address", agent_grpc.as_str())];
    let m = metrics(&http).unwrap();
    assert_eq!(
        value(&m, "gpuscale_collector_agent_connected", &a),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "gpuscale_collector_agent_snapshot_age_seconds", &a),
        None
    );

    // The agent comes: ready, SERVING, connected, and the pod's values carry its name.
    let agent_http = format!("127.0.0.1:{}", free_port());
    let mut agent = start_agent(&dir, &agent_grpc, &agent_http);
    wait_for(
        "collector /readyz 200",
        || http_get(&http, "/readyz"),
        |r| r.0 == 200,
    );
    for service in ["", "externalscaler.ExternalScaler"] {
        wait_for(
            &format!("grpc health of {service:?} SERVING"),
            || grpc_health(&collector_grpc, service),
            |s| *s == ServingStatus::Serving,
        );
    }
    let pod = [
        ("namespace", "ml"),
        ("pod", "vllm-0"),
        ("node", "e2e-node"),
        ("gpu", "0"),
    ];
    let m = wait_for(
        "the pod's sm_active",
        || metrics(&http),
        |m| value(m, "gpuscale_collector_pod_gpu_sm_active", &pod).is_some(),
    );
    let a = [("address", agent_grpc.as_str()), ("node", "e2e-node")];
    assert_eq!(
        value(&m, "gpuscale_collector_agent_connected", &a),
        Some(1.0)
    );
    assert!(value(&m, "gpuscale_collector_agent_snapshot_age_seconds", &a).is_some());
    assert_eq!(
        value(&m, "gpuscale_collector_pod_gpu_sm_active", &pod),
        Some(30.0)
    );
    assert_eq!(
        value(&m, "gpuscale_collector_pod_gpu_gpu_util", &pod),
        Some(37.0)
    );

    // KEDA's calls are counted by RPC and status.
    let mut keda = Keda::connect(&collector_grpc);
    let so = scaled_object(
        "vllm",
        &[
            ("metric", "sm_active"),
            ("podSelector", "app=vllm"),
            ("targetValue", "60"),
        ],
    );
    let (name, _, _) = keda.metric_spec(&so).unwrap();
    keda.metrics(&so, &name).unwrap();
    let (answered, _) = keda.metrics(&so, &name).unwrap();
    let bad = scaled_object("bad", &[("metric", "nope"), ("targetValue", "60")]);
    assert!(is_code(&keda.metrics(&bad, "x"), Code::InvalidArgument));
    let m = metrics(&http).unwrap();
    // The value KEDA was last told, per ScaledObject.
    assert_eq!(
        value(
            &m,
            "gpuscale_collector_scaledobject_value",
            &[
                ("namespace", "ml"),
                ("scaledobject", "vllm"),
                ("metric", &name)
            ]
        ),
        Some(answered),
        "{m:?}"
    );
    let req = |rpc: &str, code: &str| {
        value(
            &m,
            "gpuscale_collector_keda_requests_total",
            &[("rpc", rpc), ("code", code)],
        )
    };
    assert_eq!(req("GetMetrics", "OK"), Some(2.0), "{m:?}");
    assert_eq!(req("GetMetrics", "INVALID_ARGUMENT"), Some(1.0));
    assert_eq!(req("GetMetricSpec", "OK"), Some(1.0));
    assert_eq!(
        value(
            &m,
            "gpuscale_collector_keda_request_duration_seconds_count",
            &[("rpc", "GetMetrics"), ("code", "OK")]
        ),
        Some(2.0)
    );

    // A StreamIsActive stream counts when it ends: KEDA hanging up is CANCELLED.
    let mut stream = keda.stream_is_active(&so).unwrap();
    assert!(keda.next_active(&mut stream, WAIT).is_some());
    drop(stream);
    wait_for(
        "StreamIsActive CANCELLED",
        || {
            // Drives the client's runtime, which sends the hang-up.
            let _ = keda.metric_spec(&so);
            metrics(&http)
        },
        |m| {
            value(
                m,
                "gpuscale_collector_keda_requests_total",
                &[("rpc", "StreamIsActive"), ("code", "CANCELLED")],
            ) == Some(1.0)
        },
    );

    // Requests no KEDA sends are refused before anything holds them: a 10 KB name by the
    // collector's size limits, a 3 MB one already by the port's message limit (64 KiB).
    for (size, code) in [(10_000, Code::InvalidArgument), (3 << 20, Code::OutOfRange)] {
        let huge = scaled_object(&"n".repeat(size), &[("metric", "sm_active")]);
        let err = keda.metrics(&huge, &name).unwrap_err();
        assert_eq!(err.code(), code, "a {size}-byte name: {err:?}");
        assert!(
            err.message().len() < 300,
            "a prefix, not {size} bytes: {} bytes",
            err.message().len()
        );
    }
    assert!(
        !collector.daemon.log().contains(&"n".repeat(100)),
        "nor logged whole"
    );

    // A pods file that no longer parses (here: a UID listed twice): the last good list keeps
    // answering, /readyz fails naming the file and the pods, the refusal counts; fixed, ready.
    let item = |name: &str| e2e::pod_item("ml", name, POD_UID, json!({"app": "vllm"}));
    e2e::write_pods(&pods, &[item("vllm-0"), item("vllm-copy")]);
    let (_, why) = wait_for(
        "collector /readyz 503 after a bad reload",
        || http_get(&http, "/readyz"),
        |r| r.0 == 503,
    );
    assert!(
        why.contains("pods.json")
            && why.contains("(pod ml/vllm-0)")
            && why.contains("ml/vllm-copy"),
        "{why}"
    );
    assert_eq!(
        keda.metrics(&so, &name).unwrap().0,
        answered,
        "the last good list answers"
    );
    let m = metrics(&http).unwrap();
    assert_eq!(
        value(&m, "gpuscale_collector_pod_source_refused_total", &[]),
        Some(1.0)
    );
    e2e::write_pods(&pods, &[item("vllm-0")]);
    wait_for(
        "collector /readyz 200 once the file is fixed",
        || http_get(&http, "/readyz"),
        |r| r.0 == 200,
    );
    let (closed, after) = silent.join().unwrap();
    assert!(
        closed,
        "a connection that never sent the HTTP/2 preface was still open after {after:?}"
    );

    assert!(
        collector.daemon.terminate().success(),
        "{}",
        collector.daemon.log()
    );
    assert!(agent.terminate().success(), "{}", agent.log());
}

#[test]
fn a_taken_or_bad_http_address_fails_at_start_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = Scratch::new("health-bad");
    let scenario_path = dir.path("scenario.json");
    write_scenario(&scenario_path, &[gpu(0)]);
    let shm = dir.path("agent.ring");
    let pods = dir.path("pods.json");
    std::fs::write(&pods, r#"{"kind": "PodList", "items": []}"#).unwrap();
    for given in [addr.as_str(), "not-an-address"] {
        let agent = std::process::Command::new(e2e::agent_bin())
            .args(["run", "--nvml-lib"])
            .arg(e2e::fake_nvml())
            .arg("--shm")
            .arg(&shm)
            .args(["--ebpf", "off", "--http-listen", given])
            .env("FAKE_NVML_SCENARIO", &scenario_path)
            .output()
            .unwrap();
        let collector = std::process::Command::new(collector_bin())
            .args([
                "serve",
                "--agents",
                "127.0.0.1:1",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--pods-file")
            .arg(&pods)
            .args(["--http-listen", given])
            .output()
            .unwrap();
        for (who, out) in [("agent", agent), ("collector", collector)] {
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{who} {given}: {err}");
            assert!(
                err.contains("--http-listen") && err.contains(given),
                "{who}: {err}"
            );
            assert!(!err.contains("panicked"), "{who}: {err}");
        }
    }
    // The flag is documented in --help.
    let help = agent_cmd(&["run", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--http-listen"));
}
