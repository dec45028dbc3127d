//! Which Kubernetes pod a host process belongs to, read from the process's cgroup.
//!
//! Owns four things: parsing kubelet-made cgroup paths into a [`PodRef`]
//! ([`parse_cgroup_path`]), picking the useful path out of `/proc/<pid>/cgroup`
//! ([`parse_proc_cgroup`]), [`ProcfsResolver`], which reads procfs and caches each PID's
//! answer keyed by the PID **and** its start time, so a reused PID is resolved afresh, and where
//! cgroup v2 is mounted ([`cgroup2_root`], for the eBPF tracker and the tests' pods).
//!
//! Shapes understood, anywhere in the path (so kind-style `kubelet-` prefixes and nested
//! prefixes such as `/system.slice/docker-<id>.scope/…` work too):
//!
//! ```text
//! systemd driver (v1 or v2), pod UID written with `_`:
//!   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
//!   /kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope                      (Guaranteed)
//!   /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/docker-<id>.scope
//!   /kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod<uid>.slice/…
//! cgroupfs driver (v1 or v2), pod UID written with `-`:
//!   /kubepods/burstable/pod<uid>/<id>     /kubepods/pod<uid>/<id>     /kubepods/besteffort/pod<uid>/<id>
//! ```
//!
//! Decisions:
//! - The first (outermost) pod component wins; everything below the container component
//!   (`crio-<id>.scope/container`, a process's own sub-cgroups) is ignored.
//! - A process directly in the pod cgroup gets a [`PodRef`] with no container. A pause/sandbox
//!   container has its own scope and so is reported with its sandbox id: the path cannot tell
//!   it from an application container (it never uses a GPU, so this does not matter).
//! - `crio-conmon-<id>.scope` is CRI-O's container monitor, not the container: it belongs to
//!   the pod (`runtime` CRI-O) but gets `container_id: None`, so its work is never charged to
//!   the container whose id it carries.
//! - Pod UIDs must be lowercase 8-4-4-4-12 hex after `_` → `-`; container ids 64 lowercase hex.
//!   A path that names a pod but is malformed anywhere gives no pod at all (never a wrong one);
//!   [`ProcfsResolver`] reports such a process as [`Membership::Unknown`] with the reason.
//!
//! Must never: guess a pod from a malformed path, write to procfs or cgroupfs, call NVML or
//! the Kubernetes API, or do more I/O per lookup than reading two small procfs files.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The pod (and, when the path names one, the container) a cgroup path belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    /// The pod's UID in canonical dashed lowercase form (`0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0`),
    /// even where the path wrote it with `_` (systemd driver).
    pub pod_uid: String,
    /// The container's 64-hex id (as in `status.containerStatuses[].containerID` after the
    /// `scheme://`), or `None` for a process in the pod cgroup itself or in CRI-O's conmon.
    pub container_id: Option<String>,
    /// The container runtime, where the path says it (systemd scope names do; bare cgroupfs
    /// container directories do not).
    pub runtime: Option<Runtime>,
    /// The pod's QoS class, from the kubepods level the pod cgroup sits under.
    pub qos: Qos,
}

/// A container runtime recognised from a cgroup name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// containerd's CRI plugin (`cri-containerd-<id>.scope`).
    Containerd,
    /// CRI-O (`crio-<id>.scope`, `crio-conmon-<id>.scope`).
    Crio,
    /// Docker, through dockershim or cri-dockerd (`docker-<id>.scope`).
    Docker,
}

impl Runtime {
    /// The scheme Kubernetes puts before the id in a pod's `containerID`
    /// (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`).
    pub fn scheme(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::Crio => "cri-o",
            Runtime::Docker => "docker",
        }
    }
}

/// A pod's QoS class, spelled as Kubernetes spells `status.qosClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Qos {
    /// Pod cgroup directly under `kubepods`.
    Guaranteed,
    /// Pod cgroup under `kubepods/burstable` (`kubepods-burstable.slice`).
    Burstable,
    /// Pod cgroup under `kubepods/besteffort` (`kubepods-besteffort.slice`).
    BestEffort,
}

