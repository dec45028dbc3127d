//! Real processes in real kubelet-shaped cgroups (cgroup v2, systemd driver shape), for tests
//! that must attribute GPU processes to pods. Needs root; [`privileged`] says why it cannot run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Why privileged tests cannot run here, or `None` when they can (root and a cgroup v2 mount).
///
/// With `GPUSCALE_REQUIRE_PRIVILEGED=1` (what `cargo xtask test` sets as root, as in CI) a test
/// that cannot run is a failure: this panics with the reason instead of returning it.
pub fn privileged() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root: creating pod cgroups needs root (CI runs as root)".to_owned())
    } else if cgroup2_root().is_none() {
        Some("no cgroup v2 mount found in /proc/self/mounts".to_owned())
    } else {
        None
    };
    if let Some(why) = &why {
        if std::env::var("GPUSCALE_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("a privileged test cannot run: {why}; GPUSCALE_REQUIRE_PRIVILEGED=1 forbids skipping it");
        }
    }
    why
}

/// Serializes creating and removing this process's test cgroups (they share parents).
static CGROUPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Mounts tracefs at /sys/kernel/tracing where it is missing (eBPF tracepoints need it); the
/// answer says why it could not.
pub fn ensure_tracefs() -> Result<(), String> {
    if Path::new("/sys/kernel/tracing/events/syscalls").exists() {
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    // Another test may have mounted it meanwhile; only the outcome matters.
    if Path::new("/sys/kernel/tracing/events/syscalls").exists() {
        Ok(())
    } else {
        Err(format!(
            "tracefs is not mounted and mounting it failed ({status})"
        ))
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts):
/// the agent's own lookup.
pub use agent::cgroup::cgroup2_root;

/// A `sleep` process living in the cgroup of container `container_id` of pod `uid`, shaped as
/// the kubelet's systemd driver makes it (below a private `gpuscale-e2e-<pid>` parent).
/// Killed, and its cgroups removed, on drop.
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
        Self::spawn(uid, container_id, "exec sleep 600")
    }

    /// Starts a shell that joins the pod's container cgroup itself, then runs `script`
    /// (`sh -c`), so everything the script does (opening a device file, say) happens inside
    /// the pod's cgroup.
    pub fn spawn(uid: &str, container_id: &str, script: &str) -> PodProcess {
        let root = cgroup2_root().expect("cgroup v2 mount");
        // Under a private parent, so tests never touch a real kubelet's kubepods.slice; the
        // agent finds the pod anywhere in the path.
        let rel = [
            format!("gpuscale-e2e-{}", std::process::id()),
            "kubepods.slice".to_owned(),
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
            format!("cri-containerd-{container_id}.scope"),
        ];
        let mut dirs = Vec::new();
        let mut dir = root.clone();
        // Tests of one binary run in parallel and share the parent directories.
        let _guard = CGROUPS.lock().unwrap_or_else(|e| e.into_inner());
        for part in &rel {
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                dirs.push(dir.clone());
            }
        }
        let procs = dir.join("cgroup.procs");
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > '{}' && {script}", procs.display()))
            .spawn()
            .expect("starting sh");
        // The shell moves itself; wait until it is in, so callers find it there.
        let pid = child.id().to_string();
        for _ in 0..500 {
            let members = std::fs::read_to_string(&procs).unwrap_or_default();
            if members.lines().any(|l| l == pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
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
        // A removed cgroup must be empty; the process is reaped above. Parents shared with other
        // pods' processes are removed by whoever leaves them empty, so walk up to the root.
        let _guard = CGROUPS.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(root), Some(mut d)) = (cgroup2_root(), self.dirs.last().cloned()) {
            while d != root && d.starts_with(&root) {
                if std::fs::remove_dir(&d).is_err() {
                    break;
                }
                if !d.pop() {
                    break;
                }
            }
        }
    }
}
