//! The node simulator (`gpuscale-cluster sim`, started by `up`): what a kubelet, a container
//! runtime and the NVIDIA device plugin would do on the simulated GPU nodes, for the two kinds
//! of pod gpuscale cares about. Every 250 ms it reads the pods and nodes and:
//!
//! - for every Running `gpuscale-agent` pod, runs a real `gpuscale-agent` on its node's fake
//!   NVML, listening on the pod's IP (inside the pod network), restarted like a container when
//!   it exits; a node annotated `gpuscale.dev/simulated-agent=stopped` has its agent stopped
//!   (how a test takes an agent down);
//! - for every Running pod that requests `nvidia.com/gpu`, gives it that many of its node's
//!   fake GPUs, runs a real process in a kubelet-shaped cgroup named with the pod's UID and a
//!   container ID that it writes into the pod's status, lists that process on those GPUs, and
//!   sets their load from the pod's `gpuscale.dev/simulated-load` annotation, following its
//!   changes;
//! - rewrites each node's fake-NVML scenario when anything on it changed.
//!
//! A bad annotation is reported as a Warning Event on the pod (reason `BadSimulatedLoad`) and
//! the pod's GPUs keep their last good load. On SIGTERM it stops its processes and removes the
//! cgroups it made; its children also die with it if it is killed (`PR_SET_PDEATHSIG`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Event, Node, ObjectReference, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::load::{self, Load};
use crate::state::NodeInfo;

/// What the simulator needs (`sim.json`, written by `up`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The simulated nodes.
    pub nodes: Vec<NodeInfo>,
    /// `gpuscale-agent`.
    pub agent: PathBuf,
    /// `libfake_nvml.so`.
    pub fake_nvml: PathBuf,
    /// Where pod cgroups are made.
    pub cgroup_parent: PathBuf,
    /// The cluster folder.
    pub dir: PathBuf,
    /// The agents' TLS files (`tls.crt`, `tls.key`, `ca.crt` of the installer's Secret), served
    /// as the DaemonSet's agents serve them.
    pub tls: PathBuf,
}

/// The annotation on a Node that stops its agent (`stopped`), for tests of a lost agent.
pub const AGENT_ANNOTATION: &str = "gpuscale.dev/simulated-agent";
/// The label of the agent DaemonSet's pods.
const AGENT_LABEL: (&str, &str) = ("app.kubernetes.io/name", "gpuscale-agent");
/// Fake GPU memory, as on an H100 80GB.
const MEMORY_TOTAL_MIB: f64 = 81559.0;
const IDLE_POWER_W: f64 = 70.0;
const IDLE_TEMP_C: f64 = 35.0;
/// How long an agent that exited waits before it is started again (a kubelet's first back-off).
const RESTART_DELAY: Duration = Duration::from_secs(2);

/// The cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

