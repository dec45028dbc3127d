//! eBPF device-open tracking: which processes opened an NVIDIA device node, from which cgroup.
//!
//! Owns loading the embedded eBPF object (`agent-ebpf/program`, built by `build.rs` when the
//! eBPF toolchain is present; see [`built_with_ebpf`]), overriding its device-prefix global,
//! attaching its three tracepoints (`syscalls/sys_enter_openat`, `syscalls/sys_enter_openat2`,
//! `sched/sched_process_exit`), and a [`Tracker`] that reads the `EVENTS` ring buffer through
//! tokio's `AsyncFd` on its own thread and answers queries: per tgid the open info ([`Tracker::process`]), the last
//! [`RECENT_CAP`] processes that opened a device, exited ones included
//! ([`Tracker::recent_opens`]), and counters ([`Tracker::stats`]).
//!
//! Cgroup ids (what `bpf_get_current_cgroup_id` returns: the inode number of the cgroup v2
//! directory) become paths through an index of the cgroup v2 tree under the configured root
//! (default: the `cgroup2` mount in `/proc/self/mounts`), re-walked on a miss at most once per
//! [`REWALK_EVERY`]. A hit is checked against the directory still being there with that inode;
//! an id with no directory (the cgroup was removed) has no path and so no pod: the tracker may
//! say "unknown", never a wrong pod. An open's path is resolved when the event is read (or, when
//! its cgroup is newer than the last walk and the rate limit holds, by the reader thread at the
//! next walk, within [`REWALK_EVERY`]) and kept, so an exited process's entry in
//! [`Tracker::recent_opens`] keeps the pod it ran in. Queries do no I/O except
//! [`Tracker::cgroup_path`].
//!
//! Timestamps: the program stamps events with `bpf_ktime_get_ns` (CLOCK_MONOTONIC); the tracker
//! converts them to Unix nanoseconds with the REALTIME − MONOTONIC offset read when it drains
//! the ring buffer.
//!
//! Must never: block or slow the traced processes (the program drops events and counts them
//! rather than wait), guess a pod for a cgroup id it cannot find, call NVML, or write to
//! cgroupfs or procfs.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_ebpf_common::{self as common, Event, EVENT_EXIT, EVENT_OPEN, PREFIX_CAP};
use serde::Serialize;

use crate::cgroup::{parse_cgroup_path, PodRef};
use crate::{Error, Result};

/// How many recent device-opening processes [`Tracker::recent_opens`] keeps.
pub const RECENT_CAP: usize = 256;

/// The cgroup index is re-walked on a miss at most this often.
pub const REWALK_EVERY: Duration = Duration::from_millis(100);

/// Oldest kernel the eBPF program runs on (ring buffer maps).
const MIN_KERNEL: (u32, u32) = (5, 8);

/// The eBPF object `build.rs` built, when it could.
#[cfg(gpuscale_ebpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/agent-ebpf"
)));
#[cfg(not(gpuscale_ebpf))]
static OBJECT: Option<&[u8]> = None;

/// Whether this agent was built with its eBPF object (the eBPF toolchain was present at build
/// time). Without it, [`Tracker::start`] can only fall back to procfs.
pub fn built_with_ebpf() -> bool {
    OBJECT.is_some()
}

/// `--ebpf`: whether to track device opens with eBPF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Load eBPF where possible; otherwise log one line why and use procfs.
    #[default]
    Auto,
    /// Load eBPF or fail to start, saying why.
    On,
    /// Do not load eBPF; use procfs.
    Off,
}

impl EbpfMode {
    /// The flag value (`auto`, `on`, `off`).
    pub fn name(self) -> &'static str {
        match self {
            EbpfMode::Auto => "auto",
            EbpfMode::On => "on",
            EbpfMode::Off => "off",
        }
    }
}

impl fmt::Display for EbpfMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EbpfMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(EbpfMode::Auto),
            "on" => Ok(EbpfMode::On),
            "off" => Ok(EbpfMode::Off),
            _ => Err(format!(
                "--ebpf takes auto, on or off, not {s:?} (auto: use eBPF where it loads, else \
                 procfs)"
            )),
        }
    }
}

/// What [`Tracker::start`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfConfig {
    /// `--ebpf`.
    pub mode: EbpfMode,
    /// `--device-prefix`: opens of paths starting with this are tracked (`/dev/nvidia` matches
    /// `/dev/nvidia0`, `/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-caps/…`).
    pub device_prefix: String,
    /// `--cgroup-root`: where the cgroup v2 tree is mounted; `None` finds the `cgroup2` mount in
    /// `/proc/self/mounts`.
    pub cgroup_root: Option<PathBuf>,
    /// `--ebpf-hook`: how opens are caught.
    pub open_hook: OpenHook,
}

