//! The collector's health and readiness: `/healthz`, `/readyz` and `/metrics` on `--http-listen`
//! (served by the `gpuscale-health` crate) and `grpc.health.v1` on `--listen`.
//!
//! Owns [`Health`], the readiness state the rest of the collector reports into (the pod source
//! says when it has synced; `serve` says when it shuts down), and the heartbeat task whose
//! progress `/healthz` checks. It never does I/O of its own and answers from memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gpuscale_health::{Check, Endpoints, Heartbeat};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::api::metrics::{CollectorMetrics, KedaMetrics};
use crate::sources::pods::PodSource;
use crate::sources::view::Cluster;
use crate::{Error, Result};

/// How often the heartbeat task beats.
const BEAT_EVERY: Duration = Duration::from_secs(1);
/// `/healthz` fails when the heartbeat task has not run for this long: the runtime is stuck.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(5);
/// How often `grpc.health.v1` re-reads readiness.
const GRPC_HEALTH_EVERY: Duration = Duration::from_millis(250);

/// Whether the collector is alive and ready.
pub struct Health {
    cluster: Arc<Cluster>,
    pods: OnceLock<Arc<dyn PodSource>>,
    stopping: AtomicBool,
    heartbeat: Heartbeat,
}

impl Health {
    /// The health of a collector over `cluster`: not ready until the pod source syncs.
    pub fn new(cluster: Arc<Cluster>) -> Health {
        Health {
            cluster,
            pods: OnceLock::new(),
            stopping: AtomicBool::new(false),
            heartbeat: Heartbeat::new(),
        }
    }

    /// The pod source whose [`PodSource::health`] readiness asks (`--pods-file`: synced once
    /// loaded; `--kube`: once the first complete list arrived). Set once; later calls are
    /// ignored.
    pub fn set_pods(&self, pods: Arc<dyn PodSource>) {
        let _ = self.pods.set(pods);
    }