fn short_hash(s: &str) -> String {
    let d = sha2::Sha256::digest(s.as_bytes());
    d.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The cgroup folder the cluster in `dir` makes its pods' cgroups under: private to it, so a
/// real kubelet's `kubepods.slice` is never touched (the agent finds a pod anywhere in a path).
pub fn cgroup_parent(dir: &Path) -> Result<PathBuf> {
    let root = cgroup2_root().context("no cgroup v2 mount in /proc/self/mounts")?;
    Ok(root.join(format!(
        "gpuscale-cluster-{}",
        short_hash(&dir.to_string_lossy())
    )))
}

/// Kills every process below `parent` (`cgroup.kill`) and removes its cgroups, deepest first.
pub fn remove_cgroups(parent: &Path) -> Result<()> {
    if !parent.exists() {
        return Ok(());
    }
    let _ = std::fs::write(parent.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match remove_tree(parent) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| {
                    format!("removing the pod cgroups under {}", parent.display())
                })
            }
            Err(_) => {
                crate::process::reap();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// A GPU's UUID: stable per node and index.
fn gpu_uuid(node: &str, index: u32) -> String {
    let h = sha2::Sha256::digest(node.as_bytes());
    format!(
        "GPU-{:02x}{:02x}{:02x}{:02x}-0000-4000-8000-{index:012}",
        h[0], h[1], h[2], h[3]
    )
}

/// What one fake GPU shows.
#[derive(Debug, Clone, PartialEq)]
struct GpuView {
    load: Load,
    /// The PIDs of the processes on it (they share its used memory evenly).
    processes: Vec<u32>,
}

fn scenario(node: &NodeInfo, gpus: &[GpuView]) -> Value {
    let gpus: Vec<Value> = gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let l = &g.load;
            let v = |m: &str| l.get(m).unwrap_or(0.0);
            let used_mib = match (l.get("vram_used_bytes"), l.get("vram_used_pct")) {
                (Some(b), _) => b / (1024.0 * 1024.0),
                (None, Some(p)) => p / 100.0 * MEMORY_TOTAL_MIB,
                (None, None) => 0.0,
            }
            .min(MEMORY_TOTAL_MIB);
            let per_process = if g.processes.is_empty() {
                0.0
            } else {
                used_mib / g.processes.len() as f64
            };
            json!({
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": gpu_uuid(&node.name, i as u32),
                "memory_total_mib": MEMORY_TOTAL_MIB,
                "gpm": true,
                "gpu_util": v("gpu_util").round(),
                "mem_util": v("mem_util").round(),
                "sm_active": v("sm_active"),
                "sm_occupancy": v("sm_occupancy"),
                "tensor_active": v("tensor_active"),
                "dram_active": v("dram_active"),
                "memory_used_mib": used_mib,
                "power_w": l.get("power_watts").unwrap_or(IDLE_POWER_W),
                "temp_c": l.get("temperature_c").unwrap_or(IDLE_TEMP_C).round(),
                "processes": g.processes.iter().map(|pid| json!({
                    "pid": pid,
                    "used_memory_mib": per_process,
                    "sm_util": v("sm_active").round(),
                })).collect::<Vec<_>>(),
                "fail": null,
            })
        })
        .collect();
    json!({"driver_version": "580.159.04", "gpus": gpus})
}

fn write_scenario(node: &NodeInfo, gpus: &[GpuView]) -> Result<()> {
    let tmp = node.scenario.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&scenario(node, gpus))?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &node.scenario)
        .with_context(|| format!("writing {}", node.scenario.display()))
}

/// The scenario of a node with no GPU pods yet (written by `up` before any agent starts).
pub fn write_idle_scenario(node: &NodeInfo) -> Result<()> {
    let idle = vec![
        GpuView {
            load: Load::default(),
            processes: vec![],
        };
        node.gpus as usize
    ];
    write_scenario(node, &idle)
}

/// `PR_SET_PDEATHSIG`: the child gets SIGKILL when the simulator dies.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A simulated container's process.
struct PodProc {
    child: Child,
    cgroup: PathBuf,
    node: String,
    gpus: Vec<u32>,
    load: Load,
    bad_load: Option<String>,
}

struct AgentProc {
    child: Option<Child>,
    node: String,
    ip: String,
    exited_at: Option<Instant>,
}

struct Sim {
    cfg: Config,
    client: Client,
    pods: HashMap<String, PodProc>,
    agents: HashMap<String, AgentProc>,
    written: HashMap<String, Vec<GpuView>>,
    logs: PathBuf,
}

/// Whether a pod should be treated as running here.
fn running_on(pod: &Pod, nodes: &[NodeInfo]) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let node = pod.spec.as_ref()?.node_name.clone()?;
    nodes.iter().any(|n| n.name == node).then_some(node)
}

/// GPUs a pod asks for: the sum over its containers of `nvidia.com/gpu` limits (or requests).
pub fn gpus_requested(pod: &Pod) -> u32 {
    let Some(spec) = &pod.spec else { return 0 };
    spec.containers
        .iter()
        .filter_map(|c| {
            let r = c.resources.as_ref()?;
            let q = r
                .limits
                .as_ref()
                .and_then(|l| l.get("nvidia.com/gpu"))
                .or_else(|| r.requests.as_ref().and_then(|l| l.get("nvidia.com/gpu")))?;
            q.0.parse::<u32>().ok()
        })
        .sum()
}

