//! End-to-end: the real collector against an agent that lies. The "agent" is a gRPC server in
//! this test speaking the real agent API (`proto/agent.proto`), so it can send what no honest
//! agent sends: NaN, a value counted twice through a duplicate (pod, GPU) entry, infinity. KEDA
//! (the project's client of the external-scaler API) must read `UNAVAILABLE` naming the refusal,
//! never NaN, a doubled value or i64::MAX, and never `IsActive` false; the collector counts each
//! refused snapshot on `/metrics` and logs each reason once; a good snapshot brings the value
//! back. No privileges needed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::keda::{is_code, scaled_object, Keda};
use e2e::{free_port, http_get, wait_json, Collector, Scratch};
use proto::agent::agent_server::{Agent, AgentServer};
use proto::agent::{
    GpuState, GpuSummary, MetricSummary, NodeSnapshot, PodSummary, SnapshotRequest, WatchRequest,
};
use serde_json::json;
use tonic::{Code, Request, Response, Status};

const WAIT: Duration = Duration::from_secs(30);
const UID: &str = "0a0a0a0a-1111-4222-8333-444444444444";
const GPU: &str = "GPU-0a0a0a0a-0000-4000-8000-000000000000";
const INTERVAL: Duration = Duration::from_millis(100);

/// What the fake agent sends as `gpu_util` of the pod, and whether it lists the pod twice.
#[derive(Clone, Copy, Debug)]
struct Lie {
    value: f64,
    duplicate_pod: bool,
}

/// A snapshot of one GPU with one pod whose every `gpu_util` figure is `lie.value`, taken now.
fn snapshot(lie: Lie) -> NodeSnapshot {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let gpu_util = |v: f64| MetricSummary::steady(vocab::Metric::GpuUtil, v, |_| 10);

    let pod = PodSummary {
        pod_uid: UID.into(),
        gpu_uuid: GPU.into(),
        newest_sample_unix_ns: now,
        metrics: vec![gpu_util(lie.value)],
        ..PodSummary::default()
    };
    let mut pods = vec![pod.clone()];
    if lie.duplicate_pod {
        pods.push(pod);
    }
    NodeSnapshot {
        api_version: 2,
        node_name: e2e::NODE.into(),
        agent_version: "0.0.0-test".into(),
        taken_unix_ns: now,
        interval_ns: INTERVAL.as_nanos() as u64,
        gpus: vec![GpuSummary {
            uuid: GPU.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            state: GpuState::Ok as i32,
            memory_total_bytes: 80 << 30,
            newest_sample_unix_ns: now,
            metrics: vec![gpu_util(40.0)],
            ..GpuSummary::default()
        }],
        pods,
        ..NodeSnapshot::default()
    }
}

/// The lying agent: a snapshot of the current [`Lie`] every [`INTERVAL`].
struct Liar(Arc<Mutex<Lie>>);

type Snapshots = Pin<Box<dyn tokio_stream::Stream<Item = Result<NodeSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Liar {
    async fn get_snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<NodeSnapshot>, Status> {
        Ok(Response::new(snapshot(*self.0.lock().unwrap())))
    }

    type WatchSnapshotsStream = Snapshots;

    async fn watch_snapshots(
        &self,
        _: Request<WatchRequest>,
    ) -> Result<Response<Snapshots>, Status> {
        let lie = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let snap = snapshot(*lie.lock().unwrap());
                if tx.send(Ok(snap)).await.is_err() {
                    return;
                }
                tokio::time::sleep(INTERVAL).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Serves the lying agent on `addr` from a thread of its own for the rest of the test.
fn serve_liar(addr: &str, lie: Arc<Mutex<Lie>>) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(
                tonic::transport::Server::builder()
                    .add_service(AgentServer::new(Liar(lie)))
                    .serve(addr),
            )
            .unwrap();
    });
}

/// The collector's `gpuscale_collector_agent_snapshots_refused_total` for its one agent.
fn refused_total(http: &str) -> Option<f64> {
    let (_, page) = http_get(http, "/metrics").ok()?;
    page.lines()
        .find(|l| l.starts_with("gpuscale_collector_agent_snapshots_refused_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn snapshots_an_honest_agent_never_sends_read_unavailable_never_as_numbers() {
    let dir = Scratch::new("hostile-agent");
    let lie = Arc::new(Mutex::new(Lie {
        value: 37.0,
        duplicate_pod: false,
    }));
    let agent = format!("127.0.0.1:{}", free_port());
    serve_liar(&agent, lie.clone());
    let pods = dir.path("pods.json");
    e2e::write_pods(
        &pods,
        &[e2e::pod_item("ml", "llm-0", UID, json!({"app": "llm"}))],
    );
    let http = format!("127.0.0.1:{}", free_port());
    let pods_arg = pods.to_string_lossy();
    let collector = Collector::spawn(
        &dir,
        &[
            "--agents",
            &agent,
            "--pods-file",
            &pods_arg,
            "--http-listen",
            &http,
        ],
        &[],
    );
    let mut keda = Keda::connect(&collector.addr);
    let so = scaled_object(
        "llm",
        &[
            ("metric", "gpu_util"),
            ("podSelector", "app=llm"),
            ("targetValue", "80"),
            ("timeAggregation", "last"),
            ("aggregation", "sum"),
        ],
    );
    let (name, _, _) = keda.metric_spec(&so).unwrap();
    let value_is = |keda: &mut Keda, want: f64| {
        let got = keda.wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == want));
        assert!(
            matches!(got, Ok((v, _)) if v == want),
            "{want} expected, got {got:?}; collector log:\n{}",
            collector.daemon.log()
        );
    };
    value_is(&mut keda, 37.0);
    assert_eq!(refused_total(&http), Some(0.0));

    // Each lie: UNAVAILABLE naming the refusal (never NaN, 74 or i64::MAX), IsActive too (never
    // false, which would scale to zero), counted; then the truth again, and the value is back.
    let lies = [
        (f64::NAN, false, "not a finite number"),
        (37.0, true, "twice"),
        (f64::INFINITY, false, "not a finite number"),
    ];
    for (i, (value, duplicate_pod, why)) in lies.into_iter().enumerate() {
        *lie.lock().unwrap() = Lie {
            value,
            duplicate_pod,
        };
        let got = keda.wait_metrics(&so, &name, WAIT, |r| is_code(r, Code::Unavailable));
        let err = got.expect_err("UNAVAILABLE");
        assert_eq!(
            err.code(),
            Code::Unavailable,
            "{value} twice={duplicate_pod}: {err:?}"
        );
        assert!(
            err.message()
                .contains("sent a snapshot the collector refused")
                && err.message().contains(why),
            "{value} twice={duplicate_pod}: {err:?}"
        );
        assert!(
            is_code(&keda.is_active(&so), Code::Unavailable),
            "IsActive is UNAVAILABLE, not false"
        );
        let counted = wait_json(
            WAIT,
            || Ok(json!(refused_total(&http))),
            |v| v.as_f64().is_some_and(|n| n >= (i + 1) as f64),
        );
        assert!(counted.is_ok(), "the refusal is counted: {counted:?}");

        *lie.lock().unwrap() = Lie {
            value: 37.0,
            duplicate_pod: false,
        };
        value_is(&mut keda, 37.0);
    }
    // Ten snapshots a second were refused for each lie; the log says each reason once.
    let log = collector.daemon.log();
    let lines = log.matches("snapshot refused:").count();
    assert_eq!(lines, 3, "one line per lie:\n{log}");
}
