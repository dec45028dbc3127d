//! End-to-end: the real `gpuscale-agent`'s stream of changes (agent API revision 4,
//! `WatchRequest.interest`), read as the collector reads it: the series asked for and nothing
//! else, then heartbeats (at the pace asked for) while nothing changes, then the change itself
//! within a few intervals. And the real collector over it: its streams carry only what its
//! triggers read, and a trigger that reads something new is answered exactly from its first
//! call.

use std::time::{Duration, Instant};

use e2e::keda::{scaled_object, Keda};
use e2e::{free_port, gpu, write_scenario, Agent, Collector, Scratch};
use proto::agent::agent_client::AgentClient;
use proto::agent::{Interest, Metric, NodeSnapshot, Series, WatchRequest};
use serde_json::{json, Value};

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
                heartbeat_ms: 0,
            }),
        };
        let mut stream = client
            .watch_snapshots(request.clone())
            .await
            .unwrap()
            .into_inner();

        // The first message is whole; the state builds up until the GPU reports.
        let first = next(&mut stream).await;
        assert!(!first.delta, "the first message of a stream is whole");
        assert_eq!(first.api_version, 4);
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

        // Heartbeats at a pace of 500 ms: never closer than that on the agent's clock (its
        // samples come every 100 ms), while a change still goes out at once (above).
        let mut paced = request;
        paced.interest.as_mut().unwrap().heartbeat_ms = 500;
        let mut stream = client
            .watch_snapshots(paced.clone())
            .await
            .unwrap()
            .into_inner();
        let mut taken = next(&mut stream).await.taken_unix_ns;
        for _ in 0..4 {
            let m = next(&mut stream).await;
            assert!(proto::delta::is_heartbeat(&m), "nothing changed: {m:?}");
            let gap_ms = (m.taken_unix_ns - taken) / 1_000_000;
            assert!(gap_ms >= 500, "heartbeats {gap_ms} ms apart, asked for 500");
            taken = m.taken_unix_ns;
        }
        drop(stream);

        // Paced by min_interval_ms too (as the collector asks while no activation is watched):
        // one message per turn, changes included, each a heartbeat when nothing changed; a
        // step of the load arrives at a turn.
        let mut turns = paced;
        turns.min_interval_ms = 500;
        let mut stream = client.watch_snapshots(turns).await.unwrap().into_inner();
        let mut state = next(&mut stream).await;
        assert_eq!(gpu_util(&state).0, Some(91.0));
        // The first turn joins the agent's grid of turns (half a pace to a pace and a half
        // after the whole state); from it, turns 500 ms apart, each reading the newest sample
        // (which another stream open to this agent may have read already, up to an interval
        // before the turn).
        let mut taken = next(&mut stream).await.taken_unix_ns;
        let turn = |m: &NodeSnapshot, taken: &mut u64| {
            let gap_ms = (m.taken_unix_ns - *taken) / 1_000_000;
            assert!(gap_ms >= 400, "messages {gap_ms} ms apart, asked for 500");
            *taken = m.taken_unix_ns;
        };
        for _ in 0..3 {
            let m = next(&mut stream).await;
            assert!(proto::delta::is_heartbeat(&m), "nothing changed: {m:?}");
            turn(&m, &mut taken);
        }
        let mut stepped = gpu(0);
        stepped["gpu_util"] = json!(55);
        write_scenario(&scenario, &[stepped]);
        let mut messages = 0;
        while gpu_util(&state).0 != Some(55.0) {
            let m = next(&mut stream).await;
            turn(&m, &mut taken);
            messages += 1;
            assert!(messages < 20, "the step never arrived");
            proto::delta::apply(&mut state, m);
        }
    });
    assert!(agent.terminate().success());
}

const UID: &str = "5eaa5eaa-1111-4222-8333-444444444444";

