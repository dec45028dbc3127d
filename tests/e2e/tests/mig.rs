//! End-to-end: a MIG-enabled H100 (fake NVML) with three MIG instances, each used by a process
//! of a different pod, through the real `gpuscale-agent` and `gpuscale-collector` and KEDA's
//! external-scaler gRPC API. The pods' processes live in a procfs tree the test writes
//! (`--proc-root`), so no root is needed.

use std::time::Duration;

use e2e::keda::{scaled_object, Keda};
use e2e::{agent_cmd, free_port, gpu, last, write_scenario, Agent, Collector, Scratch};
use serde_json::{json, Value};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);
const MIB: f64 = 1024.0 * 1024.0;
const PARENT: &str = "GPU-e2e00000-0000-4000-8000-000000000000";

/// One MIG instance and the pod whose process runs on it.
struct Slice {
    uuid: &'static str,
    gpu_instance_id: u32,
    /// MIG device index on the parent (slot 2 stays empty: indexes can be sparse).
    index: u32,
    memory_total_mib: u32,
    memory_used_mib: u32,
    pid: u32,
    pod: &'static str,
    uid: &'static str,
    app: &'static str,
}

const SLICES: [Slice; 3] = [
    Slice {
        uuid: "MIG-e2e0000a-0000-4000-8000-000000000001",
        gpu_instance_id: 1,
        index: 0,
        memory_total_mib: 40448,
        memory_used_mib: 20000,
        pid: 6101,
        pod: "llm-a-5d9c7f-aaaaa",
        uid: "0a0a0a0a-2222-4222-8333-444444444444",
        app: "llm-a",
    },
    Slice {
        uuid: "MIG-e2e0000b-0000-4000-8000-000000000002",
        gpu_instance_id: 5,
        index: 1,
        memory_total_mib: 20224,
        memory_used_mib: 8000,
        pid: 6102,
        pod: "llm-b-5d9c7f-bbbbb",
        uid: "0b0b0b0b-2222-4222-8333-444444444444",
        app: "llm-b",
    },
    Slice {
        uuid: "MIG-e2e0000c-0000-4000-8000-000000000003",
        gpu_instance_id: 13,
        index: 3,
        memory_total_mib: 10240,
        memory_used_mib: 3000,
        pid: 6103,
        pod: "llm-c-5d9c7f-ccccc",
        uid: "0c0c0c0c-2222-4222-8333-444444444444",
        app: "llm-c",
    },
];

/// The H100 in MIG mode, with each instance's `sm_active` from `sm`.
fn scenario(sm: [u32; 3]) -> Vec<Value> {
    let mut g = gpu(0);
    g["processes"] = json!([]);
    g["mig"] = json!({"instances": SLICES.iter().zip(sm).map(|(s, sm)| json!({
        "uuid": s.uuid, "gpu_instance_id": s.gpu_instance_id, "index": s.index,
        "name": "NVIDIA H100 80GB HBM3 MIG",
        "memory_total_mib": s.memory_total_mib, "memory_used_mib": s.memory_used_mib,
        "sm_active": sm, "sm_occupancy": 10, "tensor_active": 20, "dram_active": 5,
        "processes": [{"pid": s.pid, "used_memory_mib": s.memory_used_mib - 500}],
    })).collect::<Vec<_>>()});
    vec![g]
}

fn pods_file(dir: &Scratch) -> std::path::PathBuf {
    let items: Vec<Value> = SLICES
        .iter()
        .map(|s| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"namespace": "ml", "name": s.pod, "uid": s.uid,
                                "labels": {"app": s.app}},
                   "spec": {"nodeName": "e2e-node"}, "status": {"phase": "Running"}})
        })
        .collect();
    let path = dir.path("pods.json");
    std::fs::write(
        &path,
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )
    .unwrap();
    path
}

/// The dump entry (agent or collector) of the GPU with `uuid`.
fn by_uuid<'a>(gpus: &'a Value, uuid: &str) -> &'a Value {
    gpus.as_array()
        .and_then(|g| g.iter().find(|g| g["uuid"] == uuid))
        .unwrap_or_else(|| panic!("no GPU {uuid} in {gpus:#}"))
}

fn trigger(app: &str, metric: &str) -> proto::externalscaler::ScaledObjectRef {
    scaled_object(
        app,
        &[
            ("metric", metric),
            ("podSelector", &format!("app={app}")),
            ("timeAggregation", "last"),
            ("targetValue", "50"),
        ],
    )
}

