//! `cluster up` and `cluster down`.
//!
//! `up` starts, in order, each waited for before the next: etcd; kube-apiserver (RBAC, the
//! aggregation layer, ServiceAccount tokens); kube-controller-manager and kube-scheduler; the
//! simulated GPU nodes and kwok; KEDA (CRDs from its module, the operator, the metrics server
//! registered as `v1beta1.external.metrics.k8s.io`); gpuscale from `deploy/` through the
//! installer's own code; the node simulator ([`crate::sim`]), which runs an agent for every
//! agent pod and a process for every GPU pod; and the collector with its ServiceAccount's
//! token. A step that fails stops `up`, names the component, shows its log's last lines and
//! takes down whatever had started.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use kube::Client;
use serde_json::{json, Value};

use crate::components::{self, component};
use crate::kube_util::{self, wait_for};
use crate::net;
use crate::pki;
use crate::process::{self, Proc};
use crate::state::{self, ClusterInfo, NodeInfo, State};

/// What `up` makes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster folder.
    pub dir: PathBuf,
    /// Simulated GPU nodes.
    pub nodes: u32,
    /// Fake GPUs per node.
    pub gpus_per_node: u32,
    /// The `gpuscale-cluster` executable (the node simulator runs as `gpuscale-cluster sim`).
    pub exe: PathBuf,
}

/// The ServiceAccount the collector runs as, and its namespace.
pub const COLLECTOR_SA: (&str, &str) = ("gpuscale-system", "gpuscale-collector");
/// Where the agents' EndpointSlices are found.
pub const AGENT_SERVICE: &str = "gpuscale-system/gpuscale-agent";
/// KEDA's metrics server's pod IP inside the pod network (node pod CIDRs start at 198.18.1.0).
const KEDA_METRICS_IP: &str = "198.18.0.2";
/// The port it serves the external metrics API on.
const KEDA_METRICS_PORT: u16 = 6443;
/// The files of KEDA's Secret `kedaorg-certs` that its processes read from `--cert-dir`.
const KEDA_CERT_FILES: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

fn step(s: &str) {
    eprintln!("\n==> {s}");
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The workspace's target folder (`CARGO_TARGET_DIR`, else `target/`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The default cluster folder, `target/cluster`.
pub fn default_dir() -> PathBuf {
    target_dir().join("cluster")
}

/// The reason this machine cannot run the cluster, if any.
pub fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "not root: the cluster makes a network namespace and pod cgroups (run as root; CI does)"
                .into(),
        );
    }
    for (tool, package) in [("go", "golang"), ("openssl", "openssl"), ("ip", "iproute2")] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (apt-get install {package})"
            ));
        }
    }
    None
}

struct Paths {
    dir: PathBuf,
}

impl Paths {
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
    fn logs(&self) -> PathBuf {
        self.p("logs")
    }
    fn cluster_json(&self) -> PathBuf {
        self.p("cluster.json")
    }
    fn state_json(&self) -> PathBuf {
        self.p("state.json")
    }
}

/// Brings the cluster up, or finds it up and says so (a second `up` takes seconds).
pub async fn up(o: &Options) -> Result<ClusterInfo> {
    if let Some(why) = unsupported() {
        bail!("cannot run the cluster here: {why}");
    }
    if o.nodes == 0 || o.nodes > 200 {
        bail!("--nodes {}: give 1 to 200 nodes", o.nodes);
    }
    if o.gpus_per_node == 0 || o.gpus_per_node > 16 {
        bail!("--gpus-per-node {}: give 1 to 16 GPUs", o.gpus_per_node);
    }
    let paths = Paths { dir: o.dir.clone() };
    std::fs::create_dir_all(&paths.dir)
        .with_context(|| format!("creating {}", paths.dir.display()))?;
    let paths = Paths {
        dir: paths.dir.canonicalize()?,
    };

    if let Some(other) = owner().filter(|d| *d != paths.dir) {
        let st = state::read::<State>(&other.join("state.json"))
            .ok()
            .flatten();
        if st.is_some_and(|st| st.procs.iter().any(Proc::alive)) {
            bail!(
                "another cluster is up, in {} (one runs per machine: the pod network's name is \
                 fixed); take it down first: cargo xtask cluster down --dir {}",
                other.display(),
                other.display()
            );
        }
    }
    if let Some(info) = running(&paths).await? {
        if info.nodes.len() == o.nodes as usize
            && info.nodes.iter().all(|n| n.gpus == o.gpus_per_node)
        {
            eprintln!("the cluster in {} is already up", paths.dir.display());
            return Ok(info);
        }
        eprintln!(
            "the cluster in {} is up with {} node(s); taking it down to make {} with {} GPU(s) \
             each",
            paths.dir.display(),
            info.nodes.len(),
            o.nodes,
            o.gpus_per_node
        );
        down(&paths.dir)?;
    } else if paths.state_json().exists() || net::exists() {
        eprintln!("cleaning up what an earlier cluster left behind");
        down(&paths.dir)?;
    }

    step("components (built once from their Go modules, then reused)");
    components::ensure_all(false)?;
    let bins = gpuscale_binaries()?;

    let started = Instant::now();
    let mut state = State::default();
    match start(o, &paths, &bins, &mut state).await {
        Ok(info) => {
            eprintln!(
                "\ncluster up in {:.0} s: {} node(s) × {} GPU(s)\n  export KUBECONFIG={}\n  \
                 scalerAddress: {}\n  logs: {}",
                started.elapsed().as_secs_f64(),
                o.nodes,
                o.gpus_per_node,
                info.kubeconfig.display(),
                info.collector,
                info.logs.display()
            );
            Ok(info)
        }
        Err(e) => {
            // Record what did start, so `down` finds it, then take it down.
            let _ = state::write(&paths.state_json(), &state);
            eprintln!("\n`cluster up` failed (the error follows); taking down what had started");
            if let Err(d) = down(&paths.dir) {
                eprintln!("warning: {d:#}");
            }
            Err(e)
        }
    }
}

