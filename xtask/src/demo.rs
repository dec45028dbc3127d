//! `cargo xtask demo`: builds the agent and the fake NVML, plays the story of
//! [`crate::scenario`] on four simulated GPUs, and shows the agent's dump as it refreshes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::scenario::{phase_at, pod_list, scenario, PHASES, PODS, STORY_LEN_S};
use crate::util::{cargo, run as run_cmd, step, target_dir};

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Options {
    /// Stop after this long (`90s`, `2m`); default: run until Ctrl-C.
    #[arg(long, value_parser = parse_secs)]
    duration: Option<Duration>,
    /// The agent's sampling interval.
    #[arg(long, default_value = "100ms")]
    interval: String,
    /// Print each refresh below the previous one instead of redrawing the screen.
    #[arg(long)]
    no_clear: bool,
    /// What to show: the collector's cluster view, or the agent's own dump.
    #[arg(long, value_enum, default_value = "collector")]
    view: View,
    /// Tell the story on the local cluster instead (`cargo xtask cluster up`, as root): the real
    /// KEDA and HPA scale a vLLM-like Deployment, printed every second.
    #[arg(long)]
    cluster: bool,
}

/// The dump the demo refreshes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum View {
    /// `gpuscale-collector dump`: nodes, GPUs, pods with their attributed values.
    Collector,
    /// `gpuscale-agent dump`: every metric and window of every GPU.
    Agent,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let (n, mul) = if let Some(n) = s.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1)
    } else {
        return Err(format!("{s:?}: write seconds or minutes, like 90s or 2m"));
    };
    n.parse::<u64>()
        .map(|n| Duration::from_secs(n * mul))
        .map_err(|_| format!("{s:?}: write seconds or minutes, like 90s or 2m"))
}

/// Writes the scenario atomically (temp file + rename), as the fake NVML expects.
fn write_scenario(path: &Path, phase: usize) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&scenario(phase))?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, log: PathBuf, cmd: &mut Command) -> Result<Daemon> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Daemon { child, name, log })
    }

    fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ({}) says:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first so it shuts down cleanly; SIGKILL if it does not.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `--cluster`: `gpuscale-cluster demo`, with the duration and screen options passed on.
fn cluster(o: &Options) -> Result<()> {
    step("the demo on the local cluster (cargo run -p gpuscale-cluster -- demo)");
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "--package",
        "gpuscale-cluster",
        "--",
        "demo",
    ]);
    if let Some(d) = o.duration {
        cmd.arg(format!("--duration={}s", d.as_secs()));
    }
    if o.no_clear {
        cmd.arg("--no-clear");
    }
    run_cmd(&mut cmd, "gpuscale-cluster demo")
}

