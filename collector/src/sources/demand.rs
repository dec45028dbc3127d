//! What the collector asks its agents to stream (`--agent-stream changes`): the series its
//! triggers read, and how often a quiet node must prove it still samples.
//!
//! Every stream carries each metric's last value (for `/metrics` and `dump`, cheap to compute
//! and small). On top of that, each trigger adds the window it reads ([`series_of`]: with
//! `sm_active`, `gpu_util` over the same window too, its fallback on GPUs without GPM) when:
//! - KEDA or `query` asked for it in the last [`ASKED_FOR`] (`GetMetricSpec`, `GetMetrics`,
//!   `IsActive`, `Evaluate`);
//! - a `StreamIsActive` stream of it is open ([`Demand::hold`]);
//! - in-cluster, a ScaledObject with that trigger exists ([`Demand::pin`]), so its series stream
//!   before KEDA's first call.
//!
//! The pace (`Interest.heartbeat_ms`) is a quarter of the smallest `staleAfter` in use, at most
//! [`MAX_HEARTBEAT`]: a quiet node sends a heartbeat once per pace, and a busy one sends what
//! changed once per pace too (`WatchRequest.min_interval_ms`), unless a `StreamIsActive` stream
//! is open ([`Ask::every_tick`]): activation must turn within two sample intervals, so then
//! changes go out at every sample. A node's data is never older than its pace plus a sample
//! interval, well inside every trigger's `staleAfter` (and within 1 s, for the values KEDA
//! reads every 15–30 s), and its stream is given up within 1.5 s of going silent (three paces,
//! see `agents::silence_limit`). A paced stream costs an agent +0.02 % of a core against +0.55 % for
//! one of every sample (docs/BENCHMARKS.md).
//!
//! When what is asked changes, every stream asks again (a new `WatchSnapshots` on the same
//! connection, whose first message is whole). A trigger's first call finds its series on their
//! way: [`crate::api::scaler`] waits for them (up to [`FIRST_READ_WITHIN`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::series::Wanted;

use crate::model::evaluate::series_of;
use crate::model::trigger::Trigger;

/// How long a trigger's series stay streamed after the last KEDA call that asked for it: KEDA
/// polls every 15–30 s, so a trigger in use never lapses, and one deleted stops costing the
/// agents within minutes.
pub const ASKED_FOR: Duration = Duration::from_secs(5 * 60);
/// The slowest pace asked for: a value in use reaches the collector within it (plus a sample
/// interval), and three of them are the 1.5 s after which a silent stream is given up.
pub const MAX_HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a call whose series are not streamed yet waits for them (the agents send their
/// whole state at once when asked again: about one sample interval), inside KEDA's 3 s
/// deadline for a call.
pub const FIRST_READ_WITHIN: Duration = Duration::from_secs(2);
/// Most distinct (series, `staleAfter`) pairs kept as asked for: a cluster uses a handful, and
/// KEDA's callers must not grow the collector without bound (past it, the least recently
/// asked is forgotten; it streams again at its next call).
const MAX_ASKED: usize = 4096;
/// Most distinct pinned ScaledObjects (in-cluster): past it, a new pin drops an arbitrary other
/// one (its triggers still stream once KEDA asks).
const MAX_PINNED: usize = 100_000;

/// What the streams ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    /// The series.
    pub wanted: Wanted,
    /// How often a node with nothing new sends a heartbeat, and (unless `every_tick`) how
    /// often a node sends what changed.
    pub heartbeat: Duration,
    /// Changes go out at every sample: a `StreamIsActive` stream is open.
    pub every_tick: bool,
}

impl Ask {
    /// Every stream's ask before any trigger is known: each metric's last value.
    fn base() -> Ask {
        Ask {
            wanted: Wanted::lasts(),
            heartbeat: MAX_HEARTBEAT,
            every_tick: false,
        }
    }
}

/// One trigger's need: its series and its `staleAfter`.
type Need = (Wanted, Duration);

/// The need of `trigger`.
pub fn need_of(trigger: &Trigger) -> Need {
    (series_of(trigger), trigger.stale_after)
}

#[derive(Default)]
struct State {
    /// Need → when last asked.
    asked: HashMap<Need, Instant>,
    /// Need → open `StreamIsActive` streams.
    held: HashMap<Need, usize>,
    /// ScaledObject (namespace, name) → its triggers' needs.
    pinned: HashMap<(String, String), Vec<Need>>,
}

impl State {
    fn ask(&self) -> Ask {
        let needs = self
            .asked
            .keys()
            .chain(self.held.keys())
            .chain(self.pinned.values().flatten());
        let mut ask = Ask::base();
        ask.every_tick = !self.held.is_empty();
        for (wanted, stale) in needs {
            ask.wanted = ask.wanted.union(*wanted);
            ask.heartbeat = ask.heartbeat.min(*stale / 4);
        }
        ask
    }
}

