//! `gpuscale-collector`: the cluster service. Flags are parsed here; the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// gpuscale collector: follows every agent and answers KEDA's external-scaler API.
#[derive(Parser)]
#[command(name = "gpuscale-collector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the agents and serve KEDA's external scaler (and the dump API) until SIGTERM.
    Serve(ServeArgs),
    /// Print a running collector's cluster view: nodes, GPUs, pods, freshness.
    Dump(DumpArgs),
    /// Ask a collector what KEDA would be told for one trigger, and what the HPA would do.
    Query(QueryArgs),
}

/// TLS to a collector that serves it (`serve --tls-cert`).
#[derive(clap::Args)]
struct CollectorTls {
    /// Talk TLS to the collector: its certificate must chain to this CA and name the host of
    /// --collector.
    #[arg(long = "ca", env = "GPUSCALE_COLLECTOR_CA")]
    ca: Option<PathBuf>,
    /// Mutual TLS: this client certificate (PEM; needs --ca), for a collector with
    /// --tls-client-ca.
    #[arg(long = "client-cert", env = "GPUSCALE_COLLECTOR_CLIENT_CERT", requires_all = ["ca", "client_key"])]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(
        long = "client-key",
        env = "GPUSCALE_COLLECTOR_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

impl CollectorTls {
    fn files(self) -> Option<gpuscale_health::tls::ClientFiles> {
        client_files(
            ("--ca", self.ca),
            ("--client-cert", self.client_cert),
            ("--client-key", self.client_key),
        )
    }
}

/// TLS client files from a CA flag and an optional certificate and key flag.
fn client_files(
    ca: (&'static str, Option<PathBuf>),
    cert: (&'static str, Option<PathBuf>),
    key: (&'static str, Option<PathBuf>),
) -> Option<gpuscale_health::tls::ClientFiles> {
    use gpuscale_health::tls::{ClientFiles, PemFile};
    Some(ClientFiles {
        ca: PemFile::new(ca.0, ca.1?),
        identity: cert
            .1
            .zip(key.1)
            .map(|(c, k)| (PemFile::new(cert.0, c), PemFile::new(key.0, k))),
    })
}

#[derive(clap::Args)]
struct QueryArgs {
    /// The collector's address (its --listen).
    #[arg(long, env = "GPUSCALE_COLLECTOR", default_value = "127.0.0.1:7700")]
    collector: String,
    #[command(flatten)]
    tls: CollectorTls,
    /// The ScaledObject's namespace (podSelector matches pods there).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The ScaledObject's name.
    #[arg(long, default_value = "query")]
    name: String,
    /// Trigger metadata, one key=value per flag (repeat it): --meta metric=sm_active
    /// --meta podSelector=app=vllm --meta targetValue=80
    #[arg(long = "meta", value_parser = collector::cli::query::parse_meta)]
    meta: Vec<(String, String)>,
    /// The trigger's metricType: AverageValue (KEDA's default) or Value.
    #[arg(long, default_value = "AverageValue", value_parser = collector::model::hpa::MetricType::parse)]
    metric_type: collector::model::hpa::MetricType,
    /// Replicas running now (used with metricType Value).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Print JSON instead of text (with --watch: one object per line).
    #[arg(long)]
    json: bool,
    /// Ask again every DUR (50ms, 1s) over one connection, printing each answer with the time
    /// it arrived (`ts_ns`), until stopped or --count answers.
    #[arg(long, value_parser = collector::cli::query::parse_every)]
    watch: Option<std::time::Duration>,
    /// With --watch: stop after this many answers.
    #[arg(long, requires = "watch")]
    count: Option<u64>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Agent addresses, comma separated (host:port of each agent's --listen).
    #[arg(long, env = "GPUSCALE_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// Or discover the agents from the EndpointSlices of their headless Service, NAMESPACE/NAME
    /// (needs --kube).
    #[arg(long, env = "GPUSCALE_AGENT_SERVICE", value_parser = collector::kube::agents::parse_service)]
    agent_service: Option<(String, String)>,
    /// Where KEDA (and dump) reach the collector.
    #[arg(long, env = "GPUSCALE_LISTEN", default_value = "0.0.0.0:7700")]
    listen: SocketAddr,
    /// Pod metadata: a PodList JSON (`kubectl get pods -A -o json`), reloaded when it changes.
    #[arg(
        long,
        env = "GPUSCALE_PODS_FILE",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pods_file: Option<PathBuf>,
    /// Pod metadata (and with --agent-service the agents) from the Kubernetes API: in-cluster
    /// config or the kubeconfig (KUBECONFIG, ~/.kube/config). Triggers may then leave out
    /// podSelector: the ScaledObject's target's selector is used.
    #[arg(long, env = "GPUSCALE_KUBE")]
    kube: bool,
    /// Serve /healthz, /readyz and Prometheus /metrics over HTTP on this address, e.g.
    /// 0.0.0.0:7703 (off by default).
    #[arg(long, env = "GPUSCALE_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Serve --listen and --http-listen over TLS with this certificate (PEM, leaf first). For
    /// KEDA (enableTLS) it must name the host of the trigger's scalerAddress. Re-read when the
    /// file changes.
    #[arg(long, env = "GPUSCALE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "GPUSCALE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS on --listen: only clients (KEDA with tlsClientCert/tlsClientKey, dump, query)
    /// with a certificate this CA signed may connect. Not applied to --http-listen.
    #[arg(long, env = "GPUSCALE_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Dial the agents over TLS: their certificates must chain to this CA and name the node
    /// they report (or --agent-tls-server-name).
    #[arg(long, env = "GPUSCALE_AGENT_CA")]
    agent_ca: Option<PathBuf>,
    /// The name every agent's certificate carries, when one certificate serves all agents (as
    /// `cargo xtask deploy` and deploy/overlays/cert-manager issue it); the node an agent may
    /// report then comes from its EndpointSlice (--agent-service). Without it each agent's
    /// certificate must name its node.
    #[arg(long, env = "GPUSCALE_AGENT_TLS_SERVER_NAME", requires = "agent_ca", value_parser = dns_name)]
    agent_tls_server_name: Option<String>,
    /// Mutual TLS to the agents: the collector's client certificate (PEM; needs --agent-ca).
    #[arg(long, env = "GPUSCALE_AGENT_CLIENT_CERT", requires_all = ["agent_ca", "agent_client_key"])]
    agent_client_cert: Option<PathBuf>,
    /// The private key of --agent-client-cert (PEM).
    #[arg(
        long,
        env = "GPUSCALE_AGENT_CLIENT_KEY",
        requires = "agent_client_cert"
    )]
    agent_client_key: Option<PathBuf>,
    /// What the agents send: `changes` (each tick only what changed, and a heartbeat; agents of
    /// API revision 2 send whole snapshots anyway) or `full` (every series of everything, every
    /// tick, as before revision 3: for comparison, or an agent suspected of a delta bug).
    #[arg(long, env = "GPUSCALE_AGENT_STREAM", default_value = "changes")]
    agent_stream: collector::sources::agents::StreamMode,
    /// How many (pod, GPU) pairs /metrics exports per-pod series for (ten each); past it the
    /// rest are left out, counted in gpuscale_collector_pod_gpu_omitted (each agent exports
    /// its own pods' values, labelled by pod UID). 0: none.
    #[arg(long, env = "GPUSCALE_METRICS_POD_GPUS", default_value_t = collector::api::metrics::DEFAULT_POD_GPUS)]
    metrics_pod_gpus: usize,
}

/// A DNS name a certificate can carry (`--agent-tls-server-name`).
fn dns_name(s: &str) -> Result<String, String> {
    rustls::pki_types::DnsName::try_from(s)
        .map(|_| s.to_owned())
        .map_err(|_| {
            format!("{s:?} is not a DNS name; write the name in the agents' certificate, such as gpuscale-agent.gpuscale-system.svc")
        })
}

#[derive(clap::Args)]
struct DumpArgs {
    /// The collector's address (its --listen).
    #[arg(long, env = "GPUSCALE_COLLECTOR", default_value = "127.0.0.1:7700")]
    collector: String,
    #[command(flatten)]
    tls: CollectorTls,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

async fn run(cli: Cli) -> collector::Result<()> {
    match cli.command {
        Command::Serve(a) => {
            let config = collector::serve::Config {
                agents: a
                    .agents
                    .into_iter()
                    .filter(|s| !s.trim().is_empty())
                    .collect(),
                agent_service: a.agent_service,
                listen: a.listen,
                pods: match a.pods_file {
                    Some(path) => collector::serve::PodsFrom::File(path),
                    None => collector::serve::PodsFrom::Kube,
                },
                http_listen: a.http_listen,
                tls: gpuscale_health::tls::ServerFiles::from_flags(
                    a.tls_cert,
                    a.tls_key,
                    a.tls_client_ca,
                )
                .map_err(|e| collector::Error::Config(e.to_string()))?,
                agent_tls: client_files(
                    ("--agent-ca", a.agent_ca),
                    ("--agent-client-cert", a.agent_client_cert),
                    ("--agent-client-key", a.agent_client_key),
                ),
                agent_tls_name: a.agent_tls_server_name,
                agent_stream: a.agent_stream,
                metrics_pod_gpus: a.metrics_pod_gpus,
            };
            collector::serve::run_until_signalled(config).await
        }
        Command::Query(a) => {
            let q = collector::cli::query::Query {
                collector: a.collector,
                tls: a.tls.files(),
                namespace: a.namespace,
                name: a.name,
                metadata: a.meta.into_iter().collect(),
                metric_type: a.metric_type,
                current_replicas: a.replicas,
            };
            let print = collector::cli::query::Print {
                json: a.json,
                watch: a.watch,
                count: a.count,
            };
            collector::cli::query::print(&q, print).await
        }
        Command::Dump(a) => {
            let tls = a.tls.files();
            collector::cli::dump::print(&a.collector, tls.as_ref(), a.json).await
        }
    }
}

fn main() {
    let cli = Cli::parse();
    gpuscale_health::ops::init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