    /// Marks the collector as shutting down: not ready from now on.
    pub fn set_stopping(&self) {
        // Relaxed: a lone flag; readers need no other memory published with it.
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// `/healthz`: the heartbeat task ran within [`LIVENESS_LIMIT`] before `now`.
    pub fn liveness(&self, now: Instant) -> Check {
        let age = self.heartbeat.age_at(now);
        if age > LIVENESS_LIMIT {
            return Err(format!(
                "the collector's runtime has not run its heartbeat for {:.1}s (limit {:.0}s)",
                age.as_secs_f64(),
                LIVENESS_LIMIT.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// `/readyz` and `grpc.health.v1`: not shutting down, the pod source synced, and at least
    /// one agent connected with a snapshot.
    pub fn readiness(&self) -> Check {
        // Relaxed: see `set_stopping`.
        if self.stopping.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        match self.pods.get().map(|p| p.health()) {
            None => return Err("the pod source has not started yet".into()),
            Some(h) => {
                if let Some(why) = h.unsynced.or(h.refused) {
                    return Err(why);
                }
            }
        }
        self.cluster.read(|v| {
            let agents = || v.nodes.iter().filter(|n| !n.retired);
            if agents().any(|n| n.connected && n.snapshot.is_some()) {
                return Ok(());
            }
            if agents().next().is_none() {
                return Err("no agent connected yet: no agents known".into());
            }
            let shown: Vec<String> = agents()
                .take(3)
                .map(|n| match n.last_error.as_str() {
                    "" => n.address.clone(),
                    e => format!("{} ({e})", n.address),
                })
                .collect();
            let more = match agents().count().saturating_sub(shown.len()) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            Err(format!(
                "no agent connected yet: {}{more}",
                shown.join(", ")
            ))
        })
    }

    /// Beats every second until the task is dropped; `/healthz` fails when it stops.
    pub async fn heartbeat(self: Arc<Self>) {
        loop {
            self.heartbeat.beat();
            tokio::time::sleep(BEAT_EVERY).await;
        }
    }

    /// Keeps `grpc.health.v1` (the whole server `""` and each of `services`) in step with
    /// [`Health::readiness`]: SERVING while ready, NOT_SERVING otherwise and once shutting down.
    /// Runs until the task is dropped.
    pub async fn report_grpc(
        self: Arc<Self>,
        reporter: HealthReporter,
        services: Vec<&'static str>,
    ) {
        let mut last = None;
        loop {
            let status = match self.readiness() {
                Ok(()) => ServingStatus::Serving,
                Err(_) => ServingStatus::NotServing,
            };
            if last != Some(status) {
                for s in std::iter::once("").chain(services.iter().copied()) {
                    reporter.set_service_status(s, status).await;
                }
                last = Some(status);
            }
            tokio::time::sleep(GRPC_HEALTH_EVERY).await;
        }
    }
}

/// What `--http-listen` serves: [`Health::liveness`], [`Health::readiness`] and the metrics of
/// `metrics` with the cluster view and `pods` read at scrape time.
pub fn endpoints(
    health: Arc<Health>,
    metrics: Arc<CollectorMetrics>,
    pods: Arc<dyn PodSource>,
) -> Endpoints {
    let live = health.clone();
    let registry = metrics.registry(health.cluster.clone(), pods);
    Endpoints::new(
        move || live.liveness(Instant::now()),
        move || health.readiness(),
        registry,
    )
}

/// Everything `serve` needs for health, readiness and metrics, in one place: the state the
/// rest of the collector reports into, the `--http-listen` server and `grpc.health.v1`.
pub struct Observability {
    /// Readiness and liveness; it reads the pod source's health ([`Health::set_pods`]).
    pub health: Arc<Health>,
    /// Recorded series; the scaler reports into it
    /// ([`CollectorMetrics::observe_scaled_object`]).
    pub metrics: Arc<CollectorMetrics>,
    reporter: HealthReporter,
    /// `grpc.health.v1` service names besides the whole server's `""`.
    grpc_services: Vec<&'static str>,
    http: Option<std::net::TcpListener>,
    http_tls: Option<Arc<gpuscale_health::tls::ServerTls>>,
}

impl Observability {
    /// State for a collector over `cluster`; binds `--http-listen` now when given (serving it
    /// over `http_tls` if given), so a bad address or a taken port fails the collector at start.
    pub fn new(
        cluster: Arc<Cluster>,
        http_listen: Option<&str>,
        http_tls: Option<Arc<gpuscale_health::tls::ServerTls>>,
    ) -> Result<Observability> {
        let http = http_listen
            .map(gpuscale_health::listen)
            .transpose()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Observability {
            health: Arc::new(Health::new(cluster)),
            metrics: Arc::new(CollectorMetrics::default()),
            reporter: HealthReporter::new(),
            grpc_services: Vec::new(),
            http,
            http_tls,
        })
    }

    /// The `grpc.health.v1` service to add to the gRPC server (NOT_SERVING until ready).
    pub fn grpc_health(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// `service` (the ExternalScaler), counted and timed in [`Observability::metrics`].
    pub fn keda<S>(&self, service: S) -> KedaMetrics<S> {
        KedaMetrics::new(service, self.metrics.clone())
    }

    /// Starts the heartbeat, `grpc.health.v1` reporting for `grpc_services` (plus the whole
    /// server), and the `--http-listen` server with `pods` read at scrape time, on `tasks`.
    pub async fn start(
        &mut self,
        tasks: &mut tokio::task::JoinSet<()>,
        pods: Arc<dyn PodSource>,
        grpc_services: Vec<&'static str>,
    ) {
        self.grpc_services = grpc_services.clone();
        self.health.set_pods(pods.clone());
        self.set_grpc(ServingStatus::NotServing).await;
        tasks.spawn(self.health.clone().heartbeat());
        tasks.spawn(
            self.health
                .clone()
                .report_grpc(self.reporter.clone(), grpc_services),
        );
        if let Some(listener) = self.http.take() {
            let endpoints = endpoints(self.health.clone(), self.metrics.clone(), pods);
            let tls = self.http_tls.clone();
            // Runs until the task set is aborted at exit, so /readyz says "shutting down" during
            // the grace period.
            tasks.spawn(async move {
                let forever = std::future::pending::<()>();
                if let Err(e) = gpuscale_health::serve(listener, tls, endpoints, forever).await {
                    tracing::error!("{e}");
                }
            });
        }
    }

    /// The collector is shutting down: not ready, and NOT_SERVING on `grpc.health.v1` at once.
    pub async fn shutting_down(&self) {
        self.health.set_stopping();
        self.set_grpc(ServingStatus::NotServing).await;
    }

    async fn set_grpc(&self, status: ServingStatus) {
        for s in std::iter::once("").chain(self.grpc_services.iter().copied()) {
            self.reporter.set_service_status(s, status).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::NodeSnapshot;

    /// A pod source whose health the test sets.
    #[derive(Default)]
    struct Pods(std::sync::Mutex<crate::sources::pods::SourceHealth>);

    impl PodSource for Pods {
        fn index(&self) -> Arc<crate::sources::pods::PodIndex> {
            Arc::default()
        }
        fn describe(&self) -> String {
            "test".into()
        }
        fn health(&self) -> crate::sources::pods::SourceHealth {
            self.0.lock().unwrap().clone()
        }
    }

    #[test]
    fn ready_once_pods_synced_and_an_agent_sent_a_snapshot_until_shutdown() {
        let cluster = Arc::new(Cluster::new(&["a:1".into(), "b:1".into()]));
        let h = Health::new(cluster.clone());
        assert_eq!(
            h.readiness().unwrap_err(),
            "the pod source has not started yet"
        );
        let pods = Arc::new(Pods::default());
        pods.0.lock().unwrap().unsynced =
            Some("pods not listed from the Kubernetes API yet".into());
        h.set_pods(pods.clone());
        assert_eq!(
            h.readiness().unwrap_err(),
            "pods not listed from the Kubernetes API yet"
        );
        pods.0.lock().unwrap().unsynced = None;
        cluster.write(|v| v.nodes[1].last_error = "connect: refused".into());
        assert_eq!(
            h.readiness().unwrap_err(),
            "no agent connected yet: a:1, b:1 (connect: refused)"
        );
        // Connected, but no snapshot yet: still nothing to answer from.
        cluster.write(|v| v.nodes[0].connected = true);
        assert!(h.readiness().is_err());
        cluster.write(|v| v.update(0, NodeSnapshot::default(), Instant::now()));
        assert_eq!(h.readiness(), Ok(()));
        // A pods file whose newest version was refused: not ready until it is fixed.
        pods.0.lock().unwrap().refused = Some("pods file \"p.json\": invalid JSON".into());
        assert_eq!(
            h.readiness().unwrap_err(),
            "pods file \"p.json\": invalid JSON"
        );
        pods.0.lock().unwrap().refused = None;
        assert_eq!(h.readiness(), Ok(()));
        h.set_stopping();
        assert_eq!(h.readiness().unwrap_err(), "shutting down");
    }

    #[test]
    fn unhealthy_when_the_heartbeat_stops() {
        let h = Health::new(Arc::new(Cluster::new(&["a:1".into()])));
        let now = Instant::now();
        assert_eq!(h.liveness(now), Ok(()));
        let e = h.liveness(now + Duration::from_secs(6)).unwrap_err();
        assert!(e.contains("has not run its heartbeat"), "{e}");
    }
}
