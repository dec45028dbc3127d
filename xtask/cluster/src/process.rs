//! The cluster's processes: started detached (their own session, so they outlive `cluster up`
//! and a Ctrl-C in its terminal), each with a log file, and recorded by PID and start time so
//! that `down` stops exactly them and never a process that reused a PID.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A process the cluster started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proc {
    /// Its name in messages and its log file's name (`logs/<name>.log`).
    pub name: String,
    /// Its PID.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
    /// Its log file.
    pub log: PathBuf,
}

/// The start time of `pid`, if it is running.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Proc {
    /// Whether this very process is still running (not a zombie, not a reused PID).
    pub fn alive(&self) -> bool {
        if start_time(self.pid) != Some(self.start) {
            return false;
        }
        let state = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let state = state
            .rfind(')')
            .and_then(|i| state[i + 1..].split_whitespace().next());
        !matches!(state, Some("Z" | "X") | None)
    }

    /// Sends `signal` if it is still this process.
    pub fn signal(&self, signal: libc::c_int) {
        if self.alive() {
            // SAFETY: kill(2) has no memory preconditions; the PID was checked to be ours.
            unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once it is gone.
    pub fn stop(&self, grace: Duration) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            reap();
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.alive() {
            self.signal(libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                reap();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Fails with the log's last lines if the process has exited.
    pub fn check(&self) -> Result<()> {
        if self.alive() {
            return Ok(());
        }
        bail!(
            "{} exited; last lines of {}:\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, 25)
        )
    }
}

/// Collects exited children of this process (those `up` started and that died early), so
/// they do not linger as zombies and read as alive.
pub fn reap() {
    loop {
        // SAFETY: waitpid with WNOHANG and a null status pointer touches no memory of ours.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            break;
        }
    }
}

/// Starts `cmd` detached, with stdout and stderr in `logs/<name>.log`.
pub fn spawn(logs: &Path, name: &str, cmd: &mut Command) -> Result<Proc> {
    std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
    let log = logs.join(format!("{name}.log"));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    // SAFETY: setsid is async-signal-safe and touches no memory; it runs in the child between
    // fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            // EPERM: already a session leader (a `cmd` spawned before has this hook twice).
            if libc::setsid() < 0 && *libc::__errno_location() != libc::EPERM {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    let pid = child.id();
    // The child is tracked by PID from here on; dropping the handle neither kills nor reaps it.
    drop(child);
    let start =
        start_time(pid).with_context(|| format!("{name} exited at once; see {}", log.display()))?;
    Ok(Proc {
        name: name.to_owned(),
        pid,
        start,
        log,
    })
}

/// Runs a short command to completion (stdin closed); fails with `what`, naming what to install
/// (`install`) when the program is missing and its stderr when it fails.
pub fn run_checked(cmd: &mut Command, what: &str, install: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what} ({install})"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The last `n` lines of a log file (or a note that it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n);
            lines[from..]
                .iter()
                .map(|l| format!("  | {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("  (cannot read {}: {e})", path.display()),
    }
}

/// Waits until `ready` says yes, failing early with the process's log when it exits, and with
/// `what` and the log after `timeout`.
pub fn wait_ready(
    proc: &Proc,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        reap();
        proc.check()?;
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not become ready ({what}) within {} s; last lines of {}:\n{}",
                proc.name,
                timeout.as_secs(),
                proc.log.display(),
                tail(&proc.log, 25)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether something accepts TCP connections on `addr`.
pub fn listening(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).ok())
        .is_some()
}

/// A free TCP port on `ip` (bound, then released for the process that takes it).
pub fn free_port(ip: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(l.local_addr()?.port())
}