/// How the program catches device opens (`--ebpf-hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OpenHook {
    /// fentry when the kernel allows it, else the syscall tracepoints.
    #[default]
    Auto,
    /// fentry on `do_sys_openat2` (kernel BTF and BPF trampolines, 5.5+); fail without it.
    Fentry,
    /// The `syscalls/sys_enter_openat{,2}` tracepoints (every kernel the agent supports), at the
    /// price of every syscall taking the kernel's slow path while attached.
    Tracepoint,
}

impl OpenHook {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            OpenHook::Auto => "auto",
            OpenHook::Fentry => "fentry",
            OpenHook::Tracepoint => "tracepoint",
        }
    }

    /// What the hook attaches to, for logs and dumps.
    pub fn describe(self) -> &'static str {
        match self {
            OpenHook::Auto => "fentry or tracepoints",
            OpenHook::Fentry => "fentry do_sys_openat2",
            OpenHook::Tracepoint => "tracepoints sys_enter_openat, sys_enter_openat2",
        }
    }
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig {
            mode: EbpfMode::Auto,
            device_prefix: "/dev/nvidia".to_owned(),
            cgroup_root: None,
            open_hook: OpenHook::Auto,
        }
    }
}

impl EbpfConfig {
    /// Checks the device prefix fits the program's global: non-empty, absolute, no NUL, at most
    /// [`PREFIX_CAP`] bytes.
    pub fn validate(&self) -> Result<()> {
        let prefix = &self.device_prefix;
        let why = if prefix.is_empty() {
            "is empty".to_owned()
        } else if prefix.len() > PREFIX_CAP {
            format!(
                "is {} bytes long; the eBPF program matches at most {PREFIX_CAP}",
                prefix.len()
            )
        } else if !prefix.starts_with('/') {
            "is not an absolute path".to_owned()
        } else if prefix.contains('\0') {
            "contains a NUL byte".to_owned()
        } else {
            return Ok(());
        };
        Err(Error::DevicePrefix {
            prefix: prefix.clone(),
            why,
        })
    }
}

/// What the tracker knows about one process that opened a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenInfo {
    /// The process id (thread-group id).
    pub tgid: u32,
    /// The process's `comm` at its latest open (at most 15 bytes, lossy UTF-8).
    pub comm: String,
    /// The cgroup v2 id it opened from (the latest open's).
    pub cgroup_id: u64,
    /// That cgroup's path below the cgroup v2 root (`/kubepods.slice/…`), or `None` when no
    /// cgroup with that id could be found (it was removed before it was indexed).
    pub cgroup_path: Option<String>,
    /// The pod [`parse_cgroup_path`] reads from `cgroup_path`; `None` for a path that is not a
    /// pod's, or no path.
    pub pod: Option<PodRef>,
    /// The latest opened device, as the path after the prefix (`0`, `ctl`, `-uvm`, `-caps/…`).
    pub device: String,
    /// When it first opened a device, Unix nanoseconds.
    pub first_open_unix_ns: u64,
    /// When it last opened a device, Unix nanoseconds.
    pub last_open_unix_ns: u64,
    /// Whether the process has exited (only entries of [`Tracker::recent_opens`]).
    pub exited: bool,
}

/// The tracker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct EbpfStats {
    /// Events read from the ring buffer (opens and exits).
    pub events: u64,
    /// Events the program could not send because the ring buffer was full.
    pub dropped: u64,
    /// Live processes tracked now.
    pub tracked: usize,
}

/// Tracks device opens with eBPF. Shared (`Arc`) and thread-safe; stops (reader thread ends,
/// programs detach) on [`Tracker::stop`] or when dropped.
pub struct Tracker {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The loaded object: its programs stay attached while this is `Some`.
    ebpf: Mutex<Option<aya::Ebpf>>,
    /// The open hook attached (never `Auto`).
    hook: OpenHook,
}

struct Shared {
    stopped: AtomicBool,
    events: AtomicU64,
    /// The DROPPED total last read (what [`Tracker::stats`] reports once stopped).
    dropped: AtomicU64,
    /// Wakes the reader for [`Tracker::stop`] (a stored permit: a stop is never missed).
    wake: tokio::sync::Notify,
    /// The DROPPED map, read by [`Tracker::stats`] and by the reader's sweep.
    dropped_map: Mutex<Option<aya::maps::PerCpuArray<aya::maps::MapData, u64>>>,
    state: Mutex<State>,
    cgroups: Mutex<CgroupIndex>,
}

#[derive(Default)]
struct State {
    /// Live processes by tgid.
    procs: HashMap<u32, OpenInfo>,
    /// The last [`RECENT_CAP`] processes that opened, oldest first.
    recent: VecDeque<OpenInfo>,
    /// Opens whose cgroup was not in the index and could not be re-walked yet (rate limit):
    /// resolved by the reader thread at the next walk. Only the reader thread touches it.
    pending: Vec<Pending>,
}

/// An open waiting for the next cgroup walk to find its path.
#[derive(Clone, Copy)]
struct Pending {
    tgid: u32,
    cgroup_id: u64,
}

/// Upper bound on [`State::pending`] (opens beyond it in one burst stay without a path).
const PENDING_CAP: usize = 4096;

