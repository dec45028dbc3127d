//! End-to-end, privileged: one value per replica through the real binaries. A tensor-parallel pod
//! on four fake GPUs, a pod on one GPU and a two-pod LeaderWorkerSet group, as processes in
//! kubelet-shaped cgroups, read through KEDA's external-scaler gRPC API and
//! `gpuscale-collector query`. Runs as root (CI does); says why it skips otherwise.

use std::time::Duration;

use e2e::keda::{scaled_object, Keda};
use e2e::pod::{privileged, PodProcess};
use e2e::{collector_bin, free_port, gpu, write_scenario, Agent, Collector, Scratch};
use serde_json::{json, Value};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);
const UID_TP: &str = "0d0d0d0d-1111-4222-8333-444444444444";
const UID_ONE: &str = "0e0e0e0e-1111-4222-8333-444444444444";
const UID_LEADER: &str = "0f0f0f0f-1111-4222-8333-444444444444";
const UID_WORKER: &str = "1a1a1a1a-1111-4222-8333-444444444444";
const GROUP_KEY: &str = "leaderworkerset.sigs.k8s.io/group-key";
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn pod_item(name: &str, uid: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": "ml", "name": name, "uid": uid, "labels": labels},
           "spec": {"nodeName": "e2e-node"}, "status": {"phase": "Running"}})
}

/// GPU `index` used by `p` alone at `sm` % `sm_active`, with `used_gib` of its memory in use.
fn gpu_of(index: usize, p: &PodProcess, sm: u32, used_gib: u32) -> Value {
    let mut g = gpu(index);
    g["sm_active"] = json!(sm);
    g["memory_used_mib"] = json!(used_gib * 1024);
    g["processes"] = json!([{"pid": p.pid(), "used_memory_mib": used_gib * 1024, "sm_util": sm}]);
    g
}