/// The simulated pods' processes exist only in the fake NVML, so the agent reads their cgroups
/// from a procfs tree the demo writes (`--proc-root`), shaped as the kubelet's systemd driver
/// makes them. The tests use real processes in real cgroups instead.
fn write_proc_tree(root: &Path) -> Result<()> {
    for p in &PODS {
        let d = root.join(p.pid.to_string());
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("stat"),
            format!(
                "{} (python3) S 1 {0} {0} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 {} 0 0\n",
                p.pid,
                1000 + p.pid
            ),
        )?;
        std::fs::write(
            d.join("cgroup"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
                 cri-containerd-{:064x}.scope\n",
                p.uid.replace('-', "_"),
                p.pid
            ),
        )?;
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn output(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => format!("(waiting: {})\n", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("(cannot run: {e})\n"),
    }
}

/// Runs the demo.
pub fn run(o: Options) -> Result<()> {
    if o.cluster {
        return cluster(&o);
    }
    step("building gpuscale-agent, gpuscale-collector and the fake NVML library");
    run_cmd(
        cargo().args(["build", "-p", "agent", "-p", "collector", "-p", "fake-nvml"]),
        "cargo build",
    )?;
    let bin = target_dir().join("debug");
    let agent = bin.join("gpuscale-agent");
    let collector = bin.join("gpuscale-collector");
    let fake = bin.join("libfake_nvml.so");
    let dir = target_dir().join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scenario_path = dir.join("scenario.json");
    let ring = dir.join("agent.ring");
    let pods = dir.join("pods.json");
    write_scenario(&scenario_path, 0)?;
    // Each demo tells its story from the start (a kept ring would carry the last run's windows).
    let _ = std::fs::remove_file(&ring);
    write_proc_tree(&dir.join("proc"))?;
    std::fs::write(&pods, serde_json::to_vec_pretty(&pod_list("demo-node"))?)?;
    let agent_addr = format!("127.0.0.1:{}", free_port()?);
    let collector_addr = format!("127.0.0.1:{}", free_port()?);

    step(&format!(
        "starting the agent on 4 simulated GPUs and the collector (logs and files in {})",
        dir.display()
    ));
    let mut agent_proc = Daemon::spawn(
        "the agent",
        dir.join("agent.log"),
        Command::new(&agent)
            .args(["run", "--nvml-lib"])
            .arg(&fake)
            .arg("--shm")
            .arg(&ring)
            .args(["--interval", &o.interval, "--node-name", "demo-node"])
            .args(["--listen", &agent_addr, "--proc-root"])
            .arg(dir.join("proc"))
            .env("FAKE_NVML_SCENARIO", &scenario_path),
    )?;
    let mut collector_proc = Daemon::spawn(
        "the collector",
        dir.join("collector.log"),
        Command::new(&collector)
            .args([
                "serve",
                "--agents",
                &agent_addr,
                "--listen",
                &collector_addr,
            ])
            .arg("--pods-file")
            .arg(&pods),
    )?;
    let query = |metric: &str| {
        output(
            Command::new(&collector)
                .args(["query", "--collector", &collector_addr, "--namespace", "ml"])
                .args(["--name", &format!("vllm-on-{metric}")])
                .args(["--meta", &format!("metric={metric}")])
                .args(["--meta", "podSelector=app=vllm", "--meta", "targetValue=60"])
                .args(["--meta", "window=10s", "--meta", "activationThreshold=5"]),
        )
    };

    let clear = !o.no_clear && std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut phase = 0;
    let mut tick = 0u64;
    loop {
        agent_proc.check()?;
        collector_proc.check()?;
        let t = start.elapsed();
        if o.duration.is_some_and(|d| t >= d) {
            break;
        }
        let now_phase = phase_at(t.as_secs());
        if now_phase != phase {
            phase = now_phase;
            write_scenario(&scenario_path, phase)?;
        }
        let mut screen = String::new();
        if clear {
            screen.push_str("\x1b[2J\x1b[H");
        }
        screen.push_str(&format!(
            "gpuscale demo · t={:>3}s · phase {}/{} (story repeats every {STORY_LEN_S}s): {}\n\
             Ctrl-C to stop{}\n\n",
            t.as_secs(),
            phase + 1,
            PHASES.len(),
            PHASES[phase].title,
            o.duration
                .map_or(String::new(), |d| format!(" · ends at {}s", d.as_secs())),
        ));
        if o.view == View::Agent {
            screen.push_str(&output(
                Command::new(&agent).args(["dump", "--shm"]).arg(&ring),
            ));
        } else {
            screen.push_str(&output(Command::new(&collector).args([
                "dump",
                "--collector",
                &collector_addr,
            ])));
        }
        screen.push_str(
            "\nWhat KEDA is told for ScaledObject ml/vllm (podSelector app=vllm, targetValue 60, \
             10s average), on the honest signal and on the usual one:\n",
        );
        screen.push_str(&query("sm_active"));
        screen.push_str(&query("gpu_util"));
        print!("{screen}");
        tick += 1;
        let next = start + Duration::from_secs(tick);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    drop(collector_proc);
    drop(agent_proc);
    eprintln!(
        "\ndemo finished; the ring is kept, inspect it with:\n  {} dump --shm {}",
        agent.display(),
        ring.display()
    );
    Ok(())
}