/// What a process's cgroup says about it: in a pod, not in one, or cannot tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Membership {
    /// The process runs in this pod.
    Pod(PodRef),
    /// The process's cgroup is not a pod's (a host service, a user session, `/`).
    NotInPod {
        /// The cgroup path the process is in.
        cgroup: String,
    },
    /// The agent cannot tell: the process is gone, procfs refused the read, or its cgroup
    /// names a pod in a form this parser does not trust.
    Unknown {
        /// What happened and, where there is one, what to do about it.
        reason: String,
    },
}

/// Where cgroup v2 is mounted for this process, per `/proc/self/mounts`; `None` when it is not
/// (or the file cannot be read).
pub fn cgroup2_root() -> Option<PathBuf> {
    cgroup2_mount_in(&std::fs::read_to_string("/proc/self/mounts").ok()?)
}

/// The mount point of the first `cgroup2` file system in the text of a `/proc/<pid>/mounts`
/// file (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
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

/// How a cgroup path parses: a pod, not a pod, or pod-like but malformed (with why).
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Pod(PodRef),
    NotPod,
    Malformed(String),
}

/// The pod a cgroup path belongs to, or `None` for a path that is not a pod's (or that names a
/// pod in a malformed way: this never returns a wrong pod). See the module doc for the shapes.
pub fn parse_cgroup_path(path: &str) -> Option<PodRef> {
    match classify(path) {
        Parsed::Pod(pod) => Some(pod),
        Parsed::NotPod | Parsed::Malformed(_) => None,
    }
}

fn classify(path: &str) -> Parsed {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for (i, comp) in comps.iter().enumerate() {
        let Some((qos, raw_uid)) = pod_component(&comps[..i], comp) else {
            continue;
        };
        let Some(pod_uid) = canonical_uid(raw_uid) else {
            return Parsed::Malformed(format!(
                "cgroup {path:?} names a pod in {comp:?} but {raw_uid:?} is not a pod UID \
                 (8-4-4-4-12 lowercase hex)"
            ));
        };
        let (container_id, runtime) = match comps.get(i + 1) {
            None => (None, None),
            Some(child) => match container_component(child) {
                Some(c) => c,
                None => {
                    return Parsed::Malformed(format!(
                        "cgroup {path:?} is inside pod {pod_uid} but {child:?} is not a \
                         container cgroup this agent knows (cri-containerd-, crio-, \
                         crio-conmon-, docker- followed by a 64-hex id, or a bare 64-hex id)"
                    ))
                }
            },
        };
        return Parsed::Pod(PodRef {
            pod_uid,
            container_id,
            runtime,
            qos,
        });
    }
    Parsed::NotPod
}

/// If `comp` is a pod cgroup's name (given its ancestors), its QoS and the UID as written.
fn pod_component<'a>(ancestors: &[&str], comp: &'a str) -> Option<(Qos, &'a str)> {
    // systemd driver: `[<prefix>-]kubepods[-burstable|-besteffort]-pod<uid>.slice`.
    if let Some(stem) = comp.strip_suffix(".slice") {
        let (prefix, uid) = stem.rsplit_once("-pod")?;
        let qos = [
            ("kubepods-burstable", Qos::Burstable),
            ("kubepods-besteffort", Qos::BestEffort),
            ("kubepods", Qos::Guaranteed),
        ]
        .into_iter()
        .find(|(level, _)| {
            prefix
                .strip_suffix(level)
                .is_some_and(|rest| rest.is_empty() || rest.ends_with('-'))
        })?
        .1;
        return Some((qos, uid));
    }
    // cgroupfs driver: `…/kubepods[/burstable|/besteffort]/pod<uid>`.
    let uid = comp.strip_prefix("pod")?;
    let qos = match ancestors {
        [.., "kubepods"] => Qos::Guaranteed,
        [.., "kubepods", "burstable"] => Qos::Burstable,
        [.., "kubepods", "besteffort"] => Qos::BestEffort,
        _ => return None,
    };
    Some((qos, uid))
}

