//! End-to-end, in-cluster mode: the real `gpuscale-collector serve --kube` against a fake
//! Kubernetes API server on loopback (recorded-shape objects and watch streams, see
//! `e2e::kubeapi`), real agents on the fake NVML, and KEDA's gRPC calls. Needs no root: the
//! agents read the simulated pods' cgroups from a procfs tree the test writes (`--proc-root`).

use std::path::Path;
use std::time::Duration;

use e2e::keda::{scaled_object, Keda};
use e2e::kubeapi::FakeApi;
use e2e::{collector_bin, gpu, write_scenario, Agent, Collector, Scratch};
use serde_json::{json, Value};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);
const PODS: &str = "api/v1/pods";
const SLICES: &str = "apis/discovery.k8s.io/v1/endpointslices";
const SCALED: &str = "apis/keda.sh/v1alpha1/scaledobjects";
const DEPLOYMENTS: &str = "apis/apps/v1/deployments";
const UID_A: &str = "1a1a1a1a-1111-4222-8333-444444444444";
const UID_B: &str = "1b1b1b1b-1111-4222-8333-444444444444";
const PID_A: u32 = 4101;
const PID_B: u32 = 4102;

fn pod(name: &str, uid: &str, app: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "ml", "name": name, "uid": uid,
            "labels": {"app": app, "pod-template-hash": "5d9c7f"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "llm-5d9c7f", "uid": "0000", "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "server", "image": "vllm"}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "server", "ready": true,
            "restartCount": 0, "image": "vllm", "imageID": "",
            "containerID": format!("containerd://{}", "c".repeat(64))}]}})
}

fn slice(name: &str, port: u16) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "gpuscale-system", "name": name,
            "labels": {"kubernetes.io/service-name": "gpuscale-agent"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}]})
}

fn deployment(app: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"namespace": "ml", "name": "llm"},
        "spec": {"selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}}}}})
}

fn scaled(name: &str, target: &str) -> Value {
    json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"namespace": "ml", "name": name},
        "spec": {"scaleTargetRef": {"name": target}}})
}

/// The simulated pods' processes, as a procfs tree with kubelet-shaped cgroups.
fn write_proc(root: &Path) {
    for (pid, uid) in [(PID_A, UID_A), (PID_B, UID_B)] {
        e2e::fake_proc(root, pid, uid, &"c".repeat(64));
    }
}

/// An agent on node `node` whose one GPU runs process `pid` at `sm_active` %.
fn agent(dir: &Scratch, node: &str, index: usize, pid: u32, sm_active: u32) -> (Agent, u16) {
    let scenario = dir.path(&format!("{node}.json"));
    let mut g = gpu(index);
    g["sm_active"] = json!(sm_active);
    g["processes"] = json!([{"pid": pid, "used_memory_mib": 1000}]);
    write_scenario(&scenario, &[g]);
    let port = e2e::free_port();
    let listen = format!("127.0.0.1:{port}");
    let proc_root = dir.path("proc");
    let agent = Agent::start(
        dir,
        &scenario,
        &dir.path(&format!("{node}.ring")),
        &[
            "--node-name",
            node,
            "--listen",
            &listen,
            "--ebpf",
            "off",
            "--proc-root",
            proc_root.to_str().unwrap(),
            "--interval",
            "50ms",
        ],
    );
    (agent, port)
}

fn kube_collector(dir: &Scratch, api: &FakeApi, extra: &[&str]) -> Collector {
    let kubeconfig = dir.path("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    Collector::spawn(
        dir,
        &[&["--kube"], extra].concat(),
        &[("KUBECONFIG", kubeconfig.as_path())],
    )
}

/// Waits for GetMetrics to answer `want` (within 0.5).
fn wait_value(keda: &mut Keda, so: &proto::externalscaler::ScaledObjectRef, want: f64) {
    let got = keda.wait_metrics(so, "m", WAIT, |r| {
        r.as_ref().is_ok_and(|(v, _)| (v - want).abs() < 0.5)
    });
    assert!(
        got.as_ref().is_ok_and(|(v, _)| (v - want).abs() < 0.5),
        "wanted {want}, got {got:?}"
    );
}