/// Names the cluster folder whose `up` made the pod network (one cluster per machine).
const OWNER: &str = "/run/gpuscale-cluster.owner";

fn owner() -> Option<PathBuf> {
    let bytes = std::fs::read(OWNER).ok()?;
    Some(PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The binaries of this checkout that the cluster runs.
struct Bins {
    agent: PathBuf,
    collector: PathBuf,
    fake_nvml: PathBuf,
}

fn gpuscale_binaries() -> Result<Bins> {
    step("gpuscale: cargo build -p agent -p collector -p fake-nvml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", "agent", "-p", "collector", "-p", "fake-nvml"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p agent -p collector -p fake-nvml failed ({status})");
    }
    let dir = target_dir().join("debug");
    Ok(Bins {
        agent: dir.join("gpuscale-agent"),
        collector: dir.join("gpuscale-collector"),
        fake_nvml: dir.join("libfake_nvml.so"),
    })
}

/// The cluster described by the folder, if every process it started runs and the API server
/// answers.
async fn running(paths: &Paths) -> Result<Option<ClusterInfo>> {
    let (Some(info), Some(st)) = (
        state::read::<ClusterInfo>(&paths.cluster_json())?,
        state::read::<State>(&paths.state_json())?,
    ) else {
        return Ok(None);
    };
    if st.procs.is_empty() || !st.procs.iter().all(Proc::alive) || !net::exists() {
        return Ok(None);
    }
    let Ok(client) = kube_util::client(&info.kubeconfig).await else {
        return Ok(None);
    };
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(Some(info)),
        _ => Ok(None),
    }
}

/// Starts a process and records it in `state` at once (so a failure later still stops it).
fn spawn(paths: &Paths, state: &mut State, name: &str, cmd: &mut Command) -> Result<Proc> {
    let p = process::spawn(&paths.logs(), name, cmd)?;
    state.procs.push(p.clone());
    state::write(&paths.state_json(), state)?;
    Ok(p)
}

fn port(state: &mut State, name: &str, ip: &str) -> Result<u16> {
    let p = process::free_port(ip)?;
    state.ports.insert(name.into(), json!(p));
    Ok(p)
}

async fn start(o: &Options, paths: &Paths, bins: &Bins, state: &mut State) -> Result<ClusterInfo> {
    let logs = paths.logs();
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    state::write(&paths.state_json(), state)?;

    step("pod network: namespace gpuscale-cluster, veth gsc-host (198.19.0.1) ↔ gsc-pods, pod IPs 198.18.0.0/16");
    net::up()?;
    std::fs::write(OWNER, paths.dir.as_os_str().as_encoded_bytes())
        .with_context(|| format!("writing {OWNER}"))?;

    step("certificates and tokens (openssl)");
    let pki = pki::make(&paths.p("pki"), &[net::HOST_IP, "127.0.0.1", "10.96.0.1"])?;

    // etcd
    let etcd_port = port(state, "etcd", "127.0.0.1")?;
    let etcd_peer = port(state, "etcd_peer", "127.0.0.1")?;
    step(&format!(
        "etcd {} on 127.0.0.1:{etcd_port}",
        components::ETCD
    ));
    let data = paths.p("etcd");
    let _ = std::fs::remove_dir_all(&data);
    let etcd = spawn(
        paths,
        state,
        "etcd",
        Command::new(components::binary("etcd"))
            .arg(format!("--data-dir={}", data.display()))
            .arg("--name=gpuscale")
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"
            ))
            .arg(format!(
                "--initial-cluster=gpuscale=http://127.0.0.1:{etcd_peer}"
            ))
            // A test cluster: losing the last writes on a power cut is fine, slow fsyncs on a
            // shared disk are not.
            .arg("--unsafe-no-fsync")
            .arg("--quota-backend-bytes=2147483648")
            .arg("--log-level=warn"),
    )?;
    let etcd_addr = format!("127.0.0.1:{etcd_port}");
    process::wait_ready(&etcd, "client port open", Duration::from_secs(30), || {
        process::listening(&etcd_addr)
    })?;

    // kube-apiserver
    let api_port = port(state, "apiserver", net::HOST_IP)?;
    let server = format!("https://{}:{api_port}", net::HOST_IP);
    step(&format!(
        "kube-apiserver {} on {server}",
        components::KUBERNETES
    ));
    let admin_kubeconfig = paths.p("kubeconfig");
    std::fs::write(
        &admin_kubeconfig,
        pki::kubeconfig(&pki, &server, "admin", &pki.admin_token),
    )?;
    let p = |f: &str| pki.path(f).display().to_string();
    let apiserver = spawn(
        paths,
        state,
        "kube-apiserver",
        Command::new(components::binary("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--bind-address={}", net::HOST_IP))
            .arg(format!("--advertise-address={}", net::HOST_IP))
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--token-auth-file={}", p("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            .arg("--anonymous-auth=false")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            // The aggregation layer: KEDA's metrics server is reached at its endpoint's IP.
            .arg("--enable-aggregator-routing=true")
            .arg(format!(
                "--requestheader-client-ca-file={}",
                p("front-proxy-ca.crt")
            ))
            .arg("--requestheader-allowed-names=front-proxy-client")
            .arg("--requestheader-username-headers=X-Remote-User")
            .arg("--requestheader-group-headers=X-Remote-Group")
            .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
            .arg(format!(
                "--proxy-client-cert-file={}",
                p("front-proxy-client.crt")
            ))
            .arg(format!(
                "--proxy-client-key-file={}",
                p("front-proxy-client.key")
            ))
            .arg(format!(
                "--cert-dir={}",
                pki.path("apiserver-generated").display()
            ))
            .arg("--profiling=false")
            .arg("--v=1"),
    )?;
    let client = kube_util::client(&admin_kubeconfig).await?;
    {
        let c = client.clone();
        wait_for("kube-apiserver /readyz", Duration::from_secs(90), || {
            let c = c.clone();
            let apiserver = apiserver.clone();
            async move {
                apiserver.check()?;
                Ok(kube_util::ready(&c).await.then_some(()))
            }
        })
        .await
        .map_err(|e| e.context(format!("log: {}", apiserver.log.display())))?;
    }

    // controller-manager and scheduler
    let kcm_port = port(state, "kube-controller-manager", "127.0.0.1")?;
    step(&format!(
        "kube-controller-manager and kube-scheduler {} (HPA sync every 15 s, the default)",
        components::KUBERNETES
    ));
    let kubeconfig_arg = |flag: &str| format!("--{flag}={}", admin_kubeconfig.display());
    let kcm = spawn(
        paths,
        state,
        "kube-controller-manager",
        Command::new(components::binary("kube-controller-manager"))
            .arg(kubeconfig_arg("kubeconfig"))
            .arg(kubeconfig_arg("authentication-kubeconfig"))
            .arg(kubeconfig_arg("authorization-kubeconfig"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={kcm_port}"))
            .arg(format!(
                "--service-account-private-key-file={}",
                p("sa.key")
            ))
            .arg(format!("--root-ca-file={}", p("ca.crt")))
            .arg("--use-service-account-credentials=true")
            .arg("--leader-elect=false")
            .arg("--v=1"),
    )?;
    let sched_port = port(state, "kube-scheduler", "127.0.0.1")?;
    let scheduler = spawn(
        paths,
        state,
        "kube-scheduler",
        Command::new(components::binary("kube-scheduler"))
            .arg(kubeconfig_arg("kubeconfig"))
            .arg(kubeconfig_arg("authentication-kubeconfig"))
            .arg(kubeconfig_arg("authorization-kubeconfig"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={sched_port}"))
            .arg("--leader-elect=false")
            .arg("--v=1"),
    )?;
    {
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        let kcm = kcm.clone();
        wait_for(
            "kube-controller-manager (the default ServiceAccount)",
            Duration::from_secs(60),
            || {
                let sas = sas.clone();
                let kcm = kcm.clone();
                async move {
                    kcm.check()?;
                    Ok(sas.get_opt("default").await?.map(|_| ()))
                }
            },
        )
        .await?;
        let addr = format!("127.0.0.1:{sched_port}");
        process::wait_ready(
            &scheduler,
            "secure port open",
            Duration::from_secs(60),
            || process::listening(&addr),
        )?;
    }

    // Nodes and kwok
    step(&format!(
        "{} simulated GPU node(s) with {} nvidia.com/gpu each, kwok {}",
        o.nodes,
        o.gpus_per_node,
        components::KWOK
    ));
    let mut nodes = Vec::new();
    for i in 1..=o.nodes as usize {
        let name = format!("gpu-node-{i}");
        let node_dir = paths.p(&format!("nodes/{name}"));
        std::fs::create_dir_all(&node_dir)?;
        let info = NodeInfo {
            name: name.clone(),
            gpus: o.gpus_per_node,
            pod_cidr: net::node_cidr(i),
            scenario: node_dir.join("scenario.json"),
        };
        crate::sim::write_idle_scenario(&info)?;
        kube_util::apply(&client, &node_object(&info)).await?;
        // Capacity is status, which an apply of the Node does not write; kwok keeps it.
        let resources = json!({"cpu": "64", "memory": "512Gi", "pods": "110",
                               "nvidia.com/gpu": info.gpus.to_string()});
        Api::<Node>::all(client.clone())
            .patch_status(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(
                    json!({"status": {"capacity": resources, "allocatable": resources}}),
                ),
            )
            .await
            .with_context(|| format!("setting the capacity of node {name}"))?;
        nodes.push(info);
    }
    kube_util::apply(
        &client,
        &json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                "metadata": {"name": "nvidia"}, "handler": "nvidia"}),
    )
    .await?;
    let kwok_config = paths.p("kwok.yaml");
    std::fs::write(&kwok_config, kwok_stages()?)?;
    let kwok_port = port(state, "kwok", "127.0.0.1")?;
    let kwok = spawn(
        paths,
        state,
        "kwok",
        Command::new(components::binary("kwok"))
            .arg(kubeconfig_arg("kubeconfig"))
            .arg(format!("--config={}", kwok_config.display()))
            .arg("--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake")
            .arg(format!("--server-address=127.0.0.1:{kwok_port}"))
            .arg("--node-lease-duration-seconds=40")
            .arg(format!("--node-ip={}", net::HOST_IP))
            .arg("--cidr=198.18.250.0/24"),
    )?;
    {
        let api: Api<Node> = Api::all(client.clone());
        let want = nodes.len();
        let kwok = kwok.clone();
        wait_for("kwok: every node Ready", Duration::from_secs(60), || {
            let api = api.clone();
            let kwok = kwok.clone();
            async move {
                kwok.check()?;
                let list = api.list(&ListParams::default()).await?;
                let ready = list
                    .items
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                Ok((ready == want).then_some(()))
            }
        })
        .await?;
    }

    keda(paths, state, &client, &admin_kubeconfig).await?;

    // gpuscale
    step("gpuscale: deploy/ through the installer (server-side apply, real RBAC)");
    let ns = gpuscale_deploy::DEFAULT_NAMESPACE;
    let mut objects = gpuscale_deploy::render::render(
        &workspace_root().join("deploy/base"),
        &gpuscale_deploy::render::Options::default(),
    )?;
    gpuscale_deploy::checks::check(&objects)?;
    gpuscale_deploy::render::set_image(
        &mut objects,
        gpuscale_deploy::IMAGE_NAME,
        &format!("gpuscale:{}", env!("CARGO_PKG_VERSION")),
    );
    let mut say = |s: String| eprintln!("{s}");
    let warnings = gpuscale_deploy::install(
        &client,
        &objects,
        ns,
        gpuscale_deploy::certificates::DEFAULT_KEDA_NAMESPACE,
        Duration::from_secs(60),
        &mut say,
    )
    .await?;
    if let Some(w) = warnings.first() {
        bail!("the installer warned, with KEDA installed: {w}");
    }
    // The agents and the collector run here, not in pods: they get the Secrets' files.
    let tls_dir = paths.p("tls");
    for (secret, dir) in [
        (gpuscale_deploy::certificates::AGENT_SECRET, "agent"),
        (gpuscale_deploy::certificates::COLLECTOR_SECRET, "collector"),
    ] {
        write_secret_files(&client, ns, secret, &tls_dir.join(dir)).await?;
    }

    // The simulator: agents for agent pods, processes for GPU pods.
    let cgroup_parent = crate::sim::cgroup_parent(&paths.dir)?;
    state.cgroup_parent = Some(cgroup_parent.clone());
    let info = ClusterInfo {
        kubeconfig: admin_kubeconfig.clone(),
        server: server.clone(),
        collector: String::new(),
        collector_http: String::new(),
        collector_kubeconfig: paths.p("collector.kubeconfig"),
        collector_bin: bins.collector.clone(),
        nodes: nodes.clone(),
        versions: versions(),
        logs: logs.clone(),
        netns: net::NETNS.into(),
        tls_dir: tls_dir.clone(),
    };
    let sim_config = crate::sim::Config {
        kubeconfig: admin_kubeconfig.clone(),
        nodes: nodes.clone(),
        agent: bins.agent.clone(),
        fake_nvml: bins.fake_nvml.clone(),
        cgroup_parent,
        dir: paths.dir.clone(),
        tls: tls_dir.join("agent"),
    };
    let sim_json = paths.p("sim.json");
    state::write(&sim_json, &sim_config)?;
    step("node simulator: an agent per agent pod, a process in a pod cgroup per GPU pod");
    let sim = spawn(
        paths,
        state,
        "sim",
        Command::new(&o.exe)
            .arg("sim")
            .arg("--config")
            .arg(&sim_json),
    )?;
    step("waiting for the gpuscale rollout");
    let timeout = Duration::from_secs(120);
    let waited = gpuscale_deploy::cluster::wait_rollout(
        &client,
        ns,
        "gpuscale-agent",
        "gpuscale-collector",
        timeout,
        &mut say,
    );
    let warnings = tokio::select! {
        r = waited => r?,
        e = watch_proc(sim.clone()) => return Err(e),
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }

    // The collector, as its ServiceAccount.
    let collector_port = port(state, "collector", "127.0.0.1")?;
    let collector_http = port(state, "collector_http", "127.0.0.1")?;
    let collector_addr = format!("127.0.0.1:{collector_port}");
    let collector_http_addr = format!("127.0.0.1:{collector_http}");
    step(&format!(
        "collector on {collector_addr} (--kube, ServiceAccount {}/{})",
        COLLECTOR_SA.0, COLLECTOR_SA.1
    ));
    let token = service_account_token(&client, COLLECTOR_SA.0, COLLECTOR_SA.1).await?;
    std::fs::write(
        &info.collector_kubeconfig,
        pki::kubeconfig(&pki, &server, COLLECTOR_SA.1, &token),
    )?;
    let collector = spawn(
        paths,
        state,
        "collector",
        Command::new(&bins.collector)
            .args(["serve", "--kube", "--agent-service", AGENT_SERVICE])
            .args([
                "--listen",
                &collector_addr,
                "--http-listen",
                &collector_http_addr,
            ])
            .args(agent_tls_flags(&info))
            .env("KUBECONFIG", &info.collector_kubeconfig)
            .env("RUST_LOG", "info"),
    )?;
    let want_agents = nodes.len();
    let readyz = format!("http://{collector_http_addr}/readyz");
    let metrics = format!("http://{collector_http_addr}/metrics");
    process::wait_ready(
        &collector,
        "/readyz 200 and every agent connected",
        Duration::from_secs(90),
        || {
            http_get(&readyz).is_ok_and(|(code, _)| code == 200)
                && http_get(&metrics).is_ok_and(|(_, body)| {
                    body.lines()
                        .filter(|l| {
                            l.starts_with("gpuscale_collector_agent_connected{")
                                && l.ends_with(" 1")
                        })
                        .count()
                        >= want_agents
                })
        },
    )?;
    sim.check()?;

    let info = ClusterInfo {
        collector: collector_addr,
        collector_http: collector_http_addr,
        ..info
    };
    state::write(&paths.state_json(), state)?;
    state::write(&paths.cluster_json(), &info)?;
    Ok(info)
}

/// The collector's flags for dialing the agents as the installed one does: mutual TLS with the
/// collector's certificate, the agents' shared name, and the node of each agent from its
/// EndpointSlice.
pub fn agent_tls_flags(info: &ClusterInfo) -> Vec<String> {
    let dir = info.tls_dir.join("collector");
    let file = |f: &str| dir.join(f).display().to_string();
    vec![
        "--agent-ca".into(),
        file("ca.crt"),
        "--agent-client-cert".into(),
        file("tls.crt"),
        "--agent-client-key".into(),
        file("tls.key"),
        "--agent-tls-server-name".into(),
        gpuscale_deploy::certificates::agent_name(gpuscale_deploy::DEFAULT_NAMESPACE),
    ]
}

/// Writes the `tls.crt`, `tls.key` and `ca.crt` of Secret `ns/name` into `dir` (mode 0600).
async fn write_secret_files(client: &Client, ns: &str, name: &str, dir: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let secret = api
        .get(name)
        .await
        .with_context(|| format!("reading Secret {ns}/{name}, which the installer makes"))?;
    std::fs::create_dir_all(dir)?;
    let data = secret.data.unwrap_or_default();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let bytes = data
            .get(key)
            .with_context(|| format!("Secret {ns}/{name} has no {key}"))?;
        let path = dir.join(key);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, &bytes.0)?;
    }
    Ok(())
}

