//! End-to-end, privileged: fake NVML + `gpuscale-agent` + `gpuscale-collector`, with real
//! processes in kubelet-shaped cgroups, called through KEDA's external-scaler gRPC API as KEDA
//! calls it. Runs as root (CI does); says why it skips otherwise.

use std::time::Duration;

use e2e::keda::{is_code, scaled_object, Keda};
use e2e::pod::{privileged, PodProcess};
use e2e::{collector_bin, free_port, gpu, wait_json, write_scenario, Agent, Collector, Scratch};
use serde_json::{json, Value};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);
const UID_A: &str = "0a0a0a0a-1111-4222-8333-444444444444";
const UID_B: &str = "0b0b0b0b-1111-4222-8333-444444444444";
const UID_C: &str = "0c0c0c0c-1111-4222-8333-444444444444";

fn pod_item(name: &str, uid: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": "ml", "name": name, "uid": uid,
                        "labels": {"app": app, "pod-template-hash": "5d9c7f"},
                        "ownerReferences": [{"kind": "ReplicaSet", "name": format!("{app}-5d9c7f"),
                                             "controller": true}]},
           "spec": {"nodeName": "e2e-node"}, "status": {"phase": "Running"}})
}

fn proc_json(p: &PodProcess, mib: u64, sm: u32) -> Value {
    json!({"pid": p.pid(), "used_memory_mib": mib, "sm_util": sm})
}

