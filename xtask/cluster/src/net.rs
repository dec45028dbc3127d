//! The pod network: one network namespace that holds every pod IP, joined to the host by a
//! veth pair.
//!
//! Why not loopback: the API server rejects EndpointSlice and Endpoints addresses in
//! 127.0.0.0/8 ("may not be in the loopback range"), so pods with loopback IPs would never get
//! the EndpointSlices the collector discovers agents from. Instead pod IPs come from
//! 198.18.0.0/15 (RFC 2544's range for benchmarking test networks, never routed on the
//! internet), and every one of them lives inside this machine, in a namespace the cluster makes
//! and removes itself:
//!
//! | where | address | what |
//! |---|---|---|
//! | host, `gsc-host` | 198.19.0.1/30 | the node side: KEDA's metrics server listens here for the aggregation layer |
//! | namespace `gpuscale-cluster`, `gsc-pods` | 198.19.0.2/30 | the pod side |
//! | namespace `gpuscale-cluster`, `lo` | 198.18.0.0/16 (a `local` route) | every pod IP: node *i* gets 198.18.*i*.0/24; an agent binds its pod IP there |
//!
//! The host routes 198.18.0.0/16 through the veth, so the collector (a host process) reaches
//! every agent at the IP its pod was given.

use std::process::Command;

use anyhow::{Context, Result};

/// The network namespace's name (`/run/netns/gpuscale-cluster`).
pub const NETNS: &str = "gpuscale-cluster";
/// The host end of the veth pair.
pub const HOST_IF: &str = "gsc-host";
/// The namespace end of the veth pair.
pub const PODS_IF: &str = "gsc-pods";
/// The host's address on the veth: where pods' traffic to the node goes.
pub const HOST_IP: &str = "198.19.0.1";
/// The namespace's address on the veth.
pub const PODS_IP: &str = "198.19.0.2";
/// Every pod IP is in this range.
pub const POD_RANGE: &str = "198.18.0.0/16";

/// The pod CIDR of node number `i` (1-based).
pub fn node_cidr(i: usize) -> String {
    format!("198.18.{i}.0/24")
}

fn ip(args: &[&str]) -> Result<()> {
    crate::process::run_checked(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
        "on Debian: apt-get install iproute2",
    )
}

/// Whether the namespace exists.
pub fn exists() -> bool {
    std::path::Path::new("/run/netns").join(NETNS).exists()
}

/// Makes the namespace, the veth pair, the addresses and the routes (removing a leftover
/// namespace first).
pub fn up() -> Result<()> {
    down();
    ip(&["netns", "add", NETNS]).context("making the pod network namespace (needs root)")?;
    let steps: &[&[&str]] = &[
        &[
            "link", "add", HOST_IF, "type", "veth", "peer", "name", PODS_IF,
        ],
        &["link", "set", PODS_IF, "netns", NETNS],
        &["addr", "add", &format!("{HOST_IP}/30"), "dev", HOST_IF],
        &["link", "set", HOST_IF, "up"],
        &["-n", NETNS, "link", "set", "lo", "up"],
        &[
            "-n",
            NETNS,
            "addr",
            "add",
            &format!("{PODS_IP}/30"),
            "dev",
            PODS_IF,
        ],
        &["-n", NETNS, "link", "set", PODS_IF, "up"],
        &["-n", NETNS, "route", "add", "local", POD_RANGE, "dev", "lo"],
        &["-n", NETNS, "route", "add", "default", "via", HOST_IP],
        &["route", "add", POD_RANGE, "via", PODS_IP, "dev", HOST_IF],
    ];
    for args in steps {
        if let Err(e) = ip(args) {
            down();
            return Err(e.context("setting up the pod network"));
        }
    }
    Ok(())
}

/// Removes the namespace (and with it the veth pair and the route); nothing to do when it is
/// gone.
pub fn down() {
    if exists() {
        let _ = ip(&["netns", "del", NETNS]);
    }
    // A host end left without its peer (a crash between the two steps of `up`).
    let _ = Command::new("ip")
        .args(["link", "del", HOST_IF])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Makes `cmd` run inside the pod namespace (`setns` between fork and exec; unlike
/// `ip netns exec` this keeps the host's mounts, so the agent sees the real cgroup tree).
pub fn enter(cmd: &mut Command) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let ns = std::fs::File::open(std::path::Path::new("/run/netns").join(NETNS))
        .with_context(|| format!("opening /run/netns/{NETNS} (is the cluster up?)"))?;
    let fd = ns.as_raw_fd();
    // SAFETY: setns(2) on an fd owned by `ns`, which the closure keeps open until exec; it is
    // async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &ns;
            if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
