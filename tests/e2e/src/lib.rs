//! Harness for end-to-end tests: finds (or builds) the real binaries and the fake NVML library,
//! writes fake-NVML scenarios atomically, and runs agents in scratch directories.
//!
//! Owns process lifecycle for tests: every process it starts is stopped when its handle drops.
#![deny(missing_docs)]

pub mod keda;
pub mod kubeapi;
pub mod netns;
pub mod pod;
pub mod toxiproxy;

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

/// The binaries under test.
pub struct Bins {
    /// `gpuscale-agent`.
    pub agent: PathBuf,
    /// `gpuscale-collector`.
    pub collector: PathBuf,
    /// `libfake_nvml.so`.
    pub fake_nvml: PathBuf,
}

/// Builds the binaries and the fake NVML library once per test process, so the tests run the
/// code of this checkout (cargo does not build other packages' binaries for a test).
pub fn ensure_built() -> &'static Bins {
    static BUILT: OnceLock<Bins> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            .args(["build", "-p", "agent", "-p", "collector", "-p", "fake-nvml"])
            .status()
            .expect("running cargo build for the end-to-end binaries");
        assert!(
            status.success(),
            "cargo build -p agent -p collector -p fake-nvml failed"
        );
        Bins {
            agent: bin_dir().join("gpuscale-agent"),
            collector: bin_dir().join("gpuscale-collector"),
            fake_nvml: bin_dir().join("libfake_nvml.so"),
        }
    })
}

/// Path of the `gpuscale-agent` binary.
pub fn agent_bin() -> &'static Path {
    &ensure_built().agent
}

/// Path of the `gpuscale-collector` binary.
pub fn collector_bin() -> &'static Path {
    &ensure_built().collector
}

/// Path of the fake NVML library.
pub fn fake_nvml() -> &'static Path {
    &ensure_built().fake_nvml
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory under the system temp dir, named after the test.
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("gpuscale-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        // 0700 whatever the umask: the agent refuses a ring directory others may write to.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&d)
            .expect("creating a scratch dir");
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

/// Adds process `pid` to a procfs tree at `root` (for the agent's `--proc-root`), running in
/// container `container_id` of pod `pod_uid` under the kubelet's systemd driver: how tests give
/// the fake NVML's processes a pod without root.
pub fn fake_proc(root: &Path, pid: u32, pod_uid: &str, container_id: &str) {
    let d = root.join(pid.to_string());
    std::fs::create_dir_all(&d).expect("creating the fake procfs entry");
    std::fs::write(
        d.join("stat"),
        format!("{pid} (python3) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n"),
    )
    .expect("writing the fake stat");
    std::fs::write(
        d.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
             cri-containerd-{container_id}.scope\n",
            pod_uid.replace('-', "_"),
        ),
    )
    .expect("writing the fake cgroup");
}

/// Writes a scenario atomically (temp file + rename), as the fake NVML expects.
pub fn write_scenario(path: &Path, gpus: &[Value]) {
    let tmp = path.with_extension("tmp");
    let body = json!({"driver_version": "580.159.04", "gpus": gpus});
    std::fs::write(&tmp, serde_json::to_vec(&body).unwrap()).expect("writing scenario");
    std::fs::rename(&tmp, path).expect("renaming scenario");
}

/// The node every e2e agent and pod is on unless a test names another.
pub const NODE: &str = "e2e-node";

/// A running pod on node [`NODE`], as `kubectl get pods -o json` lists it.
pub fn pod_item(namespace: &str, name: &str, uid: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": namespace, "name": name, "uid": uid, "labels": labels},
           "spec": {"nodeName": NODE}, "status": {"phase": "Running"}})
}