/// Fails when `p` exits (for racing a wait against a process that must stay up).
async fn watch_proc(p: Proc) -> anyhow::Error {
    loop {
        process::reap();
        if let Err(e) = p.check() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn versions() -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("etcd".into(), json!(components::ETCD));
    m.insert("kubernetes".into(), json!(components::KUBERNETES));
    m.insert("kwok".into(), json!(components::KWOK));
    m.insert("keda".into(), json!(components::KEDA));
    m.insert("gpuscale".into(), json!(env!("CARGO_PKG_VERSION")));
    m
}

/// A Node kwok manages: the labels the agent DaemonSet selects on, its pod CIDR (its GPU
/// capacity is written to its status separately).
fn node_object(n: &NodeInfo) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": n.name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "type": "kwok",
                "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.count": n.gpus.to_string(),
            }
        },
        "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
    })
}

/// kwok's stages, read from the kwok module's own `kustomize/stage` files: nodes become Ready
/// and keep a lease; pods become Running with an IP from their node's pod CIDR, complete, and
/// are deleted when asked. Plus [`POD_READY_AGAIN`].
/// A stage of ours: a running pod whose Ready condition is not `True` gets it back, as a real
/// kubelet's status sync restores what the API server lost. Without it, a pod the node
/// controller marked not ready (its node's lease went stale during an API-server outage) stays
/// not ready for good, since kwok's own ready stage only takes `Pending` pods; its agent's
/// endpoint then vanished from the collector's discovery for minutes after such an outage.
const POD_READY_AGAIN: &str = r#"apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: gpuscale-pod-ready-again
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: PodScheduled
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
---
"#;

