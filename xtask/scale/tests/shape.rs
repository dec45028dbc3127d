//! The simulator's snapshots against a real agent's: the same GPUs and pods (two H100s, two
//! pods on each) on the fake NVML give snapshots of the same shape — the same fields set, the
//! same metrics with values or without, the same windows — and of nearly the same size, so
//! what `bench-scale` measures is what real agents would cost. Also: the simulator's encoding
//! trick decodes to exactly the snapshot it stands for, and its gRPC service streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{fake_proc, free_port, gpu, write_scenario, Agent, Scratch};
use gpuscale_scale::sim::{self, Shape};
use prost::Message;
use proto::agent::agent_client::AgentClient;
use proto::agent::{
    GpuSummary, MetricSummary, NodeSnapshot, PodSummary, ProcessUsage, SnapshotRequest,
    WatchRequest,
};
use serde_json::{json, Value};

const SHAPE: Shape = Shape {
    gpus: 2,
    pods_per_gpu: 2,
    interval: Duration::from_millis(100),
};

fn metrics_shape(ms: &[MetricSummary]) -> Value {
    ms.iter()
        .map(|m| {
            let windows: Vec<u32> = m.windows.iter().map(|w| w.window_s).collect();
            json!([m.metric, m.last.is_some(), windows])
        })
        .collect()
}

fn process_shape(p: &ProcessUsage) -> Value {
    json!({
        "pid": p.pid != 0,
        "used_memory_bytes": p.used_memory_bytes.is_some(),
        "sm_util": p.sm_util.is_some(),
        "pod_uid": !p.pod_uid.is_empty(),
        "container_id": !p.container_id.is_empty(),
        "attribution": p.attribution,
    })
}

fn gpu_shape(g: &GpuSummary) -> Value {
    json!({
        "uuid": !g.uuid.is_empty(),
        "name": g.name,
        "state": g.state,
        "gpm_supported": g.gpm_supported,
        "memory_total_bytes": g.memory_total_bytes,
        "newest_sample": g.newest_sample_unix_ns != 0,
        "parent_uuid": g.parent_uuid,
        "gpu_instance_id": g.gpu_instance_id,
        "mig_enabled": g.mig_enabled,
        "metrics": metrics_shape(&g.metrics),
        "processes": g.processes.iter().map(process_shape).collect::<Vec<_>>(),
    })
}

fn pod_shape(p: &PodSummary) -> Value {
    json!({
        "pod_uid": !p.pod_uid.is_empty(),
        "gpu_uuid": !p.gpu_uuid.is_empty(),
        "container_ids": p.container_ids.len(),
        "pids": p.pids.len(),
        "shared": p.shared,
        "newest_sample": p.newest_sample_unix_ns != 0,
        "metrics": metrics_shape(&p.metrics),
        "attribution": p.attribution,
    })
}

/// Everything about a snapshot but its names and numbers.
fn shape(s: &NodeSnapshot) -> Value {
    json!({
        "api_version": s.api_version,
        "node_name": !s.node_name.is_empty(),
        "agent_version": !s.agent_version.is_empty(),
        "driver_version": s.driver_version,
        "taken": s.taken_unix_ns != 0,
        "interval_ns": s.interval_ns,
        "gpus": s.gpus.iter().map(gpu_shape).collect::<Vec<_>>(),
        "pods": s.pods.iter().map(pod_shape).collect::<Vec<_>>(),
        "opens": s.opens.len(),
        "ebpf": s.ebpf,
        "ebpf_state": s.ebpf_state,
        "ebpf_detail": s.ebpf_detail,
    })
}

/// `shape` as one line per field and per array element, named by its path (readable diffs).
fn lines(v: &Value) -> Vec<String> {
    fn walk(path: String, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) if m.values().any(|v| v.is_object() || v.is_array()) => {
                for (k, v) in m {
                    walk(format!("{path}.{k}"), v, out);
                }
            }
            Value::Array(a) if a.iter().any(Value::is_object) => {
                for (i, v) in a.iter().enumerate() {
                    walk(format!("{path}[{i}]"), v, out);
                }
            }
            _ => out.push(format!("{path} = {v}")),
        }
    }
    let mut out = Vec::new();
    walk(String::new(), v, &mut out);
    out
}

