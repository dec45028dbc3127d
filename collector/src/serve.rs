//! `gpuscale-collector serve`: starts the agent streams, the pod source, and the gRPC server
//! (KEDA's external scaler plus the debug API) on one address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpuscale_health::ops::{serve_until_stopped, MAX_REQUEST_BYTES};
use gpuscale_health::tls::{self, ClientFiles, ServerFiles, ServerNames, ServerTls};
use proto::collector::collector_server::CollectorServer;
use proto::externalscaler::external_scaler_server::ExternalScalerServer;

use crate::api::debug::Debug;
use crate::api::http::Observability;
use crate::api::scaler::{Scaler, ScalerService, Targets};
use crate::kube::agents::AgentDiscovery;
use crate::kube::pods::KubePods;
use crate::kube::targets::KubeTargets;
use crate::sources::agents;
use crate::sources::demand::Demand;
use crate::sources::pods::{PodSource, PodsFile};
use crate::sources::view::Cluster;
use crate::{Error, Result};

/// Concurrent streams one connection may hold open on the collector's gRPC port. KEDA shares one
/// connection per scaler address among all its ScaledObjects, and holds one `StreamIsActive`
/// stream open for each that uses `external-push`: past this many such ScaledObjects on one
/// collector, the next one's stream waits for a free slot (use `external` for the rest, or a
/// second collector). With [`MAX_REQUEST_BYTES`] per request, one connection can make the
/// collector buffer at most 128 MiB of requests.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 2048;

/// What `serve` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Agent addresses (`host:port`), fixed.
    pub agents: Vec<String>,
    /// Or: discover agents from the EndpointSlices of this Service (`namespace`, `name`).
    pub agent_service: Option<(String, String)>,
    /// Where to serve gRPC.
    pub listen: SocketAddr,
    /// Where pod metadata comes from.
    pub pods: PodsFrom,
    /// Where to serve /healthz, /readyz and /metrics over HTTP (`--http-listen`), if anywhere.
    pub http_listen: Option<String>,
    /// TLS for both ports (`--tls-cert`, `--tls-key`; `--tls-client-ca` for the gRPC port only:
    /// the kubelet's probes cannot present a client certificate).
    pub tls: Option<ServerFiles>,
    /// TLS to the agents (`--agent-ca`, `--agent-client-cert`, `--agent-client-key`).
    pub agent_tls: Option<ClientFiles>,
    /// The name every agent's certificate carries (`--agent-tls-server-name`), when one
    /// certificate serves all agents; `None`: each agent's certificate names its node.
    pub agent_tls_name: Option<String>,
    /// What the agents send (`--agent-stream`).
    pub agent_stream: agents::StreamMode,
    /// How many (pod, GPU) pairs `/metrics` exports per-pod series for
    /// (`--metrics-pod-gpus`, [`crate::api::metrics::DEFAULT_POD_GPUS`]).
    pub metrics_pod_gpus: usize,
}

/// Where pod metadata comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum PodsFrom {
    /// A PodList file (`--pods-file`).
    File(PathBuf),
    /// The Kubernetes API (`--kube`).
    Kube,
}

/// A runtime started from async code: dropped without waiting for its tasks (dropping a
/// runtime the usual way blocks, which async code must not).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("set until dropped").handle().clone()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs the collector until SIGTERM or SIGINT (`gpuscale-collector serve`).
pub async fn run_until_signalled(config: Config) -> Result<()> {
    run(config, shutdown_signal()).await
}