/// The series in use, shared by the KEDA service (which records what it reads) and the agent
/// streams (which ask for it).
pub struct Demand {
    state: Mutex<State>,
    ask: tokio::sync::watch::Sender<Ask>,
}

impl Default for Demand {
    fn default() -> Self {
        Demand {
            state: Mutex::default(),
            ask: tokio::sync::watch::channel(Ask::base()).0,
        }
    }
}

/// An open `StreamIsActive` stream's need: streamed until dropped.
pub struct Hold {
    demand: Arc<Demand>,
    need: Need,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.demand.change(|s| {
            if let Some(n) = s.held.get_mut(&self.need) {
                *n -= 1;
                if *n == 0 {
                    s.held.remove(&self.need);
                }
            }
        });
    }
}

impl Demand {
    /// What the streams ask for now.
    pub fn current(&self) -> Ask {
        *self.ask.borrow()
    }

    /// Follows what the streams ask for.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Ask> {
        self.ask.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state with `f` and tells the streams when what they ask for changed.
    fn change(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.lock();
        f(&mut s);
        let ask = s.ask();
        self.ask.send_if_modified(|a| {
            let changed = *a != ask;
            if changed {
                tracing::info!(
                    series = ask.wanted.count(),
                    heartbeat_ms = ask.heartbeat.as_millis() as u64,
                    every_tick = ask.every_tick,
                    "agent streams ask for a new set of series"
                );
            }
            *a = ask;
            changed
        });
    }

    /// Records that `trigger` was asked for at `now`; its series stream from now on.
    pub fn asked(&self, trigger: &Trigger, now: Instant) {
        let need = need_of(trigger);
        let mut s = self.lock();
        if let Some(at) = s.asked.get_mut(&need) {
            *at = now;
            return;
        }
        drop(s);
        self.change(|s| {
            if s.asked.len() >= MAX_ASKED {
                let oldest = s.asked.iter().min_by_key(|(_, at)| **at).map(|(n, _)| *n);
                if let Some(n) = oldest {
                    s.asked.remove(&n);
                }
            }
            s.asked.insert(need, now);
        });
    }

    /// Streams `trigger`'s series while the returned [`Hold`] lives.
    pub fn hold(self: &Arc<Self>, trigger: &Trigger) -> Hold {
        let need = need_of(trigger);
        self.change(|s| *s.held.entry(need).or_default() += 1);
        Hold {
            demand: self.clone(),
            need,
        }
    }

    /// Streams the series of ScaledObject `namespace/name`'s `triggers` (in-cluster: every
    /// ScaledObject pointing at the collector), replacing what it pinned before; none: unpins.
    pub fn pin(&self, namespace: &str, name: &str, triggers: &[Trigger]) {
        let key = (namespace.to_owned(), name.to_owned());
        let needs: Vec<Need> = triggers.iter().map(need_of).collect();
        if self
            .lock()
            .pinned
            .get(&key)
            .map_or(needs.is_empty(), |n| *n == needs)
        {
            return;
        }
        self.change(|s| {
            if needs.is_empty() {
                s.pinned.remove(&key);
            } else {
                if s.pinned.len() >= MAX_PINNED && !s.pinned.contains_key(&key) {
                    // Dropped pins still stream once KEDA asks.
                    let any = s.pinned.keys().next().cloned();
                    if let Some(k) = any {
                        s.pinned.remove(&k);
                    }
                }
                s.pinned.insert(key, needs);
            }
        });
    }

    /// Makes `pins` (ScaledObject (namespace, name) → its triggers) every pin there is: the
    /// ScaledObjects listed again after a watch restarted.
    pub fn pin_all(&self, pins: Vec<((String, String), Vec<Trigger>)>) {
        let pinned: HashMap<(String, String), Vec<Need>> = pins
            .into_iter()
            .filter(|(_, t)| !t.is_empty())
            .take(MAX_PINNED)
            .map(|(key, triggers)| (key, triggers.iter().map(need_of).collect()))
            .collect();
        self.change(|s| s.pinned = pinned);
    }

    /// Drops what was last asked for before `now - ASKED_FOR` (and is neither held nor pinned).
    pub fn expire(&self, now: Instant) {
        let lapsed = |s: &State| {
            s.asked
                .values()
                .any(|&at| now.saturating_duration_since(at) > ASKED_FOR)
        };
        if !lapsed(&self.lock()) {
            return;
        }
        self.change(|s| {
            s.asked
                .retain(|_, at| now.saturating_duration_since(*at) <= ASKED_FOR);
        });
    }

    /// Expires lapsed series once a minute, forever.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            self.expire(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use vocab::{Metric, Window};

