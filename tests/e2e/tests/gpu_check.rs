//! End-to-end: the gpu-check bundle (`cargo xtask gpu-check --bundle DIR`) as a user runs it.
//!
//! Without a GPU, `run.sh` and `cargo xtask gpu-check` must say `skipped: no NVIDIA GPU (…)` and
//! succeed. The checks themselves run in the bundle's simulated mode: the agent, the collector
//! and pynvml all load the fake NVML, and the load phases are rewrites of its scenario, so the
//! checker's logic (pairing, crossing times, attribution, failure reporting) runs for real. Those
//! runs are privileged (pod cgroups, eBPF: root, as CI runs) and need the Python venv with
//! nvidia-ml-py that `cargo xtask test` makes; each prints why it skips otherwise (under CI a
//! missing venv fails instead). Every run must
//! leave no process, cgroup or scratch folder behind.
//!
//! The bundle is built once per test binary with dev binaries (`--profile dev`: the release
//! build is what ships, but takes minutes here).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use e2e::pod::{cgroup2_root, privileged};
use e2e::{root, Scratch};
use serde_json::Value;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `cargo xtask gpu-check --bundle target/gpu-check-e2e/bundle --profile dev`, once.
fn bundle() -> &'static Path {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let dir = target_dir().join("gpu-check-e2e/bundle");
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(root())
            .args(["run", "-q", "-p", "xtask", "--", "gpu-check", "--bundle"])
            .arg(&dir)
            .args(["--profile", "dev"])
            .output()
            .expect("running cargo xtask gpu-check --bundle");
        assert!(
            out.status.success(),
            "cargo xtask gpu-check --bundle failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in [
            "run.sh",
            "check.py",
            "load.py",
            "README.md",
            "bundle.json",
            "gpuscale-agent",
            "gpuscale-collector",
            "sim/libfake_nvml.so",
        ] {
            assert!(dir.join(f).is_file(), "the bundle lacks {f}");
        }
        dir
    })
}

/// Why this machine cannot show the no-GPU path: it has a GPU.
fn has_gpu() -> Option<String> {
    let ldconfig = Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libnvidia-ml.so.1"))
        .unwrap_or(false);
    (ldconfig || Path::new("/dev/nvidiactl").exists())
        .then(|| "this machine has an NVIDIA driver: the no-GPU path does not run here".into())
}

/// The venv python with pynvml that `cargo xtask test` makes, or why there is none.
fn venv_python() -> Result<PathBuf, String> {
    let py = target_dir().join("gpu-check-venv/bin/python3");
    let ok = Command::new(&py)
        .args(["-c", "import pynvml"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(py)
    } else {
        Err(format!(
            "{} cannot import pynvml: run `cargo xtask test`, which makes it",
            py.display()
        ))
    }
}

/// Why the simulated runs cannot run here.
fn sim_skip() -> Option<String> {
    if let Some(why) = privileged() {
        return Some(why);
    }
    if let Err(why) = e2e::pod::ensure_tracefs() {
        return Some(why);
    }
    let why = venv_python().err()?;
    // CI runs `cargo xtask test`, which makes the venv: missing there, it is a broken set-up.
    assert!(std::env::var_os("CI").is_none(), "{why}");
    Some(why)
}

/// The bundle seen through a per-test link, so this run's processes are the ones whose command
/// lines name `link` (the run's `$here`).
fn linked_bundle(dir: &Scratch) -> PathBuf {
    let link = dir.path("bundle");
    std::os::unix::fs::symlink(bundle(), &link).expect("linking the bundle");
    link
}

/// Processes (other than this test) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// Asserts run.sh (PID `pid`, bundle seen at `link`) left nothing behind: no process, no
/// cgroup, no scratch folder.
fn assert_left_nothing(pid: u32, link: &Path) {
    // Killed processes may take a moment to be reaped by init.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = processes_mentioning(&link.display().to_string());
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = processes_mentioning(&link.display().to_string());
    }
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    if let Some(cg) = cgroup2_root() {
        let dir = cg.join(format!("gpuscale-check-{pid}"));
        assert!(!dir.exists(), "cgroups left behind: {}", dir.display());
    }
    let prefix = format!("gsc.{pid}.");
    let scratch: Vec<_> = std::fs::read_dir("/tmp")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    assert!(
        scratch.is_empty(),
        "scratch folders left behind: {scratch:?}"
    );
}

