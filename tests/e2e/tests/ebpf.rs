//! End-to-end, privileged: the real `gpuscale-agent` with its eBPF tracker loaded into the
//! kernel, real processes in kubelet-shaped cgroups opening files under a test device prefix,
//! the fake NVML reporting their PIDs. Runs as root (CI does); says why it skips otherwise.

use std::process::Command;
use std::time::Duration;

use e2e::pod::{privileged, PodProcess};
use e2e::{agent_bin, fake_nvml, gpu, write_scenario, Agent, Scratch};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const UID: &str = "0e0e0e0e-1111-4222-8333-444444444444";
const UID_SHORT: &str = "0f0f0f0f-1111-4222-8333-444444444444";

fn skip_reason() -> Option<String> {
    if let Some(why) = privileged() {
        return Some(why);
    }
    if let Err(why) = e2e::pod::ensure_tracefs() {
        // Root with the eBPF object but no tracefs is a broken machine: fail, don't skip.
        panic!("{why}");
    }
    if !agent::ebpf::built_with_ebpf() {
        return Some(
            "the agent was built without its eBPF object (run `cargo xtask test`, which installs \
             the eBPF toolchain)"
                .into(),
        );
    }
    None
}

/// An agent with eBPF on, tracking opens of "devices" (plain files) under a test prefix.
struct Tracking {
    dir: Scratch,
    /// The "device" directory (removed on drop).
    dev: Scratch,
    /// `<dev>/nvidia0`.
    device: std::path::PathBuf,
    scenario: std::path::PathBuf,
    agent: Agent,
}

impl Tracking {
    /// Starts the agent once its eBPF tracker is on and GPU 0 samples; the device directory is
    /// `/tmp/<short>-<pid>` because the prefix must fit the program's 32 bytes.
    fn start(name: &str, short: &str) -> Tracking {
        let dir = Scratch::new(name);
        let dev = Scratch(std::path::PathBuf::from(format!(
            "/tmp/{short}-{}",
            std::process::id()
        )));
        std::fs::create_dir_all(&dev.0).unwrap();
        let prefix = dev.path("nvidia");
        let device = dev.path("nvidia0");
        std::fs::write(&device, b"").unwrap();
        let scenario = dir.path("scenario.json");
        write_scenario(&scenario, &[gpu(0)]);
        let mut agent = Agent::start(
            &dir,
            &scenario,
            &dir.path("agent.ring"),
            &["--ebpf", "on", "--device-prefix", prefix.to_str().unwrap()],
        );
        agent
            .wait_dump(WAIT, |d| d["ebpf"] == "on" && d["gpus"][0]["state"] == "ok")
            .unwrap();
        Tracking {
            dir,
            dev,
            device,
            scenario,
            agent,
        }
    }
}

fn open_of(d: &Value, pid: u32) -> Option<&Value> {
    d["device_opens"]
        .as_array()?
        .iter()
        .rev()
        .find(|o| o["pid"] == pid)
}

#[test]
fn ebpf_attributes_gpu_processes_and_remembers_short_lived_ones() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: ebpf_attributes_gpu_processes_and_remembers_short_lived_ones: {why}");
        return;
    }
    let Tracking {
        dir,
        dev: _dev,
        device,
        scenario,
        mut agent,
    } = Tracking::start("ebpf", "gsdev");

    // A process in a pod opens the "GPU" and keeps running; NVML reports it.
    let cid = "e".repeat(64);
    let p = PodProcess::spawn(
        UID,
        &cid,
        &format!("exec 3< '{}' && exec sleep 600", device.display()),
    );
    let mut g = gpu(0);
    g["processes"] = json!([{"pid": p.pid(), "used_memory_mib": 1000}]);
    write_scenario(&scenario, &[g]);
    let d = agent
        .wait_dump(WAIT, |d| {
            d["gpus"][0]["processes"][0]["attribution"] == "ebpf"
        })
        .unwrap();
    let proc0 = &d["gpus"][0]["processes"][0];
    assert_eq!(proc0["pid"], p.pid());
    assert_eq!(proc0["pod_uid"], UID);
    assert_eq!(proc0["container_id"], cid);
    // The device-open log is published once a second.
    let pid = p.pid();
    let d = agent
        .wait_dump(WAIT, |d| open_of(d, pid).is_some())
        .unwrap();
    let open = open_of(&d, pid).unwrap();
    assert_eq!(open["pod_uid"], UID);
    assert_eq!(open["device"], "0");
    assert_eq!(open["exited"], false);

    // A process that opens and exits within milliseconds is still in the device-open log, with
    // its pod, and marked exited.
    let cid_short = "f".repeat(64);
    let short = PodProcess::spawn(
        UID_SHORT,
        &cid_short,
        &format!("exec 3< '{}' && exit 0", device.display()),
    );
    let short_pid = short.pid();
    let d = agent
        .wait_dump(WAIT, |d| {
            open_of(d, short_pid).is_some_and(|o| o["exited"] == true)
        })
        .unwrap();
    let o = open_of(&d, short_pid).unwrap();
    assert_eq!(o["pod_uid"], UID_SHORT);
    assert_eq!(o["container_id"], cid_short);
    drop(short);

    // An open outside the prefix is not a device open.
    let before = agent.wait_dump(WAIT, |_| true).unwrap()["device_opens"]
        .as_array()
        .map_or(0, Vec::len);
    let other = dir.path("not-a-gpu");
    std::fs::write(&other, b"").unwrap();
    Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3< '{}'", other.display()))
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let after = agent.wait_dump(WAIT, |_| true).unwrap();
    assert_eq!(after["device_opens"].as_array().map_or(0, Vec::len), before);

    // The process exits: NVML stops reporting it, and it leaves the tracker (exited in the log).
    drop(p);
    write_scenario(&scenario, &[gpu(0)]);
    agent
        .wait_dump(WAIT, |d| {
            open_of(d, pid).is_some_and(|o| o["exited"] == true)
        })
        .unwrap();
    assert!(agent.terminate().success(), "{}", agent.log());
}