impl Shared {
    /// Sums the DROPPED map over CPUs (the last sum once stopped).
    fn dropped_now(&self) -> u64 {
        let map = lock(&self.dropped_map);
        if let Some(sum) = map
            .as_ref()
            .and_then(|m| m.get(&0, 0).ok())
            .map(|per_cpu| per_cpu.iter().sum())
        {
            // Relaxed (here and below): a counter read on its own.
            self.dropped.store(sum, Ordering::Relaxed);
        }
        self.dropped.load(Ordering::Relaxed)
    }
}

use gpuscale_health::ops::lock;

impl Tracker {
    /// Starts tracking as `config.mode` says: `Off` → `Ok(None)`; `Auto` → the tracker, or, when
    /// it cannot load, one warning saying why and `Ok(None)` (procfs is used); `On` → the
    /// tracker or an error saying why. An invalid `--device-prefix` is an error in every mode
    /// but `Off`.
    pub fn start(config: &EbpfConfig) -> Result<Option<Arc<Tracker>>> {
        match config.mode {
            EbpfMode::Off => Ok(None),
            EbpfMode::On => Tracker::load(config).map(Some),
            EbpfMode::Auto => match Tracker::load(config) {
                Ok(tracker) => Ok(Some(tracker)),
                Err(e @ Error::DevicePrefix { .. }) => Err(e),
                Err(Error::Ebpf { why }) => {
                    tracing::warn!(
                        "eBPF device-open tracking is unavailable ({why}); attributing GPU \
                         processes through procfs"
                    );
                    Ok(None)
                }
                Err(e) => {
                    tracing::warn!(
                        "eBPF device-open tracking is unavailable ({e}); attributing GPU \
                         processes through procfs"
                    );
                    Ok(None)
                }
            },
        }
    }

