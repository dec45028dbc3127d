//! The agent's stop signal: what every loop and server waits on, and what SIGTERM and SIGINT
//! trigger.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use gpuscale_health::ops::{lock, ShutdownSignals};

use crate::{Error, Result};

/// A stop signal the sampler threads wait on between samples (and async tasks through
/// [`Stop::stopped`]).
pub struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Stop {
    fn default() -> Self {
        Stop {
            stopped: Mutex::new(false),
            cv: Condvar::new(),
            tx: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Stop {
    /// Asks every loop waiting on this signal to finish.
    pub fn trigger(&self) {
        *lock(&self.stopped) = true;
        self.cv.notify_all();
        self.tx.send_replace(true);
    }

    /// Resolves once [`Stop::trigger`] has been called.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }

    /// Whether [`Stop::trigger`] was called.
    pub fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Sleeps until [`Stop::trigger`] is called.
    pub fn wait(&self) {
        let mut stopped = lock(&self.stopped);
        while !*stopped {
            stopped = self.cv.wait(stopped).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sleeps until `deadline`; returns `true` when stopped meanwhile.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut stopped = lock(&self.stopped);
        loop {
            if *stopped {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .cv
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A stop signal that SIGTERM and SIGINT trigger, caught from the moment this returns (a
    /// thread of its own waits for them).
    pub fn on_signals() -> Result<Arc<Stop>> {
        let stop = Arc::new(Stop::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| Error::Runtime {
                what: "the signal runtime",
                error,
            })?;
        let signals = rt
            .block_on(async { ShutdownSignals::install() })
            .map_err(|error| Error::Runtime {
                what: "the SIGTERM and SIGINT handlers",
                error,
            })?;
        let s = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                rt.block_on(signals.wait());
                s.trigger();
            })
            .map_err(|error| Error::Runtime {
                what: "the signal thread",
                error,
            })?;
        Ok(stop)
    }
}
