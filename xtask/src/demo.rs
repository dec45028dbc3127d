//! `cargo xtask demo`: builds the agent and the fake NVML, plays the story of
//! [`crate::scenario`] on four simulated GPUs, and shows the agent's dump as it refreshes.

use std::io::IsTerminal;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::scenario::{phase_at, scenario, PHASES, STORY_LEN_S};
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

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SIGTERM first so the agent shuts down cleanly; SIGKILL if it does not.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs the demo.
pub fn run(o: Options) -> Result<()> {
    step("building gpuscale-agent and the fake NVML library (cargo build -p agent -p fake-nvml)");
    run_cmd(
        cargo().args(["build", "-p", "agent", "-p", "fake-nvml"]),
        "cargo build",
    )?;
    let bin = target_dir().join("debug");
    let agent = bin.join("gpuscale-agent");
    let fake = bin.join("libfake_nvml.so");
    let dir = target_dir().join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scenario_path = dir.join("scenario.json");
    let ring = dir.join("agent.ring");
    let log = dir.join("agent.log");
    write_scenario(&scenario_path, 0)?;
    // Each demo tells its story from the start (a kept ring would carry the last run's windows).
    let _ = std::fs::remove_file(&ring);

    step(&format!(
        "starting the agent on 4 simulated GPUs (log: {}, scenario: {})",
        log.display(),
        scenario_path.display()
    ));
    let child = Command::new(&agent)
        .args(["run", "--nvml-lib"])
        .arg(&fake)
        .arg("--shm")
        .arg(&ring)
        .args(["--interval", &o.interval, "--node-name", "demo-node"])
        .env("FAKE_NVML_SCENARIO", &scenario_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    let mut child = AgentProcess(child);

    let clear = !o.no_clear && std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut phase = 0;
    let mut tick = 0u64;
    loop {
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "the agent exited ({status}); its log says:\n{}",
                log_tail(&log)
            );
        }
        let t = start.elapsed();
        if o.duration.is_some_and(|d| t >= d) {
            break;
        }
        let now_phase = phase_at(t.as_secs());
        if now_phase != phase {
            phase = now_phase;
            write_scenario(&scenario_path, phase)?;
        }
        let out = Command::new(&agent)
            .args(["dump", "--shm"])
            .arg(&ring)
            .output()?;
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
        if out.status.success() {
            screen.push_str(&String::from_utf8_lossy(&out.stdout));
        } else {
            screen.push_str(&format!(
                "(waiting for the agent: {})\n",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        print!("{screen}");
        tick += 1;
        let next = start + Duration::from_secs(tick);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    drop(child);
    eprintln!(
        "\ndemo finished; inspect the ring yourself with:\n  {} dump --shm {}",
        agent.display(),
        ring.display()
    );
    Ok(())
}