#[test]
fn each_pod_on_a_mig_instance_scales_on_its_own_instance() {
    let dir = Scratch::new("mig");
    let proc_root = dir.path("proc");
    for s in &SLICES {
        e2e::fake_proc(&proc_root, s.pid, s.uid, &format!("{:064x}", s.pid));
    }
    let scenario_path = dir.path("scenario.json");
    write_scenario(&scenario_path, &scenario([40, 25, 70]));
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let mut agent = Agent::start(
        &dir,
        &scenario_path,
        &dir.path("agent.ring"),
        &[
            "--listen",
            &agent_addr,
            "--ebpf",
            "off",
            "--proc-root",
            proc_root.to_str().unwrap(),
        ],
    );

    // The agent samples the parent and each instance as a GPU of its own (GPM needs two samples
    // 100 ms apart before sm_active exists).
    let d = agent
        .wait_dump(WAIT, |d| {
            d["gpus"].as_array().is_some_and(|g| g.len() == 4)
                && (1..4).all(|i| {
                    last(d, i, "sm_active").is_some()
                        && d["gpus"][i]["processes"][0]["pod_uid"].is_string()
                })
        })
        .unwrap();
    let parent = &d["gpus"][0];
    assert_eq!(parent["uuid"], PARENT);
    assert_eq!(parent["mig_enabled"], true);
    assert_eq!(parent["parent"], Value::Null);
    assert_eq!(parent["state"], "ok");
    assert_eq!(
        last(&d, 0, "power_watts"),
        Some(350.0),
        "power is the GPU's"
    );
    assert_eq!(last(&d, 0, "temperature_c"), Some(60.0));
    assert_eq!(
        last(&d, 0, "gpu_util"),
        None,
        "NOT_SUPPORTED in MIG mode: absent"
    );
    assert_eq!(
        parent["processes"],
        json!([]),
        "processes are listed under the instances"
    );
    for (i, (s, sm)) in SLICES.iter().zip([40.0, 25.0, 70.0]).enumerate() {
        let g = &d["gpus"][i + 1];
        assert_eq!(g["uuid"], s.uuid);
        assert_eq!(g["parent"], PARENT);
        assert_eq!(g["gpu_instance_id"], s.gpu_instance_id);
        assert_eq!(g["mig_enabled"], false);
        assert_eq!(g["state"], "ok", "unsupported utilization is no error");
        assert_eq!(g["memory_total_bytes"], u64::from(s.memory_total_mib) << 20);
        assert_eq!(last(&d, i + 1, "sm_active"), Some(sm));
        assert_eq!(
            last(&d, i + 1, "vram_used_bytes"),
            Some(f64::from(s.memory_used_mib) * MIB)
        );
        for absent in ["gpu_util", "mem_util", "power_watts", "temperature_c"] {
            assert_eq!(last(&d, i + 1, absent), None, "{absent} of {}", s.uuid);
            assert_eq!(g["metrics"][absent]["windows"]["10s"], Value::Null);
        }
        let p = &g["processes"][0];
        assert_eq!(p["pid"], s.pid);
        assert_eq!(p["pod_uid"], s.uid);
        assert_eq!(p["attribution"], "procfs");
    }
    let table =
        String::from_utf8(agent_cmd(&["dump", "--shm", agent.shm.to_str().unwrap()]).stdout)
            .unwrap();
    assert!(
        table.contains(&format!("GPU 0  NVIDIA H100 80GB HBM3  {PARENT}")),
        "{table}"
    );
    assert!(table.contains("(MIG mode: 3 instance(s) below)"), "{table}");
    let mut at = table.find(PARENT).unwrap();
    for s in &SLICES {
        let line = format!(
            "\n    MIG instance GI {} of GPU 0  NVIDIA H100 80GB HBM3 MIG  {}",
            s.gpu_instance_id, s.uuid
        );
        let found = table[at..]
            .find(&line)
            .unwrap_or_else(|| panic!("{line:?} not under the parent, in order:\n{table}"));
        at += found + line.len();
    }

    let mut collector = Collector::start(&dir, &agent_addr, &pods_file(&dir));
    let mut keda = Keda::connect(&collector.addr);
    // Each pod gets its own instance's values: sm_active and (alone on it) the instance's VRAM.
    for (s, sm) in SLICES.iter().zip([40.0, 25.0, 70.0]) {
        let so = trigger(s.app, "sm_active");
        let got = keda.wait_metrics(&so, "m", WAIT, |r| matches!(r, Ok((v, _)) if *v == sm));
        assert_eq!(
            got.unwrap(),
            (sm, sm as i64),
            "{}; collector log:\n{}",
            s.pod,
            collector.daemon.log()
        );
        let vram = f64::from(s.memory_used_mib) * MIB;
        let so = trigger(s.app, "vram_used_bytes");
        assert_eq!(keda.metrics(&so, "v").unwrap().0, vram, "{}", s.pod);
    }
    // One instance's load steps; only its pod's value follows.
    write_scenario(&scenario_path, &scenario([40, 90, 70]));
    let got = keda.wait_metrics(
        &trigger("llm-b", "sm_active"),
        "m",
        WAIT,
        |r| matches!(r, Ok((v, _)) if *v == 90.0),
    );
    assert_eq!(got.unwrap().0, 90.0);
    assert_eq!(
        keda.metrics(&trigger("llm-a", "sm_active"), "m").unwrap().0,
        40.0
    );

    // gpu_util is not measured on a MIG instance: UNAVAILABLE naming the instance, never 0.
    let err = keda
        .metrics(&trigger("llm-c", "gpu_util"), "u")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(SLICES[2].uuid), "{err:?}");
    assert!(err.message().contains("gpu_util"), "{err:?}");

    // The collector's dump shows the three instances under their parent.
    let view = collector
        .wait_dump(WAIT, |v| {
            v["nodes"][0]["gpus"]
                .as_array()
                .is_some_and(|g| g.len() == 4)
                && v["pods"].as_array().is_some_and(|p| p.len() == 3)
        })
        .unwrap();
    let gpus = &view["nodes"][0]["gpus"];
    let parent = by_uuid(gpus, PARENT);
    assert_eq!(parent["mig_enabled"], true);
    assert_eq!(
        parent["mig_instances"],
        json!(SLICES.iter().map(|s| s.uuid).collect::<Vec<_>>())
    );
    for s in &SLICES {
        let g = by_uuid(gpus, s.uuid);
        assert_eq!(g["parent_uuid"], PARENT);
        assert_eq!(g["gpu_instance_id"], s.gpu_instance_id);
        let pod = view["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["uid"] == s.uid)
            .unwrap();
        assert_eq!(pod["name"], s.pod);
        assert_eq!(
            pod["gpus"][0]["gpu_uuid"], s.uuid,
            "the pod is on its instance"
        );
        assert_eq!(pod["gpus"].as_array().unwrap().len(), 1, "and only there");
    }

    assert!(agent.terminate().success());
    assert!(
        collector.daemon.terminate().success(),
        "{}",
        collector.daemon.log()
    );
}
