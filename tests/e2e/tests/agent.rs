//! End-to-end: the real `gpuscale-agent` binary sampling the fake NVML library, read back with
//! the real `dump` command (and the ring reader, for per-sample history).

use std::time::Duration;

use agent::ring::Read;
use agent::sample::Metric;
use agent::shm::ShmReader;
use e2e::{agent_cmd, dump_json, gpu, last, write_scenario, Agent, Scratch};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn dump_json_follows_the_documented_shape() {
    let dir = Scratch::new("shape");
    let scenario = dir.path("scenario.json");
    let mut g1 = gpu(1);
    g1["gpm"] = json!(false);
    g1["name"] = json!("NVIDIA A100-SXM4-80GB");
    write_scenario(&scenario, &[gpu(0), g1]);
    let mut a = Agent::start(&dir, &scenario, &dir.path("agent.ring"), &[]);
    // GPM needs two samples 100 ms apart before sm_active exists.
    let d = a
        .wait_dump(WAIT, |d| last(d, 0, "sm_active").is_some())
        .unwrap();

    assert_eq!(d["node"], "e2e-node");
    assert_eq!(d["driver_version"], "580.159.04");
    assert_eq!(d["agent_running"], true);
    let gpus = d["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    let g = &gpus[0];
    assert_eq!(g["index"], 0);
    assert_eq!(g["uuid"], "GPU-e2e00000-0000-4000-8000-000000000000");
    assert_eq!(g["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(g["state"], "ok");
    for m in Metric::ALL {
        let metric = &g["metrics"][m.name()];
        assert!(metric.get("last").is_some(), "{} has no last", m.name());
        for w in ["10s", "30s", "60s", "5m"] {
            let win = &metric["windows"][w];
            for k in ["avg", "min", "max", "p95", "count"] {
                assert!(win.get(k).is_some(), "{}.{w} lacks {k}: {win}", m.name());
            }
        }
    }
    assert_eq!(last(&d, 0, "gpu_util"), Some(37.0));
    assert_eq!(last(&d, 0, "mem_util"), Some(12.0));
    assert_eq!(last(&d, 0, "sm_active"), Some(30.0));
    assert_eq!(last(&d, 0, "tensor_active"), Some(25.0));
    assert_eq!(last(&d, 0, "power_watts"), Some(350.0));
    assert_eq!(last(&d, 0, "vram_used_bytes"), Some(20000.0 * 1048576.0));
    let pct = last(&d, 0, "vram_used_pct").unwrap();
    assert!((pct - 20000.0 / 81559.0 * 100.0).abs() < 1e-6, "{pct}");
    // PID 4242 exists only in the scenario, so its cgroup cannot be read: unknown, not a pod.
    assert_eq!(
        g["processes"],
        json!([{"pid": 4242, "used_memory_bytes": 18000u64 << 20, "sm_util": null,
                "pod_uid": null, "container_id": null, "attribution": "unknown"}])
    );
    // A GPU without GPM reports sm_active as unavailable, never 0.
    assert_eq!(gpus[1]["gpm_supported"], false);
    assert_eq!(gpus[1]["metrics"]["sm_active"]["last"], json!(null));
    assert_eq!(
        gpus[1]["metrics"]["sm_active"]["windows"]["10s"],
        json!(null)
    );
    assert_eq!(last(&d, 1, "gpu_util"), Some(37.0));

    let table =
        String::from_utf8(agent_cmd(&["dump", "--shm", a.shm.to_str().unwrap()]).stdout).unwrap();
    assert!(table.contains("GPU 0  NVIDIA H100 80GB HBM3"), "{table}");
    assert!(table.contains("pid 4242"), "{table}");
    assert!(
        a.terminate().success(),
        "SIGTERM must end the agent cleanly"
    );
    assert!(a.log().contains("SIGTERM"), "{}", a.log());
}

#[test]
fn scenario_rewrite_shows_in_the_ring_within_two_intervals() {
    let dir = Scratch::new("step");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let mut a = Agent::start(&dir, &scenario, &dir.path("agent.ring"), &[]);
    a.wait_dump(WAIT, |d| last(d, 0, "gpu_util") == Some(37.0))
        .unwrap();

    let mut stepped = gpu(0);
    stepped["gpu_util"] = json!(91);
    write_scenario(&scenario, &[stepped]);
    let step_ns = agent::unix_now_ns();
    let d = a
        .wait_dump(WAIT, |d| last(d, 0, "gpu_util") == Some(91.0))
        .unwrap();
    assert_eq!(
        d["gpus"][0]["metrics"]["gpu_util"]["windows"]["10s"]["max"],
        91.0
    );

    // Count the samples taken after the rewrite that still showed the old load: the one in
    // flight at the rewrite may; the next must not. So the change shows within two intervals.
    let reader = ShmReader::open(&a.shm).unwrap();
    let ring = reader.regions()[0].ring();
    let mut stale_after_step = 0;
    for pos in ring.head().saturating_sub(200)..ring.head() {
        if let Read::Record(s) = ring.read(pos) {
            if s.ts_ns > step_ns && s.get(Metric::GpuUtil, 0) == Some(37.0) {
                stale_after_step += 1;
            }
        }
    }
    assert!(
        stale_after_step <= 1,
        "{stale_after_step} samples after the rewrite still read the old load"
    );
}

#[test]
fn a_lost_gpu_leaves_the_others_sampling_and_comes_back() {
    let dir = Scratch::new("lost");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0), gpu(1), gpu(2)]);
    let mut a = Agent::start(&dir, &scenario, &dir.path("agent.ring"), &[]);
    a.wait_dump(WAIT, |d| d["gpus"][1]["state"] == "ok")
        .unwrap();

    let mut lost = gpu(1);
    lost["fail"] = json!("gpu_lost");
    write_scenario(&scenario, &[gpu(0), lost, gpu(2)]);
    let d = a
        .wait_dump(WAIT, |d| d["gpus"][1]["state"] == "lost")
        .unwrap();
    assert_eq!(
        last(&d, 1, "gpu_util"),
        None,
        "a lost GPU reads unavailable, not 0"
    );
    let before = d["gpus"][0]["samples_written"].as_u64().unwrap();
    // The healthy GPUs keep sampling while GPU 1 is lost.
    let d = a
        .wait_dump(WAIT, |d| {
            d["gpus"][0]["samples_written"].as_u64().unwrap() >= before + 10
                && d["gpus"][2]["state"] == "ok"
                && d["gpus"][1]["state"] == "lost"
        })
        .unwrap();
    assert_eq!(last(&d, 0, "gpu_util"), Some(37.0));
    assert_eq!(last(&d, 2, "gpu_util"), Some(37.0));
    assert!(a.log().contains("GPU is lost"), "{}", a.log());

    write_scenario(&scenario, &[gpu(0), gpu(1), gpu(2)]);
    a.wait_dump(WAIT, |d| {
        d["gpus"][1]["state"] == "ok" && last(d, 1, "gpu_util") == Some(37.0)
    })
    .unwrap();
}

