//! Harness for end-to-end tests: finds (or builds) the real binaries and the fake NVML library,
//! writes fake-NVML scenarios atomically, and runs agents in scratch directories.
//!
//! Owns process lifecycle for tests: every process it starts is stopped when its handle drops.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The directory holding debug builds (`target/debug`).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("debug")
}

/// Builds the agent binary and the fake NVML library once per test process, so the tests run
/// the code of this checkout (cargo does not build other packages' binaries for a test).
pub fn ensure_built() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            .args(["build", "-p", "agent", "-p", "fake-nvml"])
            .status()
            .expect("running cargo build for the end-to-end binaries");
        assert!(status.success(), "cargo build -p agent -p fake-nvml failed");
        (
            bin_dir().join("gpuscale-agent"),
            bin_dir().join("libfake_nvml.so"),
        )
    })
}

/// Path of the `gpuscale-agent` binary.
pub fn agent_bin() -> &'static Path {
    &ensure_built().0
}

/// Path of the fake NVML library.
pub fn fake_nvml() -> &'static Path {
    &ensure_built().1
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory under the system temp dir, named after the test.
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("gpuscale-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a scratch dir");
        Scratch(d)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A GPU of a scenario with typical values; tweak fields with `gpu["key"] = …`.
pub fn gpu(index: usize) -> Value {
    json!({
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": format!("GPU-e2e00000-0000-4000-8000-{index:012}"),
        "memory_total_mib": 81559, "gpm": true,
        "gpu_util": 37, "mem_util": 12, "sm_active": 30, "sm_occupancy": 10,
        "tensor_active": 25, "dram_active": 15, "memory_used_mib": 20000,
        "power_w": 350, "temp_c": 60,
        "processes": [{"pid": 4242 + index, "used_memory_mib": 18000, "sm_util": 30}],
        "fail": null
    })
}

/// Writes a scenario atomically (temp file + rename), as the fake NVML expects.
pub fn write_scenario(path: &Path, gpus: &[Value]) {
    let tmp = path.with_extension("tmp");
    let body = json!({"driver_version": "580.159.04", "gpus": gpus});
    std::fs::write(&tmp, serde_json::to_vec(&body).unwrap()).expect("writing scenario");
    std::fs::rename(&tmp, path).expect("renaming scenario");
}

/// A running `gpuscale-agent run`, stopped (SIGKILL) on drop if still running.
pub struct Agent {
    child: Option<Child>,
    /// Its ring file.
    pub shm: PathBuf,
    log: PathBuf,
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a pid we started; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

impl Agent {
    /// Starts an agent on `scenario` writing `shm`, with extra flags.
    pub fn start(dir: &Scratch, scenario: &Path, shm: &Path, extra: &[&str]) -> Agent {
        let log = dir.path(&format!(
            "agent-{}.log",
            Instant::now().elapsed().as_nanos() ^ rand_ish()
        ));
        let child = Command::new(agent_bin())
            .args(["run", "--nvml-lib"])
            .arg(fake_nvml())
            .arg("--shm")
            .arg(shm)
            .args(["--node-name", "e2e-node"])
            .args(extra)
            .env("FAKE_NVML_SCENARIO", scenario)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting gpuscale-agent");
        Agent {
            child: Some(child),
            shm: shm.to_owned(),
            log,
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Polls `dump --json` until `pred` holds, up to `timeout`; returns the last dump.
    pub fn wait_dump(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("agent exited early ({status}); log:\n{}", self.log());
            }
            if let Ok(v) = dump_json(&self.shm) {
                if pred(&v) {
                    return Ok(v);
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "condition not met within {timeout:?}; last dump:\n{}\nagent log:\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            self.log()
        )
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().expect("waiting for the agent") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent did not stop within 20 s of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rand_ish() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    u128::from(N.fetch_add(1, Ordering::Relaxed))
}

/// Runs `gpuscale-agent` with `args` to completion.
pub fn agent_cmd(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("running gpuscale-agent")
}

/// `gpuscale-agent dump --shm PATH --json`, parsed.
pub fn dump_json(shm: &Path) -> Result<Value> {
    let out = Command::new(agent_bin())
        .args(["dump", "--json", "--shm"])
        .arg(shm)
        .output()?;
    if !out.status.success() {
        bail!("dump failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("dump printed invalid JSON")
}

/// `dump["gpus"][i]["metrics"][metric]["last"]` as a number.
pub fn last(dump: &Value, gpu: usize, metric: &str) -> Option<f64> {
    dump["gpus"][gpu]["metrics"][metric]["last"].as_f64()
}
