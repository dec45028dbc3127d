//! `gpuscale-agent`: the node daemon. Flags are parsed here; the work is in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use agent::sampler::{self, Stop};
use agent::shm::ShmReader;
use gpuscale_health::ops::ShutdownSignals;

mod watch;

/// gpuscale node agent: samples NVML into a shared-memory ring and keeps rolling windows.
#[derive(Parser)]
#[command(name = "gpuscale-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample every GPU on this node until SIGTERM or Ctrl-C.
    Run(RunArgs),
    /// Print what a running agent's ring holds (no network needed).
    Dump(DumpArgs),
    /// Print every new sample of a running agent's ring as it is written, one line each.
    Watch(watch::Args),
}

#[derive(clap::Args)]
struct RunArgs {
    /// NVML library to load (the fake one in tests).
    #[arg(long, env = "GPUSCALE_NVML_LIB", default_value = "libnvidia-ml.so.1")]
    nvml_lib: PathBuf,
    /// Ring file in shared memory.
    #[arg(long, env = "GPUSCALE_SHM", default_value = DEFAULT_SHM)]
    shm: PathBuf,
    /// Sampling interval per GPU, 10ms to 10s.
    #[arg(long, env = "GPUSCALE_INTERVAL", default_value = "100ms", value_parser = parse_interval)]
    interval: Duration,
    /// Node name reported with the data (default: the host name).
    #[arg(long, env = "GPUSCALE_NODE_NAME")]
    node_name: Option<String>,
    /// Serve the agent gRPC API (for the collector) on this address, e.g. 0.0.0.0:7701.
    #[arg(long, env = "GPUSCALE_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// The host's procfs (NVML reports host PIDs; run with hostPID or mount the host's /proc).
    #[arg(long, env = "GPUSCALE_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// Track GPU device opens with eBPF: auto (use it when it loads, else procfs), on (fail
    /// without it), off.
    #[arg(long, env = "GPUSCALE_EBPF", value_enum, default_value = "auto")]
    ebpf: agent::ebpf::EbpfMode,
    /// Opens of paths starting with this count as GPU device opens.
    #[arg(long, env = "GPUSCALE_DEVICE_PREFIX", default_value = "/dev/nvidia")]
    device_prefix: String,
    /// Where the cgroup v2 tree is mounted (default: found in /proc/self/mounts).
    #[arg(long, env = "GPUSCALE_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// How eBPF catches device opens: auto (fentry on do_sys_openat2 where the kernel allows
    /// it, else the syscall tracepoints), fentry, tracepoint.
    #[arg(long, env = "GPUSCALE_EBPF_HOOK", value_enum, default_value = "auto")]
    ebpf_hook: agent::ebpf::OpenHook,
    /// Serve /healthz, /readyz and Prometheus /metrics over HTTP on this address, e.g.
    /// 0.0.0.0:7702 (off by default).
    #[arg(long, env = "GPUSCALE_HTTP_LISTEN")]
    http_listen: Option<String>,
}

#[derive(clap::Args)]
struct DumpArgs {
    /// Ring file of the agent to read.
    #[arg(long, env = "GPUSCALE_SHM", default_value = DEFAULT_SHM)]
    shm: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

const DEFAULT_SHM: &str = "/dev/shm/gpuscale/agent.ring";

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = vocab::duration::parse(s)?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(10) {
        return Err(format!("{s} is outside the accepted range 10ms to 10s"));
    }
    Ok(d)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-node".into())
}

/// Triggers `stop` on SIGTERM or SIGINT (caught from now on).
fn watch_signals(stop: std::sync::Arc<Stop>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let signals = rt
        .block_on(async { ShutdownSignals::install() })
        .context("installing the SIGTERM and SIGINT handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(signals.wait());
            stop.trigger();
        })?;
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let stop = std::sync::Arc::new(Stop::default());
    watch_signals(stop.clone())?;
    let listener = args.listen.map(agent::server::bind).transpose()?;
    // Bound now, so a taken port fails the agent before NVML is touched.
    let http_listener = args
        .http_listen
        .as_deref()
        .map(gpuscale_health::listen)
        .transpose()?;
    let config = sampler::Config {
        nvml_lib: args.nvml_lib,
        shm: args.shm,
        interval: args.interval,
        node_name: args.node_name.unwrap_or_else(hostname),
        proc_root: args.proc_root,
        ebpf: agent::ebpf::EbpfConfig {
            mode: args.ebpf,
            device_prefix: args.device_prefix,
            cgroup_root: args.cgroup_root,
            open_hook: args.ebpf_hook,
        },
    };
    let mut server = None;
    let mut http = None;
    sampler::run(&config, &stop, |agent| {
        if let Some(listener) = http_listener {
            let started = start_http(listener, agent.clone(), stop.clone());
            if started.is_err() {
                stop.trigger();
            }
            http = Some(started);
        }
        if let Some(listener) = listener {
            let stop2 = stop.clone();
            server = Some(std::thread::spawn(move || {
                let result = agent::server::serve(listener, agent, stop2.clone());
                // Without its API the agent is useless to the collector: stop the samplers too.
                stop2.trigger();
                result
            }));
        }
    })?;
    if let Some(server) = server {
        server
            .join()
            .map_err(|_| anyhow::anyhow!("the gRPC server thread panicked"))??;
    }
    if let Some(http) = http {
        http?
            .join()
            .map_err(|_| anyhow::anyhow!("the HTTP server thread panicked"))??;
    }
    Ok(())
}

/// Serves `--http-listen` (/healthz, /readyz, /metrics) on a thread of its own until `stop`.
/// If the server fails, the agent stops with its error: its probes would fail anyway.
fn start_http(
    listener: std::net::TcpListener,
    agent: std::sync::Arc<agent::sampler::Agent>,
    stop: std::sync::Arc<Stop>,
) -> anyhow::Result<std::thread::JoinHandle<Result<(), gpuscale_health::Error>>> {
    let endpoints = agent::metrics::endpoints(agent, stop.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let thread = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let result = rt.block_on(gpuscale_health::serve(listener, endpoints, stop.stopped()));
            if result.is_err() {
                stop.trigger();
            }
            result
        })
        .context("starting the HTTP thread")?;
    Ok(thread)
}

fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let reader = ShmReader::open(&args.shm)?;
    let report = agent::dump::collect(&reader, agent::unix_now_ns());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", agent::dump::render_table(&report));
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    gpuscale_health::ops::init_tracing();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Dump(a) => dump(a),
        Command::Watch(a) => watch::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
