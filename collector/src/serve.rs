//! `gpuscale-collector serve`: starts the agent streams, the pod source, and the gRPC server
//! (KEDA's external scaler plus the debug API) on one address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::collector::collector_server::CollectorServer;
use proto::externalscaler::external_scaler_server::ExternalScalerServer;

use crate::debug::Debug;
use crate::pods::{PodSource, PodsFile};
use crate::scaler::{Scaler, ScalerService};
use crate::view::Cluster;
use crate::{agents, Error, Result};

/// How long a shutdown waits for in-flight requests.
const GRACE: Duration = Duration::from_secs(3);

/// What `serve` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Agent addresses (`host:port`).
    pub agents: Vec<String>,
    /// Where to serve gRPC.
    pub listen: SocketAddr,
    /// The PodList file.
    pub pods_file: PathBuf,
}

/// Runs the collector until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    if config.agents.is_empty() {
        return Err(Error::Config(
            "no agents: pass --agents host:port[,host:port…] (GPUSCALE_AGENTS)".into(),
        ));
    }
    agents::validate(&config.agents).map_err(Error::Config)?;
    let pods_file = Arc::new(PodsFile::load(&config.pods_file)?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| Error::Listen {
            addr: config.listen,
            error,
        })?;
    let cluster = Arc::new(Cluster::new(&config.agents));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pods_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, a) in config.agents.iter().enumerate() {
        tasks.spawn(agents::follow(cluster.clone(), i, a.clone()));
    }
    tasks.spawn(pods_file.clone().watch(Duration::from_secs(1), pods_stop));
    let pods: Arc<dyn PodSource> = pods_file;
    let scaler = Arc::new(Scaler::new(cluster.clone(), pods.clone(), stop_rx.clone()));
    tracing::info!(
        listen = %config.listen,
        agents = config.agents.len(),
        pods = %pods.describe(),
        "serving KEDA's external scaler and the collector API"
    );
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ExternalScalerServer::new(ScalerService(scaler)))
            .add_service(CollectorServer::new(Debug { cluster, pods }))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = drain_rx.await;
                },
            ),
    );
    let result = tokio::select! {
        r = &mut server => r,
        _ = shutdown => {
            // End the long-lived streams, then give in-flight requests a grace period; a
            // client that never hangs up does not keep the collector alive.
            let _ = stop_tx.send(true);
            let _ = drain_tx.send(());
            match tokio::time::timeout(GRACE, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("connections still open {GRACE:?} after the shutdown signal; exiting anyway");
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    tasks.abort_all();
    result
        .map_err(|e| Error::Serve(e.to_string()))?
        .map_err(|e| Error::Serve(e.to_string()))
}
