//! eBPF device-open tracking: which processes opened an NVIDIA device node, from which cgroup.
//!
//! [`start`] is the one start policy (`--ebpf auto|on|off`). [`load`] loads the embedded eBPF
//! object (`agent-ebpf/program`, built by `build.rs` when the eBPF toolchain is present; see
//! [`built_with_ebpf`]), overrides its device-prefix global and attaches its programs: the open
//! hook (fentry on `do_sys_openat2` where the kernel allows it, else the
//! `syscalls/sys_enter_openat` and `syscalls/sys_enter_openat2` tracepoints; see [`OpenHook`])
//! and `sched/sched_process_exit`. A [`Tracker`] reads the `EVENTS` ring buffer on its own thread
//! ([`reader`]) into its [`state`] and answers queries: per tgid the open info
//! ([`Tracker::process`]), the last [`RECENT_CAP`] processes that opened a device, exited ones
//! included ([`Tracker::recent_opens`]), and counters ([`Tracker::stats`]).
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

pub mod cgroups;
pub mod load;
pub mod reader;
pub mod state;

pub use cgroups::find_cgroup2_mount;
use cgroups::*;
use load::*;
use reader::*;
use state::*;

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
/// time). Without it, [`start`] can only fall back to procfs.
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

/// What [`start`] needs.
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

/// Whether the agent's eBPF device-open tracker runs, as the agent status reports it: the
/// vocabulary's (`vocab`).
pub use vocab::EbpfState;

/// What starting eBPF tracking gave: the tracker when it runs, and the state and reason that
/// `dump` and the agent API report.
#[derive(Debug)]
pub struct Started {
    /// The tracker, when it loaded.
    pub tracker: Option<Arc<Tracker>>,
    /// On, off, or unavailable.
    pub state: EbpfState,
    /// With the tracker, the hook it attached (e.g. "fentry on do_sys_openat2"); without it
    /// under `auto`, why it could not load; empty when off.
    pub reason: String,
}

/// Starts tracking as `config.mode` says, the one start policy of the agent (its tests use it
/// too): `Off` → no tracker; `On` → the tracker or an error saying why; `Auto` → the tracker, or,
/// when it cannot load, one warning saying why and no tracker (procfs is used). An invalid
/// `--device-prefix` is an error in every mode but `Off`.
pub fn start(config: &EbpfConfig) -> Result<Started> {
    if !built_with_ebpf() {
        tracing::info!(
            "this agent was built without its eBPF object (the eBPF toolchain was missing at \
             build time); GPU processes are attributed through procfs"
        );
    }
    let on = |tracker: Arc<Tracker>| Started {
        reason: tracker.hook().describe().to_owned(),
        tracker: Some(tracker),
        state: EbpfState::On,
    };
    match config.mode {
        EbpfMode::Off => Ok(Started {
            tracker: None,
            state: EbpfState::Off,
            reason: String::new(),
        }),
        EbpfMode::On => Tracker::load(config).map(on),
        EbpfMode::Auto => match Tracker::load(config) {
            Ok(tracker) => Ok(on(tracker)),
            Err(e @ Error::DevicePrefix { .. }) => Err(e),
            Err(e) => {
                let why = match e {
                    Error::Ebpf { why } => why,
                    e => e.to_string(),
                };
                tracing::warn!(
                    "eBPF device-open tracking is unavailable ({why}); attributing GPU processes \
                     through procfs"
                );
                Ok(Started {
                    tracker: None,
                    state: EbpfState::Unavailable,
                    reason: why,
                })
            }
        },
    }
}

impl Tracker {
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
        let started = start(&config).unwrap();
        assert!(started.tracker.is_none());
        assert_eq!(started.state, EbpfState::Off);
    }

    #[test]
    fn auto_mode_still_rejects_a_bad_prefix() {
        let config = EbpfConfig {
            device_prefix: String::new(),
            ..EbpfConfig::default()
        };
        assert!(matches!(start(&config), Err(Error::DevicePrefix { .. })));
    }

    #[cfg(not(gpuscale_ebpf))]
    #[test]
    fn on_mode_without_the_object_says_how_to_get_it() {
        let config = EbpfConfig {
            mode: EbpfMode::On,
            ..EbpfConfig::default()
        };
        let msg = start(&config).unwrap_err().to_string();
        assert!(msg.contains("built without its eBPF object"), "{msg}");
        assert!(!built_with_ebpf());
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
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
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