    /// Loads and attaches the tracker whatever `config.mode` says; an error says why (the
    /// reason `--ebpf auto` logs). For callers that want the reason itself.
    pub fn load(config: &EbpfConfig) -> Result<Arc<Tracker>> {
        config.validate()?;
        let Some(object) = OBJECT else {
            return Err(ebpf_err(
                "this gpuscale-agent was built without its eBPF object (the eBPF toolchain was \
                 missing at build time; `cargo xtask test` installs it, then rebuild)",
            ));
        };
        preflight()?;
        let cgroup_root = match &config.cgroup_root {
            Some(root) => root.clone(),
            None => find_cgroup2_mount(Path::new("/proc/self/mounts"))?,
        };
        if !cgroup_root.is_dir() {
            return Err(ebpf_err(format!(
                "the cgroup v2 root {} is not a directory (--cgroup-root)",
                cgroup_root.display()
            )));
        }
        raise_memlock_limit();

        let prefix = common::pad_prefix(config.device_prefix.as_bytes());
        let prefix_len = config.device_prefix.len() as u32;
        let mut ebpf = aya::EbpfLoader::new()
            .override_global(common::GLOBAL_DEVICE_PREFIX, &prefix, true)
            .override_global(common::GLOBAL_PREFIX_LEN, &prefix_len, true)
            .load(object)
            .map_err(|e| ebpf_err(format!("loading the eBPF object failed: {}", chain(&e))))?;
        let hook = attach_open(&mut ebpf, config.open_hook)?;
        let (program, category, name) = common::TRACEPOINT_EXIT;
        attach(&mut ebpf, program, category, name)?;
        let events = ebpf
            .take_map(common::MAP_EVENTS)
            .ok_or_else(|| ebpf_err("the eBPF object has no EVENTS map"))?;
        let ring = aya::maps::RingBuf::try_from(events)
            .map_err(|e| ebpf_err(format!("opening the EVENTS ring buffer: {}", chain(&e))))?;
        let dropped = ebpf
            .take_map(common::MAP_DROPPED)
            .ok_or_else(|| ebpf_err("the eBPF object has no DROPPED map"))?;
        let dropped = aya::maps::PerCpuArray::<_, u64>::try_from(dropped)
            .map_err(|e| ebpf_err(format!("opening the DROPPED map: {}", chain(&e))))?;

        let mut index = CgroupIndex::new(cgroup_root.clone());
        index.walk();
        let shared = Arc::new(Shared {
            stopped: AtomicBool::new(false),
            events: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            dropped_map: Mutex::new(Some(dropped)),
            state: Mutex::new(State::default()),
            cgroups: Mutex::new(index),
        });
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("gpuscale-ebpf".to_owned())
                .spawn(move || read_loop(&shared, ring))
                .map_err(|e| ebpf_err(format!("cannot start the eBPF reader thread: {e}")))?
        };
        tracing::info!(
            prefix = %config.device_prefix,
            cgroup_root = %cgroup_root.display(),
            "eBPF device-open tracking attached ({}, process exit)",
            hook.describe()
        );
        Ok(Arc::new(Tracker {
            shared,
            thread: Mutex::new(Some(reader)),
            ebpf: Mutex::new(Some(ebpf)),
            hook,
        }))
    }

    /// The open hook attached: [`OpenHook::Fentry`] or [`OpenHook::Tracepoint`].
    pub fn hook(&self) -> OpenHook {
        self.hook
    }

    /// What the tracker knows about live process `tgid`, or `None` when it did not see it open
    /// a device (or saw it exit).
    pub fn process(&self, tgid: u32) -> Option<OpenInfo> {
        lock(&self.shared.state).procs.get(&tgid).cloned()
    }

    /// The last [`RECENT_CAP`] processes that opened a device, oldest first, with `exited` set
    /// for those that have exited since.
    pub fn recent_opens(&self) -> Vec<OpenInfo> {
        lock(&self.shared.state).recent.iter().cloned().collect()
    }

    /// Counters: events read, events dropped by the program (ring buffer full), live processes.
    pub fn stats(&self) -> EbpfStats {
        EbpfStats {
            // Relaxed (here and below): counters read on their own.
            events: self.shared.events.load(Ordering::Relaxed),
            dropped: self.shared.dropped_now(),
            tracked: lock(&self.shared.state).procs.len(),
        }
    }

    /// The path (below the cgroup v2 root) of the cgroup with id `cgroup_id` now, or `None` when
    /// there is no such cgroup (never another cgroup's path).
    pub fn cgroup_path(&self, cgroup_id: u64) -> Option<String> {
        lock(&self.shared.cgroups).lookup(cgroup_id)
    }

    /// Stops reading events and detaches the programs. Queries keep answering from what was
    /// read. Idempotent.
    pub fn stop(&self) {
        // Release: the reader's Acquire load sees the stop before it polls again.
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
        self.shared.dropped_now();
        lock(&self.shared.dropped_map).take();
        lock(&self.ebpf).take();
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn ebpf_err(why: impl Into<String>) -> Error {
    Error::Ebpf { why: why.into() }
}

/// `e` and its sources, `: `-joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Attaches the open hook `wanted` says: fentry on `do_sys_openat2` when the kernel allows it
/// (`Auto` falls back to the syscall tracepoints, logging why), or the
/// tracepoints. Returns the hook attached.
fn attach_open(ebpf: &mut aya::Ebpf, wanted: OpenHook) -> Result<OpenHook> {
    if wanted != OpenHook::Tracepoint {
        match attach_fentry(ebpf) {
            Ok(()) => return Ok(OpenHook::Fentry),
            Err(e) if wanted == OpenHook::Fentry => return Err(e),
            Err(e) => tracing::info!(
                "the kernel refused the fentry open hook ({e}); using the syscall tracepoints, \
                 which slow every syscall a little while attached"
            ),
        }
    }
    for (program, category, name) in common::TRACEPOINTS_OPEN {
        attach(ebpf, program, category, name)?;
    }
    Ok(OpenHook::Tracepoint)
}

fn attach_fentry(ebpf: &mut aya::Ebpf) -> Result<()> {
    let (program, function) = common::FENTRY_OPEN;
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| ebpf_err(format!("reading the kernel's BTF failed: {}", chain(&e))))?;
    let prog: &mut aya::programs::FEntry = ebpf
        .program_mut(program)
        .ok_or_else(|| ebpf_err(format!("the eBPF object has no program {program}")))?
        .try_into()
        .map_err(|e| ebpf_err(format!("{program} is not an fentry program: {e}")))?;
    prog.load(function, &btf).map_err(|e| {
        ebpf_err(format!(
            "the kernel rejected the {program} program: {}",
            chain(&e)
        ))
    })?;
    prog.attach().map_err(|e| {
        ebpf_err(format!(
            "attaching fentry to {function} failed: {}",
            chain(&e)
        ))
    })?;
    Ok(())
}

fn attach(ebpf: &mut aya::Ebpf, program: &str, category: &str, name: &str) -> Result<()> {
    let prog: &mut aya::programs::TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| ebpf_err(format!("the eBPF object has no program {program}")))?
        .try_into()
        .map_err(|e| ebpf_err(format!("{program} is not a tracepoint program: {e}")))?;
    prog.load().map_err(|e| {
        ebpf_err(format!(
            "the kernel rejected the {program} program: {}",
            chain(&e)
        ))
    })?;
    prog.attach(category, name).map_err(|e| {
        ebpf_err(format!(
            "attaching to tracepoint {category}/{name} failed: {}",
            chain(&e)
        ))
    })?;
    Ok(())
}