/// The container ID the simulated runtime gives container `name` of pod `uid`: 64 hex digits.
pub fn container_id(uid: &str, name: &str) -> String {
    let d = sha2::Sha256::digest(format!("{uid}/{name}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pod's container cgroup below `parent`, shaped as the kubelet's systemd driver with
/// containerd makes it for the pod's QoS class.
pub fn pod_cgroup(parent: &Path, qos: &str, uid: &str, container_id: &str) -> PathBuf {
    let uid = uid.replace('-', "_");
    let base = parent.join("kubepods.slice");
    let pod_dir = match qos {
        "Guaranteed" => base.join(format!("kubepods-pod{uid}.slice")),
        "BestEffort" => base
            .join("kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{uid}.slice")),
        _ => base
            .join("kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{uid}.slice")),
    };
    pod_dir.join(format!("cri-containerd-{container_id}.scope"))
}

impl Sim {
    async fn tick(&mut self) -> Result<()> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let pods = pods.list(&ListParams::default()).await?.items;
        let nodes = nodes_api.list(&ListParams::default()).await?.items;
        let stopped: Vec<String> = nodes
            .iter()
            .filter(|n| {
                n.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(AGENT_ANNOTATION))
                    .is_some_and(|v| v == "stopped")
            })
            .filter_map(|n| n.metadata.name.clone())
            .collect();

        // Agents.
        let mut want_agents: HashMap<String, (String, String)> = HashMap::new();
        for pod in &pods {
            let is_agent = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(AGENT_LABEL.0))
                .is_some_and(|v| v == AGENT_LABEL.1);
            if !is_agent {
                continue;
            }
            let (Some(node), Some(uid)) =
                (running_on(pod, &self.cfg.nodes), pod.metadata.uid.clone())
            else {
                continue;
            };
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                continue;
            };
            if !stopped.contains(&node) {
                want_agents.insert(uid, (node, ip));
            }
        }
        let gone: Vec<String> = self
            .agents
            .keys()
            .filter(|k| !want_agents.contains_key(*k))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(mut a) = self.agents.remove(&uid) {
                eprintln!("agent of pod {uid} on {}: stopping", a.node);
                stop_child(&mut a.child);
            }
        }
        for (uid, (node, ip)) in want_agents {
            let entry = self.agents.entry(uid.clone()).or_insert(AgentProc {
                child: None,
                node: node.clone(),
                ip: ip.clone(),
                exited_at: None,
            });
            if let Some(c) = entry.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    eprintln!("agent of pod {uid} on {node} exited ({status}); restarting it");
                    entry.child = None;
                    entry.exited_at = Some(Instant::now());
                }
            }
            let due = entry.exited_at.is_none_or(|t| t.elapsed() >= RESTART_DELAY);
            if entry.child.is_none() && due {
                let Some(info) = self.cfg.nodes.iter().find(|n| n.name == node) else {
                    continue;
                };
                match spawn_agent(&self.cfg, info, &uid, &entry.ip, &self.logs) {
                    Ok(c) => {
                        eprintln!(
                            "agent of pod {uid} on {node}: started (pid {}) on {}:7701",
                            c.id(),
                            entry.ip
                        );
                        entry.child = Some(c);
                        entry.exited_at = None;
                    }
                    Err(e) => {
                        eprintln!("agent of pod {uid} on {node}: cannot start: {e:#}");
                        entry.exited_at = Some(Instant::now());
                    }
                }
            }
        }

        // GPU pods.
        let mut seen = Vec::new();
        for pod in &pods {
            let want = gpus_requested(pod);
            if want == 0 {
                continue;
            }
            let (Some(node), Some(uid)) =
                (running_on(pod, &self.cfg.nodes), pod.metadata.uid.clone())
            else {
                continue;
            };
            seen.push(uid.clone());
            let annotation = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(load::ANNOTATION))
                .cloned()
                .unwrap_or_default();
            if !self.pods.contains_key(&uid) {
                if let Err(e) = self.start_pod(pod, &uid, &node, want).await {
                    eprintln!(
                        "pod {}/{}: cannot start its process: {e:#}",
                        pod.metadata.namespace.as_deref().unwrap_or(""),
                        pod.metadata.name.as_deref().unwrap_or("")
                    );
                    continue;
                }
            }
            let parsed = load::parse(&annotation);
            let report = {
                let p = self.pods.get_mut(&uid).expect("just started");
                match parsed {
                    Ok(l) => {
                        p.load = l;
                        p.bad_load = None;
                        None
                    }
                    Err(why) if p.bad_load.as_deref() != Some(why.as_str()) => {
                        p.bad_load = Some(why.clone());
                        Some(why)
                    }
                    Err(_) => None,
                }
            };
            if let Some(why) = report {
                eprintln!(
                    "pod {}/{}: {why}",
                    pod.metadata.namespace.as_deref().unwrap_or(""),
                    pod.metadata.name.as_deref().unwrap_or("")
                );
                if let Err(e) = self.warn(pod, &why).await {
                    eprintln!("  (could not post the Event: {e:#})");
                }
            }
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(p) = self.pods.remove(&uid) {
                eprintln!("pod {uid} on {}: gone, stopping its process", p.node);
                stop_pod(p);
            }
        }

        // Scenarios.
        for node in self.cfg.nodes.clone() {
            let mut gpus = vec![
                GpuView {
                    load: Load::default(),
                    processes: vec![],
                };
                node.gpus as usize
            ];
            for p in self.pods.values().filter(|p| p.node == node.name) {
                for &g in &p.gpus {
                    if let Some(v) = gpus.get_mut(g as usize) {
                        v.load = p.load.clone();
                        v.processes.push(p.child.id());
                    }
                }
            }
            if self.written.get(&node.name) != Some(&gpus) {
                write_scenario(&node, &gpus)?;
                self.written.insert(node.name.clone(), gpus);
            }
        }
        Ok(())
    }

    async fn start_pod(&mut self, pod: &Pod, uid: &str, node: &str, want: u32) -> Result<()> {
        let info = self
            .cfg
            .nodes
            .iter()
            .find(|n| n.name == node)
            .context("not a simulated node")?;
        let used: Vec<u32> = self
            .pods
            .values()
            .filter(|p| p.node == node)
            .flat_map(|p| p.gpus.clone())
            .collect();
        let free: Vec<u32> = (0..info.gpus).filter(|g| !used.contains(g)).collect();
        if free.len() < want as usize {
            anyhow::bail!(
                "it asks for {want} GPU(s) and {node} has {} free (of {}); waiting",
                free.len(),
                info.gpus
            );
        }
        let gpus = free[..want as usize].to_vec();
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let container = spec
            .containers
            .first()
            .map(|c| c.name.clone())
            .context("pod without containers")?;
        let cid = container_id(uid, &container);
        let qos = pod
            .status
            .as_ref()
            .and_then(|s| s.qos_class.clone())
            .unwrap_or_else(|| "BestEffort".into());
        let cgroup = pod_cgroup(&self.cfg.cgroup_parent, &qos, uid, &cid);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let procs = CString::new(cgroup.join("cgroup.procs").to_string_lossy().into_owned())?;
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        // SAFETY: open/write/close are async-signal-safe; the path was allocated before fork.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the pod's process")?;
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        eprintln!(
            "pod {ns}/{name} on {node}: process {} in {} on GPU(s) {gpus:?}",
            child.id(),
            cgroup.display()
        );
        self.pods.insert(
            uid.to_owned(),
            PodProc {
                child,
                cgroup,
                node: node.to_owned(),
                gpus,
                load: Load::default(),
                bad_load: None,
            },
        );
        // The container IDs into the pod's status, as a runtime reports them.
        let mut statuses: Vec<Value> = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
            .collect();
        for s in &mut statuses {
            let cname = s["name"].as_str().unwrap_or_default().to_owned();
            s["containerID"] = json!(format!("containerd://{}", container_id(uid, &cname)));
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"containerStatuses": statuses}})),
        )
        .await
        .context("writing the container IDs into the pod's status")?;
        Ok(())
    }

    async fn warn(&self, pod: &Pod, why: &str) -> Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let ev = Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some(format!(
                    "{}.",
                    pod.metadata.name.as_deref().unwrap_or("pod")
                )),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                namespace: Some(ns),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            },
            reason: Some("BadSimulatedLoad".into()),
            message: Some(format!("{why}; the pod's GPUs keep their last good load")),
            type_: Some("Warning".into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("gpuscale-cluster-sim".into()),
                host: None,
            }),
            ..Default::default()
        };
        api.create(&PostParams::default(), &ev).await?;
        Ok(())
    }

    fn stop_all(&mut self) {
        for (_, mut a) in self.agents.drain() {
            stop_child(&mut a.child);
        }
        for (_, p) in self.pods.drain() {
            stop_pod(p);
        }
    }
}

