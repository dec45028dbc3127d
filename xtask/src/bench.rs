//! `cargo xtask bench`: the agent's CPU and memory overhead on simulated GPUs.
//!
//! Builds the agent and the fake NVML in release, then for every sampling interval and GPU count
//! asked for runs `gpuscale-agent run` on a fake-NVML scenario for `--duration`, and measures:
//!
//! - CPU: utime + stime of the whole process from `/proc/<pid>/stat` (clock ticks, `getconf
//!   CLK_TCK`), read once the agent is sampling and again at the end, as a percentage of one core
//!   over the wall time between the two reads;
//! - memory: peak RSS (`VmHWM`) and, at the end, `RssAnon` / `RssFile` / `RssShmem` from
//!   `/proc/<pid>/status` (the ring is a shared file mapping: its pages are `RssShmem` on tmpfs,
//!   `RssFile` elsewhere, and are shared with every reader);
//! - that the agent kept up: samples written per GPU (from `gpuscale-agent dump --json`) against
//!   the number the interval asks for.
//!
//! The smallest GPU count is the baseline (its difference to the largest gives the cost per
//! GPU), and an idle `sleep` is measured alongside the first run as the floor of any process.
//! The result is a markdown table for docs/BENCHMARKS.md. The fake NVML answers from memory, so
//! the CPU figures are the agent's own cost, not the driver's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::util::{cargo, run as run_cmd, step, target_dir};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// How long to measure each configuration (`60s`, `5m`). The 5 m window fills after 5 minutes
    /// and the ring's pages are all touched only after its capacity × interval, so use e.g.
    /// `15m` to see steady-state memory.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Sampling intervals to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100ms,10ms")]
    interval: Vec<String>,
    /// Simulated GPU counts to measure, comma separated; the smallest is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    gpus: Vec<usize>,
    /// Where the ring files go (default: /dev/shm, like the agent's default, else the temp dir).
    #[arg(long)]
    shm_dir: Option<PathBuf>,
    /// What reads the agent, comma separated, each measured: `none` (the agent alone), or a
    /// release collector holding one stream open to it, of `full` snapshots or of `changes`
    /// (the collector's `--agent-stream`; asked for one typical trigger, `sm_active` over 30 s,
    /// so the stream carries what a cluster with that trigger reads), or `changes-x2`: two such
    /// collectors (two replicas), or `watched`: one `changes` collector whose trigger KEDA
    /// watches (a `StreamIsActive` stream held open, as for an `external-push` trigger: the
    /// stream then sends changes at every sample), or `served`: the agent serving its API
    /// (`--listen`, as it always does when deployed) with no stream open. The difference to
    /// `served` (else to `none`) is what streaming costs.
    #[arg(long, value_delimiter = ',', default_value = "none", value_parser = ["none", "served", "full", "changes", "changes-x2", "watched"])]
    stream: Vec<String>,
    /// Instead: a GPU load step → replicas through gpuscale and through the Prometheus chain, on
    /// the local cluster (as root; `gpuscale-cluster bench`), this many steps per chain.
    #[arg(long, value_name = "STEPS", num_args = 0..=1, default_missing_value = "10")]
    cluster: Option<usize>,
}

/// Targets from the issue, for 8 GPUs at 100 ms.
const TARGET_CPU_PCT: f64 = 0.5;
const TARGET_RSS_MIB: f64 = 16.0;
/// What one collector stream may cost an agent (issue 15), % of a core.
const TARGET_STREAM_PCT: f64 = 0.05;
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

fn parse_duration(s: &str) -> Result<Duration, String> {
    match vocab::duration::parse(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("{s:?} is zero; write a duration like 60s or 5m")),
        Err(why) => Err(format!("{why}; write a duration like 60s or 5m")),
    }
}

/// `--interval` as the agent reads it (`100ms`, `1s`).
fn parse_interval(s: &str) -> Result<Duration> {
    vocab::duration::parse(s).map_err(|why| anyhow::anyhow!("--interval: {why}; write e.g. 100ms"))
}

/// The pod (as an index) of process `j` (0 or 1) of GPU `gpu`: GPU 1 is shared by two pods,
/// every other GPU belongs to one pod that runs two processes on it.
fn pod_of(gpu: usize, j: usize) -> usize {
    if gpu == 1 {
        100 + j
    } else {
        gpu
    }
}

