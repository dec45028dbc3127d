//! The operations code both binaries share: logging set-up, the shutdown signals, serving until
//! a stop with a grace period, the wall clock in nanoseconds, and locks that survive a panicked
//! holder.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How long a server asked to stop waits for open requests and connections before closing them.
pub const GRACE: Duration = Duration::from_secs(3);

/// How long a gRPC connection may be idle before the server pings it.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long the server waits for the answer to that ping before it closes the connection: a
/// client that vanished (a half-open connection, a partitioned node) frees its streams after at
/// most the interval plus this.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request message a gRPC port decodes; a larger one is refused with
/// `OUT_OF_RANGE` before it is buffered whole. Every request of gpuscale's APIs is far smaller:
/// KEDA's largest (a ScaledObject reference with trigger metadata) is refused above 16 KiB of
/// metadata anyway (`collector::api::limits`).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The gRPC server builder both programs use: HTTP/2 keep-alive pings
/// ([`HTTP2_KEEPALIVE_INTERVAL`], [`HTTP2_KEEPALIVE_TIMEOUT`]) and at most `max_streams`
/// concurrent streams per connection (without it, one connection could open streams without
/// bound). The first bytes of a connection are bounded in time by [`crate::tls::incoming`].
pub fn grpc_server(max_streams: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(max_streams)
}

/// Runs `server` until it ends, or until `stop` resolves; then runs `on_stop` (to end long-lived
/// streams, say) and gives the server [`GRACE`] to finish before dropping it, which closes what it
/// still has open (a client that never hangs up must not keep the process alive). `None` when the
/// grace period ran out; `what` names the server in that warning.
///
/// Pass the server's future itself, not a `JoinHandle` of a spawned one: dropping a handle does
/// not stop its task.
pub async fn serve_until_stopped<T>(
    what: &str,
    server: impl Future<Output = T>,
    stop: impl Future<Output = ()>,
    on_stop: impl Future<Output = ()>,
) -> Option<T> {
    let mut server = std::pin::pin!(server);
    tokio::select! {
        r = &mut server => return Some(r),
        _ = stop => {}
    }
    on_stop.await;
    match tokio::time::timeout(GRACE, server).await {
        Ok(r) => Some(r),
        Err(_) => {
            tracing::warn!("{what}: connections still open {GRACE:?} after the stop; closing them");
            None
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). tracing-subscriber's `init` also
/// installs the `log` bridge (its `tracing-log` feature), so `log` records from libraries arrive.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// SIGTERM and SIGINT, caught from the moment [`ShutdownSignals::install`] returns (so one that
/// arrives early still ends the process cleanly rather than killing it).
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers; must be called inside a tokio runtime (with its I/O driver).
    pub fn install() -> std::io::Result<ShutdownSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the first of the two, and logs which arrived.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

/// A listener bound to `addr` now (so a taken port fails the process at start, before anything
/// else runs), non-blocking, ready for a tokio runtime to take over.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// An error with its sources, `: ` between them (tonic's transport error alone says only
/// "transport error"; aya's load errors hide the verifier's reason in a source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Wall-clock time now, nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Locks `m`, also when a thread panicked holding it: the data behind gpuscale's locks stays
/// consistent between statements, and one failed request must not take the process down.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_server_that_ends_in_its_grace_period_gives_its_result() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = async {
            // Ends one second after the stop: within the grace period.
            let _ = rx.await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            7
        };
        let mut stopped = false;
        let r = serve_until_stopped("test", server, async {}, async {
            stopped = true;
            let _ = tx.send(());
        })
        .await;
        assert!(stopped, "on_stop ran");
        assert_eq!(r, Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_ends_is_dropped_after_the_grace_period() {
        let started = tokio::time::Instant::now();
        let r = serve_until_stopped("test", std::future::pending::<()>(), async {}, async {}).await;
        assert_eq!(r, None);
        assert_eq!(
            started.elapsed(),
            GRACE,
            "the paused clock advanced exactly the grace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_fails_before_the_stop_returns_at_once() {
        let r = serve_until_stopped("test", async { 3 }, std::future::pending(), async {
            panic!("no stop happened")
        })
        .await;
        assert_eq!(r, Some(3));
    }

    #[test]
    fn a_poisoned_lock_still_opens_and_the_clock_is_past_2020() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poisoning the lock on purpose");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
        assert!(unix_now_ns() > 1_577_836_800_000_000_000);
    }
}