fn stop_child(c: &mut Option<Child>) {
    if let Some(mut c) = c.take() {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn stop_pod(mut p: PodProc) {
    let _ = p.child.kill();
    let _ = p.child.wait();
    // Remove the container's cgroup and the parents it leaves empty.
    let mut d = p.cgroup.clone();
    while std::fs::remove_dir(&d).is_ok() {
        if !d.pop() {
            break;
        }
    }
}

fn spawn_agent(cfg: &Config, node: &NodeInfo, uid: &str, ip: &str, logs: &Path) -> Result<Child> {
    let short = &uid[..uid.len().min(8)];
    let ring = cfg
        .dir
        .join("nodes")
        .join(&node.name)
        .join(format!("agent-{short}.ring"));
    let log = logs.join(format!("agent-{}-{short}.log", node.name));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(&cfg.agent);
    cmd.arg("run")
        .arg("--nvml-lib")
        .arg(&cfg.fake_nvml)
        .arg("--shm")
        .arg(&ring)
        .args(["--node-name", &node.name])
        .args(["--interval", "100ms"])
        .args(["--listen", &format!("{ip}:7701")])
        .args(["--http-listen", &format!("{ip}:7702")])
        .arg("--tls-cert")
        .arg(cfg.tls.join("tls.crt"))
        .arg("--tls-key")
        .arg(cfg.tls.join("tls.key"))
        .arg("--tls-client-ca")
        .arg(cfg.tls.join("ca.crt"))
        // One kernel runs every simulated node: eBPF would see every node's opens.
        .args(["--ebpf", "off"])
        .env("FAKE_NVML_SCENARIO", &node.scenario)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    crate::net::enter(&mut cmd)?;
    die_with_parent(&mut cmd);
    cmd.spawn().context("starting gpuscale-agent")
}

/// Runs the simulator until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<()> {
    let cfg: Config = crate::state::read(config_path)?.with_context(|| {
        format!(
            "{} is missing; `cluster up` writes it",
            config_path.display()
        )
    })?;
    let client = crate::kube_util::client(&cfg.kubeconfig).await?;
    let logs = cfg.dir.join("logs");
    let mut sim = Sim {
        cfg,
        client,
        pods: HashMap::new(),
        agents: HashMap::new(),
        written: HashMap::new(),
        logs,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut errors: BTreeMap<String, u32> = BTreeMap::new();
    eprintln!("node simulator: {} node(s)", sim.cfg.nodes.len());
    loop {
        if let Err(e) = sim.tick().await {
            let msg = format!("{e:#}");
            let n = errors.entry(msg.clone()).or_default();
            if *n == 0 {
                eprintln!("tick failed: {msg}");
            }
            *n += 1;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("node simulator: stopping");
    sim.stop_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_have_the_kubelet_shapes_of_each_qos_class() {
        let p = Path::new("/sys/fs/cgroup/x");
        let uid = "0b1e7a3c-7d2f-4c59-9a4e-1f2d3c4b5a69";
        assert_eq!(
            pod_cgroup(p, "Guaranteed", uid, "abc"),
            Path::new("/sys/fs/cgroup/x/kubepods.slice/kubepods-pod0b1e7a3c_7d2f_4c59_9a4e_1f2d3c4b5a69.slice/cri-containerd-abc.scope")
        );
        assert!(pod_cgroup(p, "BestEffort", uid, "abc")
            .to_string_lossy()
            .contains("kubepods-besteffort.slice/kubepods-besteffort-pod0b1e7a3c_"));
        assert!(pod_cgroup(p, "Burstable", uid, "abc")
            .to_string_lossy()
            .contains("kubepods-burstable.slice/kubepods-burstable-pod0b1e7a3c_"));
        assert_eq!(container_id(uid, "vllm").len(), 64);
        assert_ne!(container_id(uid, "vllm"), container_id(uid, "sidecar"));
    }

    #[test]
    fn a_load_becomes_the_gpus_scenario() {
        let node = NodeInfo {
            name: "gpu-node-1".into(),
            gpus: 2,
            pod_cidr: "198.18.1.0/24".into(),
            scenario: PathBuf::from("/nonexistent"),
        };
        let busy = GpuView {
            load: load::parse("sm_active=80,gpu_util=90,vram_used_pct=50").unwrap(),
            processes: vec![4242],
        };
        let idle = GpuView {
            load: Load::default(),
            processes: vec![],
        };
        let s = scenario(&node, &[busy, idle]);
        assert_eq!(s["gpus"][0]["sm_active"], 80.0);
        assert_eq!(s["gpus"][0]["gpu_util"], 90.0);
        assert_eq!(s["gpus"][0]["memory_used_mib"], MEMORY_TOTAL_MIB / 2.0);
        assert_eq!(s["gpus"][0]["processes"][0]["pid"], 4242);
        assert_eq!(s["gpus"][1]["sm_active"], 0.0);
        assert_eq!(s["gpus"][1]["processes"], json!([]));
        assert_ne!(s["gpus"][0]["uuid"], s["gpus"][1]["uuid"]);
    }
}
