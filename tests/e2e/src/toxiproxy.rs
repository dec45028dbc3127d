//! toxiproxy (github.com/Shopify/toxiproxy) for fault tests: finds the server `cargo xtask test`
//! built, runs it, and drives it through its HTTP API (plain HTTP/1.1 and JSON over
//! `std::net::TcpStream`: five calls do not need an HTTP client crate).
//!
//! The server is built from its Go module by `gpuscale-cluster build` (a component in
//! `xtask/cluster/src/components.rs`, which `cargo xtask test` runs) into
//! `<cache>/bin/toxiproxy-<version>/toxiproxy-server`. This crate does not depend on
//! `gpuscale-cluster` (it would pull kube-rs and the Kubernetes types into every end-to-end
//! build for one path), so [`cache_dir`] repeats its rule and [`VERSION`] its version; a test
//! below reads components.rs and fails when they drift apart.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{Daemon, Scratch};

/// The toxiproxy release components.rs builds (`TOXIPROXY` there).
pub const VERSION: &str = "v2.12.0";

/// Where `gpuscale-cluster` keeps its builds: `GPUSCALE_CLUSTER_CACHE`, else
/// `$XDG_CACHE_HOME/gpuscale/cluster`, else `~/.cache/gpuscale/cluster` (components.rs's
/// `cache_dir`, repeated).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GPUSCALE_CLUSTER_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("gpuscale/cluster")
}

/// The path of `toxiproxy-server`, built or not.
pub fn binary() -> PathBuf {
    cache_dir()
        .join("bin")
        .join(format!("toxiproxy-{VERSION}"))
        .join("toxiproxy-server")
}

/// Why toxiproxy cannot run here (its server is not built), with the fix; `None` when it can.
pub fn missing() -> Option<String> {
    let bin = binary();
    (!bin.is_file()).then(|| {
        format!(
            "toxiproxy {VERSION} is not built ({} is missing): run `cargo xtask test`, or \
             `cargo run -p gpuscale-cluster -- build`, which builds it from its Go module",
            bin.display()
        )
    })
}

/// A running `toxiproxy-server`, killed on drop.
pub struct Toxiproxy {
    /// The process.
    pub daemon: Daemon,
    /// Its API address (`host:port`).
    pub api: String,
}

/// A toxic's direction: `Downstream` is what the upstream server sends to the client.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    /// Client → server.
    Upstream,
    /// Server → client.
    Downstream,
}

impl Toxiproxy {
    /// Starts the server with its API on `api` (`host:port`), `cmd` being a command for
    /// [`binary`] (from `netns::Lab::command`, to run it in a lab host), and waits until the
    /// API answers.
    pub fn start(dir: &Scratch, mut cmd: Command, api: &str) -> Result<Toxiproxy> {
        let (host, port) = api.rsplit_once(':').context("api is host:port")?;
        let mut daemon = Daemon::spawn(dir, "toxiproxy", cmd.args(["-host", host, "-port", port]));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            daemon.check_alive()?;
            if let Ok((200, _)) = request(api, "GET", "/version", None) {
                return Ok(Toxiproxy {
                    daemon,
                    api: api.to_owned(),
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "toxiproxy's API at {api} did not answer within 20 s; log:\n{}",
                    daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>, ok: &[u16]) -> Result<Value> {
        let (status, text) = request(&self.api, method, path, body.as_ref())?;
        if !ok.contains(&status) {
            bail!("toxiproxy: {method} {path} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Makes proxy `name`: listening on `listen`, forwarding to `upstream` (both `host:port`).
    pub fn proxy(&self, name: &str, listen: &str, upstream: &str) -> Result<()> {
        self.call(
            "POST",
            "/proxies",
            Some(json!({"name": name, "listen": listen, "upstream": upstream, "enabled": true})),
            &[201],
        )
        .map(drop)
    }

    /// Adds toxic `toxic` of kind `kind` (`latency`, `bandwidth`, `reset_peer`, `timeout`, …) to
    /// proxy `proxy` in direction `stream`, for every connection (open ones too), with the
    /// kind's `attributes`.
    pub fn add_toxic(
        &self,
        proxy: &str,
        toxic: &str,
        kind: &str,
        stream: Stream,
        attributes: Value,
    ) -> Result<()> {
        let stream = match stream {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        };
        self.call(
            "POST",
            &format!("/proxies/{proxy}/toxics"),
            Some(
                json!({"name": toxic, "type": kind, "stream": stream, "toxicity": 1.0,
                        "attributes": attributes}),
            ),
            &[200],
        )
        .map(drop)
    }

    /// Removes toxic `toxic` of proxy `proxy`.
    pub fn remove_toxic(&self, proxy: &str, toxic: &str) -> Result<()> {
        self.call(
            "DELETE",
            &format!("/proxies/{proxy}/toxics/{toxic}"),
            None,
            &[204],
        )
        .map(drop)
    }

    /// Enables or disables proxy `proxy` (disabled: it closes its connections and refuses new
    /// ones).
    pub fn set_enabled(&self, proxy: &str, enabled: bool) -> Result<()> {
        self.call(
            "POST",
            &format!("/proxies/{proxy}"),
            Some(json!({"enabled": enabled})),
            &[200],
        )
        .map(drop)
    }
}

/// One HTTP/1.1 request with a JSON body: (status, body).
fn request(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, rest) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    // Go's server answers small bodies with Content-Length; a chunked one is de-chunked here.
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_owned()
        },
    ))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_one_the_cluster_components_build() {
        let components = crate::root().join("xtask/cluster/src/components.rs");
        let text = std::fs::read_to_string(&components).unwrap();
        assert!(
            text.contains(&format!("pub const TOXIPROXY: &str = \"{VERSION}\";")),
            "{} builds another toxiproxy than tests/e2e/src/toxiproxy.rs's VERSION {VERSION}",
            components.display()
        );
    }

    #[test]
    fn a_chunked_body_is_put_together() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"), "{\"a\":1}");
    }
}