/// The canonical dashed form of a pod UID written with `_` or `-`, if it is one.
fn canonical_uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => is_lower_hex(b),
        });
    ok.then_some(uid)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

/// The container id and runtime a pod cgroup's child names, or `None` if it names neither.
/// The outer `Option`s are (container id, runtime); conmon has a runtime but no container.
fn container_component(name: &str) -> Option<(Option<String>, Option<Runtime>)> {
    let (stem, is_scope) = match name.strip_suffix(".scope") {
        Some(stem) => (stem, true),
        None => (name, false),
    };
    // `crio-conmon-` before `crio-`: the longer prefix decides.
    let prefixes = [
        ("cri-containerd-", Runtime::Containerd, true),
        ("crio-conmon-", Runtime::Crio, false),
        ("crio-", Runtime::Crio, true),
        ("docker-", Runtime::Docker, true),
    ];
    for (prefix, runtime, is_container) in prefixes {
        if let Some(id) = stem.strip_prefix(prefix) {
            if !is_container_id(id) {
                return None;
            }
            return Some((is_container.then(|| id.to_owned()), Some(runtime)));
        }
    }
    // cgroupfs driver: the bare id; the runtime does not show.
    (!is_scope && is_container_id(stem)).then(|| (Some(stem.to_owned()), None))
}

/// The cgroup path to attribute from the contents of `/proc/<pid>/cgroup`.
///
/// Lines are `hierarchy:controllers:path`. In order: the cgroup v2 path (`0::<path>`) if it
/// parses as a pod; else the first v1 path that does, trying the `memory`, `cpu`, `cpuacct`
/// and `pids` hierarchies first, then the others in file order (hybrid systems have both, and
/// there the v2 path may not be the pod's); else the v2 path; else the first path. A trailing
/// ` (deleted)` (a process in a removed cgroup) is dropped. `None` when no line has a path.
pub fn parse_proc_cgroup(contents: &str) -> Option<String> {
    let mut v2 = None;
    let mut v1: Vec<(&str, &str)> = Vec::new();
    for line in contents.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        if !path.starts_with('/') {
            continue;
        }
        if id == "0" && controllers.is_empty() {
            v2.get_or_insert(path);
        } else {
            v1.push((controllers, path));
        }
    }
    if let Some(path) = v2.filter(|p| parse_cgroup_path(p).is_some()) {
        return Some(path.to_owned());
    }
    let has = |controllers: &str, want: &str| controllers.split(',').any(|c| c == want);
    let preferred = ["memory", "cpu", "cpuacct", "pids"]
        .iter()
        .flat_map(|want| v1.iter().filter(move |(c, _)| has(c, want)));
    if let Some((_, path)) = preferred
        .chain(v1.iter())
        .find(|(_, p)| parse_cgroup_path(p).is_some())
    {
        return Some((*path).to_owned());
    }
    v2.or_else(|| v1.first().map(|(_, p)| *p))
        .map(str::to_owned)
}

/// A process's start time (field 22 of `/proc/<pid>/stat`, clock ticks after boot).
///
/// The command name (field 2) may hold spaces and parentheses, so fields are counted from the
/// text after the **last** `)`. `None` if the text is not a stat line.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After `)`: field 3 (state) is index 0, so field 22 is index 19.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Resolves host PIDs to pods through procfs, caching each answer by PID and start time.
///
/// Every [`resolve`](Self::resolve) reads `<proc_root>/<pid>/stat`; the cgroup file is read only
/// when the PID is new or its start time changed (the PID was reused). Call
/// [`retain`](Self::retain) or [`evict_missing`](Self::evict_missing) with the PIDs NVML still
/// reports so the cache does not grow without bound.
#[derive(Debug)]
pub struct ProcfsResolver {
    proc_root: PathBuf,
    cache: HashMap<u32, Cached>,
}

#[derive(Debug)]
struct Cached {
    start_time: u64,
    membership: Membership,
}

