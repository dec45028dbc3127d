//! Privileged tests of eBPF device-open tracking: real tracepoints, real processes in real
//! kubelet-shaped cgroup v2 directories.
//!
//! They run for real as root in an agent built with its eBPF object (CI); otherwise each prints
//! `skipped: <test>: <why>` and passes — unless `GPUSCALE_REQUIRE_PRIVILEGED=1` (set by
//! `cargo xtask test` as root), which makes a skip a failure. As root with the object built in, a failure to load is a
//! failure, not a skip. Each test uses its own device prefix (a temporary directory) so the tests
//! can run in parallel, and removes its cgroups and files.
//!
//! `openat_cost_and_open_to_tracked_latency` is a measurement, not a check: run it with
//! `cargo test -p agent --release --test ebpf -- --ignored --nocapture`.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::cgroup::Runtime;
use agent::ebpf::{
    built_with_ebpf, find_cgroup2_mount, EbpfConfig, EbpfMode, OpenHook, OpenInfo, Tracker,
};

/// Why this test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (loads eBPF programs and creates cgroups)".to_owned());
    }
    if !built_with_ebpf() {
        return Some(
            "the agent was built without its eBPF object (no eBPF toolchain at build time; \
             `cargo xtask test` installs it)"
                .to_owned(),
        );
    }
    None
}

macro_rules! privileged {
    ($name:literal) => {
        if let Some(why) = skip_reason() {
            // `cargo xtask test` as root (CI) sets it: there, a skip would hide a lost privilege.
            if std::env::var("GPUSCALE_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!(
                    "{} cannot run: {why}; GPUSCALE_REQUIRE_PRIVILEGED=1 forbids skipping it",
                    $name
                );
            }
            println!("skipped: {}: {why}", $name);
            return;
        }
        ensure_tracefs();
    };
}