fn kwok_stages() -> Result<String> {
    let src = components::module_dir(component("kwok").module, components::KWOK)?;
    let files = [
        "kustomize/stage/node/fast/node-initialize.yaml",
        "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
        "kustomize/stage/pod/fast/pod-ready.yaml",
        "kustomize/stage/pod/fast/pod-complete.yaml",
        "kustomize/stage/pod/fast/pod-delete.yaml",
    ];
    let mut out = String::from(POD_READY_AGAIN);
    for f in files {
        let path = src.join(f);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading kwok's stage {}", path.display()))?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// KEDA: its CRDs (from the module's `config/crd/bases`), the operator (generating and rotating
/// its certificates itself, as in a real install) and the metrics server, registered with the
/// aggregation layer.
async fn keda(
    paths: &Paths,
    state: &mut State,
    client: &Client,
    admin_kubeconfig: &Path,
) -> Result<()> {
    step(&format!(
        "KEDA {}: CRDs, operator, metrics server as v1beta1.external.metrics.k8s.io",
        components::KEDA
    ));
    let src = components::module_dir(component("keda").module, components::KEDA)?;
    kube_util::apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "keda"}}),
    )
    .await?;
    let crds = src.join("config/crd/bases");
    let mut applied = 0;
    for entry in std::fs::read_dir(&crds).with_context(|| format!("reading {}", crds.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path)?;
            applied += kube_util::apply_yaml(client, &text, &path).await?;
        }
    }
    if applied == 0 {
        bail!("no CRDs in {}", crds.display());
    }
    {
        let crd_api: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        wait_for("KEDA's CRDs Established", Duration::from_secs(30), || {
            let crd_api = crd_api.clone();
            async move {
                let so = crd_api.get("scaledobjects.keda.sh").await?;
                let established = so.status.and_then(|s| s.conditions).is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                Ok(established.then_some(()))
            }
        })
        .await?;
    }
    // The metrics server's Service, with its endpoint in the pod network.
    for obj in [
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "keda-metrics-apiserver", "namespace": "keda"},
               "spec": {"ports": [{"name": "https", "port": 443, "targetPort": KEDA_METRICS_PORT}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "keda-metrics-apiserver-local", "namespace": "keda",
                            "labels": {"kubernetes.io/service-name": "keda-metrics-apiserver",
                                       "endpointslice.kubernetes.io/managed-by": "gpuscale-cluster"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [KEDA_METRICS_IP], "conditions": {"ready": true}}],
               "ports": [{"name": "https", "port": KEDA_METRICS_PORT, "protocol": "TCP"}]}),
        json!({"apiVersion": "v1", "kind": "Endpoints",
               "metadata": {"name": "keda-metrics-apiserver", "namespace": "keda"},
               "subsets": [{"addresses": [{"ip": KEDA_METRICS_IP}],
                            "ports": [{"name": "https", "port": KEDA_METRICS_PORT, "protocol": "TCP"}]}]}),
        json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
               "metadata": {"name": "v1beta1.external.metrics.k8s.io"},
               "spec": {"service": {"name": "keda-metrics-apiserver", "namespace": "keda", "port": 443},
                        "group": "external.metrics.k8s.io", "version": "v1beta1",
                        "groupPriorityMinimum": 100, "versionPriority": 100}}),
    ] {
        kube_util::apply(client, &obj).await?;
    }

    let certs = paths.p("keda/certs");
    let ca_dir = paths.p("keda/ca");
    std::fs::create_dir_all(&certs)?;
    std::fs::create_dir_all(&ca_dir)?;
    let metrics = port(state, "keda_operator_metrics", "127.0.0.1")?;
    let probe = port(state, "keda_operator_probe", "127.0.0.1")?;
    let grpc = port(state, "keda_operator_grpc", net::HOST_IP)?;
    let keda_env = |cmd: &mut Command| {
        cmd.env("KUBECONFIG", admin_kubeconfig)
            .env("WATCH_NAMESPACE", "")
            .env("POD_NAMESPACE", "keda")
            .env("KEDA_CLUSTER_OBJECT_NAMESPACE", "keda")
            .env("KEDA_HTTP_DEFAULT_TIMEOUT", "3000");
    };
    let mut cmd = Command::new(components::binary("keda-operator"));
    cmd.arg("--leader-elect=false")
        .arg(format!("--metrics-bind-address=127.0.0.1:{metrics}"))
        .arg(format!("--health-probe-bind-address=127.0.0.1:{probe}"))
        .arg(format!(
            "--metrics-service-bind-address={}:{grpc}",
            net::HOST_IP
        ))
        .arg("--enable-cert-rotation=true")
        .arg(format!("--cert-dir={}", certs.display()))
        .arg(format!("--ca-dir={}", ca_dir.display()))
        .arg("--enable-webhook-patching=false")
        .arg("--zap-log-level=info")
        .env("OPERATOR_NAME", "keda-operator")
        .env("POD_NAME", "keda-operator-local");
    keda_env(&mut cmd);
    // On its first start the operator makes its certificates, stores them in the Secret
    // kedaorg-certs and exits "so the pod can be restarted". As the kubelet would, write the
    // Secret's files into the certificate folder (a Secret volume in a real install) and start
    // it again.
    let mut operator = spawn(paths, state, "keda-operator", &mut cmd)?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "keda");
    let secret = {
        let operator = operator.clone();
        wait_for(
            "keda-operator: the Secret keda/kedaorg-certs",
            Duration::from_secs(60),
            || {
                let secrets = secrets.clone();
                let operator = operator.clone();
                async move {
                    let s = secrets.get_opt("kedaorg-certs").await?;
                    let complete = s
                        .as_ref()
                        .and_then(|s| s.data.as_ref())
                        .is_some_and(|d| KEDA_CERT_FILES.iter().all(|k| d.contains_key(*k)));
                    if !complete && !operator.alive() {
                        operator.check()?;
                    }
                    Ok(s.filter(|_| complete))
                }
            },
        )
        .await?
    };
    for (k, v) in secret.data.unwrap_or_default() {
        if KEDA_CERT_FILES.contains(&k.as_str()) {
            std::fs::write(certs.join(&k), &v.0)?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while operator.alive() && Instant::now() < deadline {
        process::reap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !operator.alive() {
        eprintln!(
            "  keda-operator made its certificates and exited to be restarted; restarting it"
        );
        std::fs::rename(
            &operator.log,
            paths.logs().join("keda-operator.first-start.log"),
        )?;
        state.procs.retain(|p| p.pid != operator.pid);
        operator = spawn(paths, state, "keda-operator", &mut cmd)?;
    }
    let grpc_addr = format!("{}:{grpc}", net::HOST_IP);
    process::wait_ready(
        &operator,
        "its gRPC port open",
        Duration::from_secs(60),
        || process::listening(&grpc_addr),
    )?;

    let adapter_metrics = 8080;
    let mut cmd = Command::new(components::binary("keda-adapter"));
    cmd.arg(format!("--secure-port={KEDA_METRICS_PORT}"))
        .arg(format!("--bind-address={KEDA_METRICS_IP}"))
        .arg(format!(
            "--tls-cert-file={}",
            certs.join("tls.crt").display()
        ))
        .arg(format!(
            "--tls-private-key-file={}",
            certs.join("tls.key").display()
        ))
        .arg(format!("--cert-dir={}", certs.display()))
        .arg(format!("--metrics-service-address={}:{grpc}", net::HOST_IP))
        .arg("--metrics-service-grpc-authority=keda-operator.keda.svc")
        .arg(format!("--port={adapter_metrics}"))
        .arg(format!(
            "--lister-kubeconfig={}",
            admin_kubeconfig.display()
        ))
        .arg(format!(
            "--authentication-kubeconfig={}",
            admin_kubeconfig.display()
        ))
        .arg(format!(
            "--authorization-kubeconfig={}",
            admin_kubeconfig.display()
        ))
        .arg("--zap-log-level=info");
    keda_env(&mut cmd);
    // In the pod network, where its pod IP is: the metrics port it opens on every interface
    // stays inside that namespace.
    net::enter(&mut cmd)?;
    let adapter = spawn(paths, state, "keda-adapter", &mut cmd)?;
    let api: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
            "apiservices",
        ),
    );
    wait_for(
        "the aggregation layer: APIService v1beta1.external.metrics.k8s.io Available",
        Duration::from_secs(90),
        || {
            let api = api.clone();
            let adapter = adapter.clone();
            let operator = operator.clone();
            async move {
                adapter.check()?;
                operator.check()?;
                let svc = api.get("v1beta1.external.metrics.k8s.io").await?;
                let cond = svc.data["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Available").cloned())
                    .unwrap_or(Value::Null);
                if cond["status"] == "True" {
                    Ok(Some(()))
                } else {
                    bail!("{}: {}", cond["reason"], cond["message"])
                }
            }
        },
    )
    .await
    .map_err(|e| {
        e.context(format!(
            "KEDA's metrics server; last lines of {}:\n{}",
            adapter.log.display(),
            process::tail(&adapter.log, 15)
        ))
    })?;
    Ok(())
}

