//! `gpuscale-agent`: the node daemon. Flags are parsed here; the work is in the library.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use agent::cli::{self, watch, DEFAULT_SHM};
use agent::daemon;
use agent::stop::Stop;

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
    Run(Box<RunArgs>),
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
    /// Serve both ports over TLS with this certificate (PEM, leaf first); it names this node
    /// (a DNS name equal to --node-name), or the name every agent's certificate shares (the
    /// collector's --agent-tls-server-name, as the install issues it). Re-read when the file
    /// changes.
    #[arg(long, env = "GPUSCALE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "GPUSCALE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS on --listen: only clients (the collector) with a certificate this CA signed
    /// may connect. Not applied to --http-listen (the kubelet's probes have no certificate).
    #[arg(long, env = "GPUSCALE_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
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

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = vocab::duration::parse(s)?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(10) {
        return Err(format!("{s} is outside the accepted range 10ms to 10s"));
    }
    Ok(d)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let stop = Stop::on_signals()?;
    let config = daemon::Config {
        nvml_lib: args.nvml_lib,
        shm: args.shm,
        interval: args.interval,
        node_name: args.node_name.unwrap_or_else(daemon::default_node_name),
        proc_root: args.proc_root,
        ebpf: agent::ebpf::EbpfConfig {
            mode: args.ebpf,
            device_prefix: args.device_prefix,
            cgroup_root: args.cgroup_root,
            open_hook: args.ebpf_hook,
        },
        listen: args.listen,
        http_listen: args.http_listen,
        tls: gpuscale_health::tls::ServerFiles::from_flags(
            args.tls_cert,
            args.tls_key,
            args.tls_client_ca,
        )?,
    };
    Ok(daemon::run(&config, &stop)?)
}

fn main() {
    let cli = Cli::parse();
    gpuscale_health::ops::init_tracing();
    let result = match cli.command {
        Command::Run(a) => run(*a),
        Command::Dump(a) => cli::dump::run(&a.shm, a.json).map_err(Into::into),
        Command::Watch(a) => watch::run(&a).map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