    fn trigger(pairs: &[(&str, &str)]) -> Trigger {
        let meta: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .chain([
                ("podSelector".to_owned(), "app=x".to_owned()),
                ("targetValue".to_owned(), "80".to_owned()),
            ])
            .collect();
        Trigger::parse(&meta).unwrap()
    }

    #[test]
    fn before_any_trigger_streams_carry_last_values_only() {
        let d = Demand::default();
        assert_eq!(d.current().wanted, Wanted::lasts());
        assert_eq!(d.current().heartbeat, MAX_HEARTBEAT);
    }

    #[test]
    fn a_trigger_adds_its_window_and_sm_active_its_gpu_util_fallback() {
        let d = Demand::default();
        let mut rx = d.subscribe();
        let now = Instant::now();
        d.asked(&trigger(&[("metric", "sm_active"), ("window", "1m")]), now);
        assert!(rx.has_changed().unwrap(), "the streams are told");
        rx.borrow_and_update();
        let w = d.current().wanted;
        assert!(w.window(Metric::SmActive, Window::S60));
        assert!(w.window(Metric::GpuUtil, Window::S60));
        assert!(!w.window(Metric::SmActive, Window::S30));
        assert!(!w.window(Metric::PowerWatts, Window::S60));
        // The same trigger again: nothing new to ask.
        d.asked(&trigger(&[("metric", "sm_active"), ("window", "1m")]), now);
        assert!(!rx.has_changed().unwrap());
        // `last` needs no window.
        let before = d.current().wanted;
        d.asked(
            &trigger(&[("metric", "power_watts"), ("timeAggregation", "last")]),
            now,
        );
        assert_eq!(d.current().wanted, before);
    }

    #[test]
    fn the_pace_is_a_quarter_of_the_smallest_stale_after_at_most_500ms() {
        let d = Demand::default();
        let now = Instant::now();
        d.asked(&trigger(&[("metric", "gpu_util")]), now);
        assert_eq!(d.current().heartbeat, MAX_HEARTBEAT, "staleAfter 10s");
        d.asked(
            &trigger(&[("metric", "gpu_util"), ("staleAfter", "500ms")]),
            now,
        );
        assert_eq!(d.current().heartbeat, Duration::from_millis(125));
    }

    #[test]
    fn callers_cannot_grow_what_is_kept_as_asked_past_its_bound() {
        let d = Demand::default();
        let t0 = Instant::now();
        for ms in 0..=MAX_ASKED as u64 {
            let stale = format!("{}ms", 500 + ms);
            d.asked(
                &trigger(&[("metric", "gpu_util"), ("staleAfter", &stale)]),
                t0 + Duration::from_millis(ms),
            );
        }
        let s = d.lock();
        assert_eq!(s.asked.len(), MAX_ASKED);
        assert!(
            !s.asked.values().any(|&at| at == t0),
            "the least recently asked is the one forgotten"
        );
    }

    #[test]
    fn asked_series_lapse_but_held_and_pinned_ones_stay() {
        let d = Arc::new(Demand::default());
        let t0 = Instant::now();
        let asked = trigger(&[("metric", "tensor_active"), ("window", "10s")]);
        let held = trigger(&[("metric", "dram_active"), ("window", "5m")]);
        let pinned = trigger(&[("metric", "mem_util"), ("window", "30s")]);
        d.asked(&asked, t0);
        let hold = d.hold(&held);
        d.pin("ns", "so", std::slice::from_ref(&pinned));
        let has = |m, w| d.current().wanted.window(m, w);
        assert!(has(Metric::TensorActive, Window::S10));
        // Asked again within the time: kept.
        d.asked(&asked, t0 + ASKED_FOR / 2);
        d.expire(t0 + ASKED_FOR + Duration::from_secs(1));
        assert!(has(Metric::TensorActive, Window::S10));
        d.expire(t0 + ASKED_FOR * 2);
        assert!(!has(Metric::TensorActive, Window::S10), "lapsed");
        assert!(has(Metric::DramActive, Window::M5) && has(Metric::MemUtil, Window::S30));
        assert!(d.current().every_tick, "activation is watched");
        drop(hold);
        assert!(!has(Metric::DramActive, Window::M5), "the stream ended");
        assert!(!d.current().every_tick, "no activation is watched");
        d.pin("ns", "so", &[]);
        assert_eq!(d.current().wanted, Wanted::lasts(), "the ScaledObject left");
        // A watch listed every ScaledObject again: its list replaces the pins.
        d.pin("ns", "gone", std::slice::from_ref(&pinned));
        d.pin_all(vec![(("ns".into(), "new".into()), vec![held.clone()])]);
        assert!(has(Metric::DramActive, Window::M5) && !has(Metric::MemUtil, Window::S30));
    }
}
