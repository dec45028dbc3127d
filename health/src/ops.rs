//! The operations code both binaries share: logging set-up, the shutdown signals, the wall
//! clock in nanoseconds, and locks that survive a panicked holder.

use std::sync::{Mutex, MutexGuard};

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