#[test]
fn the_collector_streams_what_its_triggers_read_and_a_new_trigger_is_exact_at_its_first_call() {
    let dir = Scratch::new("stream-collector");
    let (mut agent, addr) = Agent::one_gpu_pod(&dir, UID, &[]);
    let pods = dir.path("pods.json");
    e2e::write_pods(
        &pods,
        &[e2e::pod_item("ml", "llm-0", UID, json!({"app": "llm"}))],
    );
    let mut collector = Collector::start(&dir, &addr, &pods);
    let metrics = |d: &Value| d["pods"][0]["gpus"][0]["metrics"].clone();

    // No trigger yet: each metric's last value, no window. (GPM's, such as tensor_active, come
    // from the second GPM sample on.)
    let d = collector
        .wait_dump(WAIT, |d| {
            metrics(d)["gpu_util"]["last"] == 37.0 && metrics(d)["tensor_active"]["last"] == 25.0
        })
        .unwrap();
    let windows = |d: &Value, metric: &str| -> Vec<String> {
        metrics(d)[metric]["windows"]
            .as_object()
            .map(|w| w.keys().cloned().collect())
            .unwrap_or_default()
    };
    for m in ["sm_active", "gpu_util", "power_watts", "tensor_active"] {
        assert!(windows(&d, m).is_empty(), "{m}: {d}");
    }
    assert_eq!(d["streamed"]["heartbeat_ms"], 500, "{d}");
    assert_eq!(d["streamed"]["every_sample"], false, "{d}");

    // A trigger's first call, before any other: GetMetrics answers the exact value of a window
    // no stream carried (the collector asks its agent and waits for it), never UNAVAILABLE.
    let mut keda = Keda::connect(&collector.addr);
    let tensor = scaled_object(
        "tensor",
        &[
            ("metric", "tensor_active"),
            ("window", "1m"),
            ("podSelector", "app=llm"),
            ("targetValue", "50"),
            ("aggregation", "sum"),
        ],
    );
    let got = keda.metrics(&tensor, "gpuscale-tensor-active-avg-1m-sum");
    match got {
        Ok((v, _)) => assert_eq!(v, 25.0),
        Err(e) => panic!("{e:?}\n{}", collector.daemon.log()),
    }
    // And IsActive likewise, for another.
    let power = scaled_object(
        "power",
        &[
            ("metric", "power_watts"),
            ("window", "5m"),
            ("timeAggregation", "max"),
            ("podSelector", "app=llm"),
            ("targetValue", "1000"),
            ("activationThreshold", "300"),
            ("staleAfter", "800ms"),
        ],
    );
    match keda.is_active(&power) {
        Ok(active) => assert!(active, "350 W > 300"),
        Err(e) => panic!("{e:?}\n{}", collector.daemon.log()),
    }

    // The streams now carry those windows and no other; the heartbeat follows the smallest
    // staleAfter (800 ms / 4).
    let d = collector
        .wait_dump(WAIT, |d| d["streamed"]["heartbeat_ms"] == 200)
        .unwrap();
    assert_eq!(windows(&d, "tensor_active"), ["60s"], "{d}");
    assert_eq!(windows(&d, "power_watts"), ["5m"], "{d}");
    assert!(windows(&d, "sm_active").is_empty(), "{d}");
    assert!(windows(&d, "gpu_util").is_empty(), "{d}");
    assert_eq!(
        d["streamed"]["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| !s.as_str().unwrap().ends_with(" last"))
            .collect::<Vec<_>>(),
        ["tensor_active 60s", "power_watts 5m"],
        "{d}"
    );
    assert_eq!(d["streamed"]["every_sample"], false, "{d}");

    // A StreamIsActive stream open: its activation must turn within two sample intervals, so
    // the streams send changes at every sample until it closes.
    let mut active = keda.stream_is_active(&power).unwrap();
    assert_eq!(keda.next_active(&mut active, WAIT), Some(true));
    collector
        .wait_dump(WAIT, |d| d["streamed"]["every_sample"] == true)
        .unwrap();
    drop(active);
    // (The client's runtime runs only inside a call: one call sends the stream's reset.)
    assert!(keda.is_active(&power).unwrap());
    collector
        .wait_dump(WAIT, |d| d["streamed"]["every_sample"] == false)
        .unwrap();
    assert!(collector.daemon.terminate().success());
    assert!(agent.terminate().success());
}

/// A collector that could not run for longer than its silence limit (stopped outright: on a
/// busy node, a CPU taken for seconds) has not heard its agents, but that proves nothing
/// about their links: once it runs again it reads on, on the same connections, and does not
/// dial its agents again (at 5,000 nodes, dialing them all again at once, each answering with
/// its whole state, kept it behind for the rest of the run). The stop is twice the limit, so
/// a stream judged by the clock alone is given up at once (it was: one reconnect).
#[test]
fn a_collector_that_could_not_run_past_its_silence_limit_keeps_its_streams() {
    let dir = Scratch::new("stream-stalled-collector");
    let (_agent, addr) = Agent::one_gpu_pod(&dir, UID, &[]);
    let pods = dir.path("pods.json");
    e2e::write_pods(
        &pods,
        &[e2e::pod_item("ml", "llm-0", UID, json!({"app": "llm"}))],
    );
    let mut collector = Collector::start(&dir, &addr, &pods);
    let node = |d: &Value| d["nodes"][0].clone();
    let d = collector
        .wait_dump(WAIT, |d| {
            node(d)["connected"] == true && node(d)["age_ms"].as_f64().is_some_and(|a| a < 1000.0)
        })
        .unwrap();
    // (Dialed before the agent listened, it may have tried more than once.)
    let reconnects = node(&d)["reconnects"].clone();
    // Paced streams: given up after 1.5 s of silence (three 500 ms paces).
    let stop = Duration::from_secs(3);
    e2e::signal(collector.daemon.pid(), libc::SIGSTOP);
    std::thread::sleep(stop);
    e2e::signal(collector.daemon.pid(), libc::SIGCONT);
    // Fresh data again, and for a while after: still the first connection.
    let resumed = Instant::now();
    collector
        .wait_dump(WAIT, |d| {
            node(d)["age_ms"].as_f64().is_some_and(|a| a < 1000.0)
        })
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let d = collector
        .wait_dump(WAIT, |d| {
            node(d)["age_ms"].as_f64().is_some_and(|a| a < 1000.0)
        })
        .unwrap();
    println!(
        "fresh again {:.2} s after SIGCONT; last_error {:?}",
        resumed.elapsed().as_secs_f64() - 2.0,
        node(&d)["last_error"]
    );
    assert_eq!(
        (
            node(&d)["connected"].clone(),
            node(&d)["reconnects"].clone()
        ),
        (json!(true), reconnects),
        "the collector dialed its agent again after its own stop: {d}\n{}",
        collector.daemon.log()
    );
}
