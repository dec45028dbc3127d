//! End-to-end: the streaming readers `cargo xtask gpu-check` times load steps with:
//! `gpuscale-agent watch` (every new sample of the ring, as it is written) and
//! `gpuscale-collector query --watch` (KEDA's calls, repeated, with arrival times).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::{
    agent_bin, collector_bin, free_port, gpu, last, write_scenario, Agent, Collector, Scratch,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect()
}

#[test]
fn watch_prints_each_new_sample_once_with_its_time_and_sees_a_load_step() {
    let dir = Scratch::new("watch-step");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let mut a = Agent::start(&dir, &scenario, &dir.path("agent.ring"), &[]);
    a.wait_dump(WAIT, |d| last(d, 0, "gpu_util") == Some(37.0))
        .unwrap();

    let mut watch = Command::new(agent_bin())
        .args(["watch", "--json", "--count", "40", "--shm"])
        .arg(&a.shm)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(watch.stdout.take().unwrap());
    let mut got = Vec::new();
    let mut line = String::new();
    // A few samples at the old load, then the step.
    while got.len() < 5 {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "watch ended early");
        got.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    let mut g = gpu(0);
    g["gpu_util"] = json!(80);
    write_scenario(&scenario, &[g]);
    let stepped = unix_now_ns();
    for l in out.lines() {
        got.push(serde_json::from_str(&l.unwrap()).unwrap());
    }
    assert!(watch.wait().unwrap().success());

    assert_eq!(got.len(), 40, "--count 40 prints 40 samples");
    for w in got.windows(2) {
        assert_eq!(
            w[1]["seq"],
            w[0]["seq"].as_u64().unwrap() + 1,
            "each sample once, in order"
        );
        assert!(w[1]["ts_ns"].as_u64() > w[0]["ts_ns"].as_u64());
    }
    for s in &got {
        assert_eq!(s["gpu"], 0);
        assert_eq!(s["state"], "ok");
        assert!(s["seen_ns"].as_u64() >= s["ts_ns"].as_u64(), "{s}");
        assert_eq!(s["metrics"]["power_watts"], 350.0);
        assert_eq!(s["metrics"]["vram_used_bytes"], 20000.0 * 1048576.0);
    }
    assert_eq!(got[0]["metrics"]["gpu_util"], 37.0);
    let first_80 = got
        .iter()
        .find(|s| s["metrics"]["gpu_util"] == 80.0)
        .expect("the step shows in the stream");
    assert!(first_80["ts_ns"].as_u64().unwrap() >= stepped, "{first_80}");
    assert!(got.last().unwrap()["metrics"]["gpu_util"] == 80.0);
}

#[test]
fn watch_follows_one_gpu_and_refuses_an_unknown_one_naming_those_it_has() {
    let dir = Scratch::new("watch-gpu");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0), gpu(1)]);
    let mut a = Agent::start(&dir, &scenario, &dir.path("agent.ring"), &[]);
    a.wait_dump(WAIT, |d| last(d, 1, "gpu_util").is_some())
        .unwrap();

    let one = Command::new(agent_bin())
        .args(["watch", "--json", "--gpu", "1", "--count", "6", "--shm"])
        .arg(&a.shm)
        .output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let got = lines(&one.stdout);
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|s| s["gpu"] == 1), "{got:?}");

    let both = Command::new(agent_bin())
        .args(["watch", "--count", "8", "--shm"])
        .arg(&a.shm)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&both.stdout);
    assert!(text.lines().any(|l| l.starts_with("gpu 0 #")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("gpu 1 #")), "{text}");
    assert!(text.contains("gpu_util 37.0"), "{text}");

    let bad = Command::new(agent_bin())
        .args(["watch", "--gpu", "7", "--shm"])
        .arg(&a.shm)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--gpu 7") && err.contains("(it has: 0, 1)"),
        "{err}"
    );
}