#[test]
fn keda_sees_per_pod_values_through_agent_and_collector() {
    if let Some(why) = privileged() {
        eprintln!("skipped: keda_sees_per_pod_values_through_agent_and_collector: {why}");
        return;
    }
    let dir = Scratch::new("cluster");
    // Pod A has GPU 0 alone; pods B and C share GPU 1 (30 % and 10 % of its SMs).
    let a = PodProcess::start(UID_A, &"a".repeat(64));
    let b = PodProcess::start(UID_B, &"b".repeat(64));
    let c = PodProcess::start(UID_C, &"c".repeat(64));
    let scenario = dir.path("scenario.json");
    let gpus = |a_sm: u32| {
        let mut g0 = gpu(0);
        g0["sm_active"] = json!(a_sm);
        g0["processes"] = json!([proc_json(&a, 18000, a_sm)]);
        let mut g1 = gpu(1);
        g1["sm_active"] = json!(40);
        g1["processes"] = json!([proc_json(&b, 9000, 30), proc_json(&c, 3000, 10)]);
        vec![g0, g1]
    };
    write_scenario(&scenario, &gpus(30));
    let pods = dir.path("pods.json");
    std::fs::write(
        &pods,
        json!({"apiVersion": "v1", "kind": "List", "items": [
            pod_item("vllm-5d9c7f-aaaaa", UID_A, "vllm"),
            pod_item("vllm-5d9c7f-bbbbb", UID_B, "vllm"),
            pod_item("other-5d9c7f-ccccc", UID_C, "other")]})
        .to_string(),
    )
    .unwrap();

    let agent_addr = format!("127.0.0.1:{}", free_port());
    let mut agent = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &["--listen", &agent_addr],
    );
    // The agent's own dump attributes the real processes to their pods through procfs.
    let d = agent
        .wait_dump(WAIT, |d| {
            d["gpus"][1]["processes"][0]["pod_uid"] == UID_B
                && d["gpus"][1]["processes"][0]["sm_util"] == 30.0
        })
        .unwrap();
    let p = &d["gpus"][0]["processes"][0];
    assert_eq!(p["pod_uid"], UID_A);
    assert_eq!(p["container_id"], "a".repeat(64));
    assert_eq!(p["attribution"], "procfs");

    let mut collector = Collector::start(&dir, &agent_addr, &pods);
    let collector_addr = collector.addr.clone();
    let mut keda = Keda::connect(&collector_addr);

    // GetMetricSpec: the metric name and targetValue, both fields.
    let so = scaled_object(
        "vllm",
        &[
            ("metric", "sm_active"),
            ("podSelector", "app=vllm"),
            ("targetValue", "80"),
            ("timeAggregation", "last"),
            ("staleAfter", "2s"),
        ],
    );
    let (name, target, target_int) = keda.metric_spec(&so).unwrap();
    assert_eq!((target, target_int), (80.0, 80));
    assert!(name.starts_with("gpuscale-sm-active"), "{name}");

    // GetMetrics: pod A has GPU 0 (30) + pod B's share of GPU 1 (40 × 30/40 = 30) = 60.
    let got = keda.wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == 60.0));
    assert_eq!(
        got.unwrap(),
        (60.0, 60),
        "collector log:\n{}",
        collector.daemon.log()
    );
    assert!(keda.is_active(&so).unwrap());
    // HPA with AverageValue: ceil(60 / 80) = 1 replica; more load asks for more.
    let quiet = scaled_object(
        "quiet",
        &[
            ("metric", "sm_active"),
            ("podSelector", "app=none"),
            ("targetValue", "80"),
        ],
    );
    assert_eq!(
        keda.metrics(&quiet, "q").unwrap(),
        (0.0, 0),
        "no pods match: 0"
    );
    assert!(!keda.is_active(&quiet).unwrap(), "no pods match: inactive");

    // StreamIsActive sends the current state at once, then the change.
    let hot = scaled_object(
        "hot",
        &[
            ("metric", "sm_active"),
            ("podSelector", "app in (vllm)"),
            ("targetValue", "80"),
            ("timeAggregation", "last"),
            ("activationThreshold", "100"),
        ],
    );
    let mut stream = keda.stream_is_active(&hot).unwrap();
    assert_eq!(keda.next_active(&mut stream, WAIT), Some(false));
    write_scenario(&scenario, &gpus(90));
    assert_eq!(keda.next_active(&mut stream, WAIT), Some(true));
    let (v, _) = keda
        .wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == 120.0))
        .unwrap();
    assert_eq!(v, 120.0);

    // Bad metadata: INVALID_ARGUMENT naming the key and the accepted values.
    let bad = scaled_object(
        "bad",
        &[
            ("metric", "gpu_utilization"),
            ("podSelector", "app=vllm"),
            ("targetValue", "80"),
        ],
    );
    let err = keda.metrics(&bad, "x").unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("metric") && err.message().contains("sm_active"),
        "{err:?}"
    );
    let bad = scaled_object(
        "bad",
        &[
            ("metric", "sm_active"),
            ("podSelector", "app in vllm"),
            ("targetValue", "80"),
        ],
    );
    assert!(is_code(&keda.is_active(&bad), Code::InvalidArgument));

    // The collector's dump shows the pods with namespace/name, owner and attributed values.
    let dump = wait_json(
        WAIT,
        || {
            let out = std::process::Command::new(collector_bin())
                .args(["dump", "--json", "--collector", &collector_addr])
                .output()?;
            Ok(serde_json::from_slice(&out.stdout)?)
        },
        |d| d["pods"].as_array().is_some_and(|p| p.len() == 3),
    )
    .unwrap();
    let vllm_a = dump["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["uid"] == UID_A)
        .unwrap();
    assert_eq!(vllm_a["name"], "vllm-5d9c7f-aaaaa");
    assert_eq!(vllm_a["owner"], "Deployment/vllm");
    assert_eq!(vllm_a["gpus"][0]["attribution"], "procfs");
    assert_eq!(dump["nodes"][0]["node"], "e2e-node");
    assert_eq!(dump["nodes"][0]["connected"], true);

    // The agent dies: after staleAfter, UNAVAILABLE naming the node, never a silent 0.
    agent.daemon.kill();
    let got = keda.wait_metrics(&so, &name, WAIT, |r| is_code(r, Code::Unavailable));
    let err = got.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("e2e-node"), "{err:?}");
    assert!(is_code(&keda.is_active(&so), Code::Unavailable));
    // The collector itself keeps serving.
    collector.daemon.check_alive().unwrap();
    assert_eq!(keda.metrics(&quiet, "q").unwrap(), (0.0, 0));

    // The agent comes back on the same address: the collector reconnects on its own.
    let mut agent = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &["--listen", &agent_addr],
    );
    let got = keda.wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == 120.0));
    assert_eq!(got.unwrap().0, 120.0, "agent log:\n{}", agent.log());
    assert!(agent.terminate().success());
    assert!(
        collector.daemon.terminate().success(),
        "{}",
        collector.daemon.log()
    );
}
