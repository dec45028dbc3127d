//! End-to-end: the real `gpuscale-agent`'s stream of changes (agent API revision 3,
//! `WatchRequest.interest`), read as the collector reads it: the series asked for and nothing
//! else, then heartbeats while nothing changes, then the change itself within a few intervals.

use std::time::{Duration, Instant};

use e2e::{free_port, gpu, write_scenario, Agent, Scratch};
use proto::agent::agent_client::AgentClient;
use proto::agent::{Interest, Metric, NodeSnapshot, Series, WatchRequest};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// The last `gpu_util` of the first GPU in `s`, and how many metrics its entry carries.
fn gpu_util(s: &NodeSnapshot) -> (Option<f64>, usize) {
    s.gpus.first().map_or((None, 0), |g| {
        let util = g
            .metrics
            .iter()
            .find(|m| m.metric == Metric::GpuUtil as i32)
            .and_then(|m| m.last);
        (util, g.metrics.len())
    })
}

/// The stream's next message.
async fn next(stream: &mut tonic::Streaming<NodeSnapshot>) -> NodeSnapshot {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message within 30 s")
        .expect("the stream stays open")
        .expect("the stream stays open")
}

#[test]
fn a_stream_of_changes_sends_the_series_asked_for_then_heartbeats_then_the_change() {
    let dir = Scratch::new("stream");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut agent = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &["--listen", &addr, "--ebpf", "off"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + WAIT;
        let mut client = loop {
            match AgentClient::connect(format!("http://{addr}")).await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no agent API at {addr}: {e}\n{}", agent.log()),
            }
        };
        let request = WatchRequest {
            min_interval_ms: 0,
            interest: Some(Interest {
                series: vec![Series {
                    metric: Metric::GpuUtil as i32,
                    window_s: 0,
                }],
                changes_only: true,
            }),
        };
        let mut stream = client.watch_snapshots(request).await.unwrap().into_inner();

        // The first message is whole; the state builds up until the GPU reports.
        let first = next(&mut stream).await;
        assert!(!first.delta, "the first message of a stream is whole");
        assert_eq!(first.api_version, 3);
        let mut state = first;
        while gpu_util(&state).0 != Some(37.0) {
            proto::delta::apply(&mut state, next(&mut stream).await);
        }
        assert_eq!(
            gpu_util(&state).1,
            1,
            "only gpu_util is sent: {:?}",
            state.gpus[0].metrics
        );
        assert!(
            state.gpus[0].metrics[0].windows.is_empty(),
            "no windows were asked for"
        );

        // Nothing changes (only the sample times): heartbeats, the header alone.
        let mut taken = state.taken_unix_ns;
        for _ in 0..5 {
            let m = next(&mut stream).await;
            assert!(proto::delta::is_heartbeat(&m), "a heartbeat: {m:?}");
            assert!(m.taken_unix_ns > taken, "each heartbeat is newer");
            assert!(
                prost::Message::encoded_len(&m) < 200,
                "a heartbeat is small: {} bytes",
                prost::Message::encoded_len(&m)
            );
            taken = m.taken_unix_ns;
            proto::delta::apply(&mut state, m);
        }

        // The load steps: a delta carries the GPU's new value within a few intervals.
        let mut stepped = gpu(0);
        stepped["gpu_util"] = json!(91);
        write_scenario(&scenario, &[stepped]);
        let mut messages = 0;
        while gpu_util(&state).0 != Some(91.0) {
            let m = next(&mut stream).await;
            assert!(m.delta, "every later message is a delta");
            messages += 1;
            assert!(messages < 50, "the step never arrived");
            proto::delta::apply(&mut state, m);
        }
        assert_eq!(gpu_util(&state).1, 1);
    });
    assert!(agent.terminate().success());
}