/// Resolves on SIGTERM or SIGINT; never, when the handlers cannot be installed.
async fn shutdown_signal() {
    match gpuscale_health::ops::ShutdownSignals::install() {
        Ok(signals) => signals.wait().await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot catch SIGTERM/SIGINT; stop the collector with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the collector until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    match (
        &config.agent_service,
        config.agents.is_empty(),
        &config.pods,
    ) {
        (Some(_), false, _) => {
            return Err(Error::Config(
                "pass either --agents or --agent-service, not both".into(),
            ))
        }
        (Some(_), true, PodsFrom::File(_)) => {
            return Err(Error::Config(
                "--agent-service reads EndpointSlices from the Kubernetes API: add --kube".into(),
            ))
        }
        (None, true, _) => {
            return Err(Error::Config(
                "no agents: pass --agents host:port[,host:port…] (GPUSCALE_AGENTS), or with \
                 --kube --agent-service NAMESPACE/NAME to discover them"
                    .into(),
            ))
        }
        _ => {}
    }
    agents::validate(&config.agents).map_err(Error::Config)?;
    let client = match config.pods {
        PodsFrom::Kube => Some(crate::kube::client().await?),
        PodsFrom::File(_) => None,
    };
    let pods_file = match &config.pods {
        PodsFrom::File(path) => Some(Arc::new(PodsFile::load(path)?)),
        PodsFrom::Kube => None,
    };
    // Certificates are read at start: a wrong path or a key that is not the certificate's fails
    // here, naming the flag and the file.
    let tls_err = |e: tls::TlsError| Error::Config(e.to_string());
    let grpc_tls = config
        .tls
        .as_ref()
        .map(|f| ServerTls::load(f, tls::ALPN_GRPC))
        .transpose()
        .map_err(tls_err)?;
    let http_tls = match (&config.tls, &config.http_listen) {
        (Some(f), Some(_)) => Some(ServerTls::load(&f.without_client_ca(), tls::ALPN_HTTP)),
        _ => None,
    }
    .transpose()
    .map_err(tls_err)?;
    let agent_tls = config
        .agent_tls
        .as_ref()
        .map(|f| f.load(ServerNames::CheckedByCaller))
        .transpose()
        .map_err(tls_err)?
        .map(|tls| agents::AgentTls {
            tls,
            shared_name: config.agent_tls_name.clone(),
        });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| Error::Listen {
            addr: config.listen,
            error,
        })?;
    let incoming =
        tls::incoming(listener, grpc_tls.clone(), "--listen").map_err(|error| Error::Listen {
            addr: config.listen,
            error,
        })?;
    let cluster = Arc::new(Cluster::new(&[]));
    let mut obs = Observability::new(cluster.clone(), config.http_listen.as_deref(), http_tls)?;
    obs.metrics.limit_pod_gpus(config.metrics_pod_gpus);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The series the triggers in use read: KEDA's calls and (in-cluster) the ScaledObjects name
    // them; the agent streams ask for them.
    let demand = Arc::new(Demand::default());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(demand.clone().run_expiry());
    let (pods, targets): (Arc<dyn PodSource>, Option<Arc<dyn Targets>>) =
        match (pods_file, client.clone()) {
            (Some(file), _) => {
                let pods_stop = {
                    let mut rx = stop_rx.clone();
                    async move {
                        let _ = rx.wait_for(|s| *s).await;
                    }
                };
                tasks.spawn(file.clone().watch(Duration::from_secs(1), pods_stop));
                (file, None)
            }
            (None, Some(client)) => {
                let pods = KubePods::new();
                tasks.spawn(pods.clone().run(client.clone()));
                let targets = KubeTargets::new(client, demand.clone());
                tasks.spawn(targets.clone().run());
                (pods, Some(targets))
            }
            (None, None) => unreachable!("a file or a client was made above"),
        };
    let scaler = Arc::new(Scaler::new(
        cluster.clone(),
        pods.clone(),
        targets,
        demand.clone(),
        stop_rx.clone(),
    ));
    scaler.observe_with(obs.metrics.clone());
    // The agent streams run on threads of their own: at thousands of agents they handle tens
    // of thousands of messages a second, and a KEDA call must not wait behind them.
    let ingest = OwnRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(
                std::thread::available_parallelism()
                    .map(usize::from)
                    .unwrap_or(1),
            )
            .thread_name("agent-streams")
            .enable_all()
            .build()
            .map_err(|e| Error::Serve(format!("cannot start the agent streams' runtime: {e}")))?,
    ));
    let fleet = Arc::new(
        agents::Fleet::new(
            cluster.clone(),
            agent_tls.clone(),
            config.agent_stream,
            demand,
        )
        .run_on(ingest.handle()),
    );
    fleet.set(
        &config
            .agents
            .iter()
            .map(agents::Agent::at)
            .collect::<Vec<_>>(),
    );
    let discovery = Arc::new(AgentDiscovery::default());
    if let (Some((namespace, service)), Some(client)) = (&config.agent_service, client) {
        tasks.spawn(crate::kube::agents::discover_agents(
            client,
            namespace.clone(),
            service.clone(),
            fleet.clone(),
            discovery.clone(),
        ));
    }
    tracing::info!(
        listen = %config.listen,
        agents = %match &config.agent_service {
            Some((ns, name)) => format!("discovered from Service {ns}/{name}"),
            None => config.agents.len().to_string(),
        },
        pods = %pods.describe(),
        tls = match (&config.tls, &config.tls.as_ref().and_then(|t| t.client_ca.as_ref())) {
            (None, _) => "off",
            (Some(_), None) => "on",
            (Some(_), Some(_)) => "mutual",
        },
        agent_tls = match &config.agent_tls {
            None => "off",
            Some(ClientFiles { identity: None, .. }) => "on",
            Some(_) => "mutual",
        },
        "serving KEDA's external scaler and the collector API"
    );
    start_observability(&mut obs, &mut tasks, pods.clone()).await;
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = gpuscale_health::ops::grpc_server(MAX_STREAMS_PER_CONNECTION)
        .add_service(
            obs.keda(
                ExternalScalerServer::new(ScalerService(scaler.clone()))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            ),
        )
        .add_service(
            CollectorServer::new(Debug {
                cluster,
                pods,
                scaler,
                agent_stream: config.agent_stream,
            })
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(obs.grpc_health())
        .serve_with_incoming_shutdown(incoming, async {
            let _ = drain_rx.await;
        });
    // On the signal: end the long-lived streams and stop accepting, then give in-flight
    // requests the grace period; a client that never hangs up does not keep the collector alive.
    let on_stop = async {
        obs.shutting_down().await;
        let _ = stop_tx.send(true);
        let _ = drain_tx.send(());
    };
    let result = serve_until_stopped("the collector's gRPC server", server, shutdown, on_stop)
        .await
        .unwrap_or(Ok(()));
    tasks.abort_all();
    fleet.stop();
    drop(ingest);
    result.map_err(|e| Error::Serve(e.to_string()))
}

/// Starts the heartbeat, `--http-listen` (health, readiness, metrics with `pods` read at scrape
/// time) and `grpc.health.v1` for the services of the gRPC port.
async fn start_observability(
    obs: &mut Observability,
    tasks: &mut tokio::task::JoinSet<()>,
    pods: Arc<dyn PodSource>,
) {
    use tonic::server::NamedService;
    let services = vec![
        <ExternalScalerServer<ScalerService> as NamedService>::NAME,
        <CollectorServer<Debug> as NamedService>::NAME,
    ];
    obs.start(tasks, pods, services).await;
}