/// Writes `items` to `path` as a pods file (a `List`, as `kubectl get pods -A -o json` prints
/// one), atomically (a collector polling it never reads half a file).
pub fn write_pods(path: &Path, items: &[Value]) {
    let tmp = path.with_extension("tmp");
    let body = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&tmp, body.to_string()).expect("writing pods file");
    std::fs::rename(&tmp, path).expect("renaming pods file");
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a pid we started; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// A background process under test with its log file; killed (SIGKILL) on drop if running.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stderr to a log file in `dir` named after `name`.
    pub fn spawn(dir: &Scratch, name: &str, cmd: &mut Command) -> Daemon {
        let log = dir.path(&format!("{name}-{}.log", rand_ish()));
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Fails with the log if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            bail!("process exited early ({status}); log:\n{}", self.log());
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().expect("waiting for the process") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "process did not stop within 20 s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its status, or `None` if it
    /// still runs (it is then left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let child = self.child.as_mut()?;
            if let Some(s) = child.try_wait().expect("waiting for the process") {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `gpuscale-agent run`.
pub struct Agent {
    /// The process.
    pub daemon: Daemon,
    /// Its ring file.
    pub shm: PathBuf,
}

impl Agent {
    /// Starts an agent on one fake GPU ([`gpu`]`(0)`, scenario `dir/scenario.json`) whose
    /// process 4242 belongs to pod `pod_uid` (a fake procfs at `dir/proc`), serving its API on
    /// a free loopback port without eBPF, with the flags `extra` added; returns it and its
    /// address.
    pub fn one_gpu_pod(dir: &Scratch, pod_uid: &str, extra: &[&str]) -> (Agent, String) {
        let proc_root = dir.path("proc");
        fake_proc(&proc_root, 4242, pod_uid, &"c".repeat(64));
        let scenario = dir.path("scenario.json");
        write_scenario(&scenario, &[gpu(0)]);
        let addr = format!("127.0.0.1:{}", free_port());
        let proc_root = proc_root.to_string_lossy();
        let mut args = vec![
            "--listen",
            &addr,
            "--ebpf",
            "off",
            "--proc-root",
            &proc_root,
        ];
        args.extend_from_slice(extra);
        let agent = Agent::start(dir, &scenario, &dir.path("agent.ring"), &args);
        (agent, addr)
    }

    /// Starts an agent on `scenario` writing `shm`, with extra flags (node [`NODE`] unless
    /// they name another).
    pub fn start(dir: &Scratch, scenario: &Path, shm: &Path, extra: &[&str]) -> Agent {
        let daemon = Daemon::spawn(
            dir,
            "agent",
            Command::new(agent_bin())
                .args(["run", "--nvml-lib"])
                .arg(fake_nvml())
                .arg("--shm")
                .arg(shm)
                .args(if extra.contains(&"--node-name") {
                    &[][..]
                } else {
                    &["--node-name", NODE][..]
                })
                .args(extra)
                .env("FAKE_NVML_SCENARIO", scenario),
        );
        Agent {
            daemon,
            shm: shm.to_owned(),
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Polls `dump --json` until `pred` holds, up to `timeout`; returns the last dump.
    pub fn wait_dump(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let shm = self.shm.clone();
        let daemon = &mut self.daemon;
        wait_json(
            timeout,
            || {
                daemon.check_alive()?;
                dump_json(&shm)
            },
            pred,
        )
        .with_context(|| format!("agent log:\n{}", daemon.log()))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.daemon.terminate()
    }
}

/// A running `gpuscale-collector serve` on a free loopback port.
pub struct Collector {
    /// The process.
    pub daemon: Daemon,
    /// Its `--listen` address (`127.0.0.1:port`), where KEDA and `dump` reach it.
    pub addr: String,
}

impl Collector {
    /// Starts a collector following the agent at `agent_addr`, with pods from `pods_file`.
    pub fn start(dir: &Scratch, agent_addr: &str, pods_file: &Path) -> Collector {
        let pods_file = pods_file.to_string_lossy();
        Collector::spawn(
            dir,
            &["--agents", agent_addr, "--pods-file", &pods_file],
            &[],
        )
    }

    /// Starts `gpuscale-collector serve --listen <free port>` with the other flags in `args` and
    /// the environment `env` added.
    pub fn spawn(dir: &Scratch, args: &[&str], env: &[(&str, &Path)]) -> Collector {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(collector_bin());
        cmd.args(["serve", "--listen", &addr]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let daemon = Daemon::spawn(dir, "collector", &mut cmd);
        Collector { daemon, addr }
    }

    /// Polls `dump --json` until `pred` holds, up to `timeout`; returns the last dump.
    pub fn wait_dump(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let addr = self.addr.clone();
        let daemon = &mut self.daemon;
        wait_json(
            timeout,
            || {
                daemon.check_alive()?;
                let out = Command::new(collector_bin())
                    .args(["dump", "--json", "--collector", &addr])
                    .output()?;
                if !out.status.success() {
                    bail!("dump failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                Ok(serde_json::from_slice(&out.stdout)?)
            },
            pred,
        )
        .with_context(|| format!("collector log:\n{}", daemon.log()))
    }
}

/// Polls `fetch` until `pred` holds on its answer, up to `timeout`; returns that answer.
pub fn wait_json(
    timeout: Duration,
    mut fetch: impl FnMut() -> Result<Value>,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        match fetch() {
            Ok(v) if pred(&v) => return Ok(v),
            Ok(v) => last = v,
            Err(e) if e.to_string().contains("exited early") => return Err(e),
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "condition not met within {timeout:?}; last answer:\n{}",
        serde_json::to_string_pretty(&last).unwrap_or_default()
    )
}

/// A loopback port free now, for a server a test starts, unique within this test process.
///
/// Taken below the kernel's ephemeral range (32768–60999 by default), where neither `bind(:0)`
/// nor the source port of an outgoing connection lands, so no other socket grabs it between this
/// check and the server's own bind (with ephemeral ports that race failed a collector's bind
/// while its test then talked to another test's agent). Each test process starts at its own
/// offset (by PID) and counts up; if none is free it falls back to an ephemeral port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 480) * 25;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
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

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