/// A bearer token for ServiceAccount `ns/name` (TokenRequest, valid 48 h).
pub async fn service_account_token(client: &Client, ns: &str, name: &str) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let req = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(48 * 3600),
            audiences: vec![],
            ..Default::default()
        },
        ..Default::default()
    };
    let resp: k8s_openapi::api::authentication::v1::TokenRequest = api
        .create_subresource("token", name, &PostParams::default(), &req)
        .await
        .with_context(|| format!("requesting a token for ServiceAccount {ns}/{name}"))?;
    resp.status
        .map(|s| s.token)
        .context("the TokenRequest came back without a token")
}

/// A plain-HTTP GET on loopback: (status code, body).
pub fn http_get(url: &str) -> Result<(u16, String)> {
    crate::ops::http("GET", url, "")
}

/// Stops every process of the cluster in `dir` (the last started first), removes the pod
/// cgroups and the pod network, and the state; logs stay. Fine to run when nothing is up.
pub fn down(dir: &Path) -> Result<()> {
    let state_path = dir.join("state.json");
    let st = state::read::<State>(&state_path)?.unwrap_or_default();
    for p in st.procs.iter().rev() {
        if p.alive() {
            eprintln!("  stopping {} (pid {})", p.name, p.pid);
            p.stop(Duration::from_secs(10));
        }
    }
    let parent = st
        .cgroup_parent
        .clone()
        .or_else(|| crate::sim::cgroup_parent(dir).ok());
    if let Some(parent) = parent {
        crate::sim::remove_cgroups(&parent)?;
    }
    let ours = owner().is_none_or(|o| dir.canonicalize().is_ok_and(|d| d == o));
    if ours {
        net::down();
        let _ = std::fs::remove_file(OWNER);
    }
    for f in ["state.json", "cluster.json", "sim.json"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join("etcd"));
    Ok(())
}