/// Mounts tracefs where it is missing (as the design notes say this machine needs).
fn ensure_tracefs() {
    let events = Path::new("/sys/kernel/tracing/events/syscalls");
    if events.is_dir() || Path::new("/sys/kernel/debug/tracing/events/syscalls").is_dir() {
        return;
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status();
    // Another test may have mounted it meanwhile; only the outcome matters.
    assert!(
        events.is_dir(),
        "tracefs is not mounted and `mount -t tracefs nodev /sys/kernel/tracing` gave {status:?}"
    );
}

/// A temporary directory (`/tmp/gpuscale-<pid>-<test>`) with a fake device node `nvidia0` (a plain file) in it.
struct DeviceDir {
    dir: PathBuf,
}

impl DeviceDir {
    fn new(test: &str) -> Self {
        // Short, so that `<dir>/nvidia` fits the program's 32-byte prefix.
        let dir = PathBuf::from(format!("/tmp/gpuscale-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("nvidia0"), b"").unwrap();
        DeviceDir { dir }
    }

    /// The prefix the tracker matches: `<dir>/nvidia`.
    fn prefix(&self) -> String {
        format!("{}/nvidia", self.dir.display())
    }

    fn file(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        if !path.exists() {
            fs::write(&path, b"").unwrap();
        }
        path
    }
}

impl Drop for DeviceDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A kubelet-shaped (systemd driver, containerd) cgroup made for one test, removed on drop:
/// `<cgroup2 root>/gpuscale-test-<pid>-<n>/kubepods.slice/kubepods-burstable.slice/
/// kubepods-burstable-pod<uid_>.slice/cri-containerd-<64hex>.scope`.
struct PodCgroup {
    root: PathBuf,
    /// Directories created, outermost first.
    created: Vec<PathBuf>,
    uid: String,
    container: String,
}

impl PodCgroup {
    fn new(test_no: u32) -> Self {
        let root = find_cgroup2_mount(Path::new("/proc/self/mounts")).unwrap();
        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), test_no);
        let container = format!(
            "{:064x}",
            (u64::from(std::process::id()) << 16) | u64::from(test_no)
        );
        // Under a base of its own, so parallel tests share no directory (and a run on a real
        // node never touches the kubelet's own `kubepods.slice`); the parser finds the pod
        // anywhere in the path.
        let rel = [
            format!("gpuscale-test-{}-{test_no}", std::process::id()),
            "kubepods.slice".to_owned(),
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
            format!("cri-containerd-{container}.scope"),
        ];
        let mut created = Vec::new();
        let mut dir = root.clone();
        for comp in rel {
            dir.push(comp);
            let _ = fs::remove_dir(&dir); // a leftover of an earlier run with this pid
            fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
            created.push(dir.clone());
        }
        PodCgroup {
            root,
            created,
            uid,
            container,
        }
    }

    fn dir(&self) -> &Path {
        self.created
            .last()
            .expect("the container cgroup is always new")
    }

    fn procs(&self) -> PathBuf {
        self.dir().join("cgroup.procs")
    }

    fn id(&self) -> u64 {
        fs::metadata(self.dir()).unwrap().ino()
    }

    fn rel_path(&self) -> String {
        format!(
            "/{}",
            self.dir().strip_prefix(&self.root).unwrap().display()
        )
    }

    fn remove(&mut self) {
        if let Some(dir) = self.created.last() {
            // A leftover process (a killed shell's `sleep`) would keep the cgroup busy.
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: plain syscall on a pid read from our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        while let Some(dir) = self.created.pop() {
            if let Err(e) = rmdir_retrying(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("could not remove test cgroup {}: {e}", dir.display());
                }
            }
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// rmdir of a cgroup, retried briefly while its last process is being reaped.
fn rmdir_retrying(dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// A child process, killed and reaped on drop.
struct Child(std::process::Child);

impl Child {
    /// `sh -c` running `script` after moving itself into `cgroup` (when given).
    fn sh(cgroup: Option<&PodCgroup>, script: &str) -> Self {
        let join = cgroup.map_or(String::new(), |c| {
            format!("echo $$ > '{}' || exit 97; ", c.procs().display())
        });
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("{join}{script}"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Child(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn wait_success(&mut self) {
        let status = self.0.wait().unwrap();
        assert!(status.success(), "child exited with {status}");
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dev: &DeviceDir) -> Arc<Tracker> {
    start_with(dev, OpenHook::Auto)
}

fn start_with(dev: &DeviceDir, open_hook: OpenHook) -> Arc<Tracker> {
    let config = EbpfConfig {
        mode: EbpfMode::On,
        device_prefix: dev.prefix(),
        cgroup_root: None,
        open_hook,
    };
    agent::ebpf::start(&config)
        .unwrap_or_else(|e| panic!("running as root with the eBPF object built in: {e}"))
        .tracker
        .expect("--ebpf on gives a tracker")
}

/// Polls `f` until it gives `Some`, for up to 5 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn assert_in_pod(info: &OpenInfo, cg: &PodCgroup) {
    assert_eq!(
        info.cgroup_id,
        cg.id(),
        "cgroup id is the cgroup directory's inode"
    );
    assert_eq!(info.cgroup_path.as_deref(), Some(cg.rel_path().as_str()));
    let pod = info
        .pod
        .as_ref()
        .expect("a pod for a kubelet-shaped cgroup");
    assert_eq!(pod.pod_uid, cg.uid);
    assert_eq!(pod.container_id.as_deref(), Some(cg.container.as_str()));
    assert_eq!(pod.runtime, Some(Runtime::Containerd));
}

#[test]
fn process_opening_a_device_in_a_pod_cgroup_is_tracked_with_its_pod_and_container() {
    privileged!("process_opening_a_device_in_a_pod_cgroup_is_tracked_with_its_pod_and_container");
    let dev = DeviceDir::new("a");
    let mut cg = PodCgroup::new(1);
    let tracker = start(&dev);
    let before = gpuscale_now_ns();

    let child = Child::sh(
        Some(&cg),
        &format!("exec 3< '{}'; exec sleep 10", dev.file("nvidia0").display()),
    );
    let info = eventually("the child's open to be tracked", || {
        tracker.process(child.pid())
    });

    assert_eq!(info.tgid, child.pid());
    assert_eq!(info.comm, "sh");
    assert_eq!(info.device, "0");
    assert!(!info.exited);
    assert_in_pod(&info, &cg);
    let after = gpuscale_now_ns();
    assert!(
        (before..=after).contains(&info.first_open_unix_ns),
        "first open {} is a Unix time within the test ({before}..{after})",
        info.first_open_unix_ns
    );
    assert!(info.last_open_unix_ns >= info.first_open_unix_ns);
    let stats = tracker.stats();
    assert!(stats.events >= 1 && stats.tracked >= 1, "{stats:?}");
    assert_eq!(stats.dropped, 0);

    drop(child);
    tracker.stop();
    cg.remove();
}

#[test]
fn short_lived_process_stays_in_recent_opens_marked_exited_and_is_evicted() {
    privileged!("short_lived_process_stays_in_recent_opens_marked_exited_and_is_evicted");
    let dev = DeviceDir::new("b");
    let mut cg = PodCgroup::new(2);
    let tracker = start(&dev);

    let started = Instant::now();
    let mut child = Child::sh(
        Some(&cg),
        &format!("exec 3< '{}'; exit 0", dev.file("nvidia0").display()),
    );
    let tgid = child.pid();
    child.wait_success();
    let lived = started.elapsed();

    let info = eventually("the exited process in recent_opens", || {
        tracker
            .recent_opens()
            .into_iter()
            .find(|o| o.tgid == tgid && o.exited)
    });
    assert_in_pod(&info, &cg);
    assert_eq!(info.device, "0");
    assert_eq!(
        tracker.process(tgid),
        None,
        "an exited process is no longer tracked"
    );
    println!("the short-lived process lived {lived:?}");

    tracker.stop();
    cg.remove();
}

#[test]
fn removed_cgroup_resolves_to_no_path_rather_than_a_wrong_pod() {
    privileged!("removed_cgroup_resolves_to_no_path_rather_than_a_wrong_pod");
    let dev = DeviceDir::new("c");
    let mut cg = PodCgroup::new(3);
    let tracker = start(&dev);

    let mut child = Child::sh(
        Some(&cg),
        &format!("exec 3< '{}'; exit 0", dev.file("nvidia0").display()),
    );
    let tgid = child.pid();
    child.wait_success();
    let info = eventually("the exit", || {
        tracker
            .recent_opens()
            .into_iter()
            .find(|o| o.tgid == tgid && o.exited)
    });
    let old_id = cg.id();
    assert_eq!(info.cgroup_id, old_id);
    assert_eq!(tracker.cgroup_path(old_id), Some(cg.rel_path()));

    let container_dir = cg.dir().to_owned();
    rmdir_retrying(&container_dir).unwrap();
    assert_eq!(
        tracker.cgroup_path(old_id),
        None,
        "a removed cgroup has no path"
    );

    // The same path made again is another cgroup (another id); the old id still has no path.
    fs::create_dir(&container_dir).unwrap();
    let new_id = fs::metadata(&container_dir).unwrap().ino();
    assert_ne!(new_id, old_id);
    std::thread::sleep(agent::ebpf::REWALK_EVERY);
    assert_eq!(tracker.cgroup_path(new_id), Some(cg.rel_path()));
    assert_eq!(tracker.cgroup_path(old_id), None);

    tracker.stop();
    cg.remove();
}

#[test]
fn process_opening_a_non_matching_path_is_not_tracked() {
    privileged!("process_opening_a_non_matching_path_is_not_tracked");
    let dev = DeviceDir::new("d");
    let mut cg = PodCgroup::new(4);
    let tracker = start(&dev);

    // Differs from the prefix in its last byte, and a path elsewhere.
    let near = dev.file("nvidiX0");
    let other = Child::sh(
        Some(&cg),
        &format!("exec 3< '{}' 4< /dev/null; exec sleep 10", near.display()),
    );
    eventually("the non-matching opens to happen", || {
        Path::new(&format!("/proc/{}/fd/4", other.pid()))
            .exists()
            .then_some(())
    });
    // A matching open after them: once it is seen, anything the first child sent was too.
    let marker = Child::sh(
        Some(&cg),
        &format!("exec 3< '{}'; exec sleep 10", dev.file("nvidia0").display()),
    );
    eventually("the marker", || tracker.process(marker.pid()));

    assert_eq!(tracker.process(other.pid()), None);
    assert!(tracker.recent_opens().iter().all(|o| o.tgid != other.pid()));
    assert_eq!(tracker.stats().tracked, 1);

    drop((other, marker));
    tracker.stop();
    cg.remove();
}

#[test]
fn pod_cgroup_created_after_start_is_resolved_for_a_process_that_already_exited() {
    privileged!("pod_cgroup_created_after_start_is_resolved_for_a_process_that_already_exited");
    let dev = DeviceDir::new("f");
    let tracker = start(&dev);
    // Made after the tracker's first walk of the cgroup tree, and used at once (within the
    // re-walk rate limit): the path comes from the next walk.
    let mut cg = PodCgroup::new(6);
    let mut child = Child::sh(
        Some(&cg),
        &format!("exec 3< '{}'; exit 0", dev.file("nvidia0").display()),
    );
    let tgid = child.pid();
    child.wait_success();

    let info = eventually("the exited process with its pod", || {
        tracker
            .recent_opens()
            .into_iter()
            .find(|o| o.tgid == tgid && o.exited && o.pod.is_some())
    });
    assert_in_pod(&info, &cg);

    tracker.stop();
    cg.remove();
}

#[test]
fn openat2_is_tracked_too() {
    privileged!("openat2_is_tracked_too");
    let dev = DeviceDir::new("e");
    let tracker = start(&dev);
    let path = CString::new(dev.file("nvidia-uvm").as_os_str().as_encoded_bytes()).unwrap();
    /// `struct open_how` of openat2(2) (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: 0,
    };
    // SAFETY: valid NUL-terminated path and open_how for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how,
            std::mem::size_of::<OpenHow>(),
        )
    };
    assert!(fd >= 0, "openat2: {}", std::io::Error::last_os_error());
    // SAFETY: closes the fd just opened.
    unsafe { libc::close(fd as i32) };

    let me = std::process::id();
    let info = eventually("the openat2 to be tracked", || tracker.process(me));
    assert_eq!(info.device, "-uvm");
    tracker.stop();
}

#[test]
fn both_open_hooks_track_opens_and_auto_prefers_fentry() {
    privileged!("both_open_hooks_track_opens_and_auto_prefers_fentry");
    let dev = DeviceDir::new("h");
    let tracks = |tracker: &Tracker, device: &str| {
        let child = Child::sh(
            None,
            &format!("exec 3< '{}'; exec sleep 10", dev.file(device).display()),
        );
        let info = eventually("the child's open to be tracked", || {
            tracker.process(child.pid())
        });
        assert_eq!(info.device, device.trim_start_matches("nvidia"));
    };

    let tracepoints = start_with(&dev, OpenHook::Tracepoint);
    assert_eq!(tracepoints.hook(), OpenHook::Tracepoint);
    tracks(&tracepoints, "nvidia1");
    tracepoints.stop();

    let fentry = Tracker::load(&EbpfConfig {
        mode: EbpfMode::On,
        device_prefix: dev.prefix(),
        cgroup_root: None,
        open_hook: OpenHook::Fentry,
    });
    let auto = start(&dev);
    match fentry {
        Ok(fentry) => {
            assert_eq!(
                auto.hook(),
                OpenHook::Fentry,
                "auto takes fentry where it loads"
            );
            auto.stop();
            tracks(&fentry, "nvidia2");
            fentry.stop();
        }
        Err(e) => {
            assert_eq!(auto.hook(), OpenHook::Tracepoint, "auto falls back: {e}");
            tracks(&auto, "nvidia3");
            auto.stop();
            eprintln!(
                "both_open_hooks_track_opens_and_auto_prefers_fentry: the fentry hook was not \
                 checked, this kernel refuses it ({e}); the tracepoint fallback was"
            );
        }
    }
}

fn gpuscale_now_ns() -> u64 {
    agent::unix_now_ns()
}

/// Measures (prints, asserts nothing about time): the cost of `openat` + `close` on a
/// non-matching path with the programs attached vs detached, and open → tracked latency.
#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture, alone"]
fn openat_cost_and_open_to_tracked_latency() {
    privileged!("openat_cost_and_open_to_tracked_latency");
    let dev = DeviceDir::new("m");
    let config = EbpfConfig {
        mode: EbpfMode::On,
        device_prefix: dev.prefix(),
        cgroup_root: None,
        ..EbpfConfig::default()
    };
    let null = CString::new("/dev/null").unwrap();
    let loop_ns = |n: u32| {
        let t = Instant::now();
        for _ in 0..n {
            // SAFETY: valid path; the fd is closed at once.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, null.as_ptr(), libc::O_RDONLY) };
            assert!(fd >= 0);
            // SAFETY: closes the fd just opened.
            unsafe { libc::close(fd) };
        }
        t.elapsed().as_nanos() as f64 / f64::from(n)
    };
    const N: u32 = 200_000;
    loop_ns(N / 10); // warm up
                     // Rounds interleave detached, fentry and tracepoints, so drift hits all three alike. A
                     // kernel that refuses fentry (no BTF, no trampolines, or a lockdown/LSM policy) is reported.
    let try_hook = |open_hook| {
        Tracker::load(&EbpfConfig {
            open_hook,
            ..config.clone()
        })
    };
    let fentry_refused = try_hook(OpenHook::Fentry).err().map(|e| e.to_string());
    let (mut off, mut fentry, mut tp) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        off.push(loop_ns(N));
        if fentry_refused.is_none() {
            let tracker = try_hook(OpenHook::Fentry).unwrap();
            fentry.push(loop_ns(N));
            tracker.stop();
        }
        let tracker = try_hook(OpenHook::Tracepoint).unwrap();
        tp.push(loop_ns(N));
        tracker.stop();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let off_ns = median(&mut off).unwrap();
    let tp_ns = median(&mut tp).unwrap();
    println!(
        "openat+close of /dev/null (medians of 7 rounds of {N}): detached {off_ns:.0} ns; \
         tracepoints attached {tp_ns:.0} ns, ratio {:.3}",
        tp_ns / off_ns
    );
    match (median(&mut fentry), &fentry_refused) {
        (Some(ns), _) => println!("  fentry attached {ns:.0} ns, ratio {:.3}", ns / off_ns),
        (None, Some(why)) => println!("  fentry: the kernel refused it here ({why})"),
        (None, None) => unreachable!("fentry was measured or refused"),
    }
    let tracker = agent::ebpf::start(&config).unwrap().tracker.unwrap();
    let path = CString::new(dev.file("nvidia0").as_os_str().as_encoded_bytes()).unwrap();
    let me = std::process::id();
    let mut lat = Vec::new();
    for _ in 0..2000 {
        let seen = tracker.process(me).map_or(0, |i| i.last_open_unix_ns);
        let t = Instant::now();
        // SAFETY: valid path; the fd is closed at once.
        let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
        assert!(fd >= 0);
        // SAFETY: closes the fd just opened.
        unsafe { libc::close(fd) };
        while tracker
            .process(me)
            .is_none_or(|i| i.last_open_unix_ns == seen)
        {
            std::hint::spin_loop();
        }
        lat.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(1));
    }
    lat.sort();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
    println!(
        "open -> tracked: p50 {:?}, p99 {:?}, max {:?} ({} opens)",
        pct(50),
        pct(99),
        lat[lat.len() - 1],
        lat.len()
    );

    // Sustained storm: 10,000 matching opens/s for 10 s (4 threads of this process), while 20
    // other processes that opened the device once (the ones NVML would report) must stay
    // tracked, and the ring buffer must not drop.
    let holders: Vec<std::process::Child> = (0..20)
        .map(|_| {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "exec 3< '{}' && exec sleep 60",
                    dev.file("nvidia0").display()
                ))
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = tracker.stats();
    let started = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                s.spawn(move || {
                    let mut n = 0u64;
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(10) {
                        // 2,500 opens/s per thread, paced per millisecond.
                        let due = (t0.elapsed().as_micros() as u64 * 2500) / 1_000_000;
                        while n < due {
                            // SAFETY: valid path; the fd is closed at once.
                            let fd = unsafe {
                                libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY)
                            };
                            // SAFETY: closes the fd just opened.
                            unsafe { libc::close(fd) };
                            n += 1;
                        }
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let after = tracker.stats();
    let tracked = holders
        .iter()
        .filter(|c| tracker.process(c.id()).is_some())
        .count();
    println!(
        "storm: {total} matching opens in {secs:.1} s ({:.0}/s); events {} -> {} (+{}), \
         dropped {} -> {}; holders still tracked: {tracked} of {}",
        total as f64 / secs,
        before.events,
        after.events,
        after.events - before.events,
        before.dropped,
        after.dropped,
        holders.len()
    );
    for mut c in holders {
        let _ = c.kill();
        let _ = c.wait();
    }
    tracker.stop();
}
