//! Real processes in real kubelet-shaped cgroups (cgroup v2, systemd driver shape), for tests
//! that must attribute GPU processes to pods. Needs root; [`privileged`] says why it cannot run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Why privileged tests cannot run here, or `None` when they can (root and a cgroup v2 mount).
pub fn privileged() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: creating pod cgroups needs root (CI runs as root)".into());
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup v2 mount found in /proc/self/mounts".into());
    }
    None
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// A `sleep` process living in the cgroup of container `container_id` of pod `uid`, shaped as
/// the kubelet's systemd driver makes it. Killed, and its cgroups removed, on drop.
pub struct PodProcess {
    child: Child,
    dirs: Vec<PathBuf>,
    /// The pod's UID.
    pub uid: String,
    /// The container's 64-hex ID.
    pub container_id: String,
}

impl PodProcess {
    /// Starts the process in the pod's Burstable container cgroup. Panics when not privileged.
    pub fn start(uid: &str, container_id: &str) -> PodProcess {
        let root = cgroup2_root().expect("cgroup v2 mount");
        let rel = [
            "kubepods.slice".to_owned(),
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
            format!("cri-containerd-{container_id}.scope"),
        ];
        let mut dirs = Vec::new();
        let mut dir = root.clone();
        for part in &rel {
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                dirs.push(dir.clone());
            }
        }
        let child = Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("starting sleep");
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string())
            .unwrap_or_else(|e| panic!("moving pid into {}: {e}", dir.display()));
        PodProcess {
            child,
            dirs,
            uid: uid.to_owned(),
            container_id: container_id.to_owned(),
        }
    }

    /// The process id (what the fake NVML should report).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The cgroup directory the process lives in.
    pub fn cgroup(&self) -> Option<&Path> {
        self.dirs.last().map(PathBuf::as_path)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for d in self.dirs.iter().rev() {
            // A removed cgroup must be empty; the process is reaped above.
            let _ = std::fs::remove_dir(d);
        }
    }
}
