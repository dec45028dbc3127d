//! A small lab network for fault tests: every process under test in its own network namespace,
//! joined by veth pairs to one bridge, so a test can cut, flap or slow one host's link with the
//! kernel's own tools while the others keep talking. Needs root.
//!
//! ```text
//!   root namespace (the test, its KEDA client)
//!     gsnf<slot>  198.19.128.0/17 carved per lab: <base>.1/27
//!        │ veth
//!   ┌────┴──────────── namespace gsnf<slot>-hub ────────────────────────┐
//!   │ p-test ── br0 ── p-collector ── p-agent0 ── p-proxy ── …          │
//!   └──────────────────┬──────────────┬────────────┬─────────────────────┘
//!                      │ veth         │ veth       │ veth
//!        gsnf<slot>-collector   gsnf<slot>-agent0   gsnf<slot>-proxy   (eth0: <base>.2, .3, …)
//! ```
//!
//! Why a bridge in a namespace of its own rather than routes through the root namespace: every
//! host, the test's root namespace included, is on one layer-2 segment, so nothing forwards IP
//! packets and no sysctl (`ip_forward`, per-interface `forwarding`) or route of the host is
//! touched; the root namespace gains one interface and the connected route of its address, both
//! gone with the hub namespace. A link is cut at the hub's end (`p-<host>` down, a switch port
//! pulled): the host's `eth0` loses its carrier and nothing crosses in either direction.
//!
//! Names and addresses come from a *slot* (0–1023): the lab holds `flock` on
//! `/run/gpuscale-netfault/slot-<n>.lock` for its life, so no two labs (tests of one process,
//! or of processes running side by side) share a slot, and a killed test's lock goes with it.
//! Slot `n` owns namespaces `gsnf<n>-*`, root interface `gsnf<n>` (≤ 15 bytes) and
//! 198.19.128.0/17's `n`-th /27; whatever a killed earlier run left under those names
//! (namespaces, the processes in them, the interface) is removed when the slot is taken, and
//! a new lab also removes the leftovers of every other slot whose lock nobody holds.
//! 198.18.0.0/16 and 198.19.0.0/30 belong to the local cluster (`xtask/cluster/src/net.rs`) and
//! are never used here.
//!
//! Owns: the namespaces, links and addresses it makes, and (on drop) every process still in its
//! namespaces. Never touches an interface, route or sysctl it did not make.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The range labs carve their /27s from.
const RANGE_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
/// /27s in 198.19.128.0/17.
const SLOTS: u32 = 1024;
/// Where slot locks live (tmpfs, root's).
const LOCK_DIR: &str = "/run/gpuscale-netfault";

/// One host of a lab: a network namespace with `eth0` on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// The name the test gave it (`collector`, `agent0`).
    pub name: String,
    /// Its network namespace (`/run/netns/<netns>`).
    pub netns: String,
    /// Its address on the lab network.
    pub ip: Ipv4Addr,
}

/// A lab network; removed, with every process left in it, on drop (also when the test panics).
pub struct Lab {
    slot: u32,
    hub: String,
    root_if: String,
    root_ip: Ipv4Addr,
    hosts: Vec<Host>,
    _lock: File,
}

/// Runs `ip` with `args`; an error quotes the command and what `ip` said.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<()> {
    run("ip", args)
}

fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (on Debian: apt-get install iproute2)"))?;
    if !out.status.success() {
        let line: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        bail!(
            "`{program} {}` failed ({}): {}",
            line.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Slot `slot`'s lock, when no living lab holds it.
fn lock_slot(slot: u32) -> Result<Option<File>> {
    use std::os::fd::AsRawFd as _;
    let path = Path::new(LOCK_DIR).join(format!("slot-{slot}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor `file` owns; no memory is involved.
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    Ok(taken.then_some(file))
}

/// Takes the first free slot at or after a start that differs per process and per lab.
fn take_slot() -> Result<(u32, File)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(LOCK_DIR)
        .with_context(|| format!("creating {LOCK_DIR}"))?;
    let start = std::process::id().wrapping_mul(7) + NEXT.fetch_add(1, Ordering::Relaxed);
    for i in 0..SLOTS {
        let slot = (start + i) % SLOTS;
        if let Some(file) = lock_slot(slot)? {
            return Ok((slot, file));
        }
    }
    bail!("all {SLOTS} lab slots under {LOCK_DIR} are taken")
}

/// Removes what labs of dead processes left (a test killed before its drops ran): every slot
/// with a namespace but no living holder of its lock.
fn sweep_dead_slots() -> Result<()> {
    let mut slots: Vec<u32> = netns_named("gsnf")
        .iter()
        .filter_map(|n| n.strip_prefix("gsnf")?.split_once('-')?.0.parse().ok())
        .collect();
    slots.sort_unstable();
    slots.dedup();
    for slot in slots {
        if let Some(_lock) = lock_slot(slot)? {
            clean_slot(slot);
        }
    }
    Ok(())
}

/// Namespaces whose name starts with `prefix`.
fn netns_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Kills (SIGKILL) every process in namespace `netns`, then removes it.
fn remove_netns(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            crate::signal(pid, libc::SIGKILL);
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", netns])
        .stderr(Stdio::null())
        .status();
}

/// Removes whatever slot `slot` may hold: its namespaces (with their processes and links) and
/// its root interface.
fn clean_slot(slot: u32) {
    for ns in netns_named(&format!("gsnf{slot}-")) {
        remove_netns(&ns);
    }
    let _ = Command::new("ip")
        .args(["link", "del", &format!("gsnf{slot}")])
        .stderr(Stdio::null())
        .status();
}

impl Lab {
    /// Makes a lab with one host per name in `hosts` (names of at most 13 bytes: the hub's
    /// `p-<name>` must fit an interface name).
    pub fn new(hosts: &[&str]) -> Result<Lab> {
        let (slot, lock) = take_slot()?;
        clean_slot(slot);
        sweep_dead_slots()?;
        let base = u32::from(RANGE_BASE) + slot * 32;
        let hub = format!("gsnf{slot}-hub");
        let mut lab = Lab {
            slot,
            hub: hub.clone(),
            root_if: format!("gsnf{slot}"),
            root_ip: Ipv4Addr::from(base + 1),
            hosts: Vec::new(),
            _lock: lock,
        };
        // On an error `lab` drops and removes what was made so far.
        ip(&["netns", "add", &hub]).context("making the lab's hub namespace (needs root)")?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        let root_if = lab.root_if.clone();
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", "p-test", "netns", &hub,
        ])?;
        ip(&["-n", &hub, "link", "set", "p-test", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/27", lab.root_ip),
            "dev",
            &root_if,
        ])?;
        ip(&["link", "set", &root_if, "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            if name.len() > 13 || i >= 28 {
                bail!("host name {name:?} is over 13 bytes, or the lab has over 28 hosts");
            }
            let host = Host {
                name: (*name).to_owned(),
                netns: format!("gsnf{slot}-{name}"),
                ip: Ipv4Addr::from(base + 2 + i as u32),
            };
            ip(&["netns", "add", &host.netns])?;
            lab.hosts.push(host.clone());
            let port = format!("p-{name}");
            ip(&[
                "-n",
                &hub,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{}/27", host.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &host.netns, "link", "set", "eth0", "up"])?;
        }
        Ok(lab)
    }

    /// The lab's slot (names and addresses derive from it).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The root namespace's (the test's) address on the lab network.
    pub fn root_ip(&self) -> Ipv4Addr {
        self.root_ip
    }

    /// Host `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("the lab has no host {name}"))
    }

    /// Host `name`'s address.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.host(name).ip
    }

    /// A command for `program` that runs inside host `name`'s namespace: `setns(2)` between fork
    /// and exec, so (unlike `ip netns exec`) it keeps the test's mounts and its pid is the
    /// program's own.
    pub fn command(&self, name: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter(&self.host(name).netns, &mut cmd)
            .unwrap_or_else(|e| panic!("entering host {name}: {e:#}"));
        cmd
    }

    /// Takes host `name`'s link down (`up == false`: the switch port pulled, nothing crosses) or
    /// up again.
    pub fn set_link(&self, name: &str, up: bool) -> Result<()> {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p-{}", self.host(name).name),
            if up { "up" } else { "down" },
        ])
    }

    /// Makes the bridge drop everything to and from host `name` (`on`), or forward it again,
    /// while both ends of its link stay up: a cut further away than the host's own link, which
    /// neither end's kernel sees (its port set to `disabled`, 0, with `bridge link`).
    pub fn set_blackhole(&self, name: &str, on: bool) -> Result<()> {
        run(
            "bridge",
            &[
                "-n",
                &self.hub,
                "link",
                "set",
                "dev",
                &format!("p-{}", self.host(name).name),
                "state",
                if on { "0" } else { "3" },
            ],
        )
    }

    /// Runs `tc -n <host's namespace>` with `args` (the host's link is `eth0`: a qdisc there
    /// shapes what the host sends).
    pub fn tc(&self, name: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.host(name).netns.as_str()];
        full.extend_from_slice(args);
        run("tc", &full)
    }

    /// TCP connections in state ESTABLISHED in host `name`'s namespace whose local or remote
    /// port is `port` (read from `/proc/net/tcp` by a `cat` inside the namespace).
    pub fn established(&self, name: &str, port: u16) -> Result<usize> {
        let out = self
            .command(name, "cat")
            .arg("/proc/net/tcp")
            .output()
            .context("reading /proc/net/tcp in the lab host")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(established_on(&text, port))
    }
}

/// Counts the ESTABLISHED rows of a `/proc/net/tcp` text with `port` at either end.
pub fn established_on(proc_net_tcp: &str, port: u16) -> usize {
    let port_hex = format!(":{port:04X}");
    proc_net_tcp
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "01" && (f[1].ends_with(&port_hex) || f[2].ends_with(&port_hex))
        })
        .count()
}

/// Makes `cmd` run inside network namespace `netns` (`/run/netns/<netns>`).
fn enter(netns: &str, cmd: &mut Command) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let path: PathBuf = Path::new("/run/netns").join(netns);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let fd = ns.as_raw_fd();
    // SAFETY: setns(2) on a descriptor `ns` owns, kept open by the closure until exec; setns is
    // async-signal-safe and touches no memory of ours.
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

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            remove_netns(&h.netns);
        }
        remove_netns(&self.hub);
        // Gone with the hub (its peer was there); a pair half made is removed here.
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_connections_are_counted_by_port_at_either_end() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n\
            0: 0100007F:1E15 00000000:0000 0A 00000000:00000000\n\
            1: 028013C6:1E15 038013C6:9C40 01 00000000:00000000\n\
            2: 038013C6:9C41 028013C6:1E15 01 00000000:00000000\n\
            3: 038013C6:9C42 028013C6:1E15 06 00000000:00000000\n\
            4: 038013C6:9C43 028013C6:1F40 01 00000000:00000000\n";
        // 0x1E15 = 7701: the listener (0A) and the TIME_WAIT (06) do not count.
        assert_eq!(established_on(text, 7701), 2);
        assert_eq!(established_on(text, 8000), 1);
        assert_eq!(established_on(text, 1), 0);
    }
}
