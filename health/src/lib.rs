//! The HTTP side of gpuscale's operability, shared by `gpuscale-agent run` and
//! `gpuscale-collector serve` (`--http-listen ADDR`, env `GPUSCALE_HTTP_LISTEN`):
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | `200 ok` while the process's loops make progress, else `503` and one line saying which loop stalled |
//! | `/readyz` | `200 ok` once the process can answer with real data, else `503` and one line saying what it waits for |
//! | `/metrics` | the registry in the Prometheus text format (0.0.4), encoded by `prometheus-client` |
//!
//! This crate owns the router, binding (errors name `--http-listen` and the address), graceful
//! shutdown and [`Heartbeat`], the progress marker loops update. What "healthy" and "ready" mean,
//! and which series exist, is decided by each binary: it hands in two check functions and a
//! registry. It must never compute a metric itself, nor block a request on anything but those
//! callbacks (which must answer from memory).
//!
//! [`ops`] holds the rest of the operations code both binaries share (logging set-up, shutdown
//! signals, the wall clock in ns, poison-tolerant locks); [`tls`] the TLS of every port and of
//! the collector's connections; `pki` (feature `pki`) the certificate generator.
#![deny(missing_docs)]

pub mod ops;
#[cfg(any(test, feature = "pki"))]
pub mod pki;
pub mod tls;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// Errors of the HTTP endpoints. Each names the flag and the address.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--http-listen` is not an `IP:PORT`.
    #[error(
        "--http-listen / GPUSCALE_HTTP_LISTEN {given:?} is not an address ({why}); write IP:PORT, \
         e.g. 0.0.0.0:7702"
    )]
    BadAddress {
        /// What was given.
        given: String,
        /// What the parser said.
        why: String,
    },
    /// The address could not be bound (port in use, address not on this host, no permission).
    #[error(
        "cannot listen on {addr} (--http-listen / GPUSCALE_HTTP_LISTEN): {error}; pick a free \
         address or leave --http-listen out"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// The HTTP server failed while running, or its runtime could not start.
    #[error("the health and metrics server on {addr} (--http-listen) failed: {error}")]
    Serve {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The answer of a health or readiness check: `Err` carries the one-line reason a `503` shows.
pub type Check = std::result::Result<(), String>;

/// A check the endpoints call on every request. It must answer from memory, quickly.
pub type CheckFn = Arc<dyn Fn() -> Check + Send + Sync>;

/// What the three paths serve.
#[derive(Clone)]
pub struct Endpoints {
    /// `/healthz`: is the process making progress?
    pub healthz: CheckFn,
    /// `/readyz`: can it answer with real data?
    pub readyz: CheckFn,
    /// `/metrics`: the registry encoded on each scrape (custom collectors run then).
    pub registry: Arc<Registry>,
}

impl Endpoints {
    /// Endpoints from two checks and a registry.
    pub fn new(
        healthz: impl Fn() -> Check + Send + Sync + 'static,
        readyz: impl Fn() -> Check + Send + Sync + 'static,
        registry: Registry,
    ) -> Endpoints {
        Endpoints {
            healthz: Arc::new(healthz),
            readyz: Arc::new(readyz),
            registry: Arc::new(registry),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn check_response(check: Check) -> Response {
    match check {
        Ok(()) => text(StatusCode::OK, "ok\n".into()),
        // One line, whatever the reason text holds.
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", why.replace('\n', " ")),
        ),
    }
}

/// Labels of one series computed at scrape time.
pub type Labels = Vec<(&'static str, String)>;

/// Encodes gauge family `name` with one series per `(labels, value)`, for collectors that read
/// their values at scrape time.
pub fn gauge_family<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, V)>,
) -> std::result::Result<(), std::fmt::Error> {
    use prometheus_client::encoding::EncodeMetric;
    let mut e = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in series {
        prometheus_client::metrics::gauge::ConstGauge::new(v).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes counter family `name` with one series per `(labels, total)`, for collectors that
/// read their totals at scrape time.
pub fn counter_family(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> std::result::Result<(), std::fmt::Error> {
    use prometheus_client::encoding::EncodeMetric;
    let mut e = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, v) in series {
        prometheus_client::metrics::counter::ConstCounter::new(v)
            .encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> std::result::Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

fn metrics_response(registry: &Registry) -> Response {
    match encode(registry) {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n".into(),
        ),
    }
}

/// The router for `/healthz`, `/readyz` and `/metrics`.
pub fn router(endpoints: Endpoints) -> Router {
    let Endpoints {
        healthz,
        readyz,
        registry,
    } = endpoints;
    Router::new()
        .route(
            "/healthz",
            get(move || async move { check_response(healthz()) }),
        )
        .route(
            "/readyz",
            get(move || async move { check_response(readyz()) }),
        )
        .route(
            "/metrics",
            get(move || async move { metrics_response(&registry) }),
        )
}

/// Parses the `--http-listen` value (`IP:PORT`).
pub fn parse_listen(given: &str) -> Result<SocketAddr> {
    given
        .trim()
        .parse()
        .map_err(|e: std::net::AddrParseError| Error::BadAddress {
            given: given.to_owned(),
            why: e.to_string(),
        })
}

/// Binds `addr` now, so a taken port fails the process at start, before anything else runs.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    ops::bind(addr).map_err(|error| Error::Bind { addr, error })
}

/// Parses and binds a `--http-listen` value in one step.
pub fn listen(given: &str) -> Result<std::net::TcpListener> {
    bind(parse_listen(given)?)
}

/// Serves `endpoints` on `listener` (over TLS when `tls` is given) until `shutdown` resolves;
/// open requests then get [`ops::GRACE`] to finish. Call it on a tokio runtime.
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Option<Arc<tls::ServerTls>>,
    endpoints: Endpoints,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let fail = |error| Error::Serve { addr, error };
    let listener = tokio::net::TcpListener::from_std(listener).map_err(fail)?;
    tracing::info!(%addr, tls = tls.is_some(), "serving /healthz, /readyz and /metrics");
    let listener = tls::incoming(listener, tls, "--http-listen").map_err(fail)?;
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(endpoints)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopped_tx.send(());
    });
    let stopped = async {
        let _ = stopped_rx.await;
    };
    ops::serve_until_stopped("the HTTP server", server.into_future(), stopped, async {})
        .await
        .unwrap_or(Ok(()))
        .map_err(fail)
}

/// A loop's progress marker: the loop calls [`Heartbeat::beat`] every round; the health check
/// asks [`Heartbeat::age`]. Lock-free, so a sampler can beat on every tick.
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds after `origin` of the newest beat.
    last_ms: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that beat just now (a loop that has not run yet is as old as its creation).
    pub fn new() -> Heartbeat {
        Heartbeat {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records progress now.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        // Relaxed: the timestamp is the only data; nothing else is published with it.
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Time since the newest beat, as seen at `now`.
    pub fn age_at(&self, now: Instant) -> Duration {
        // Relaxed: see `beat`.
        let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Time since the newest beat.
    pub fn age(&self) -> Duration {
        self.age_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicBool;

    /// A minimal HTTP/1.1 GET: (status, content type, body).
    fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let ctype = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned();
        (status, ctype, body.to_owned())
    }

    #[test]
    fn endpoints_answer_200_or_503_with_the_reason_and_metrics_in_prometheus_text() {
        let ready = Arc::new(AtomicBool::new(false));
        let mut registry = Registry::default();
        let requests = Counter::<u64>::default();
        registry.register("gpuscale_test_requests", "Requests.", requests.clone());
        requests.inc_by(3);
        let r = ready.clone();
        let endpoints = Endpoints::new(
            || Ok(()),
            move || {
                if r.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("no agent connected\nyet".into())
                }
            },
            registry,
        );
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = std::thread::spawn(move || {
            rt.block_on(serve(listener, None, endpoints, async {
                let _ = stop_rx.await;
            }))
        });

        assert_eq!(get(addr, "/healthz").0, 200);
        let (status, _, body) = get(addr, "/readyz");
        assert_eq!(status, 503);
        assert_eq!(body, "no agent connected yet\n", "one line");
        ready.store(true, Ordering::Relaxed);
        assert_eq!(
            get(addr, "/readyz"),
            (200, "text/plain; charset=utf-8".into(), "ok\n".into())
        );
        let (status, ctype, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
        assert!(
            body.contains(
                "# TYPE gpuscale_test_requests_total counter\ngpuscale_test_requests_total 3\n"
            ),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").0, 404);

        stop_tx.send(()).unwrap();
        server.join().unwrap().unwrap();
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the port is released after shutdown"
        );
    }

    #[test]
    fn a_taken_port_or_a_bad_address_names_the_flag_and_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = listen(&addr.to_string()).unwrap_err().to_string();
        assert!(e.contains("--http-listen"), "{e}");
        assert!(e.contains(&addr.to_string()), "{e}");
        let e = listen("localhost").unwrap_err().to_string();
        assert!(
            e.contains("--http-listen") && e.contains("\"localhost\""),
            "{e}"
        );
        assert!(e.contains("IP:PORT"), "{e}");
        assert!(parse_listen(" 0.0.0.0:7702 ").is_ok());
    }

    #[test]
    fn a_heartbeat_ages_until_the_next_beat() {
        let hb = Heartbeat::new();
        let later = Instant::now() + Duration::from_secs(10);
        assert!(hb.age_at(later) >= Duration::from_secs(9));
        assert!(hb.age_at(hb.origin) == Duration::ZERO, "never negative");
        let before = hb.age_at(later);
        std::thread::sleep(Duration::from_millis(5));
        hb.beat();
        assert!(hb.age_at(later) < before, "a beat makes it younger");
    }
}