/// `gpuscale-collector query --json` for ScaledObject `name` with `meta`.
fn query(collector: &str, name: &str, meta: &[(&str, &str)]) -> Value {
    let mut cmd = std::process::Command::new(collector_bin());
    cmd.args(["query", "--collector", collector, "--namespace", "ml"])
        .args(["--name", name, "--json"]);
    for (k, v) in meta {
        cmd.arg("--meta").arg(format!("{k}={v}"));
    }
    let out = cmd.output().expect("running gpuscale-collector query");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "query printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn replicas_count_once_whatever_their_gpus_and_pods() {
    if let Some(why) = privileged() {
        eprintln!("skipped: replicas_count_once_whatever_their_gpus_and_pods: {why}");
        return;
    }
    let dir = Scratch::new("replicas");
    // vLLM with tensor parallelism 4: one pod, one worker process per GPU.
    let tp: Vec<PodProcess> = (0..4)
        .map(|_| PodProcess::start(UID_TP, &"d".repeat(64)))
        .collect();
    let one = PodProcess::start(UID_ONE, &"e".repeat(64));
    let leader = PodProcess::start(UID_LEADER, &"f".repeat(64));
    let worker = PodProcess::start(UID_WORKER, &"1".repeat(64));
    let scenario = dir.path("scenario.json");
    let gpus = |first: u32| {
        let mut g: Vec<Value> = tp
            .iter()
            .enumerate()
            .map(|(i, p)| gpu_of(i, p, if i == 0 { first } else { 70 }, 60))
            .collect();
        g.push(gpu_of(4, &one, 90, 20));
        g.push(gpu_of(5, &leader, 60, 30));
        g.push(gpu_of(6, &worker, 80, 30));
        g
    };
    write_scenario(&scenario, &gpus(70));
    let pods = dir.path("pods.json");
    let lws = |role: &str| json!({"app": "lws", "role": role, GROUP_KEY: "0a1b2c"});
    std::fs::write(
        &pods,
        json!({"apiVersion": "v1", "kind": "List", "items": [
            pod_item("vllm-tp", UID_TP, json!({"app": "vllm", "shape": "tp4"})),
            pod_item("vllm-one", UID_ONE, json!({"app": "vllm", "shape": "tp1"})),
            pod_item("lws-0", UID_LEADER, lws("leader")),
            pod_item("lws-0-1", UID_WORKER, lws("worker"))]})
        .to_string(),
    )
    .unwrap();
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let _agent = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &["--listen", &agent_addr],
    );
    let mut collector = Collector::start(&dir, &agent_addr, &pods);
    let mut keda = Keda::connect(&collector.addr);
    let vllm = [
        ("metric", "sm_active"),
        ("podSelector", "app=vllm"),
        ("targetValue", "80"),
        ("timeAggregation", "last"),
    ];

    // sum + AverageValue: 70 (the TP replica's four GPUs averaged) + 90 = 160, and the HPA
    // wants ceil(160 / 80) = 2 replicas for the 2 running: not the 4.6 → 5 of a per-GPU sum.
    let so = scaled_object("vllm", &vllm);
    let (name, _, _) = keda.metric_spec(&so).unwrap();
    let got = keda.wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == 160.0));
    assert_eq!(got.unwrap().0, 160.0, "{}", collector.daemon.log());
    let q = query(&collector.addr, "vllm", &vllm);
    assert_eq!(q["desired_replicas"], 2, "{q}");
    assert_eq!(q["gpu_aggregation"], "avg", "{q}");
    let replicas = q["replicas"].as_array().cloned().unwrap_or_default();
    assert_eq!(replicas.len(), 2, "{q}");
    let tp_replica = replicas
        .iter()
        .find(|r| r["replica"] == "ml/vllm-tp")
        .unwrap_or_else(|| panic!("no replica ml/vllm-tp: {q}"));
    assert_eq!(tp_replica["value"], 70.0, "{q}");
    assert_eq!(tp_replica["gpus"].as_array().map(Vec::len), Some(4), "{q}");

    // gpuAggregation max: the busiest GPU is the TP replica's value.
    write_scenario(&scenario, &gpus(95));
    let mut max = vllm.to_vec();
    max.push(("gpuAggregation", "max"));
    let so_max = scaled_object("vllm-max", &max);
    let got = keda.wait_metrics(
        &so_max,
        &name,
        WAIT,
        |r| matches!(r, Ok((v, _)) if *v == 185.0),
    );
    assert_eq!(got.unwrap().0, 185.0, "95 + 90");
    let q = query(&collector.addr, "vllm-max", &max);
    let first = &q["replicas"][0];
    assert_eq!(
        (&first["replica"], &first["value"]),
        (&json!("ml/vllm-tp"), &json!(95.0)),
        "{q}"
    );

    // vram_used_bytes of the TP replica: the sum over its four GPUs (the default for bytes).
    let vram = [
        ("metric", "vram_used_bytes"),
        ("podSelector", "shape=tp4"),
        ("targetValue", "1000000000"),
        ("timeAggregation", "last"),
    ];
    let so_vram = scaled_object("vram", &vram);
    let got = keda.wait_metrics(&so_vram, &name, WAIT, |r| r.is_ok());
    assert_eq!(got.unwrap().0, 240.0 * GIB);

    // A LeaderWorkerSet group is one replica: (60 + 80) / 2 = 70, not 140.
    let lws_meta = [
        ("metric", "sm_active"),
        ("podSelector", "app=lws"),
        ("replicaLabel", GROUP_KEY),
        ("targetValue", "80"),
        ("timeAggregation", "last"),
    ];
    let so_lws = scaled_object("lws", &lws_meta);
    let got = keda.wait_metrics(&so_lws, &name, WAIT, |r| r.is_ok());
    assert_eq!(got.unwrap().0, 70.0);
    let q = query(&collector.addr, "lws", &lws_meta);
    assert_eq!(q["replicas"].as_array().map(Vec::len), Some(1), "{q}");
    assert_eq!(
        q["replicas"][0]["replica"],
        format!("{GROUP_KEY}=0a1b2c"),
        "{q}"
    );
    assert_eq!(
        q["replicas"][0]["pods"].as_array().map(Vec::len),
        Some(2),
        "{q}"
    );
    assert_eq!(q["desired_replicas"], 1, "{q}");

    // Bad keys: INVALID_ARGUMENT naming the key and what it accepts.
    for (key, value, accepted) in [
        ("gpuAggregation", "median", "avg, max, sum"),
        ("replicaLabel", "not a key", "write a label key"),
    ] {
        let mut bad = vllm.to_vec();
        bad.push((key, value));
        let e = keda.metric_spec(&scaled_object("bad", &bad)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(key), "{e:?}");
        assert!(e.message().contains(accepted), "{e:?}");
    }
    assert!(
        collector.daemon.terminate().success(),
        "{}",
        collector.daemon.log()
    );
}