/// Runs `run.sh` with `args` to the end; returns its output, report and PID.
fn run_sh(
    dir: &Scratch,
    link: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
) -> (Output, Value, u32) {
    let mut cmd = Command::new(link.join("run.sh"));
    cmd.args(args).env("OUT", &dir.0).current_dir(&dir.0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting run.sh");
    let pid = child.id();
    let out = child.wait_with_output().expect("waiting for run.sh");
    let text = std::fs::read_to_string(dir.path("gpu-check.json")).unwrap_or_else(|e| {
        panic!(
            "no report in {} ({e}); run.sh said:\n{}\n{}",
            dir.0.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    (out, report, pid)
}

fn describe(out: &Output, report: &Value) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}\nreport:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        serde_json::to_string_pretty(report).unwrap_or_default()
    )
}

fn status<'a>(report: &'a Value, check: &str) -> &'a str {
    report["checks"][check]["status"].as_str().unwrap_or("?")
}

#[test]
fn without_a_gpu_the_bundle_and_cargo_xtask_skip_saying_why_and_leave_nothing() {
    if let Some(why) = has_gpu() {
        println!("skipped: without_a_gpu_…: {why}");
        return;
    }
    let dir = Scratch::new("gpu-check-nogpu");
    let link = linked_bundle(&dir);
    let (out, report, pid) = run_sh(&dir, &link, &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out, &report));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("skipped: no NVIDIA GPU ("))
        .unwrap_or_else(|| panic!("no skip line:\n{stdout}"));
    assert!(
        line.contains("libnvidia-ml.so.1") && line.ends_with(')'),
        "{line}"
    );
    assert_eq!(report["status"], "skipped");
    assert_eq!(report["reason"], line.trim_start_matches("skipped: "));
    assert_eq!(report["checks"], serde_json::json!({}));
    assert_left_nothing(pid, &link);

    // The bundle is small enough to carry (the release one is smaller still).
    let size: u64 = [
        "gpuscale-agent",
        "gpuscale-collector",
        "sim/libfake_nvml.so",
    ]
    .iter()
    .map(|f| std::fs::metadata(bundle().join(f)).map_or(0, |m| m.len()))
    .sum();
    assert!(size < 64 << 20, "bundle binaries take {size} bytes");

    // `cargo xtask gpu-check` says the same without building anything.
    let xtask = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root())
        .args(["run", "-q", "-p", "xtask", "--", "gpu-check"])
        .output()
        .expect("running cargo xtask gpu-check");
    let text = String::from_utf8_lossy(&xtask.stdout);
    assert!(xtask.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("skipped: no NVIDIA GPU (") && l.ends_with(')')),
        "{text}"
    );
}