#[test]
fn an_erroring_gpu_is_marked_error() {
    let dir = Scratch::new("error");
    let scenario = dir.path("scenario.json");
    let mut bad = gpu(0);
    bad["fail"] = json!("unknown");
    write_scenario(&scenario, &[bad, gpu(1)]);
    let mut a = Agent::start(&dir, &scenario, &dir.path("agent.ring"), &[]);
    let d = a
        .wait_dump(WAIT, |d| {
            d["gpus"][0]["state"] == "error" && d["gpus"][1]["state"] == "ok"
        })
        .unwrap();
    assert_eq!(last(&d, 0, "gpu_util"), None);
}

#[test]
fn a_restarted_agent_keeps_the_ring_history() {
    let dir = Scratch::new("restart");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let shm = dir.path("agent.ring");
    let mut a = Agent::start(&dir, &scenario, &shm, &[]);
    let d = a
        .wait_dump(WAIT, |d| {
            d["gpus"][0]["samples_written"].as_u64() >= Some(20)
        })
        .unwrap();
    let written = d["gpus"][0]["samples_written"].as_u64().unwrap();
    assert!(a.terminate().success());
    let d = dump_json(&shm).unwrap();
    assert_eq!(d["agent_running"], false, "dump must say the agent is gone");

    let mut b = Agent::start(&dir, &scenario, &shm, &[]);
    let d = b
        .wait_dump(WAIT, |d| {
            d["agent_running"] == true && d["gpus"][0]["samples_written"].as_u64() > Some(written)
        })
        .unwrap();
    let count = d["gpus"][0]["metrics"]["gpu_util"]["windows"]["5m"]["count"]
        .as_u64()
        .unwrap();
    assert!(
        count > written,
        "5m window lost the history: {count} <= {written}"
    );
    assert!(b.log().contains("windows rebuilt"), "{}", b.log());
}

#[test]
fn zero_gpus_run_and_report_zero() {
    let dir = Scratch::new("nogpu");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[]);
    let mut a = Agent::start(&dir, &scenario, &dir.path("agent.ring"), &[]);
    let d = a.wait_dump(WAIT, |d| d["agent_running"] == true).unwrap();
    assert_eq!(d["gpus"], json!([]));
    assert!(a.log().contains("zero GPUs"), "{}", a.log());
    assert!(a.terminate().success());
}