#[test]
fn in_cluster_mode_follows_pods_agents_and_the_targets_selector() {
    let dir = Scratch::new("kube");
    write_proc(&dir.path("proc"));
    let (_agent_a, port_a) = agent(&dir, "node-a", 0, PID_A, 40);
    let (_agent_b, port_b) = agent(&dir, "node-b", 1, PID_B, 60);

    let api = FakeApi::start();
    api.apply(PODS, pod("llm-a", UID_A, "llm", "node-a"));
    api.apply(SLICES, slice("gpuscale-agent-a", port_a));
    api.apply(DEPLOYMENTS, deployment("llm"));
    api.apply(SCALED, scaled("llm", "llm"));
    let mut collector = kube_collector(
        &dir,
        &api,
        &["--agent-service", "gpuscale-system/gpuscale-agent"],
    );
    let mut keda = Keda::connect(&collector.addr);
    // No podSelector: the Deployment's selector (app=llm) is used.
    let so = scaled_object(
        "llm",
        &[
            ("metric", "sm_active"),
            ("timeAggregation", "last"),
            ("targetValue", "50"),
        ],
    );
    wait_value(&mut keda, &so, 40.0);

    // A pod appears, on a node whose agent joins the Service: both count.
    api.apply(SLICES, slice("gpuscale-agent-b", port_b));
    api.apply(PODS, pod("llm-b", UID_B, "llm", "node-b"));
    wait_value(&mut keda, &so, 100.0);
    let d = collector
        .wait_dump(WAIT, |d| {
            d["nodes"].as_array().is_some_and(|n| n.len() == 2)
        })
        .unwrap();
    let b = d["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["uid"] == UID_B)
        .cloned()
        .unwrap_or_default();
    assert_eq!(b["name"], "llm-b", "{d}");
    assert_eq!(b["owner"], "Deployment/llm", "{d}");

    // Its labels change: it leaves the selection.
    api.apply(PODS, pod("llm-b", UID_B, "other", "node-b"));
    wait_value(&mut keda, &so, 40.0);

    // The target's selector changes: the selection follows it.
    api.apply(DEPLOYMENTS, deployment("other"));
    wait_value(&mut keda, &so, 60.0);

    // An agent leaves the Service: the collector stops following it.
    api.delete(SLICES, "gpuscale-system", "gpuscale-agent-a");
    collector
        .wait_dump(WAIT, |d| {
            d["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 1 && n[0]["node"] == "node-b")
        })
        .unwrap();

    // The pod disappears: nothing matches, 0 and inactive.
    api.delete(PODS, "ml", "llm-b");
    wait_value(&mut keda, &so, 0.0);
    assert!(!keda.is_active(&so).unwrap());

    // A watch whose history was compacted (410 Gone) re-lists, and so learns what it missed.
    api.apply(PODS, pod("llm-b", UID_B, "other", "node-b"));
    wait_value(&mut keda, &so, 60.0);
    api.delete_silently(PODS, "ml", "llm-b");
    api.expire(PODS);
    wait_value(&mut keda, &so, 0.0);
    let relists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch=true"))
        .count();
    assert!(
        relists >= 2,
        "the pods were listed again after the 410: {relists}"
    );
    assert!(
        collector.daemon.terminate().success(),
        "{}",
        collector.daemon.log()
    );
}

#[test]
fn in_cluster_errors_name_what_is_wrong_and_the_collector_keeps_serving() {
    let dir = Scratch::new("kube-errors");
    write_proc(&dir.path("proc"));
    let (_agent_a, port_a) = agent(&dir, "node-a", 0, PID_A, 40);
    let api = FakeApi::start();
    api.apply(PODS, pod("llm-a", UID_A, "llm", "node-a"));
    api.apply(SCALED, scaled("orphan", "no-such-deployment"));
    api.forbid(DEPLOYMENTS);
    let agents = format!("127.0.0.1:{port_a}");
    let collector = kube_collector(&dir, &api, &["--agents", &agents]);
    let mut keda = Keda::connect(&collector.addr);
    let meta = [
        ("metric", "sm_active"),
        ("timeAggregation", "last"),
        ("targetValue", "50"),
    ];

    // With podSelector, everything works although RBAC forbids Deployments.
    let mut with_selector = meta.to_vec();
    with_selector.push(("podSelector", "app=llm"));
    let selected = scaled_object("selected", &with_selector);
    wait_value(&mut keda, &selected, 40.0);

    // A ScaledObject that does not exist.
    let missing = keda.metrics(&scaled_object("nope", &meta), "m");
    let e = missing.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("ScaledObject ml/nope does not exist"),
        "{e:?}"
    );

    // Its target's kind is forbidden: UNAVAILABLE naming the verb and the resource to grant.
    let got = keda.wait_metrics(&scaled_object("orphan", &meta), "m", WAIT, |r| {
        r.as_ref()
            .is_err_and(|s| s.message().contains("forbidden by RBAC"))
    });
    let e = got.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("list deployments.apps"),
        "names verb and resource: {e:?}"
    );
    assert!(
        collector.daemon.log().contains("forbidden by RBAC"),
        "{}",
        collector.daemon.log()
    );
}

#[test]
fn kube_mode_without_a_cluster_fails_at_start_saying_so() {
    let dir = Scratch::new("kube-none");
    let out = std::process::Command::new(collector_bin())
        .args([
            "serve",
            "--kube",
            "--agents",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", dir.path("missing-kubeconfig"))
        .env("HOME", &dir.0)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no Kubernetes API"), "{err}");
    assert!(err.contains("KUBECONFIG"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // --agent-service needs --kube.
    let out = std::process::Command::new(collector_bin())
        .args(["serve", "--agent-service", "gpuscale-system/gpuscale-agent"])
        .arg("--pods-file")
        .arg(dir.path("pods.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("--kube"), "{err}");
}
