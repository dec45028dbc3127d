//! End-to-end, privileged: numbers that would mislead KEDA never reach it. A fake GPU whose NVML
//! reports a utilization of 2³²−1 % (what a broken driver or a counter wrap gives): the real
//! agent leaves it unmeasured and counts it, KEDA reads `UNAVAILABLE` (its `fallback` applies)
//! instead of 4,294,967,295 and never `IsActive` false, and the value comes back with NVML. (What
//! the collector does with a snapshot that still carries such a number, from an agent that does
//! not check, is `collector/src/sources/validate.rs`, with its tests.) Runs as root (CI does);
//! says why it skips otherwise.

use std::time::Duration;

use e2e::keda::{is_code, scaled_object, Keda};
use e2e::pod::{privileged, PodProcess};
use e2e::{free_port, gpu, wait_json, write_scenario, Agent, Collector, Scratch};
use serde_json::json;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);
const UID: &str = "0a0a0a0a-1111-4222-8333-444444444444";

#[test]
fn an_impossible_utilization_reads_unavailable_never_a_number() {
    if let Some(why) = privileged() {
        eprintln!("skipped: an_impossible_utilization_reads_unavailable_never_a_number: {why}");
        return;
    }
    let dir = Scratch::new("hostile");
    let pod = PodProcess::start(UID, &"a".repeat(64));
    let scenario = dir.path("scenario.json");
    let gpus = |util: u64| {
        let mut g = gpu(0);
        g["gpu_util"] = json!(util);
        g["processes"] = json!([{"pid": pod.pid(), "used_memory_mib": 18000, "sm_util": 30}]);
        vec![g]
    };
    write_scenario(&scenario, &gpus(37));
    let pods = dir.path("pods.json");
    e2e::write_pods(
        &pods,
        &[e2e::pod_item("ml", "llm-0", UID, json!({"app": "llm"}))],
    );
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let mut agent = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &["--listen", &agent_addr, "--http-listen", &http],
    );
    agent
        .wait_dump(WAIT, |d| d["gpus"][0]["processes"][0]["pod_uid"] == UID)
        .unwrap();
    let collector = Collector::start(&dir, &agent_addr, &pods);
    let mut keda = Keda::connect(&collector.addr);
    let so = scaled_object(
        "llm",
        &[
            ("metric", "gpu_util"),
            ("podSelector", "app=llm"),
            ("targetValue", "80"),
            ("timeAggregation", "last"),
        ],
    );
    let (name, _, _) = keda.metric_spec(&so).unwrap();
    let got = keda.wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == 37.0));
    assert_eq!(got.unwrap().0, 37.0, "{}", collector.daemon.log());

    // NVML now says 4,294,967,295 %.
    write_scenario(&scenario, &gpus(u64::from(u32::MAX)));
    let got = keda.wait_metrics(&so, &name, WAIT, |r| is_code(r, Code::Unavailable));
    let err = got.expect_err("UNAVAILABLE, never 4294967295");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("gpu_util of pod ml/llm-0")
            && err.message().contains("is not measured now"),
        "the reason names the pod and the metric: {err:?}"
    );
    assert!(
        is_code(&keda.is_active(&so), Code::Unavailable),
        "IsActive is not false (that would scale to zero)"
    );
    // The agent counts what it left out, and says so once.
    let metrics = wait_json(
        WAIT,
        || {
            Ok(serde_json::Value::String(
                e2e::http_get(&http, "/metrics")?.1,
            ))
        },
        |m| {
            m.as_str().is_some_and(|t| {
                t.lines().any(|l| {
                    l.starts_with("gpuscale_agent_nvml_out_of_range_total{") && !l.ends_with(" 0")
                })
            })
        },
    );
    assert!(metrics.is_ok(), "{metrics:?}");
    assert_eq!(
        agent
            .log()
            .matches("NVML reported a value gpu_util cannot have")
            .count(),
        1,
        "{}",
        agent.log()
    );

    // NVML recovers: so does the value.
    write_scenario(&scenario, &gpus(37));
    let got = keda.wait_metrics(&so, &name, WAIT, |r| matches!(r, Ok((v, _)) if *v == 37.0));
    assert_eq!(got.unwrap().0, 37.0);
    assert!(agent.terminate().success());
}
