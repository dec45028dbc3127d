//! `gpuscale-scale` end to end, small: three simulated nodes, the real (debug) collector, a
//! few seconds. Every figure the issue asks for is in the JSON line and none is missing; every
//! ScaledObject was answered, every probe saw its change, and the agents' bytes match what
//! they sent. (How fast is for `cargo xtask bench-scale` and docs/BENCHMARKS.md: no time is
//! asserted here.)

use std::process::Command;

use serde_json::Value;

/// A small run with the collector's `--agent-stream` `mode`: its JSON line.
fn small_run(mode: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuscale-scale"))
        .arg("--collector")
        .arg(e2e::collector_bin())
        .args([
            "--nodes",
            "3",
            "--gpus-per-node",
            "2",
            "--pods-per-gpu",
            "2",
            "--scaled-objects",
            "6",
            "--duration",
            "4s",
            "--json",
            "--mode",
            mode,
        ])
        .output()
        .expect("running gpuscale-scale");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gpuscale-scale failed:\n{stderr}");
    let line = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    for key in [
        "nodes",
        "gpus",
        "pods",
        "scaled_objects",
        "collector_cpu_cores",
        "collector_rss_mib",
        "get_metrics_p50_us",
        "get_metrics_p99_us",
        "freshness_p99_ms",
        "activation_p99_ms",
        "bytes_per_node_per_s",
        "simulator_cpu_cores",
    ] {
        assert!(!r[key].is_null(), "{key} is missing: {r}\n{stderr}");
    }
    assert_eq!(
        (r["nodes"].as_u64(), r["gpus"].as_u64(), r["pods"].as_u64()),
        (Some(3), Some(6), Some(12))
    );
    assert_eq!(r["scaled_objects"], 6);
    assert_eq!(r["get_metrics_errors"], 0, "{r}");
    assert_eq!(r["freshness_missed"], 0, "{r}");
    assert_eq!(r["activation_missed"], 0, "{r}");
    assert!(r["freshness_probes"].as_u64() > Some(0), "{r}");
    assert!(r["collector_rss_mib"].as_u64() > Some(0), "{r}");
    assert!(r["bytes_per_node_per_s"].as_u64() > Some(0), "{r}");
    assert_eq!(r["mode"], mode);
    r
}

#[test]
fn a_small_run_reports_every_figure_with_nothing_missed_in_either_mode() {
    let full = small_run("full");
    let changes = small_run("changes");
    // Heartbeats while nothing changes: the agents send a fraction of the bytes, and the
    // probes above saw every change all the same.
    let bytes = |r: &Value| r["bytes_per_node_per_s"].as_u64().unwrap();
    assert!(
        bytes(&changes) * 2 < bytes(&full),
        "changes: {} bytes per node per s, full: {}",
        bytes(&changes),
        bytes(&full)
    );
}

#[test]
fn options_it_cannot_honour_are_refused_naming_the_flag() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gpuscale-scale"))
            .args(["--collector", "/nonexistent/gpuscale-collector"])
            .args(args)
            .output()
            .expect("running gpuscale-scale");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--nodes", "20000"]).contains("--nodes 20000"));
    assert!(run(&["--nodes", "1", "--scaled-objects", "1000"])
        .contains("--scaled-objects 1000 is more than the 16"));
    assert!(run(&["--gpus-per-node", "0"]).contains("--gpus-per-node 0"));
    assert!(run(&["--duration", "0s"]).contains("is zero"));
    assert!(run(&["--mode", "interest"]).contains("--mode"));
    assert!(run(&[]).contains("--collector /nonexistent/gpuscale-collector: no such file"));
}