impl ProcfsResolver {
    /// A resolver reading `<proc_root>/<pid>/…`: `/proc` in production (the agent needs the
    /// host's PID namespace, or the host's procfs mounted somewhere), a fake tree in tests.
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            cache: HashMap::new(),
        }
    }

    /// What `pid`'s cgroup says about it. Failures to read procfs are
    /// [`Membership::Unknown`] and are not cached, so the next call tries again.
    pub fn resolve(&mut self, pid: u32) -> Membership {
        let start_time = match self.start_time(pid) {
            Ok(t) => t,
            Err(reason) => {
                self.cache.remove(&pid);
                return Membership::Unknown { reason };
            }
        };
        if let Some(cached) = self.cache.get(&pid) {
            if cached.start_time == start_time {
                return cached.membership.clone();
            }
            tracing::debug!(
                pid,
                old_start = cached.start_time,
                new_start = start_time,
                "PID reused; resolving again"
            );
        }
        let cgroup_file = self.proc_root.join(pid.to_string()).join("cgroup");
        let contents = match std::fs::read_to_string(&cgroup_file) {
            Ok(c) => c,
            Err(e) => {
                self.cache.remove(&pid);
                return Membership::Unknown {
                    reason: describe_read_error(pid, &cgroup_file, &e),
                };
            }
        };
        // The PID may have died and been reused between the two reads: check it is still the
        // process we timed, so a cgroup is never cached under another process's start time.
        match self.start_time(pid) {
            Ok(again) if again == start_time => {}
            Ok(_) => {
                self.cache.remove(&pid);
                return Membership::Unknown {
                    reason: format!("process {pid} was replaced while its cgroup was being read"),
                };
            }
            Err(reason) => {
                self.cache.remove(&pid);
                return Membership::Unknown { reason };
            }
        }
        let membership = match parse_proc_cgroup(&contents) {
            None => Membership::Unknown {
                reason: format!("{} lists no cgroup path", cgroup_file.display()),
            },
            Some(cgroup) => match classify(&cgroup) {
                Parsed::Pod(pod) => Membership::Pod(pod),
                Parsed::NotPod => Membership::NotInPod { cgroup },
                Parsed::Malformed(why) => Membership::Unknown { reason: why },
            },
        };
        tracing::debug!(pid, start_time, ?membership, "resolved process cgroup");
        self.cache.insert(
            pid,
            Cached {
                start_time,
                membership: membership.clone(),
            },
        );
        membership
    }

    /// Keeps only the cached PIDs for which `live` returns true.
    pub fn retain(&mut self, live: impl Fn(u32) -> bool) {
        self.cache.retain(|pid, _| live(*pid));
    }

    /// Drops the cached PIDs not in `live_pids` (the PIDs NVML reported this round).
    pub fn evict_missing(&mut self, live_pids: &[u32]) {
        self.retain(|pid| live_pids.contains(&pid));
    }

    fn start_time(&self, pid: u32) -> Result<u64, String> {
        let stat_file = self.proc_root.join(pid.to_string()).join("stat");
        let stat = std::fs::read_to_string(&stat_file)
            .map_err(|e| describe_read_error(pid, &stat_file, &e))?;
        parse_stat_start_time(&stat).ok_or_else(|| {
            format!(
                "{} is not a stat line (no start time in field 22)",
                stat_file.display()
            )
        })
    }
}