#[test]
fn watch_of_a_missing_ring_names_the_file_and_the_fix() {
    let dir = Scratch::new("watch-missing");
    let out = Command::new(agent_bin())
        .args(["watch", "--shm"])
        .arg(dir.path("nope.ring"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.ring") && err.contains("is the agent running"),
        "{err}"
    );
}

#[test]
fn query_watch_asks_again_and_again_stamping_each_answer() {
    let dir = Scratch::new("query-watch");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let _a = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &["--listen", &agent_addr],
    );
    let pods = dir.path("pods.json");
    std::fs::write(&pods, r#"{"apiVersion":"v1","kind":"List","items":[]}"#).unwrap();
    let c = Collector::start(&dir, &agent_addr, &pods);
    let query = |extra: &[&str]| {
        Command::new(collector_bin())
            .args(["query", "--collector", &c.addr, "--namespace", "ml"])
            .args([
                "--meta",
                "metric=gpu_util",
                "--meta",
                "podSelector=app=none",
            ])
            .args(["--meta", "targetValue=50"])
            .args(extra)
            .output()
            .unwrap()
    };
    // The collector may still be starting: wait until a plain query gets through.
    let deadline = std::time::Instant::now() + WAIT;
    while !query(&["--json"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the collector never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = query(&["--json", "--watch", "20ms", "--count", "5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = lines(&out.stdout);
    assert_eq!(got.len(), 5, "--count 5 prints 5 answers");
    for w in got.windows(2) {
        assert!(w[1]["ts_ns"].as_u64() > w[0]["ts_ns"].as_u64(), "{got:?}");
    }
    for v in &got {
        // No pod matches: 0, and not active (scale to zero).
        assert_eq!(v["value"], 0.0, "{v}");
        assert_eq!(v["active"], false, "{v}");
        assert_eq!(v["metric_name"], "gpuscale-gpu-util-avg-30s-sum", "{v}");
    }

    let text = query(&["--watch", "20ms", "--count", "2"]);
    assert_eq!(
        String::from_utf8_lossy(&text.stdout)
            .matches("GetMetrics 0.0")
            .count(),
        2
    );
    let bad = query(&["--watch", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("like 50ms or 1s"));
    let orphan = query(&["--count", "3"]);
    assert_eq!(orphan.status.code(), Some(2), "--count needs --watch");
}

#[test]
fn watch_follows_a_restarted_agent_into_its_new_ring_file() {
    let dir = Scratch::new("watch-restart");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let shm = dir.path("agent.ring");
    let mut a = Agent::start(&dir, &scenario, &shm, &["--interval", "100ms"]);
    a.wait_dump(WAIT, |d| last(d, 0, "gpu_util").is_some())
        .unwrap();
    let mut watch = Command::new(agent_bin())
        .args(["watch", "--json", "--count", "15", "--shm"])
        .arg(&shm)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(watch.stdout.take().unwrap());
    let mut got: Vec<Value> = Vec::new();
    let mut line = String::new();
    while got.len() < 5 {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "watch ended early");
        got.push(serde_json::from_str(&line).unwrap());
    }
    // Another interval means another layout: the new agent renames a new file over the old one.
    assert!(a.terminate().success());
    let mut g = gpu(0);
    g["gpu_util"] = json!(64);
    write_scenario(&scenario, &[g]);
    let _b = Agent::start(&dir, &scenario, &shm, &["--interval", "50ms"]);
    for l in out.lines() {
        got.push(serde_json::from_str(&l.unwrap()).unwrap());
    }
    assert!(watch.wait().unwrap().success());
    assert_eq!(got.len(), 15);
    let after: Vec<&Value> = got
        .iter()
        .filter(|s| s["metrics"]["gpu_util"] == 64.0)
        .collect();
    // Only the new agent (the old one is stopped) writes 64 %.
    assert!(!after.is_empty(), "no sample of the new agent: {got:?}");
}