#[test]
fn a_second_agent_on_the_same_ring_is_refused() {
    let dir = Scratch::new("busy");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let shm = dir.path("agent.ring");
    let mut a = Agent::start(&dir, &scenario, &shm, &[]);
    a.wait_dump(WAIT, |d| d["agent_running"] == true).unwrap();
    let out = std::process::Command::new(e2e::agent_bin())
        .args(["run", "--nvml-lib"])
        .arg(e2e::fake_nvml())
        .arg("--shm")
        .arg(&shm)
        .env("FAKE_NVML_SCENARIO", &scenario)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another gpuscale agent is already writing"),
        "{err}"
    );
    // The first agent is untouched and still writing.
    let before = dump_json(&shm).unwrap()["gpus"][0]["samples_written"].as_u64();
    a.wait_dump(WAIT, |d| d["gpus"][0]["samples_written"].as_u64() > before)
        .unwrap();
}

#[test]
fn a_missing_nvml_library_fails_at_once_naming_the_flag() {
    let out = agent_cmd(&[
        "run",
        "--nvml-lib",
        "/nonexistent/libnvidia-ml.so.1",
        "--shm",
        "/tmp/gpuscale-never-created.ring",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/libnvidia-ml.so.1"), "{err}");
    assert!(err.contains("--nvml-lib"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The SIGBUS: the ring file truncated under a running agent. The agent notices, names
/// the file and what happened, and exits with status 1 (not killed by a signal); started again,
/// it writes a new file that `dump` reads.
#[test]
fn a_ring_file_truncated_under_the_agent_stops_it_with_an_error_not_a_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let dir = Scratch::new("truncated");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let shm = dir.path("agent.ring");
    let mut a = Agent::start(&dir, &scenario, &shm, &["--interval", "50ms"]);
    a.wait_dump(WAIT, |d| last(d, 0, "gpu_util").is_some())
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shm)
        .unwrap()
        .set_len(0)
        .unwrap();
    let status = a
        .daemon
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the agent kept running on a truncated file:\n{}", a.log()));
    assert_eq!(status.signal(), None, "{status:?}; log:\n{}", a.log());
    assert_eq!(status.code(), Some(1), "log:\n{}", a.log());
    let log = a.log();
    assert!(
        log.contains("was truncated") && log.contains("agent.ring") && log.contains("restart"),
        "{log}"
    );
    let mut again = Agent::start(&dir, &scenario, &shm, &["--interval", "50ms"]);
    again
        .wait_dump(WAIT, |d| last(d, 0, "gpu_util").is_some())
        .unwrap();
    assert!(again.terminate().success());
}

#[test]
fn an_unwritable_shm_path_fails_clearly() {
    let dir = Scratch::new("unwritable");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    // A path under a regular file can never be created, even by root.
    std::fs::write(dir.path("file"), b"x").unwrap();
    let out = std::process::Command::new(e2e::agent_bin())
        .args(["run", "--nvml-lib"])
        .arg(e2e::fake_nvml())
        .arg("--shm")
        .arg(dir.path("file/agent.ring"))
        .env("FAKE_NVML_SCENARIO", &scenario)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--shm"), "{err}");
    assert!(err.contains("file/agent.ring"), "{err}");
}

#[test]
fn bad_flag_values_are_refused_naming_the_flag() {
    for bad in ["5ms", "11s", "100", "1parsec"] {
        let out = agent_cmd(&["run", "--interval", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--interval"), "{bad}: {err}");
    }
}

#[test]
fn dump_of_a_missing_or_foreign_file_fails_clearly_without_panicking() {
    let dir = Scratch::new("dumpbad");
    let out = agent_cmd(&["dump", "--shm", dir.path("missing").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let junk = dir.path("junk");
    let bytes: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&junk, bytes).unwrap();
    let out = agent_cmd(&["dump", "--shm", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a gpuscale ring file"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn an_empty_or_overlong_device_prefix_is_refused_at_start() {
    let dir = Scratch::new("prefix");
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    let long = format!("/dev/{}", "n".repeat(40));
    for prefix in ["", long.as_str()] {
        let out = std::process::Command::new(e2e::agent_bin())
            .args([
                "run",
                "--ebpf",
                "auto",
                "--device-prefix",
                prefix,
                "--nvml-lib",
            ])
            .arg(e2e::fake_nvml())
            .arg("--shm")
            .arg(dir.path("agent.ring"))
            .env("FAKE_NVML_SCENARIO", &scenario)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{prefix:?}: {err}");
        assert!(err.contains("--device-prefix"), "{prefix:?}: {err}");
    }
}