/// A real agent on two fake H100s with two pods' processes on each; its snapshot once every
/// pod is attributed and every window has samples.
fn real_snapshot() -> NodeSnapshot {
    let dir = Scratch::new("scale-shape");
    let proc_root = dir.path("proc");
    let mut gpus = Vec::new();
    for g in 0..SHAPE.gpus {
        let mut v = gpu(g);
        v["processes"] = (0..SHAPE.pods_per_gpu)
            .map(|k| {
                let pod = g * SHAPE.pods_per_gpu + k;
                fake_proc(
                    &proc_root,
                    sim::pid(pod),
                    &sim::pod_uid(0, pod),
                    &sim::container_id(0, pod),
                );
                json!({"pid": sim::pid(pod), "used_memory_mib": 18432, "sm_util": 20})
            })
            .collect();
        gpus.push(v);
    }
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &gpus);
    let addr = format!("127.0.0.1:{}", free_port());
    let root = proc_root.to_string_lossy();
    let agent = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &[
            "--listen",
            &addr,
            "--proc-root",
            &root,
            "--interval",
            "100ms",
            "--ebpf",
            "off",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        let got = rt.block_on(async {
            let mut c = AgentClient::connect(format!("http://{addr}")).await.ok()?;
            c.get_snapshot(SnapshotRequest {}).await.ok()
        });
        if let Some(s) = got.map(|r| r.into_inner()) {
            // Complete: every pod attributed, with its share of the GPU (per-process
            // utilization is read less often than samples) in every window.
            let gpu_util = proto::agent::Metric::from(vocab::Metric::GpuUtil) as i32;
            let complete = s.pods.len() == SHAPE.pods()
                && s.pods.iter().all(|p| {
                    p.metrics
                        .iter()
                        .any(|m| m.metric == gpu_util && m.windows.len() == 4)
                })
                && s.gpus
                    .iter()
                    .all(|g| g.metrics.iter().all(|m| m.windows.len() == 4));
            if complete {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the real agent never reported {} attributed pods with full windows; last: {last:#?}\n{}",
        SHAPE.pods(),
        agent.log()
    );
}

#[test]
fn a_simulated_node_sends_what_a_real_agent_with_its_gpus_and_pods_sends() {
    let real = real_snapshot();
    let simulated = NodeSnapshot::decode(sim::Node::new(0, SHAPE).frame().0).unwrap();
    let (s, r) = (lines(&shape(&simulated)), lines(&shape(&real)));
    let differ: Vec<String> = s
        .iter()
        .zip(&r)
        .filter(|(s, r)| s != r)
        .map(|(s, r)| format!("simulated {s}\n     real {r}"))
        .collect();
    assert!(
        differ.is_empty() && s.len() == r.len(),
        "the simulated node differs from a real agent:\n{}",
        differ.join("\n")
    );
    // Same size within 10 %: what the simulator sends per node per second is what agents would.
    let (s, r) = (simulated.encoded_len() as f64, real.encoded_len() as f64);
    assert!(
        (s / r - 1.0).abs() < 0.10,
        "simulated snapshot {s} bytes, real {r} bytes"
    );
}

#[test]
fn the_encoded_frame_is_the_snapshot_with_its_times_and_a_change_of_value_shows_in_the_next() {
    let node = sim::Node::new(3, SHAPE);
    let first = NodeSnapshot::decode(node.frame().0).unwrap();
    let t = first.taken_unix_ns;
    assert!(t > 0);
    let values = vec![sim::DEFAULT_POD_GPU_UTIL; SHAPE.pods()];
    assert_eq!(first, sim::snapshot(3, &SHAPE, &values, 0, t, t));

    node.set_gpu_util(2, 77.5);
    let second = NodeSnapshot::decode(node.frame().0).unwrap();
    assert_eq!(second.seq, 1);
    assert!(second.taken_unix_ns >= t);
    let mut values = values;
    values[2] = 77.5;
    let t = second.taken_unix_ns;
    assert_eq!(second, sim::snapshot(3, &SHAPE, &values, 1, t, t));
}

#[test]
fn a_simulated_node_serves_the_agent_api() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let node = Arc::new(sim::Node::new(7, SHAPE));
        let sent = Arc::new(sim::Sent::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(sim::serve(
            listener,
            sim::AgentService::new(node, sent.clone()),
        ));
        let mut c = AgentClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let one = c
            .get_snapshot(SnapshotRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.node_name, sim::node_name(7));
        let mut stream = c
            .watch_snapshots(WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        let started = Instant::now();
        let mut seqs = Vec::new();
        for _ in 0..3 {
            seqs.push(stream.message().await.unwrap().unwrap().seq);
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // Three snapshots: one at once and two an interval apart.
        assert!(started.elapsed() >= SHAPE.interval);
        assert!(sent.snapshots.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    });
}