fn describe_read_error(pid: u32, file: &Path, e: &io::Error) -> String {
    let file = file.display();
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        format!("process {pid} is gone ({file}: {e})")
    } else if e.kind() == io::ErrorKind::PermissionDenied {
        format!(
            "permission denied reading {file}: {e}. Run the agent in the host PID namespace \
             (hostPID: true) with a procfs not mounted with hidepid"
        )
    } else {
        format!("cannot read {file}: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const UID_US: &str = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0";
    const UID2: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    const CID: &str = "4e1d53d0bd8d6e1f2b0e0a8a4d7f0e5cf1a2b3c4d5e6f708192a3b4c5d6e7f80";
    const CID2: &str = "9b2f1c0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

    fn pod(uid: &str, cid: Option<&str>, runtime: Option<Runtime>, qos: Qos) -> PodRef {
        PodRef {
            pod_uid: uid.to_owned(),
            container_id: cid.map(str::to_owned),
            runtime,
            qos,
        }
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
    fn systemd_burstable_containerd_path_gives_dashed_uid_and_container() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(
                UID,
                Some(CID),
                Some(Runtime::Containerd),
                Qos::Burstable
            ))
        );
    }

    #[test]
    fn systemd_guaranteed_crio_path_is_guaranteed() {
        let path = format!("/kubepods.slice/kubepods-pod{UID_US}.slice/crio-{CID}.scope");
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(UID, Some(CID), Some(Runtime::Crio), Qos::Guaranteed))
        );
    }

    #[test]
    fn crio_conmon_belongs_to_the_pod_but_to_no_container() {
        let path = format!("/kubepods.slice/kubepods-pod{UID_US}.slice/crio-conmon-{CID}.scope");
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(UID, None, Some(Runtime::Crio), Qos::Guaranteed))
        );
    }

    #[test]
    fn systemd_docker_scope_is_docker() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/docker-{CID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(UID, Some(CID), Some(Runtime::Docker), Qos::Burstable))
        );
    }

    #[test]
    fn systemd_besteffort_path_is_besteffort() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(
                UID,
                Some(CID),
                Some(Runtime::Containerd),
                Qos::BestEffort
            ))
        );
    }

    #[test]
    fn kind_style_kubelet_prefix_is_understood() {
        let path = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(
                UID,
                Some(CID),
                Some(Runtime::Containerd),
                Qos::BestEffort
            ))
        );
        let guaranteed = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_US}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&guaranteed).map(|p| p.qos),
            Some(Qos::Guaranteed)
        );
    }

    #[test]
    fn pod_under_a_nested_prefix_is_found() {
        let path = format!(
            "/system.slice/docker-{CID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_US}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(
                UID,
                Some(CID),
                Some(Runtime::Containerd),
                Qos::Burstable
            ))
        );
        let v1_in_docker = format!("/docker/{CID2}/kubepods/besteffort/pod{UID}/{CID}");
        assert_eq!(
            parse_cgroup_path(&v1_in_docker),
            Some(pod(UID, Some(CID), None, Qos::BestEffort))
        );
    }

    #[test]
    fn sub_cgroups_inside_the_container_are_ignored() {
        let path =
            format!("/kubepods.slice/kubepods-pod{UID_US}.slice/crio-{CID}.scope/container/worker");
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(UID, Some(CID), Some(Runtime::Crio), Qos::Guaranteed))
        );
    }

    #[test]
    fn outermost_pod_wins_when_pods_are_nested() {
        let path =
            format!("/kubepods/burstable/pod{UID}/{CID}/kubepods/besteffort/pod{UID2}/{CID2}");
        assert_eq!(
            parse_cgroup_path(&path),
            Some(pod(UID, Some(CID), None, Qos::Burstable))
        );
    }

    #[test]
    fn cgroupfs_paths_give_all_three_qos_classes() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{CID}")),
            Some(pod(UID, Some(CID), None, Qos::Burstable))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID2}/{CID2}")),
            Some(pod(UID2, Some(CID2), None, Qos::Guaranteed))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/{CID}")),
            Some(pod(UID, Some(CID), None, Qos::BestEffort))
        );
    }

    #[test]
    fn cgroupfs_crio_container_names_the_runtime() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/crio-{CID}")),
            Some(pod(UID, Some(CID), Some(Runtime::Crio), Qos::Burstable))
        );
    }

    #[test]
    fn process_in_the_pod_cgroup_itself_has_no_container() {
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice"
        );
        assert_eq!(
            parse_cgroup_path(&systemd),
            Some(pod(UID, None, None, Qos::Burstable))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/")),
            Some(pod(UID, None, None, Qos::Guaranteed))
        );
    }

    #[test]
    fn host_and_qos_level_paths_are_not_pods() {
        for path in [
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/",
            "",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods",
            "/kubepods/besteffort",
            "/init.scope",
        ] {
            assert_eq!(parse_cgroup_path(path), None, "{path:?}");
            assert_eq!(classify(path), Parsed::NotPod, "{path:?}");
        }
        // `pod…` not under kubepods is someone else's directory.
        assert_eq!(
            classify(&format!("/machine/pod{UID}/{CID}")),
            Parsed::NotPod
        );
    }

    #[test]
    fn malformed_uids_and_container_ids_give_no_pod() {
        let short_uid = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f";
        let upper_uid = "0F1E2D3C_4B5A_6978_8796_A5B4C3D2E1F0";
        let bad_sep = "0f1e2d3c4_b5a_6978_8796_a5b4c3d2e1f0";
        let short_cid = &CID[..63];
        let upper_cid = CID.to_uppercase();
        let cases = [
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{short_uid}.slice/cri-containerd-{CID}.scope"),
            format!("/kubepods.slice/kubepods-pod{upper_uid}.slice/crio-{CID}.scope"),
            format!("/kubepods.slice/kubepods-pod{bad_sep}.slice"),
            "/kubepods.slice/kubepods-pod.slice".to_owned(),
            format!("/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{short_cid}.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_US}.slice/docker-{upper_cid}.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_US}.slice/crio-conmon-xyz.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_US}.slice/something-else.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_US}.slice/{CID}.scope"),
            format!("/kubepods/burstable/pod{UID}/{short_cid}"),
            format!("/kubepods/burstable/podnot-a-uid/{CID}"),
            format!("/kubepods/pod{UID}x/{CID}"),
        ];
        for path in &cases {
            assert_eq!(parse_cgroup_path(path), None, "{path}");
            assert!(
                matches!(classify(path), Parsed::Malformed(_)),
                "{path} should be reported as malformed"
            );
        }
    }

    #[test]
    fn runtime_scheme_matches_kubernetes_container_ids() {
        assert_eq!(Runtime::Containerd.scheme(), "containerd");
        assert_eq!(Runtime::Crio.scheme(), "cri-o");
        assert_eq!(Runtime::Docker.scheme(), "docker");
    }

    #[test]
    fn proc_cgroup_v2_only_gives_the_unified_path() {
        let path = format!("/kubepods.slice/kubepods-pod{UID_US}.slice/crio-{CID}.scope");
        assert_eq!(parse_proc_cgroup(&format!("0::{path}\n")), Some(path));
        assert_eq!(
            parse_proc_cgroup("0::/system.slice/sshd.service\n"),
            Some("/system.slice/sshd.service".to_owned())
        );
    }

    #[test]
    fn proc_cgroup_v1_only_prefers_a_pod_path_from_memory() {
        let pod_path = format!("/kubepods/burstable/pod{UID}/{CID}");
        let contents = format!(
            "12:hugetlb:/\n\
             11:freezer:/\n\
             10:memory:{pod_path}\n\
             4:cpu,cpuacct:{pod_path}\n\
             1:name=systemd:/system.slice/containerd.service\n"
        );
        assert_eq!(parse_proc_cgroup(&contents), Some(pod_path.clone()));
        // Only a non-preferred hierarchy names the pod: it is still found.
        let only_devices = format!("11:memory:/\n7:devices:{pod_path}\n3:pids:/\n");
        assert_eq!(parse_proc_cgroup(&only_devices), Some(pod_path));
        // No pod anywhere: the first path.
        assert_eq!(
            parse_proc_cgroup("5:memory:/user.slice\n1:name=systemd:/user.slice/x.scope\n"),
            Some("/user.slice".to_owned())
        );
    }

    #[test]
    fn proc_cgroup_hybrid_uses_v1_pod_path_when_unified_is_not_a_pod() {
        let pod_path = format!("/kubepods/besteffort/pod{UID}/{CID}");
        let contents = format!(
            "12:pids:{pod_path}\n\
             9:memory:{pod_path}\n\
             1:name=systemd:/system.slice/containerd.service\n\
             0::/system.slice/containerd.service\n"
        );
        assert_eq!(parse_proc_cgroup(&contents), Some(pod_path));
        let systemd_path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/docker-{CID}.scope"
        );
        let both = format!("9:memory:{systemd_path}\n0::{systemd_path}\n");
        assert_eq!(parse_proc_cgroup(&both), Some(systemd_path));
        assert_eq!(
            parse_proc_cgroup("9:memory:/user.slice\n0::/user.slice/session-1.scope\n"),
            Some("/user.slice/session-1.scope".to_owned())
        );
    }

    #[test]
    fn proc_cgroup_drops_deleted_suffix_and_rejects_empty_files() {
        let path = format!("/kubepods/pod{UID}/{CID}");
        assert_eq!(
            parse_proc_cgroup(&format!("0::{path} (deleted)\n")),
            Some(path)
        );
        assert_eq!(parse_proc_cgroup(""), None);
        assert_eq!(parse_proc_cgroup("garbage\n"), None);
    }

    /// A stat line whose comm is `comm`, with start time `start`.
    fn stat_line(pid: u32, comm: &str, start: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1234 0 0 0 10 5 0 0 20 0 12 0 {start} \
             123456789 4567 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 3 0 0 0 0 0\n"
        )
    }

    #[test]
    fn stat_start_time_survives_parentheses_and_spaces_in_comm() {
        assert_eq!(
            parse_stat_start_time(&stat_line(4242, "python3", 987654)),
            Some(987654)
        );
        assert_eq!(
            parse_stat_start_time(&stat_line(4242, "evil) (name S 1 2 3", 555)),
            Some(555)
        );
        assert_eq!(
            parse_stat_start_time(&stat_line(4242, ") (", 777)),
            Some(777)
        );
        assert_eq!(parse_stat_start_time("4242 (truncated) S 1 2"), None);
        assert_eq!(parse_stat_start_time("no parens at all"), None);
    }

    /// A fake procfs in a temporary directory, removed on drop.
    struct FakeProc(tempfile::TempDir);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let prefix = format!("gpuscale-cgroup-{name}-");
            Self(tempfile::Builder::new().prefix(&prefix).tempdir().unwrap())
        }

        fn root(&self) -> &Path {
            self.0.path()
        }

        fn process(&self, pid: u32, start: u64, cgroup: &str) {
            let dir = self.root().join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("stat"), stat_line(pid, "python3 (worker)", start)).unwrap();
            std::fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        }

        fn kill(&self, pid: u32) {
            std::fs::remove_dir_all(self.root().join(pid.to_string())).unwrap();
        }
    }

    fn pod_a() -> String {
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/cri-containerd-{CID}.scope")
    }

    fn pod_b() -> String {
        format!("/kubepods/pod{UID2}/{CID2}")
    }

    #[test]
    fn resolver_attributes_pod_and_host_processes() {
        let proc = FakeProc::new("attr");
        proc.process(4242, 1000, &pod_a());
        proc.process(77, 50, "/system.slice/containerd.service");
        let mut r = ProcfsResolver::new(proc.root());
        assert_eq!(
            r.resolve(4242),
            Membership::Pod(pod(
                UID,
                Some(CID),
                Some(Runtime::Containerd),
                Qos::Burstable
            ))
        );
        assert_eq!(
            r.resolve(77),
            Membership::NotInPod {
                cgroup: "/system.slice/containerd.service".to_owned()
            }
        );
    }

    #[test]
    fn resolver_reuses_the_cached_answer_while_start_time_matches() {
        let proc = FakeProc::new("cache");
        proc.process(4242, 1000, &pod_a());
        let mut r = ProcfsResolver::new(proc.root());
        let first = r.resolve(4242);
        // Same process (same start time): the cgroup file is not read again.
        std::fs::write(proc.root().join("4242/cgroup"), format!("0::{}\n", pod_b())).unwrap();
        assert_eq!(r.resolve(4242), first);
    }

    #[test]
    fn reused_pid_with_new_start_time_is_resolved_again() {
        let proc = FakeProc::new("reuse");
        proc.process(4242, 1000, &pod_a());
        let mut r = ProcfsResolver::new(proc.root());
        assert!(matches!(r.resolve(4242), Membership::Pod(p) if p.pod_uid == UID));
        proc.kill(4242);
        proc.process(4242, 2000, &pod_b());
        assert_eq!(
            r.resolve(4242),
            Membership::Pod(pod(UID2, Some(CID2), None, Qos::Guaranteed))
        );
    }

    #[test]
    fn evicted_pids_are_read_afresh() {
        let proc = FakeProc::new("evict");
        proc.process(4242, 1000, &pod_a());
        proc.process(4243, 1001, &pod_a());
        let mut r = ProcfsResolver::new(proc.root());
        r.resolve(4242);
        r.resolve(4243);
        std::fs::write(proc.root().join("4242/cgroup"), format!("0::{}\n", pod_b())).unwrap();
        std::fs::write(proc.root().join("4243/cgroup"), format!("0::{}\n", pod_b())).unwrap();
        r.evict_missing(&[4243]);
        // 4242 was dropped, so its (changed) file is read; 4243 was kept and still cached.
        assert!(matches!(r.resolve(4242), Membership::Pod(p) if p.pod_uid == UID2));
        assert!(matches!(r.resolve(4243), Membership::Pod(p) if p.pod_uid == UID));
        r.retain(|_| false);
        assert!(matches!(r.resolve(4243), Membership::Pod(p) if p.pod_uid == UID2));
    }

    #[test]
    fn vanished_pid_is_unknown_and_says_the_process_is_gone() {
        let proc = FakeProc::new("gone");
        proc.process(4242, 1000, &pod_a());
        let mut r = ProcfsResolver::new(proc.root());
        assert!(matches!(r.resolve(4242), Membership::Pod(_)));
        proc.kill(4242);
        match r.resolve(4242) {
            Membership::Unknown { reason } => {
                assert!(reason.contains("process 4242 is gone"), "{reason}")
            }
            other => panic!("expected Unknown, got {other:?}"),
        }
        match r.resolve(999_999) {
            Membership::Unknown { reason } => assert!(reason.contains("gone"), "{reason}"),
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    #[test]
    fn malformed_pod_cgroup_is_unknown_with_the_path_in_the_reason() {
        let proc = FakeProc::new("malformed");
        let bad = format!("/kubepods/burstable/pod{UID}/{}", &CID[..12]);
        proc.process(4242, 1000, &bad);
        let mut r = ProcfsResolver::new(proc.root());
        match r.resolve(4242) {
            Membership::Unknown { reason } => assert!(reason.contains(&bad), "{reason}"),
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    #[test]
    fn unreadable_stat_is_unknown_not_a_pod() {
        let proc = FakeProc::new("badstat");
        proc.process(4242, 1000, &pod_a());
        std::fs::write(proc.root().join("4242/stat"), "4242 (x) S 1\n").unwrap();
        let mut r = ProcfsResolver::new(proc.root());
        assert!(
            matches!(r.resolve(4242), Membership::Unknown { reason } if reason.contains("field 22"))
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_test_process_resolves_through_the_real_proc() {
        let mut r = ProcfsResolver::new("/proc");
        let got = r.resolve(std::process::id());
        assert!(
            matches!(got, Membership::Pod(_) | Membership::NotInPod { .. }),
            "{got:?}"
        );
    }

    #[test]
    fn membership_serialises_with_a_kind_tag() {
        let json = serde_json::to_string(&Membership::Pod(pod(
            UID,
            Some(CID),
            Some(Runtime::Crio),
            Qos::BestEffort,
        )))
        .unwrap();
        assert!(json.contains(r#""kind":"pod""#), "{json}");
        assert!(json.contains(r#""runtime":"crio""#), "{json}");
        assert!(json.contains(r#""qos":"BestEffort""#), "{json}");
    }
}