#[test]
fn ebpf_on_without_privileges_fails_and_auto_falls_back_to_procfs() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: ebpf_on_without_privileges_fails_and_auto_falls_back_to_procfs: {why}");
        return;
    }
    let dir = Scratch::new("ebpf-unpriv");
    // The unprivileged user must be able to create the ring file: a directory it owns (the
    // agent refuses one others may write to).
    let shm_dir = dir.path("shm");
    std::fs::create_dir(&shm_dir).unwrap();
    std::os::unix::fs::chown(&shm_dir, Some(65534), Some(65534)).unwrap();
    Command::new("chmod")
        .arg("0755")
        .arg(&dir.0)
        .status()
        .unwrap();
    let scenario = dir.path("scenario.json");
    write_scenario(&scenario, &[gpu(0)]);
    Command::new("chmod")
        .arg("0644")
        .arg(&scenario)
        .status()
        .unwrap();
    let as_nobody = |mode: &str, shm: &str| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(agent_bin())
        .args(["run", "--ebpf", mode, "--nvml-lib"])
        .arg(fake_nvml())
        .arg("--shm")
        .arg(shm_dir.join(shm))
        .env("FAKE_NVML_SCENARIO", &scenario);
        c
    };
    let out = as_nobody("on", "on.ring").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("eBPF"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let mut auto = e2e::Daemon::spawn(&dir, "agent-auto", &mut as_nobody("auto", "auto.ring"));
    let shm = shm_dir.join("auto.ring");
    let d = e2e::wait_json(
        WAIT,
        || {
            auto.check_alive()?;
            e2e::dump_json(&shm)
        },
        |d| d["ebpf"] == "unavailable" && d["gpus"][0]["state"] == "ok",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", auto.log()));
    assert!(!d["ebpf_reason"].as_str().unwrap_or_default().is_empty());
    assert!(
        auto.log()
            .contains("attributing GPU processes through procfs"),
        "{}",
        auto.log()
    );
    assert!(auto.terminate().success());
}

#[test]
fn a_pod_loading_its_model_stays_active_with_active_after_open() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: a_pod_loading_its_model_stays_active_with_active_after_open: {why}");
        return;
    }
    use e2e::keda::{scaled_object, Keda};
    let dir = Scratch::new("ebpf-grace");
    let dev = Scratch(std::path::PathBuf::from(format!(
        "/tmp/gsgr-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dev.0).unwrap();
    let prefix = dev.path("nvidia");
    let device = dev.path("nvidiactl");
    std::fs::write(&device, b"").unwrap();
    // The GPU is idle and NVML lists no process: the pod is still loading its weights.
    let scenario = dir.path("scenario.json");
    let mut idle = gpu(0);
    idle["sm_active"] = json!(0);
    idle["processes"] = json!([]);
    write_scenario(&scenario, &[idle]);
    let agent_addr = format!("127.0.0.1:{}", e2e::free_port());
    let mut agent = Agent::start(
        &dir,
        &scenario,
        &dir.path("agent.ring"),
        &[
            "--ebpf",
            "on",
            "--device-prefix",
            prefix.to_str().unwrap(),
            "--listen",
            &agent_addr,
        ],
    );
    agent.wait_dump(WAIT, |d| d["ebpf"] == "on").unwrap();
    let loader = PodProcess::spawn(
        UID,
        &"1".repeat(64),
        &format!("exec 3< '{}' && exec sleep 600", device.display()),
    );
    let pods = dir.path("pods.json");
    e2e::write_pods(
        &pods,
        &[e2e::pod_item("ml", "llm-0", UID, json!({"app": "llm"}))],
    );
    let collector = e2e::Collector::start(&dir, &agent_addr, &pods);
    let mut keda = Keda::connect(&collector.addr);
    let meta = [
        ("metric", "sm_active"),
        ("podSelector", "app=llm"),
        ("targetValue", "80"),
    ];
    let plain = scaled_object("llm", &meta);
    let mut with_grace = meta.to_vec();
    with_grace.push(("activeAfterOpen", "2m"));
    let grace = scaled_object("llm-grace", &with_grace);
    // Both see the value 0 once the agent reports; only the one with the grace is active.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let g = keda.is_active(&grace);
        if matches!(g, Ok(true)) || std::time::Instant::now() > deadline {
            assert!(g.unwrap(), "the loading pod opened the GPU: active");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(keda.metrics(&plain, "m").unwrap(), (0.0, 0));
    assert!(
        !keda.is_active(&plain).unwrap(),
        "without the grace, 0 is inactive"
    );
    drop(loader);
}

/// Waits until process `pid` runs `comm` (a pod script has reached its final `exec`).
fn wait_comm(pid: u32, comm: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        != comm
    {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} never ran {comm}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_full_ring_buffer_is_counted_and_missed_processes_fall_back_to_procfs() {
    if let Some(why) = skip_reason() {
        eprintln!(
            "skipped: a_full_ring_buffer_is_counted_and_missed_processes_fall_back_to_procfs: {why}"
        );
        return;
    }
    const STORM: u64 = 5000;
    let Tracking {
        dir: _dir,
        dev: _dev,
        device,
        scenario,
        mut agent,
    } = Tracking::start("ebpf-overflow", "gsov");

    // The agent is starved of CPU (stopped outright): nobody drains the ring buffer while a pod
    // opens the device far more often than the buffer holds (256 KiB, ~3000 events).
    let agent_pid = agent.daemon.pid();
    e2e::signal(agent_pid, libc::SIGSTOP);
    let storm = PodProcess::spawn(
        UID,
        &"a".repeat(64),
        &format!(
            "i=0; while [ $i -lt {STORM} ]; do exec 3< '{}'; i=$((i+1)); done; exec sleep 600",
            device.display()
        ),
    );
    wait_comm(storm.pid(), "sleep");
    // This process's open finds the buffer full: the kernel side drops it rather than wait.
    let victim = PodProcess::spawn(
        UID_SHORT,
        &"b".repeat(64),
        &format!("exec 3< '{}' && exec sleep 600", device.display()),
    );
    wait_comm(victim.pid(), "sleep");
    let mut g = gpu(0);
    g["processes"] = json!([{"pid": victim.pid(), "used_memory_mib": 1000}]);
    write_scenario(&scenario, &[g]);
    e2e::signal(agent_pid, libc::SIGCONT);

    // The drops are counted, and every open is either read or counted as dropped.
    let d = agent
        .wait_dump(WAIT, |d| {
            d["ebpf_dropped"].as_u64().unwrap_or(0) > 0
                && d["ebpf_events"].as_u64().unwrap_or(0) + d["ebpf_dropped"].as_u64().unwrap_or(0)
                    > STORM
        })
        .unwrap();
    assert!(d["ebpf_dropped"].as_u64().unwrap() < STORM + 1, "{d}");
    // The missed process is still attributed to its own pod, through procfs.
    let d = agent
        .wait_dump(WAIT, |d| {
            d["gpus"][0]["processes"][0]["pid"] == victim.pid()
                && !d["gpus"][0]["processes"][0]["attribution"].is_null()
        })
        .unwrap();
    let p = &d["gpus"][0]["processes"][0];
    assert_eq!(p["attribution"], "procfs", "{p}");
    assert_eq!(p["pod_uid"], UID_SHORT, "{p}");
    // The human dump shows the drop count too.
    let out = e2e::agent_cmd(&["dump", "--shm", agent.shm.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dropped"), "{text}");
    assert!(agent.terminate().success(), "{}", agent.log());
    drop((storm, victim));
}