/// Checks what makes loading fail in ways aya's errors do not explain well: privileges, the
/// kernel version, tracefs.
fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let caps = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| effective_caps(&s))
            .unwrap_or(0);
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_PERFMON: u32 = 38;
        const CAP_BPF: u32 = 39;
        let has = |c: u32| caps & (1u64 << c) != 0;
        if !(has(CAP_SYS_ADMIN) || has(CAP_BPF) && has(CAP_PERFMON)) {
            return Err(ebpf_err(
                "loading eBPF needs root or CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); this \
                 process has neither (run the agent privileged or add those capabilities)",
            ));
        }
    }
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        if let Some(version) = kernel_version(&release) {
            if version < MIN_KERNEL {
                return Err(ebpf_err(format!(
                    "kernel {} is too old: the eBPF program needs {}.{} or newer (ring buffer \
                     maps)",
                    release.trim(),
                    MIN_KERNEL.0,
                    MIN_KERNEL.1
                )));
            }
        }
    }
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|d| Path::new(d).join("events/syscalls").is_dir());
    if !tracefs {
        return Err(ebpf_err(
            "tracefs is not mounted (no /sys/kernel/tracing/events/syscalls): mount it with \
             `mount -t tracefs nodev /sys/kernel/tracing` (in a pod, mount the host's \
             /sys/kernel/tracing)",
        ));
    }
    Ok(())
}

/// The `CapEff` bits of a `/proc/<pid>/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// `(major, minor)` of a kernel release string such as `6.18.44-fc-v657`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (as aya's template does).
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: passes a valid rlimit struct by pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not lift RLIMIT_MEMLOCK ({}); fine on kernels 5.11+",
            std::io::Error::last_os_error()
        );
    }
}

/// The mount point of the first `cgroup2` file system in a `/proc/<pid>/mounts` file.
pub fn find_cgroup2_mount(mounts: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(mounts)
        .map_err(|e| ebpf_err(format!("cannot read {}: {e}", mounts.display())))?;
    cgroup2_mount_in(&text).ok_or_else(|| {
        ebpf_err(format!(
            "no cgroup2 file system is mounted (per {}); mount it or pass --cgroup-root",
            mounts.display()
        ))
    })
}

fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
    })
}

/// Undoes the octal escapes (`\040` for a space) of a mounts-file field.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(b) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What [`CgroupIndex::resolve`] found.
enum Resolution {
    /// The cgroup's path.
    Found(String),
    /// No such cgroup, for good.
    Gone,
    /// Not indexed, and the index was walked too recently to walk again.
    Later,
}

/// Cgroup v2 id (directory inode) → path below the root, from walks of the tree.
struct CgroupIndex {
    root: PathBuf,
    by_id: HashMap<u64, String>,
    last_walk: Option<Instant>,
}

impl CgroupIndex {
    fn new(root: PathBuf) -> Self {
        CgroupIndex {
            root,
            by_id: HashMap::new(),
            last_walk: None,
        }
    }

    /// The path of cgroup `id` now, or `None` (see [`CgroupIndex::resolve`]).
    fn lookup(&mut self, id: u64) -> Option<String> {
        match self.resolve(id) {
            Resolution::Found(path) => Some(path),
            Resolution::Gone | Resolution::Later => None,
        }
    }

    /// A checked index hit; or, on a miss, a re-walk (at most once per [`REWALK_EVERY`]) and a
    /// second look. A miss after a walk that started after the cgroup was seen in use means it
    /// is gone for good (ids are never reused).
    fn resolve(&mut self, id: u64) -> Resolution {
        if let Some(path) = self.by_id.get(&id) {
            if self.inode_of(path) == Some(id) {
                return Resolution::Found(path.clone());
            }
            self.by_id.remove(&id);
        }
        if !self.may_walk() {
            return Resolution::Later;
        }
        self.walk();
        match self.by_id.get(&id) {
            Some(path) => Resolution::Found(path.clone()),
            None => Resolution::Gone,
        }
    }

    fn may_walk(&self) -> bool {
        self.last_walk.is_none_or(|at| at.elapsed() >= REWALK_EVERY)
    }

    /// How long until [`CgroupIndex::may_walk`] (zero when it may now).
    fn next_walk_in(&self) -> Duration {
        self.last_walk.map_or(Duration::ZERO, |at| {
            REWALK_EVERY.saturating_sub(at.elapsed())
        })
    }

    fn inode_of(&self, path: &str) -> Option<u64> {
        let full = self.root.join(path.trim_start_matches('/'));
        std::fs::metadata(full).ok().map(|m| m.ino())
    }

    /// Re-reads the whole tree (directory entries only: `d_ino` and `d_type`, no `stat` per
    /// cgroup).
    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        self.by_id.clear();
        if let Ok(meta) = std::fs::metadata(&self.root) {
            self.by_id.insert(meta.ino(), "/".to_owned());
        }
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue; // removed meanwhile
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    continue; // kubelet never makes non-UTF-8 names; never guess
                };
                let path = format!("{rel}/{name}");
                self.by_id.insert(entry.ino(), path.clone());
                stack.push((entry.path(), path));
            }
        }
    }
}

