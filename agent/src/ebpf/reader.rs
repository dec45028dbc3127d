//! The reader thread: drains the `EVENTS` ring buffer through tokio's `AsyncFd`, converts event
//! times to Unix nanoseconds, applies each batch to the state, resolves pending cgroup paths, and
//! sweeps processes that exited without an exit event.

use super::*;

/// Nanoseconds to add to a CLOCK_MONOTONIC time to get Unix time, now.
pub(super) fn monotonic_to_unix_offset() -> i128 {
    pub(super) fn now(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: passes a valid timespec to fill.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

pub(super) fn to_unix(ts_ns: u64, offset: i128) -> u64 {
    (i128::from(ts_ns) + offset).clamp(0, i128::from(u64::MAX)) as u64
}

pub(super) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(common::until_nul(bytes)).into_owned()
}

/// The reader thread: runs [`read_events`] on its own current-thread tokio runtime, so the
/// reader never competes with the agent's gRPC tasks and works whether or not the caller has a
/// runtime.
pub(super) fn read_loop(shared: &Shared, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(
                "cannot start the eBPF reader's runtime ({e}); no device opens are read"
            );
            return;
        }
    };
    runtime.block_on(read_events(shared, ring));
}

/// Drains the ring buffer, then waits, through tokio's [`AsyncFd`](tokio::io::unix::AsyncFd),
/// for it to become readable, for [`Tracker::stop`], or for the next cgroup walk or liveness
/// sweep to be due.
async fn read_events(shared: &Shared, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    // SAFETY: the `RingBuf` owns its map fd and keeps it open, unchanged, until it is dropped,
    // which only happens when this `AsyncFd` is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(e) => {
            let e = std::io::Error::from(e);
            tracing::error!("cannot watch the eBPF ring buffer ({e}); no device opens are read");
            return;
        }
    };
    let mut batch: Vec<Event> = Vec::with_capacity(64);
    let mut sweep = Sweep::new();
    loop {
        while let Some(item) = ring.get_mut().next() {
            if item.len() == std::mem::size_of::<Event>() {
                // SAFETY: the item holds exactly one `Event` written by the program; `Event` is
                // plain old data, and `read_unaligned` copes with any alignment.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
        if !batch.is_empty() {
            handle_batch(shared, &batch);
            batch.clear();
        }
        // Acquire: pairs with the Release store in `stop`.
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        // With opens waiting for a cgroup walk, wake up when the next walk is allowed.
        let mut wait = sweep.next_in();
        if !lock(&shared.state).pending.is_empty() {
            let walk = lock(&shared.cgroups).next_walk_in();
            wait = wait.min(walk.max(Duration::from_millis(1)));
        }
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                // Cleared before the drain at the top of the loop: an event written after the
                // drain sets readiness again, so none waits for the next wake-up.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    tracing::warn!("waiting on the eBPF ring buffer failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
        resolve_pending(shared);
        sweep.run_if_due(shared);
    }
}

/// How often the tracker checks that the processes it holds are still alive.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Forgets tracked processes that are gone without an exit event: the program drops events
/// when the ring buffer is full (an exit among them), and a stale entry must not outlive its
/// process. Runs every [`SWEEP_EVERY`], and at once after the program reports new drops.
pub(super) struct Sweep {
    pub(super) last: Instant,
    pub(super) dropped_seen: u64,
}

impl Sweep {
    pub(super) fn new() -> Sweep {
        Sweep {
            last: Instant::now(),
            dropped_seen: 0,
        }
    }

    pub(super) fn next_in(&self) -> Duration {
        SWEEP_EVERY.saturating_sub(self.last.elapsed())
    }

    pub(super) fn run_if_due(&mut self, shared: &Shared) {
        let dropped = shared.dropped_now();
        if self.last.elapsed() < SWEEP_EVERY && dropped == self.dropped_seen {
            return;
        }
        self.last = Instant::now();
        self.dropped_seen = dropped;
        let mut state = lock(&shared.state);
        let gone: Vec<u32> = state
            .procs
            .keys()
            .copied()
            .filter(|&tgid| !process_exists(tgid))
            .collect();
        for tgid in gone {
            state.exit(tgid);
        }
    }
}

/// Whether process `tgid` exists (signal 0: permission errors still mean it exists).
pub(super) fn process_exists(tgid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(tgid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Gives the opens that waited for a cgroup walk their path (or, when the walk does not find
/// their cgroup, leaves them without one for good).
pub(super) fn resolve_pending(shared: &Shared) {
    if lock(&shared.state).pending.is_empty() {
        return;
    }
    let found: Vec<(Pending, Option<String>)> = {
        let mut index = lock(&shared.cgroups);
        if !index.may_walk() {
            return;
        }
        // Every pending open was seen before this walk starts: what it misses is gone.
        index.walk();
        let pending = std::mem::take(&mut lock(&shared.state).pending);
        pending
            .into_iter()
            .map(|p| (p, index.by_id.get(&p.cgroup_id).cloned()))
            .collect()
    };
    let mut state = lock(&shared.state);
    let State { procs, recent, .. } = &mut *state;
    for (p, path) in found {
        let Some(path) = path else { continue };
        let pod = parse_cgroup_path(&path);
        let waiting = |o: &OpenInfo| {
            o.tgid == p.tgid && o.cgroup_id == p.cgroup_id && o.cgroup_path.is_none()
        };
        let live = procs.get_mut(&p.tgid).filter(|o| waiting(o));
        for o in live
            .into_iter()
            .chain(recent.iter_mut().filter(|o| waiting(o)))
        {
            o.cgroup_path = Some(path.clone());
            o.pod.clone_from(&pod);
        }
    }
}

pub(super) fn handle_batch(shared: &Shared, batch: &[Event]) {
    // Relaxed: a statistics counter.
    shared
        .events
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let offset = monotonic_to_unix_offset();
    // Resolve cgroup paths before taking the state lock (the index may walk the tree).
    let paths: Vec<Resolution> = {
        let mut index = lock(&shared.cgroups);
        batch
            .iter()
            .map(|ev| match ev.kind {
                EVENT_OPEN => index.resolve(ev.cgroup_id),
                _ => Resolution::Gone,
            })
            .collect()
    };
    let mut state = lock(&shared.state);
    for (ev, resolution) in batch.iter().zip(paths) {
        match ev.kind {
            EVENT_OPEN => {
                let path = match resolution {
                    Resolution::Found(path) => Some(path),
                    Resolution::Gone => None,
                    Resolution::Later => {
                        if state.pending.len() < PENDING_CAP {
                            state.pending.push(Pending {
                                tgid: ev.tgid,
                                cgroup_id: ev.cgroup_id,
                            });
                        }
                        None
                    }
                };
                state.open(ev, path, to_unix(ev.ts_ns, offset));
            }
            EVENT_EXIT => state.exit(ev.tgid),
            other => tracing::debug!(kind = other, "unknown eBPF event kind"),
        }
    }
}