/// Stand-ins for the GPUs' processes: real sleeping processes (so the agent reads real procfs
/// `stat` files, as it does in production) in a fake procfs root whose `cgroup` files put them in
/// Kubernetes pods, so the agent's per-pod attribution and windows run too.
struct Workload {
    procs: Vec<Proc>,
    root: PathBuf,
}

impl Workload {
    fn start(dir: &Path, gpus: usize, lifetime: Duration) -> Result<Workload> {
        let root = dir.join("proc");
        let mut procs = Vec::new();
        for k in 0..2 * gpus {
            let child = Command::new("sleep")
                .arg(lifetime.as_secs().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a stand-in GPU process (`sleep`)")?;
            let proc = Proc(child);
            let pid = proc.pid();
            procs.push(proc);
            let d = root.join(pid.to_string());
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            std::os::unix::fs::symlink(format!("/proc/{pid}/stat"), d.join("stat"))
                .with_context(|| format!("linking {}/stat", d.display()))?;
            let pod = pod_of(k / 2, k % 2);
            let uid = format!("be0c4000_0000_4000_8000_{pod:012x}");
            let cgroup = format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/\
                 cri-containerd-{:064x}.scope\n",
                k + 1
            );
            std::fs::write(d.join("cgroup"), cgroup)
                .with_context(|| format!("writing {}/cgroup", d.display()))?;
        }
        Ok(Workload { procs, root })
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
}

/// The benchmark scenario: `n` busy H100s with GPM, two processes each (`pids[2i]`,
/// `pids[2i + 1]` on GPU `i`). GPU 1 is shared by two pods, so its processes have per-process SM
/// utilization; the others' have none (the agent still asks NVML for every GPU with more than
/// one process).
fn scenario(n: usize, pids: &[u32]) -> Value {
    let gpus: Vec<Value> = (0..n)
        .map(|i| {
            let sm = |v: u32| if i == 1 { json!(v) } else { Value::Null };
            let (pid0, pid1) = (pids[2 * i], pids[2 * i + 1]);
            json!({
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": format!("GPU-be0c4000-0000-4000-8000-{i:012}"),
                "memory_total_mib": 81_559,
                "gpm": true,
                "gpu_util": 37 + i,
                "mem_util": 12,
                "sm_active": 30.5,
                "sm_occupancy": 10.25,
                "tensor_active": 25,
                "dram_active": 15,
                "memory_used_mib": 20_000,
                "power_w": 350,
                "temp_c": 60,
                "processes": [
                    {"pid": pid0, "used_memory_mib": 18_000, "sm_util": sm(22)},
                    {"pid": pid1, "used_memory_mib": 1_500, "sm_util": sm(8)},
                ],
                // As slow as nvmlDeviceGetProcessUtilization on a real H100 (a sleep: wall time,
                // not CPU).
                "process_util_delay_ms": 2.5,
                "fail": null,
            })
        })
        .collect();
    json!({"driver_version": "580.159.04", "gpus": gpus})
}

/// CPU time (utime, stime) of the whole process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("unexpected {path}: {stat}"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), counted from 1 with field 3 at index 0.
    let get = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has too few fields"))?
            .parse()
            .with_context(|| format!("unexpected {path}: {stat}"))
    };
    Ok((get(11)?, get(12)?))
}

/// Memory figures of `/proc/<pid>/status`, KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    hwm: u64,
    rss: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    threads: u64,
}

fn mem(pid: u32) -> Result<Mem> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut m = Mem::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let n = || {
            value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match key {
            "VmHWM" => m.hwm = n(),
            "VmRSS" => m.rss = n(),
            "RssAnon" => m.anon = n(),
            "RssFile" => m.file = n(),
            "RssShmem" => m.shmem = n(),
            "Threads" => m.threads = n(),
            _ => {}
        }
    }
    Ok(m)
}

fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// A child process that is SIGTERMed (then killed) when dropped.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then SIGKILL after 5 s; whether it exited on SIGTERM with success.
    fn stop(&mut self) -> bool {
        if let Ok(Some(status)) = self.0.try_wait() {
            return status.success();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One measured process.
struct Measurement {
    label: String,
    /// What read the agent (`--stream`).
    stream: String,
    gpus: Option<usize>,
    interval: String,
    interval_dur: Duration,
    cpu_pct: f64,
    user_s: f64,
    sys_s: f64,
    wall_s: f64,
    mem: Mem,
    /// Fewest samples any GPU's ring received, and how many the interval asks for.
    samples: Option<(u64, u64)>,
    clean_exit: bool,
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Where the ring files go.
fn shm_dir(o: &Options) -> PathBuf {
    let base = match &o.shm_dir {
        Some(d) => d.clone(),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    base.join(format!("gpuscale-bench-{}", std::process::id()))
}

struct Bench {
    agent: PathBuf,
    fake: PathBuf,
    /// The release collector, when a `--stream` other than `none` is measured.
    collector: Option<PathBuf>,
    dir: PathBuf,
    workload: Workload,
    duration: Duration,
    tck: u64,
}

/// How many times `log` says `what`.
fn times_logged(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log).map_or(0, |l| l.matches(what).count())
}

/// Waits up to 20 s until `log` says `what` more than `before` times. Fails with `late` and the
/// tail of `late_log` when it does not, or, when `proc` (named `name`, logging to `its_log`)
/// exits first, with the tail of its log.
fn await_logged(
    (log, what, before): (&Path, &str, usize),
    mut proc: Option<(&mut Proc, &str, &Path)>,
    late: &str,
    late_log: &Path,
) -> Result<()> {
    let started = Instant::now();
    while times_logged(log, what) <= before {
        if let Some((p, name, its_log)) = proc.as_mut() {
            if let Some(status) = p.0.try_wait()? {
                bail!(
                    "{name} exited ({status}); its log says:\n{}",
                    log_tail(its_log)
                );
            }
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "{late} within 20 s; {} says:\n{}",
                late_log.display(),
                log_tail(late_log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts `command` in the background, its stderr to `log`, without colours.
fn spawn_logged(mut command: Command, log: &Path) -> Result<Proc> {
    let child = command
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?)
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    Ok(Proc(child))
}

/// A loopback port free now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free loopback port")?
        .local_addr()?
        .port())
}

impl Bench {
    /// Starts `collector` following the agent at `agent_addr` with `--agent-stream mode` and no
    /// pods, and waits until the agent's log (`agent_log`) says it subscribed (once more than
    /// before: another collector may have subscribed already). Returns it and the address it
    /// serves KEDA's API on.
    fn start_collector(
        &self,
        collector: &Path,
        agent_addr: &str,
        mode: &str,
        name: &str,
        agent_log: &Path,
    ) -> Result<(Proc, String)> {
        let pods = self.dir.join("no-pods.json");
        std::fs::write(
            &pods,
            r#"{"apiVersion": "v1", "kind": "List", "items": []}"#,
        )
        .with_context(|| format!("writing {}", pods.display()))?;
        let log = self.dir.join(format!("{name}-collector.log"));
        let listen = format!("127.0.0.1:{}", free_port()?);
        let (subscribed, asked) = (
            times_logged(agent_log, "collector subscribed"),
            times_logged(agent_log, "series=12"),
        );
        let mut command = Command::new(collector);
        command
            .args(["serve", "--agents", agent_addr, "--pods-file"])
            .arg(&pods)
            .args(["--listen", &listen, "--agent-stream", mode]);
        let mut proc = spawn_logged(command, &log)?;
        await_logged(
            (agent_log, "collector subscribed", subscribed),
            Some((&mut proc, "the collector", &log)),
            "the collector did not subscribe to the agent",
            &log,
        )?;
        if mode == "changes" {
            self.ask_for_a_trigger(collector, &listen, &log)?;
            await_logged(
                (agent_log, "series=12", asked),
                None,
                "the collector's stream did not ask for the trigger's series",
                &log,
            )?;
        }
        Ok((proc, listen))
    }

    /// Holds the typical trigger's `StreamIsActive` stream open at the collector at `listen`
    /// (`gpuscale-collector query --watch`, asking `GetMetrics` every 10 s besides), as KEDA
    /// does for an `external-push` trigger, and waits until the collector has asked the agent
    /// (its log `agent_log`) for changes at every sample.
    fn watch_the_trigger(
        &self,
        collector: &Path,
        listen: &str,
        name: &str,
        agent_log: &Path,
    ) -> Result<Proc> {
        let every_sample = "min_interval_ms=0";
        let before = times_logged(agent_log, every_sample);
        let log = self.dir.join(format!("{name}-watch.log"));
        let mut command = Command::new(collector);
        command
            .args(["query", "--collector", listen])
            .args(TYPICAL_TRIGGER.iter().flat_map(|m| ["--meta", m]))
            .args(["--watch", "10s"]);
        let mut proc = spawn_logged(command, &log)?;
        await_logged(
            (agent_log, every_sample, before),
            Some((&mut proc, "gpuscale-collector query --watch", &log)),
            "the collector did not ask the agent for changes at every sample after a \
             StreamIsActive stream opened",
            agent_log,
        )?;
        Ok(proc)
    }

    /// Names one trigger to the collector at `listen` as KEDA would (`sm_active` over 30 s, the
    /// typical one), so its stream asks the agent for what a cluster with that trigger reads
    /// (every metric's last value, `sm_active` and `gpu_util` over 30 s).
    fn ask_for_a_trigger(
        &self,
        collector: &Path,
        listen: &str,
        collector_log: &Path,
    ) -> Result<()> {
        let out = Command::new(collector)
            .args(["query", "--collector", listen])
            .args(TYPICAL_TRIGGER.iter().flat_map(|m| ["--meta", m]))
            .output()
            .with_context(|| format!("running {} query", collector.display()))?;
        if !out.status.success() {
            bail!(
                "gpuscale-collector query failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                log_tail(collector_log)
            );
        }
        Ok(())
    }

    /// User and system CPU seconds between two `cpu_ticks` readings.
    fn cpu_delta(&self, from: (u64, u64), to: (u64, u64)) -> (f64, f64) {
        let tck = self.tck as f64;
        (
            to.0.saturating_sub(from.0) as f64 / tck,
            to.1.saturating_sub(from.1) as f64 / tck,
        )
    }

    /// Runs the agent on `gpus` simulated GPUs at `interval` and measures it; `reference`, when
    /// given, is measured over the same span.
    fn measure(
        &self,
        gpus: usize,
        interval: &str,
        stream: &str,
        reference: Option<&mut Proc>,
    ) -> Result<(Measurement, Option<Measurement>)> {
        let interval_dur = parse_interval(interval)?;
        let name = format!("{gpus}gpu-{interval}-{stream}");
        let listen = match stream {
            "none" => None,
            _ => Some(format!("127.0.0.1:{}", free_port()?)),
        };
        let scenario_path = self.dir.join(format!("scenario-{gpus}.json"));
        std::fs::write(
            &scenario_path,
            serde_json::to_vec_pretty(&scenario(gpus, &self.workload.pids()))?,
        )
        .with_context(|| format!("writing {}", scenario_path.display()))?;
        let ring = self.dir.join(format!("{name}.ring"));
        let log = self.dir.join(format!("{name}.log"));
        eprintln!(
            "  {gpus} GPU(s) at {interval} for {} s (log: {})",
            self.duration.as_secs(),
            log.display()
        );
        let child = Command::new(&self.agent)
            .args(["run", "--nvml-lib"])
            .arg(&self.fake)
            .arg("--shm")
            .arg(&ring)
            .args([
                "--interval",
                interval,
                "--node-name",
                "bench",
                "--proc-root",
            ])
            .arg(&self.workload.root)
            .args(listen.iter().flat_map(|l| ["--listen", l.as_str()]))
            .env("FAKE_NVML_SCENARIO", &scenario_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.agent.display()))?;
        let mut agent = Proc(child);
        let pid = agent.pid();

        // Wait until it samples (the ring file exists and the log says so), so start-up (NVML
        // load, ring creation) is not counted.
        let spawned = Instant::now();
        loop {
            if let Some(status) = agent.0.try_wait()? {
                bail!(
                    "the agent exited during start-up ({status}); its log says:\n{}",
                    log_tail(&log)
                );
            }
            let started = ring.exists()
                && std::fs::read_to_string(&log).is_ok_and(|l| l.contains("sampling"));
            if started {
                break;
            }
            if spawned.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the agent did not start sampling within 20 s; its log says:\n{}",
                    log_tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // With a stream: a collector that follows this agent, subscribed before measuring.
        let mut _collectors = Vec::new();
        if let (Some(agent_addr), Some(collector), false) =
            (&listen, &self.collector, stream == "served")
        {
            let (mode, count) = stream_mode(stream);
            for k in 1..=count {
                let name = format!("{name}-{k}");
                let (proc, listen) =
                    self.start_collector(collector, agent_addr, mode, &name, &log)?;
                _collectors.push(proc);
                if stream == "watched" {
                    _collectors.push(self.watch_the_trigger(collector, &listen, &name, &log)?);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));

        let reference = reference.map(|r| -> Result<_> { Ok((r.pid(), cpu_ticks(r.pid())?)) });
        let reference = reference.transpose()?;
        let t0 = Instant::now();
        let ticks0 = cpu_ticks(pid)?;
        let end = t0 + self.duration;
        let mut next = t0 + PROGRESS_EVERY;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep(next.min(end).saturating_duration_since(now));
            if let Some(status) = agent.0.try_wait()? {
                bail!(
                    "the agent exited while measured ({status}); its log says:\n{}",
                    log_tail(&log)
                );
            }
            if Instant::now() >= next && next < end {
                let t = t0.elapsed().as_secs_f64();
                let (u, s) = cpu_ticks(pid)?;
                let ticks = u + s - ticks0.0 - ticks0.1;
                let m = mem(pid)?;
                eprintln!(
                    "    {:>4.0}/{} s: CPU {:.2} % of a core so far, RSS {:.1} MiB (peak {:.1} MiB)",
                    t,
                    self.duration.as_secs(),
                    ticks as f64 / self.tck as f64 / t * 100.0,
                    m.rss as f64 / 1024.0,
                    m.hwm as f64 / 1024.0,
                );
                next += PROGRESS_EVERY;
            }
        }
        let ticks1 = cpu_ticks(pid)?;
        let wall_s = t0.elapsed().as_secs_f64();
        let m = mem(pid)?;
        let ref_measure = match reference {
            Some((rpid, rticks0)) => {
                let (user_s, sys_s) = self.cpu_delta(rticks0, cpu_ticks(rpid)?);
                Some(Measurement {
                    label: "idle reference (`sleep`)".into(),
                    stream: "none".into(),
                    gpus: None,
                    interval: "–".into(),
                    interval_dur,
                    cpu_pct: (user_s + sys_s) / wall_s * 100.0,
                    user_s,
                    sys_s,
                    wall_s,
                    mem: mem(rpid)?,
                    samples: None,
                    clean_exit: true,
                })
            }
            None => None,
        };

        // Did it keep up? Samples written per GPU against the ticks since it started.
        let asked = (spawned.elapsed().as_secs_f64() / interval_dur.as_secs_f64()) as u64;
        let dump = Command::new(&self.agent)
            .args(["dump", "--json", "--shm"])
            .arg(&ring)
            .output()
            .context("running gpuscale-agent dump")?;
        let report = serde_json::from_slice::<Value>(&dump.stdout).ok();
        if let Some(gpus) = report.as_ref().and_then(|v| v["gpus"].as_array()) {
            let procs: Vec<&Value> = gpus
                .iter()
                .filter_map(|g| g["processes"].as_array())
                .flatten()
                .collect();
            let in_pods = procs.iter().filter(|p| p["pod_uid"].is_string()).count();
            eprintln!(
                "    processes attributed to pods (from dump): {in_pods} of {}",
                procs.len()
            );
        }
        let samples = report
            .and_then(|v| {
                v["gpus"]
                    .as_array()?
                    .iter()
                    .map(|g| g["samples_written"].as_u64())
                    .collect::<Option<Vec<u64>>>()
            })
            .and_then(|v| v.into_iter().min())
            .map(|min| (min, asked));
        if samples.is_none() {
            eprintln!(
                "    (could not read samples_written from `gpuscale-agent dump --json`: {})",
                String::from_utf8_lossy(&dump.stderr).trim()
            );
        }

        let clean_exit = agent.stop();
        if !clean_exit {
            eprintln!(
                "    the agent did not exit cleanly on SIGTERM; its log says:\n{}",
                log_tail(&log)
            );
        }
        let (user_s, sys_s) = self.cpu_delta(ticks0, ticks1);
        let me = Measurement {
            label: format!(
                "agent, {gpus} GPU{}{}",
                if gpus == 1 { "" } else { "s" },
                match stream {
                    "none" => String::new(),
                    s => format!(", {}", describe_stream(s)),
                }
            ),
            stream: stream.to_owned(),
            gpus: Some(gpus),
            interval: interval.to_owned(),
            interval_dur,
            cpu_pct: (user_s + sys_s) / wall_s * 100.0,
            user_s,
            sys_s,
            wall_s,
            mem: m,
            samples,
            clean_exit,
        };
        eprintln!(
            "    done: CPU {:.3} % of a core ({:.2} s CPU in {:.1} s), peak RSS {:.1} MiB",
            me.cpu_pct,
            me.user_s + me.sys_s,
            me.wall_s,
            me.mem.hwm as f64 / 1024.0
        );
        Ok((me, ref_measure))
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores ({model}), Linux {kernel}")
}

fn table(rows: &[Measurement], tck: u64) -> String {
    let mut out = String::new();
    out.push_str(
        "| process | interval | CPU % of one core | CPU s / wall s | peak RSS (VmHWM) | RssAnon | \
         RssFile | RssShmem | threads | samples per GPU (expected ≈) |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let samples = r
            .samples
            .map_or("–".into(), |(got, asked)| format!("{got} ({asked})"));
        out.push_str(&format!(
            "| {}{} | {} | {:.3} % | {:.2} / {:.1} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | \
             {} | {} |\n",
            r.label,
            if r.clean_exit { "" } else { " (did not exit cleanly)" },
            r.interval,
            r.cpu_pct,
            r.user_s + r.sys_s,
            r.wall_s,
            mib(r.mem.hwm),
            mib(r.mem.anon),
            mib(r.mem.file),
            mib(r.mem.shmem),
            r.mem.threads,
            samples,
        ));
    }
    out.push_str(&format!(
        "\nCPU from utime+stime in /proc/<pid>/stat ({tck} ticks/s, so ±{:.3} % over this \
         duration); memory from /proc/<pid>/status at the end.\n",
        rows.first()
            .map_or(0.0, |r| 100.0 / tck as f64 / r.wall_s.max(1.0)),
    ));
    out
}

fn per_gpu(rows: &[Measurement]) -> String {
    let mut out = String::new();
    let mut intervals: Vec<&str> = rows
        .iter()
        .filter(|r| r.gpus.is_some())
        .map(|r| r.interval.as_str())
        .collect();
    intervals.dedup();
    for interval in &intervals {
        let interval = *interval;
        let agents: Vec<&Measurement> = rows
            .iter()
            .filter(|r| r.gpus.is_some() && r.interval == interval && r.stream == "none")
            .collect();
        let (Some(lo), Some(hi)) = (
            agents.iter().min_by_key(|r| r.gpus),
            agents.iter().max_by_key(|r| r.gpus),
        ) else {
            continue;
        };
        let (nl, nh) = (lo.gpus.unwrap_or(0), hi.gpus.unwrap_or(0));
        if nh > nl {
            let d = (nh - nl) as f64;
            out.push_str(&format!(
                "- at {interval}: {nh} GPUs vs {nl} (baseline): CPU {:.3} % vs {:.3} % (×{:.1}), \
                 {:+.4} % of a core per extra GPU; peak RSS {:.1} vs {:.1} MiB (×{:.2}), \
                 {:+.2} MiB per extra GPU (RssAnon {:+.2} MiB per GPU)\n",
                hi.cpu_pct,
                lo.cpu_pct,
                hi.cpu_pct / lo.cpu_pct.max(1e-9),
                (hi.cpu_pct - lo.cpu_pct) / d,
                mib(hi.mem.hwm),
                mib(lo.mem.hwm),
                hi.mem.hwm as f64 / lo.mem.hwm.max(1) as f64,
                (mib(hi.mem.hwm) - mib(lo.mem.hwm)) / d,
                (mib(hi.mem.anon) - mib(lo.mem.anon)) / d,
            ));
        }
        if nh == 8 && hi.interval_dur == Duration::from_millis(100) {
            let cpu_ok = hi.cpu_pct <= TARGET_CPU_PCT;
            let rss_ok = mib(hi.mem.hwm) <= TARGET_RSS_MIB;
            out.push_str(&format!(
                "- targets for 8 GPUs at 100ms: CPU ≤ {TARGET_CPU_PCT} % of a core: {:.3} % → {}; \
                 peak RSS ≤ {TARGET_RSS_MIB} MiB: {:.1} MiB → {}\n",
                hi.cpu_pct,
                if cpu_ok { "met" } else { "MISSED" },
                mib(hi.mem.hwm),
                if rss_ok { "met" } else { "MISSED" },
            ));
        }
    }
    out
}

/// The `--agent-stream` mode of `--stream` value `stream`, and how many collectors use it.
fn stream_mode(stream: &str) -> (&str, usize) {
    match stream.strip_suffix("-x2") {
        Some(mode) => (mode, 2),
        None if stream == "watched" => ("changes", 1),
        None => (stream, 1),
    }
}

/// The trigger the collectors are asked about (`--meta` of `gpuscale-collector query`): the
/// typical one, `sm_active` over 30 s.
const TYPICAL_TRIGGER: [&str; 3] = [
    "metric=sm_active",
    "podSelector=app=bench",
    "targetValue=80",
];

/// `--stream` value `stream` in words.
fn describe_stream(stream: &str) -> String {
    if stream == "served" {
        return "API served, no stream".into();
    }
    if stream == "watched" {
        return "one collector stream (changes) with a StreamIsActive open".into();
    }
    match stream_mode(stream) {
        (mode, 1) => format!("one collector stream ({mode})"),
        (mode, n) => format!("{n} collectors' streams ({mode})"),
    }
}

/// What collector streams cost the agent: each streamed row against the row of the agent
/// serving its API with no stream (`served`), else of the agent alone, with the same GPUs and
/// interval (and two collectors' against one's); and what serving the API costs.
fn streaming_cost(rows: &[Measurement]) -> String {
    let mut out = String::new();
    let row = |stream: &str, like: &Measurement| {
        rows.iter()
            .find(|a| a.stream == stream && a.gpus == like.gpus && a.interval == like.interval)
    };
    for r in rows
        .iter()
        .filter(|r| r.stream != "none" && r.gpus.is_some())
    {
        if r.stream == "served" {
            if let Some(alone) = row("none", r) {
                out.push_str(&format!(
                    "- serving the API with no stream, {} GPUs at {}: {:.3} % vs {:.3} % alone: \
                     {:+.3} % of a core\n",
                    r.gpus.unwrap_or(0),
                    r.interval,
                    r.cpu_pct,
                    alone.cpu_pct,
                    r.cpu_pct - alone.cpu_pct,
                ));
            }
            continue;
        }
        let Some(alone) = row("served", r).or_else(|| row("none", r)) else {
            continue;
        };
        let base = if alone.stream == "served" {
            "serving with no stream"
        } else {
            "alone"
        };
        let cost = r.cpu_pct - alone.cpu_pct;
        let (mode, count) = stream_mode(&r.stream);
        if count > 1 {
            if let Some(one) = row(mode, r) {
                out.push_str(&format!(
                    "- {}, {} GPUs at {}: {:.3} % vs {:.3} % with one: the second adds {:+.3} % \
                     of a core\n",
                    describe_stream(&r.stream),
                    r.gpus.unwrap_or(0),
                    r.interval,
                    r.cpu_pct,
                    one.cpu_pct,
                    r.cpu_pct - one.cpu_pct,
                ));
            }
            continue;
        }
        out.push_str(&format!(
            "- {}, {} GPUs at {}: {:.3} % vs {:.3} % {base}: {:+.3} % of a \
             core{}\n",
            describe_stream(&r.stream),
            r.gpus.unwrap_or(0),
            r.interval,
            r.cpu_pct,
            alone.cpu_pct,
            cost,
            if r.gpus == Some(8) && r.interval_dur == Duration::from_millis(100) {
                format!(
                    " (target ≤ {TARGET_STREAM_PCT} %: {})",
                    if cost <= TARGET_STREAM_PCT {
                        "met"
                    } else {
                        "MISSED"
                    }
                )
            } else {
                String::new()
            }
        ));
    }
    out
}

/// When the agent's memory stops growing at `interval`: the 5 m windows are full after 5 minutes,
/// and every page of the ring after its capacity × interval (the capacity mirrors
/// `agent::shm::capacity_for`: 10 minutes of samples, a power of two, at least 1024).
fn steady_after(interval: Duration) -> Duration {
    let samples = (600.0 / interval.as_secs_f64()).ceil() as u64;
    let capacity = samples.clamp(1024, 1 << 22).next_power_of_two();
    let ring = interval * capacity as u32;
    ring.max(Duration::from_secs(300))
}

fn steady_state_note(rows: &[Measurement]) -> String {
    let mut out = String::new();
    let mut seen = Vec::new();
    for r in rows.iter().filter(|r| r.gpus.is_some()) {
        if seen.contains(&r.interval_dur) {
            continue;
        }
        seen.push(r.interval_dur);
        let steady = steady_after(r.interval_dur);
        if r.wall_s < steady.as_secs_f64() {
            out.push_str(&format!(
                "- at {}: memory was still growing: the 5 m windows fill after 300 s and the ring's \
                 pages after {} s, but this run measured {:.0} s; run with `--duration {}m` for \
                 steady-state memory\n",
                r.interval,
                steady.as_secs(),
                r.wall_s,
                steady.as_secs().div_ceil(60) + 1,
            ));
        }
    }
    out
}

/// Runs the benchmark and prints the table.
pub fn run(o: Options) -> Result<()> {
    if let Some(steps) = o.cluster {
        crate::util::step("load step → replicas, gpuscale against the Prometheus chain (cargo run -p gpuscale-cluster -- bench)");
        return crate::util::run(
            crate::util::cargo()
                .args([
                    "run",
                    "--quiet",
                    "--package",
                    "gpuscale-cluster",
                    "--",
                    "bench",
                ])
                .arg(format!("--steps={steps}"))
                .arg(format!("--wakes={steps}")),
            "gpuscale-cluster bench",
        );
    }
    let intervals: Vec<String> = o.interval.iter().map(|s| s.trim().to_owned()).collect();
    for i in &intervals {
        parse_interval(i)?;
    }
    let mut counts = o.gpus.clone();
    counts.sort_unstable();
    counts.dedup();
    if counts.is_empty() || intervals.is_empty() {
        bail!("nothing to measure: give at least one --gpus count and one --interval");
    }

    let streamed = o.stream.iter().any(|s| s != "none" && s != "served");
    let mut packages = vec!["-p", "agent", "-p", "fake-nvml"];
    if streamed {
        packages.extend(["-p", "collector"]);
    }
    step(&format!(
        "building in release (cargo build --release {})",
        packages.join(" ")
    ));
    run_cmd(
        cargo().args(["build", "--release"]).args(&packages),
        "cargo build --release",
    )?;
    let bin = target_dir().join("release");
    let agent = bin.join("gpuscale-agent");
    let fake = bin.join("libfake_nvml.so");
    let collector = streamed.then(|| bin.join("gpuscale-collector"));
    for f in [Some(&agent), Some(&fake), collector.as_ref()]
        .into_iter()
        .flatten()
    {
        if !f.is_file() {
            bail!("{} is missing after the build", f.display());
        }
    }
    let dir = shm_dir(&o);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runs = o.stream.len() * intervals.len() * counts.len();
    let total = o.duration * runs as u32;
    let max_gpus = counts.iter().copied().max().unwrap_or(0);
    let workload = Workload::start(&dir, max_gpus, total + Duration::from_secs(600))?;
    let bench = Bench {
        agent,
        fake,
        collector,
        dir: dir.clone(),
        workload,
        duration: o.duration,
        tck: clk_tck(),
    };
    step(&format!(
        "measuring {} configuration(s) for {} s each (about {} min), ring files in {}",
        runs,
        o.duration.as_secs(),
        total.as_secs().div_ceil(60),
        dir.display()
    ));

    let result = (|| -> Result<Vec<Measurement>> {
        let mut rows = Vec::new();
        let mut reference_row = None;
        for (i, stream) in o.stream.iter().enumerate() {
            for (k, interval) in intervals.iter().enumerate() {
                for (j, &n) in counts.iter().enumerate() {
                    // The idle reference runs alongside the first measurement.
                    let mut reference = if i == 0 && k == 0 && j == 0 {
                        let child = Command::new("sleep")
                            .arg((o.duration.as_secs() + 60).to_string())
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .spawn()
                            .context("starting the idle reference `sleep`")?;
                        Some(Proc(child))
                    } else {
                        None
                    };
                    let (m, r) = bench.measure(n, interval, stream, reference.as_mut())?;
                    rows.push(m);
                    if r.is_some() {
                        reference_row = r;
                    }
                }
            }
        }
        rows.extend(reference_row);
        Ok(rows)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;

    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "\n### Agent overhead: `cargo xtask bench --duration {}s` ({date}, {}, release build, fake \
         NVML)\n",
        o.duration.as_secs(),
        machine()
    );
    print!("{}", table(&rows, bench.tck));
    println!();
    print!("{}", per_gpu(&rows));
    print!("{}", streaming_cost(&rows));
    print!("{}", steady_state_note(&rows));
    Ok(())
}