/// Nanoseconds to add to a CLOCK_MONOTONIC time to get Unix time, now.
fn monotonic_to_unix_offset() -> i128 {
    fn now(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: passes a valid timespec to fill.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

fn to_unix(ts_ns: u64, offset: i128) -> u64 {
    (i128::from(ts_ns) + offset).clamp(0, i128::from(u64::MAX)) as u64
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(common::until_nul(bytes)).into_owned()
}

/// The reader thread: runs [`read_events`] on its own current-thread tokio runtime, so the
/// reader never competes with the agent's gRPC tasks and works whether or not the caller has a
/// runtime.
fn read_loop(shared: &Shared, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(
                "cannot start the eBPF reader's runtime ({e}); no device opens are read"
            );
            return;
        }
    };
    runtime.block_on(read_events(shared, ring));
}

/// Drains the ring buffer, then waits, through tokio's [`AsyncFd`](tokio::io::unix::AsyncFd),
/// for it to become readable, for [`Tracker::stop`], or for the next cgroup walk or liveness
/// sweep to be due.
async fn read_events(shared: &Shared, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    // SAFETY: the `RingBuf` owns its map fd and keeps it open, unchanged, until it is dropped,
    // which only happens when this `AsyncFd` is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(e) => {
            let e = std::io::Error::from(e);
            tracing::error!("cannot watch the eBPF ring buffer ({e}); no device opens are read");
            return;
        }
    };
    let mut batch: Vec<Event> = Vec::with_capacity(64);
    let mut sweep = Sweep::new();
    loop {
        while let Some(item) = ring.get_mut().next() {
            if item.len() == std::mem::size_of::<Event>() {
                // SAFETY: the item holds exactly one `Event` written by the program; `Event` is
                // plain old data, and `read_unaligned` copes with any alignment.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
        if !batch.is_empty() {
            handle_batch(shared, &batch);
            batch.clear();
        }
        // Acquire: pairs with the Release store in `stop`.
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        // With opens waiting for a cgroup walk, wake up when the next walk is allowed.
        let mut wait = sweep.next_in();
        if !lock(&shared.state).pending.is_empty() {
            let walk = lock(&shared.cgroups).next_walk_in();
            wait = wait.min(walk.max(Duration::from_millis(1)));
        }
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                // Cleared before the drain at the top of the loop: an event written after the
                // drain sets readiness again, so none waits for the next wake-up.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    tracing::warn!("waiting on the eBPF ring buffer failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
        resolve_pending(shared);
        sweep.run_if_due(shared);
    }
}

/// How often the tracker checks that the processes it holds are still alive.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Forgets tracked processes that are gone without an exit event: the program drops events
/// when the ring buffer is full (an exit among them), and a stale entry must not outlive its
/// process. Runs every [`SWEEP_EVERY`], and at once after the program reports new drops.
struct Sweep {
    last: Instant,
    dropped_seen: u64,
}

impl Sweep {
    fn new() -> Sweep {
        Sweep {
            last: Instant::now(),
            dropped_seen: 0,
        }
    }

    fn next_in(&self) -> Duration {
        SWEEP_EVERY.saturating_sub(self.last.elapsed())
    }

    fn run_if_due(&mut self, shared: &Shared) {
        let dropped = shared.dropped_now();
        if self.last.elapsed() < SWEEP_EVERY && dropped == self.dropped_seen {
            return;
        }
        self.last = Instant::now();
        self.dropped_seen = dropped;
        let mut state = lock(&shared.state);
        let gone: Vec<u32> = state
            .procs
            .keys()
            .copied()
            .filter(|&tgid| !process_exists(tgid))
            .collect();
        for tgid in gone {
            state.exit(tgid);
        }
    }
}

/// Whether process `tgid` exists (signal 0: permission errors still mean it exists).
fn process_exists(tgid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(tgid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Gives the opens that waited for a cgroup walk their path (or, when the walk does not find
/// their cgroup, leaves them without one for good).
fn resolve_pending(shared: &Shared) {
    if lock(&shared.state).pending.is_empty() {
        return;
    }
    let found: Vec<(Pending, Option<String>)> = {
        let mut index = lock(&shared.cgroups);
        if !index.may_walk() {
            return;
        }
        // Every pending open was seen before this walk starts: what it misses is gone.
        index.walk();
        let pending = std::mem::take(&mut lock(&shared.state).pending);
        pending
            .into_iter()
            .map(|p| (p, index.by_id.get(&p.cgroup_id).cloned()))
            .collect()
    };
    let mut state = lock(&shared.state);
    let State { procs, recent, .. } = &mut *state;
    for (p, path) in found {
        let Some(path) = path else { continue };
        let pod = parse_cgroup_path(&path);
        let waiting = |o: &OpenInfo| {
            o.tgid == p.tgid && o.cgroup_id == p.cgroup_id && o.cgroup_path.is_none()
        };
        let live = procs.get_mut(&p.tgid).filter(|o| waiting(o));
        for o in live
            .into_iter()
            .chain(recent.iter_mut().filter(|o| waiting(o)))
        {
            o.cgroup_path = Some(path.clone());
            o.pod.clone_from(&pod);
        }
    }
}

fn handle_batch(shared: &Shared, batch: &[Event]) {
    // Relaxed: a statistics counter.
    shared
        .events
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let offset = monotonic_to_unix_offset();
    // Resolve cgroup paths before taking the state lock (the index may walk the tree).
    let paths: Vec<Resolution> = {
        let mut index = lock(&shared.cgroups);
        batch
            .iter()
            .map(|ev| match ev.kind {
                EVENT_OPEN => index.resolve(ev.cgroup_id),
                _ => Resolution::Gone,
            })
            .collect()
    };
    let mut state = lock(&shared.state);
    for (ev, resolution) in batch.iter().zip(paths) {
        match ev.kind {
            EVENT_OPEN => {
                let path = match resolution {
                    Resolution::Found(path) => Some(path),
                    Resolution::Gone => None,
                    Resolution::Later => {
                        if state.pending.len() < PENDING_CAP {
                            state.pending.push(Pending {
                                tgid: ev.tgid,
                                cgroup_id: ev.cgroup_id,
                            });
                        }
                        None
                    }
                };
                state.open(ev, path, to_unix(ev.ts_ns, offset));
            }
            EVENT_EXIT => state.exit(ev.tgid),
            other => tracing::debug!(kind = other, "unknown eBPF event kind"),
        }
    }
}

impl State {
    fn open(&mut self, ev: &Event, path: Option<String>, at_ns: u64) {
        let comm = text(&ev.comm);
        let device = text(&ev.device);
        if let Some(p) = self.procs.get_mut(&ev.tgid) {
            p.last_open_unix_ns = at_ns;
            p.device.clone_from(&device);
            p.comm.clone_from(&comm);
            if p.cgroup_id != ev.cgroup_id || p.cgroup_path.is_none() {
                p.cgroup_id = ev.cgroup_id;
                p.pod = path.as_deref().and_then(parse_cgroup_path);
                p.cgroup_path = path;
            }
            let updated = p.clone();
            if let Some(r) = self
                .recent
                .iter_mut()
                .rev()
                .find(|r| r.tgid == ev.tgid && !r.exited)
            {
                *r = updated;
            }
            return;
        }
        let info = OpenInfo {
            tgid: ev.tgid,
            comm,
            cgroup_id: ev.cgroup_id,
            pod: path.as_deref().and_then(parse_cgroup_path),
            cgroup_path: path,
            device,
            first_open_unix_ns: at_ns,
            last_open_unix_ns: at_ns,
            exited: false,
        };
        if self.procs.len() >= common::OPENS_ENTRIES as usize {
            // The kernel's LRU map forgets the least recently opened process too; its exit
            // would never come.
            if let Some(oldest) = self
                .procs
                .values()
                .min_by_key(|p| p.last_open_unix_ns)
                .map(|p| p.tgid)
            {
                self.procs.remove(&oldest);
            }
        }
        self.procs.insert(ev.tgid, info.clone());
        if self.recent.len() >= RECENT_CAP {
            self.recent.pop_front();
        }
        self.recent.push_back(info);
    }

    fn exit(&mut self, tgid: u32) {
        self.procs.remove(&tgid);
        for r in self.recent.iter_mut().filter(|r| r.tgid == tgid) {
            r.exited = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u32, tgid: u32, cgroup_id: u64, ts_ns: u64, device: &str) -> Event {
        let mut ev = Event {
            kind,
            tgid,
            pid: tgid,
            _pad: 0,
            cgroup_id,
            ts_ns,
            comm: [0; 16],
            device: [0; 32],
        };
        ev.comm[..6].copy_from_slice(b"python");
        ev.device[..device.len()].copy_from_slice(device.as_bytes());
        ev
    }

    const POD_PATH: &str = "/kubepods.slice/kubepods-burstable.slice/\
        kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/\
        cri-containerd-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.scope";

    #[test]
    fn tracker_can_be_shared_across_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Tracker>();
        shared::<Arc<Tracker>>();
    }

    #[test]
    fn device_prefix_is_checked_against_the_global_capacity() {
        let ok = EbpfConfig::default();
        assert!(ok.validate().is_ok());
        for (prefix, words) in [
            ("", "is empty"),
            ("/dev/a-very-long-device-prefix-here", "at most 32"),
            ("dev/nvidia", "absolute"),
        ] {
            let config = EbpfConfig {
                device_prefix: prefix.to_owned(),
                ..EbpfConfig::default()
            };
            let msg = config.validate().unwrap_err().to_string();
            assert!(msg.contains("--device-prefix"), "{msg}");
            assert!(msg.contains(words), "{msg}");
        }
        let exactly_cap = EbpfConfig {
            device_prefix: format!("/{}", "x".repeat(PREFIX_CAP - 1)),
            ..EbpfConfig::default()
        };
        assert!(exactly_cap.validate().is_ok());
    }

    #[test]
    fn ebpf_mode_parses_the_flag_values() {
        assert_eq!("auto".parse::<EbpfMode>(), Ok(EbpfMode::Auto));
        assert_eq!("ON".parse::<EbpfMode>(), Ok(EbpfMode::On));
        assert_eq!("off".parse::<EbpfMode>(), Ok(EbpfMode::Off));
        assert!("yes"
            .parse::<EbpfMode>()
            .unwrap_err()
            .contains("auto, on or off"));
        assert_eq!(EbpfMode::On.to_string(), "on");
    }

    #[test]
    fn off_mode_starts_nothing_even_with_a_bad_prefix() {
        let config = EbpfConfig {
            mode: EbpfMode::Off,
            device_prefix: String::new(),
            cgroup_root: None,
            ..EbpfConfig::default()
        };
        assert!(Tracker::start(&config).unwrap().is_none());
    }

    #[test]
    fn auto_mode_still_rejects_a_bad_prefix() {
        let config = EbpfConfig {
            device_prefix: String::new(),
            ..EbpfConfig::default()
        };
        assert!(matches!(
            Tracker::start(&config),
            Err(Error::DevicePrefix { .. })
        ));
    }

    #[cfg(not(gpuscale_ebpf))]
    #[test]
    fn on_mode_without_the_object_says_how_to_get_it() {
        let config = EbpfConfig {
            mode: EbpfMode::On,
            ..EbpfConfig::default()
        };
        let msg = Tracker::start(&config).unwrap_err().to_string();
        assert!(msg.contains("built without its eBPF object"), "{msg}");
        assert!(!built_with_ebpf());
    }

    #[test]
    fn cgroup2_mount_is_found_in_hybrid_and_unified_layouts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            cgroup2_mount_in("none /host\\040cg cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/host cg"))
        );
    }

    #[test]
    fn kernel_versions_and_capabilities_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(
            effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
    }

    #[test]
    fn cgroup_index_finds_directories_by_inode_and_forgets_removed_ones() {
        let root = std::env::temp_dir().join(format!("gpuscale-cgindex-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let pod = root.join("kubepods.slice/pod-a.slice");
        std::fs::create_dir_all(&pod).unwrap();
        let pod_ino = std::fs::metadata(&pod).unwrap().ino();
        let mut index = CgroupIndex::new(root.clone());
        assert_eq!(
            index.lookup(pod_ino).as_deref(),
            Some("/kubepods.slice/pod-a.slice")
        );
        let root_ino = std::fs::metadata(&root).unwrap().ino();
        assert_eq!(index.lookup(root_ino).as_deref(), Some("/"));

        // Created after the walk: found on a miss once the rate limit allows a re-walk.
        let late = root.join("kubepods.slice/pod-b.slice");
        std::fs::create_dir(&late).unwrap();
        let late_ino = std::fs::metadata(&late).unwrap().ino();
        std::thread::sleep(REWALK_EVERY);
        assert_eq!(
            index.lookup(late_ino).as_deref(),
            Some("/kubepods.slice/pod-b.slice")
        );

        // Removed: the stale entry is dropped, not returned.
        std::fs::remove_dir(&pod).unwrap();
        assert_eq!(index.lookup(pod_ino), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn opens_update_one_entry_per_process_and_exit_marks_it() {
        let mut state = State::default();
        let path = Some(POD_PATH.to_owned());
        state.open(&event(EVENT_OPEN, 7, 42, 1, "ctl"), path.clone(), 1_000);
        state.open(&event(EVENT_OPEN, 7, 42, 2, "0"), path.clone(), 2_000);
        let p = state.procs.get(&7).unwrap();
        assert_eq!((p.first_open_unix_ns, p.last_open_unix_ns), (1_000, 2_000));
        assert_eq!(p.device, "0");
        assert_eq!(p.comm, "python");
        let pod = p.pod.as_ref().unwrap();
        assert_eq!(pod.pod_uid, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(state.recent.len(), 1);
        assert_eq!(state.recent[0].last_open_unix_ns, 2_000);

        state.exit(7);
        assert!(!state.procs.contains_key(&7));
        assert!(state.recent[0].exited);
        assert!(state.recent[0].pod.is_some());

        // The same tgid again (reused) is a new entry.
        state.open(&event(EVENT_OPEN, 7, 43, 3, "-uvm"), None, 3_000);
        assert_eq!(state.recent.len(), 2);
        assert!(!state.recent[1].exited);
        assert_eq!(state.recent[1].pod, None);
    }

    #[test]
    fn recent_opens_are_bounded() {
        let mut state = State::default();
        for tgid in 0..(RECENT_CAP as u32 + 10) {
            state.open(&event(EVENT_OPEN, tgid, 1, 1, "0"), None, u64::from(tgid));
        }
        assert_eq!(state.recent.len(), RECENT_CAP);
        assert_eq!(state.recent.front().unwrap().tgid, 10);
    }

    #[test]
    fn monotonic_times_become_unix_times() {
        let offset = monotonic_to_unix_offset();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: passes a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let unix = to_unix(mono, offset);
        let now = crate::unix_now_ns();
        assert!(now.abs_diff(unix) < 1_000_000_000, "{now} vs {unix}");
    }
}
