//! The composition root of `gpuscale-agent run`: everything the agent starts, in order, and how
//! it stops.
//!
//! Start: bind the listeners (a taken port fails the agent before NVML is touched), start eBPF
//! tracking as `--ebpf` says ([`crate::ebpf::start`], the one start policy), load NVML and open
//! every device ([`crate::sampler::devices`]), open the ring file (rebuilding the windows from
//! its history when it is reused), build the [`Node`], then start the sampler threads, the status
//! thread and the servers (gRPC `--listen`, HTTP `--http-listen`).
//!
//! Stop: the [`Stop`] signal (SIGTERM or SIGINT from `main`, or a server that failed: without its
//! API the agent is useless, so a failed server stops the samplers too) ends every loop; the
//! servers get their grace period; then the eBPF tracker is detached.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use gpuscale_health::tls::{ServerFiles, ServerTls, ALPN_GRPC, ALPN_HTTP};

use crate::ebpf::{self, EbpfConfig};
use crate::live::GpuLive;
use crate::node::Node;
use crate::shm::{self, AgentAreaWriter, AgentStatus, DeviceOpen, ShmWriter};
use crate::stop::Stop;
use crate::window::GpuWindows;
use crate::{sampler, Error, Result};

/// History the ring keeps at the configured interval.
pub const RING_HISTORY: Duration = Duration::from_secs(600);
/// How often the agent status (eBPF counters, device opens) is published.
const STATUS_PERIOD: Duration = Duration::from_secs(1);

/// What `gpuscale-agent run` needs (its flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// Path of `libnvidia-ml.so.1` (or the fake).
    pub nvml_lib: PathBuf,
    /// Ring file path.
    pub shm: PathBuf,
    /// Sampling interval.
    pub interval: Duration,
    /// Node name written into the ring.
    pub node_name: String,
    /// Where `/proc` of the host's PID namespace is (NVML reports host PIDs).
    pub proc_root: PathBuf,
    /// eBPF device-open tracking (`--ebpf`, `--device-prefix`, `--cgroup-root`, `--ebpf-hook`).
    pub ebpf: EbpfConfig,
    /// Where to serve the agent gRPC API (`--listen`), if anywhere.
    pub listen: Option<SocketAddr>,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (`--http-listen`), if anywhere.
    pub http_listen: Option<String>,
    /// TLS for both ports (`--tls-cert`, `--tls-key`; `--tls-client-ca` for the gRPC port only:
    /// the kubelet's probes cannot present a client certificate).
    pub tls: Option<ServerFiles>,
}

/// The node name to report when `--node-name` is not given: the host name.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-node".into())
}

/// Runs the agent until `stop` fires (see the module documentation for the order).
pub fn run(config: &Config, stop: &Arc<Stop>) -> Result<()> {
    let grpc = config.listen.map(crate::server::bind).transpose()?;
    let http = config
        .http_listen
        .as_deref()
        .map(gpuscale_health::listen)
        .transpose()?;
    // Certificates are read before NVML too: a wrong path fails the start, naming the flag.
    let grpc_tls = match (&config.tls, &grpc) {
        (Some(files), Some(_)) => Some(ServerTls::load(files, ALPN_GRPC)?),
        _ => None,
    };
    let http_tls = match (&config.tls, &http) {
        (Some(files), Some(_)) => Some(ServerTls::load(&files.without_client_ca(), ALPN_HTTP)?),
        _ => None,
    };
    let ebpf = ebpf::start(&config.ebpf)?;
    let nvml = sampler::load_nvml(&config.nvml_lib)?;
    let devices = sampler::devices::open(&nvml, &config.nvml_lib)?;
    let params = shm::Params {
        capacity: shm::capacity_for(config.interval, RING_HISTORY),
        interval_ns: config.interval.as_nanos() as u64,
        node_name: config.node_name.clone(),
        driver_version: devices.driver_version.clone(),
    };
    let mut writer = ShmWriter::open(&config.shm, &params, &devices.gpus)?;
    let (reused, capacity) = (writer.reused(), writer.capacity());
    let watch = writer.watch()?;
    let shm::WriterParts {
        regions,
        agent_area: area,
    } = writer.parts();
    let live = regions
        .iter()
        .zip(&devices.gpus)
        .map(|(r, g)| {
            let w = if reused {
                GpuWindows::from_ring(r.reader().ring(), g.memory_total_bytes, config.interval)
            } else {
                GpuWindows::for_gpu_at(config.interval)
            };
            GpuLive::new(w, g.memory_total_bytes, config.interval)
        })
        .collect();
    if reused {
        tracing::info!(path = %config.shm.display(), "reused the ring file; windows rebuilt from its history");
    }
    tracing::info!(
        path = %config.shm.display(),
        driver = %devices.driver_version,
        gpus = devices.gpus.len(),
        interval = %vocab::duration::format(config.interval),
        capacity,
        "sampling"
    );
    let node = Arc::new(Node::new(
        config.node_name.clone(),
        devices.driver_version.clone(),
        config.interval,
        devices.gpus.clone(),
        live,
        AgentStatus {
            ebpf: ebpf.state,
            ebpf_reason: ebpf.reason,
            ..AgentStatus::default()
        },
        ebpf.tracker,
    ));
    let served = std::thread::scope(|s| {
        sampler::spawn(s, &nvml, &devices, &regions, &node, &config.proc_root, stop);
        let node_ref = &*node;
        let status = std::thread::Builder::new()
            .name("status".into())
            .spawn_scoped(s, move || {
                let result = status_loop(node_ref, &area, &watch, stop);
                stop.trigger();
                result
            })
            .expect("spawning the status thread");
        let grpc = grpc.map(|l| {
            let (node, stop2) = (node.clone(), stop.clone());
            spawn_server(s, "grpc-server", stop.clone(), move || {
                crate::server::serve(l, grpc_tls, node, stop2)
            })
        });
        let http = http.map(|l| {
            let (node, stop2) = (node.clone(), stop.clone());
            spawn_server(s, "http", stop.clone(), move || {
                serve_http(l, http_tls, node, stop2)
            })
        });
        stop.wait();
        let status = join(status);
        let grpc = grpc.map(join).transpose();
        let http = http.map(join).transpose();
        status.and(grpc).and(http.map(drop))
    });
    if let Some(t) = &node.tracker {
        t.stop();
    }
    tracing::info!("stopped sampling");
    served.map(|_| ())
}