#[test]
fn a_bad_option_is_refused_with_the_fix() {
    let dir = Scratch::new("gpu-check-usage");
    let link = linked_bundle(&dir);
    let out = Command::new(link.join("run.sh"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown option --frobnicate (see --help)")
    );
    let out = Command::new(link.join("run.sh"))
        .args(["--sim-gpu", "a100"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only apply with --simulate"));
}

#[test]
fn simulated_h100_passes_every_check_with_the_scenarios_numbers_and_cleans_up() {
    if let Some(why) = sim_skip() {
        println!("skipped: simulated_h100_…: {why}");
        return;
    }
    let py = venv_python().unwrap();
    let dir = Scratch::new("gpu-check-h100");
    let link = linked_bundle(&dir);
    let (out, r, pid) = run_sh(&dir, &link, &["--simulate"], &[("PYTHON", &py)]);
    let all = describe(&out, &r);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert_eq!(r["status"], "ran", "{all}");
    assert_eq!(r["result"], "pass", "{all}");
    assert_eq!(r["simulated"], true);
    for c in [
        "agreement",
        "sm_activity",
        "attribution",
        "reaction",
        "overhead",
    ] {
        assert_eq!(status(&r, c), "pass", "{c}: {all}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SIMULATED"), "{stdout}");
    assert!(
        stdout.contains("checks: 5 pass, 0 fail, 0 not run"),
        "{stdout}"
    );

    // Agreement: the agent read what pynvml read.
    let a = &r["checks"]["agreement"]["figures"];
    assert!(a["pairs"].as_u64().unwrap() >= 20, "{a}");
    assert_eq!(a["median_abs_diff"]["power_pct"], 0.0, "{a}");
    assert_eq!(a["nvml_heavy_gpu_util"], 97.0, "{a}");
    // SM activity: the tiny-kernel phase's numbers are the scenario's (33 % vs 6 %).
    let s = &r["checks"]["sm_activity"]["figures"];
    assert_eq!(s["tiny_gpu_util"], 33.0, "{s}");
    assert_eq!(s["tiny_sm_active"], 6.0, "{s}");
    assert_eq!(s["agent_gpm_supported"], true);
    assert_eq!(s["nvml_gpm_supported"], true);
    // Attribution: the load's process is in the pod run.sh made, by eBPF and by procfs.
    let pod = r["pods"]["load"]["uid"].as_str().expect("a pod uid");
    let at = &r["checks"]["attribution"]["figures"];
    for (part, source) in [("ebpf", "ebpf"), ("procfs", "procfs")] {
        let p = &at[part]["process"];
        assert_eq!(p["pod_uid"], pod, "{part}: {at}");
        assert_eq!(
            p["container_id"], r["pods"]["load"]["container_id"],
            "{part}"
        );
        assert_eq!(p["attribution"], source, "{part}: {at}");
    }
    assert_eq!(at["ebpf"]["process"]["sm_util"], 97.0, "{at}");
    assert_eq!(
        at["sidecar"]["pod_uid"], r["pods"]["sidecar"]["uid"],
        "{at}"
    );
    // Reaction: every step timed for all three sources.
    let re = &r["checks"]["reaction"]["figures"];
    for src in ["nvml", "agent", "collector"] {
        assert_eq!(re[src]["n"], 10, "{src}: {re}");
    }
    // Overhead: both intervals measured.
    let runs = r["checks"]["overhead"]["figures"]["runs"]
        .as_array()
        .unwrap();
    let intervals: Vec<&str> = runs.iter().filter_map(|x| x["interval"].as_str()).collect();
    assert_eq!(intervals, ["100ms", "10ms"]);
    assert!(runs.iter().all(|x| x["cpu_pct"].as_f64().unwrap() > 0.0));
    assert_left_nothing(pid, &link);
}

#[test]
fn simulated_a100_with_disagreeing_power_and_a_gpu_lost_midway_reports_each_part() {
    if let Some(why) = sim_skip() {
        println!("skipped: simulated_a100_…: {why}");
        return;
    }
    let py = venv_python().unwrap();
    let dir = Scratch::new("gpu-check-a100");
    let link = linked_bundle(&dir);
    let args = [
        "--simulate",
        "--sim-gpu",
        "a100",
        "--sim-skew-power",
        "20",
        "--sim-lose-gpu-at",
        "reaction",
    ];
    let (out, r, pid) = run_sh(&dir, &link, &args, &[("PYTHON", &py)]);
    let all = describe(&out, &r);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert_eq!(r["result"], "fail", "{all}");
    // pynvml sees 20 % more power than the agent: 1 - 1/1.2 = 16.7 % of pynvml's value.
    assert_eq!(status(&r, "agreement"), "fail", "{all}");
    let reason = r["checks"]["agreement"]["reason"].as_str().unwrap();
    assert!(reason.contains("power_pct differs by 16.7 %"), "{reason}");
    // No GPM: sm_active unavailable, and an sm_active trigger answers with gpu_util.
    assert_eq!(status(&r, "sm_activity"), "pass", "{all}");
    let s = &r["checks"]["sm_activity"]["figures"];
    assert_eq!(s["agent_gpm_supported"], false);
    assert_eq!(s["nvml_gpm_supported"], false);
    assert_eq!(s["tiny_sm_active"], Value::Null, "{s}");
    assert_eq!(s["collector_sm_active"], s["collector_gpu_util"], "{s}");
    // The GPU falls off the bus as the reaction check starts: what ran before stands, what
    // needs the GPU afterwards says why it could not run.
    let at = &r["checks"]["attribution"]["figures"];
    assert_eq!(at["ebpf"]["status"], "pass", "{at}");
    assert_eq!(at["procfs"]["status"], "not_run", "{at}");
    for c in ["reaction", "overhead", "attribution"] {
        assert_eq!(status(&r, c), "not_run", "{c}: {all}");
        let why = r["checks"][c]["reason"].as_str().unwrap_or("");
        assert!(why.contains("lost"), "{c}: {why}");
    }
    assert!(r["gpu_lost"].as_str().unwrap().contains("lost"), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("checks: 1 pass, 1 fail, 3 not run"),
        "{stdout}"
    );
    assert_left_nothing(pid, &link);
}

#[test]
fn without_pynvml_the_parts_that_need_it_say_so_and_the_rest_runs() {
    if let Some(why) = sim_skip() {
        println!("skipped: without_pynvml_…: {why}");
        return;
    }
    let py = venv_python().unwrap();
    let dir = Scratch::new("gpu-check-nopynvml");
    let link = linked_bundle(&dir);
    // A pynvml that cannot be imported, first on the path.
    let stub = dir.path("stub");
    std::fs::create_dir_all(&stub).unwrap();
    std::fs::write(
        stub.join("pynvml.py"),
        "raise ImportError('No module named pynvml (test stub)')\n",
    )
    .unwrap();
    let (out, r, pid) = run_sh(
        &dir,
        &link,
        &["--simulate"],
        &[("PYTHON", &py), ("PYTHONPATH", &stub)],
    );
    let all = describe(&out, &r);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert_eq!(r["result"], "incomplete", "{all}");
    let agreement = r["checks"]["agreement"]["reason"].as_str().unwrap_or("");
    assert_eq!(status(&r, "agreement"), "not_run", "{all}");
    assert!(
        agreement.contains("pynvml is not importable") && agreement.contains("nvidia-ml-py"),
        "{agreement}"
    );
    // Reaction: the agent's and collector's times are there; only NVML's baseline is missing.
    assert_eq!(status(&r, "reaction"), "not_run", "{all}");
    let re = &r["checks"]["reaction"]["figures"];
    assert_eq!(re["agent"]["n"], 10, "{re}");
    assert_eq!(re["collector"]["n"], 10, "{re}");
    assert!(re.get("nvml").is_none(), "{re}");
    for c in ["sm_activity", "attribution", "overhead"] {
        assert_eq!(status(&r, c), "pass", "{c}: {all}");
    }
    assert_left_nothing(pid, &link);
}

#[test]
fn interrupting_run_sh_stops_everything_and_removes_its_cgroups() {
    if let Some(why) = sim_skip() {
        println!("skipped: interrupting_run_sh_…: {why}");
        return;
    }
    let py = venv_python().unwrap();
    let dir = Scratch::new("gpu-check-interrupt");
    let link = linked_bundle(&dir);
    let mut child = Command::new(link.join("run.sh"))
        .arg("--simulate")
        .env("OUT", &dir.0)
        .env("PYTHON", &py)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting run.sh");
    let pid = child.id();
    // Wait until the load runs inside its pod cgroup and the agent is up.
    let cg = cgroup2_root()
        .unwrap()
        .join(format!("gpuscale-check-{pid}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let busy = || {
        let procs = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find '{}' -name cgroup.procs -exec cat {{}} + 2>/dev/null",
                cg.display()
            ))
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        procs && !processes_mentioning(&format!("{}/gpuscale-agent", link.display())).is_empty()
    };
    while !busy() {
        assert!(Instant::now() < deadline, "run.sh never started its load");
        assert!(child.try_wait().unwrap().is_none(), "run.sh ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    e2e::signal(pid, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "run.sh exits with 128 + SIGTERM");
    assert_left_nothing(pid, &link);
}
