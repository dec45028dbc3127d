//! What tests do to a running cluster: stop and start the API server (with the same command
//! line, as a crash and a supervisor's restart would), compact etcd's history, and plain HTTP on
//! loopback.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::process;
use crate::state::{self, State};

/// A plain-HTTP/1.0 request to `url` (`http://host:port/path`): (status code, body).
pub fn http(method: &str, url: &str, body: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let rest = url.strip_prefix("http://").context("not an http:// URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} /{path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    Ok((code, body))
}

fn etcd_url(dir: &Path, path: &str) -> Result<String> {
    let st = state::read::<State>(&dir.join("state.json"))?.context("the cluster is not up")?;
    let port = st
        .ports
        .get("etcd")
        .and_then(|p| p.as_u64())
        .context("no etcd port")?;
    Ok(format!("http://127.0.0.1:{port}{path}"))
}

/// Compacts etcd's history up to its current revision (through etcd's JSON gateway), so every
/// older resourceVersion is gone for good. Returns that revision.
pub fn compact_etcd(dir: &Path) -> Result<u64> {
    let (code, body) = http("POST", &etcd_url(dir, "/v3/kv/range")?, r#"{"key":"AA=="}"#)?;
    if code != 200 {
        bail!("etcd range: HTTP {code}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let rev: u64 = v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .context("etcd's answer has no revision")?;
    let (code, body) = http(
        "POST",
        &etcd_url(dir, "/v3/kv/compaction")?,
        &format!(r#"{{"revision":"{rev}","physical":true}}"#),
    )?;
    if code != 200 {
        bail!("etcd compaction at {rev}: HTTP {code}: {body}");
    }
    Ok(rev)
}

/// A cluster process stopped by [`stop`], with what it takes to start it again as it was.
#[must_use = "a stopped process stays stopped until `start` is called"]
pub struct Stopped {
    dir: std::path::PathBuf,
    index: usize,
    name: String,
    log: std::path::PathBuf,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: std::path::PathBuf,
}

/// Stops the cluster's process `name` (as a crash would; SIGKILL after 10 s), keeping its
/// command line, environment and folder for [`Stopped::start`].
pub fn stop(dir: &Path, name: &str) -> Result<Stopped> {
    let st = state::read::<State>(&dir.join("state.json"))?.context("the cluster is not up")?;
    let index = st
        .procs
        .iter()
        .position(|p| p.name == name && p.alive())
        .with_context(|| format!("no running {name} in the cluster"))?;
    let old = &st.procs[index];
    let split = |b: Vec<u8>| -> Vec<String> {
        b.split(|c| *c == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    };
    let stopped = Stopped {
        dir: dir.to_owned(),
        index,
        name: name.to_owned(),
        log: old.log.clone(),
        argv: split(std::fs::read(format!("/proc/{}/cmdline", old.pid))?),
        env: split(std::fs::read(format!("/proc/{}/environ", old.pid))?),
        cwd: std::fs::read_link(format!("/proc/{}/cwd", old.pid))?,
    };
    old.stop(Duration::from_secs(10));
    Ok(stopped)
}

impl Stopped {
    /// Starts the process again with the same command line and environment; its old log is
    /// kept as `<name>.<n>.log`. Returns once the new one runs.
    pub fn start(self) -> Result<()> {
        let path = self.dir.join("state.json");
        let mut st = state::read::<State>(&path)?.context("the cluster is not up")?;
        let mut n = 1;
        while self.log.with_extension(format!("{n}.log")).exists() {
            n += 1;
        }
        let _ = std::fs::rename(&self.log, self.log.with_extension(format!("{n}.log")));
        let (program, args) = self.argv.split_first().context("empty command line")?;
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(&self.cwd).env_clear();
        for kv in &self.env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let logs = self.log.parent().context("log without folder")?;
        let new = process::spawn(logs, &self.name, &mut cmd)?;
        let slot = st
            .procs
            .get_mut(self.index)
            .context("state.json changed while the process was stopped")?;
        *slot = new;
        state::write(&path, &st)
    }
}

/// Stops the cluster's process `name` and starts it again with the same command line and
/// environment, as a crash and a supervisor's restart would.
pub fn restart(dir: &Path, name: &str) -> Result<()> {
    stop(dir, name)?.start()
}

/// Resident memory of `pid` in KiB (`VmRSS`), if it runs.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The children of `pid` (every thread's), for the processes the simulator runs.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default()
}

/// `cluster status`: every process of the cluster in `dir` (the simulator's agents and pod
/// processes included), whether it runs, its resident memory, and the total.
pub fn status(dir: &Path) -> Result<String> {
    let st = state::read::<State>(&dir.join("state.json"))?
        .with_context(|| format!("no cluster in {} (`cargo xtask cluster up`)", dir.display()))?;
    let mut out = String::new();
    let mut total = 0;
    let mut line = |name: &str, pid: u32, alive: bool, out: &mut String| {
        let rss = if alive { rss_kib(pid) } else { None };
        total += rss.unwrap_or(0);
        out.push_str(&format!(
            "{name:<28} pid {pid:<8} {:<8} {}\n",
            if alive { "running" } else { "EXITED" },
            rss.map_or("-".into(), |r| format!("{:.1} MiB", r as f64 / 1024.0))
        ));
    };
    for p in &st.procs {
        line(&p.name, p.pid, p.alive(), &mut out);
        if p.name == "sim" && p.alive() {
            for c in children(p.pid) {
                line(&format!("  {}", comm(c)), c, true, &mut out);
            }
        }
    }
    out.push_str(&format!(
        "total resident memory: {:.0} MiB\n",
        total as f64 / 1024.0
    ));
    Ok(out)
}