/// A server thread's result; a panic is an error.
fn join(thread: ScopedJoinHandle<'_, Result<()>>) -> Result<()> {
    thread.join().unwrap_or_else(|_| {
        Err(Error::Serve {
            why: "its thread panicked".into(),
        })
    })
}

/// Runs the server `serve` on a thread `name` of `scope`. When it returns (an error, or the end
/// after a stop) the agent stops: without its API the agent is useless to the collector, and
/// without its HTTP server its probes would fail anyway.
fn spawn_server<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    stop: Arc<Stop>,
    serve: impl FnOnce() -> Result<()> + Send + 'scope,
) -> ScopedJoinHandle<'scope, Result<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(scope, move || {
            let result = serve();
            stop.trigger();
            result
        })
        .expect("spawning a server thread")
}

/// Serves `--http-listen` (/healthz, /readyz, /metrics) until `stop`, on a runtime of its own.
fn serve_http(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    node: Arc<Node>,
    stop: Arc<Stop>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Error::Runtime {
            what: "the HTTP server's runtime",
            error,
        })?;
    let endpoints = crate::metrics::endpoints(node, stop.clone());
    Ok(rt.block_on(gpuscale_health::serve(
        listener,
        tls,
        endpoints,
        stop.stopped(),
    ))?)
}

/// Publishes the agent-wide status (eBPF counters, recent device opens) once a second, to the
/// ring file for `dump` and to memory for the gRPC API; and checks the ring file is still whole
/// and in place, returning [`Error::RingFileLost`] (the agent stops) when it is not.
fn status_loop(
    node: &Node,
    area: &AgentAreaWriter<'_>,
    watch: &shm::RingWatch,
    stop: &Stop,
) -> Result<()> {
    let mut version = 0;
    loop {
        if let Err(e) = watch.check() {
            tracing::error!("{e}");
            return Err(e);
        }
        let mut status = node.status();
        if let Some(t) = &node.tracker {
            let stats = t.stats();
            status.events = stats.events;
            status.dropped = stats.dropped;
            status.opens = t
                .recent_opens()
                .into_iter()
                .map(|o| DeviceOpen {
                    tgid: o.tgid,
                    comm: o.comm,
                    device: o.device,
                    cgroup_id: o.cgroup_id,
                    cgroup_known: o.cgroup_path.is_some(),
                    pod_uid: o.pod.as_ref().map(|p| p.pod_uid.clone()),
                    container_id: o.pod.and_then(|p| p.container_id),
                    first_open_ns: o.first_open_unix_ns,
                    last_open_ns: o.last_open_unix_ns,
                    exited: o.exited,
                })
                .collect();
            node.set_status(status.clone());
        }
        version += 1;
        area.write(version, &status);
        node.stats.status.beat();
        if stop.wait_until(Instant::now() + STATUS_PERIOD) {
            return Ok(());
        }
    }
}
