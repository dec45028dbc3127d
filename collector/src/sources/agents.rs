//! Agent streams: one task per agent address holds `WatchSnapshots` open, writes each
//! snapshot into the [`Cluster`] view (with `--agent-stream changes`, the default, the agent
//! sends its whole state once and then only what changed, which [`View::apply_delta`] patches
//! in place; a heartbeat renews freshness and wakes no `StreamIsActive` stream), and reconnects with exponential backoff (100 ms doubling
//! to 500 ms) when the agent is unreachable, restarts, or its stream falls silent (no snapshot
//! for three of its intervals, at least 1 s: a cut or half-open link), so a healed link shows a
//! fresh value within 2 s (`tests/e2e/tests/netfault.rs`). One agent's trouble never delays
//! another.
//! The set of addresses is fixed (`--agents`) or follows discovery (`--agent-service`):
//! [`Fleet::set`] starts streams for new addresses and stops and retires the ones that left.
//!
//! Which node an agent may report (so that one agent cannot take over another node's pods):
//! - discovered agents (`--agent-service`) run on the node their EndpointSlice names
//!   (`endpoints[].nodeName`, which the API server's endpoint controller copies from the pod): a
//!   snapshot for any other node is refused, TLS or not;
//! - with TLS (`--agent-ca`, and `--agent-client-cert`/`--agent-client-key` for mutual TLS) an
//!   agent's certificate must chain to the agent CA. Agents are dialed by pod IP, so the
//!   certificate is not checked against the address: it must name (as a DNS name) the node every
//!   snapshot reports, or, with `--agent-tls-server-name NAME` (one certificate shared by every
//!   agent, as `cargo xtask deploy` and cert-manager issue it), it must name NAME, and the node
//!   then comes from the EndpointSlice alone.
//!
//! A snapshot for another node is refused with the reason in `dump` and the node's pods read
//! `UNAVAILABLE`. The TLS files are re-read for each new connection when they changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpuscale_health::tls::{self, ClientTls};
use proto::agent::agent_client::AgentClient;
use proto::agent::{Interest, WatchRequest};
use proto::series::Wanted;
use rustls::pki_types::CertificateDer;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::sources::demand::{Ask, Demand};
use crate::sources::validate;
use crate::sources::view::Cluster;
#[cfg(doc)]
use crate::sources::view::View;

const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between two tries. A try at a host that does not answer takes up to
/// [`CONNECT_TIMEOUT`] (its SYN sent again after 1 s), so a link that heals just after a SYN
/// is used within 1 s + this: under the 2 s a healed link may take. (It was 5 s: an agent
/// back after a few seconds of resets waited up to 3.2 s more.)
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest silence after which a stream is given up (see [`silence_limit`]).
const SILENCE_MIN: Duration = Duration::from_secs(1);
/// How long the first snapshot of a stream may take: the agent sends it at once, but a slow
/// link may hold it up (a later one is held to [`silence_limit`]).
const FIRST_SNAPSHOT_WITHIN: Duration = Duration::from_secs(10);

/// How long a stream whose agent samples every `interval_ns` may stay silent before it is given
/// up and dialed again: three intervals (the agent sends a snapshot every tick), at least
/// [`SILENCE_MIN`]. Waiting for TCP instead would let a link cut further away than either end
/// (neither kernel sees it) heal only at the agent's next retransmission, 3 s or more after a
/// few seconds' cut, and a half-open connection last until the HTTP/2 keep-alive (10 s).
/// With a paced stream (`heartbeat`, see [`crate::sources::demand`]) a node sends one message
/// per pace, changes or a heartbeat: three paces (1.5 s at the slowest pace).
fn silence_limit(interval_ns: u64, heartbeat: Duration) -> Duration {
    (3 * Duration::from_nanos(interval_ns).max(heartbeat)).max(SILENCE_MIN)
}

/// How many bytes of one agent's snapshots may be on their way to the collector at once (the
/// HTTP/2 flow-control window of the stream and of its connection): the agent sends no more
/// until the collector has read them. A collector that falls behind its streams (overloaded)
/// then reads the newest state, because the agent's own queue fills and it skips snapshots;
/// with hyper's default 2 MiB window (adaptive) plus the TCP buffers it read a backlog instead:
/// 11 s of an 8-GPU node's 50 KB snapshots at 400 simulated nodes (`cargo xtask bench-scale`),
/// so its answers were about data older than `staleAfter`. 256 KiB holds five such snapshots
/// (half a second at 100 ms); a larger snapshot still flows, in pieces.
const STREAM_WINDOW: u32 = 256 << 10;

/// An agent's endpoint, with keep-alives so a hung agent is noticed and a bounded window so a
/// slow collector reads fresh data ([`STREAM_WINDOW`]).
fn endpoint(address: &str) -> Result<Endpoint, String> {
    crate::endpoint(address)
        .map(|e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(STREAM_WINDOW)
                .http2_adaptive_window(false)
        })
        .map_err(|e| format!("agent address {e}"))
}

/// Checks every address before anything starts, so a typo fails at start.
pub fn validate(addresses: &[String]) -> Result<(), String> {
    addresses.iter().try_for_each(|a| endpoint(a).map(drop))
}

/// The largest snapshot this collector decodes from an agent, so a broken or hostile agent
/// cannot make it buffer without bound. A snapshot costs about 2 KiB per GPU and per (pod, GPU)
/// pair (every metric, every window), so this leaves room for about 2,000 of them on one node: a
/// node of 64 MIG instances each shared by 8 pods sends 1.1 MiB (a test in `validate` builds it).
/// A larger snapshot ends the stream with an error naming this limit, and the node's pods read
/// `UNAVAILABLE`.
pub const MAX_AGENT_MESSAGE: usize = 4 << 20;

/// The oldest agent API revision this collector reads: revision 1 sent metric names and
/// attributions as strings in fields revision 2 reserved, so its metrics would all read as absent.
pub const MIN_AGENT_API: u32 = 2;

/// A channel to the agent at `ep`, over TLS when `tls` is given: then also the agent's
/// certificate.
async fn connect(
    ep: &Endpoint,
    tls: Option<&ClientTls>,
) -> Result<(Channel, Option<CertificateDer<'static>>), String> {
    let how = if tls.is_some() {
        "connect over TLS"
    } else {
        "connect"
    };
    tls::channel_to(ep, tls.map(|t| t.get()))
        .await
        .map_err(|e| format!("{how}: {e}"))
}

/// How long after the series asked for change a stream asks again: changes that come together
/// (KEDA reading its ScaledObjects at start) make one new stream, not one each.
const ASK_SETTLE: Duration = Duration::from_millis(20);
/// Over how long the streams ask again for new series, each at its own point (by its node's
/// slot, [`ask_again_after`]): each answers with the node's whole state, and thousands of them
/// at the same moment (KEDA opening its `StreamIsActive` streams at 5,000 nodes) kept the
/// ingest threads busy past the silence limit, so streams were given up as silent and dialed
/// again, whole state and all, over and over (`cargo xtask bench-scale`). Inside
/// [`crate::sources::demand::FIRST_READ_WITHIN`], which a trigger's first call waits.
const ASK_SPREAD: Duration = Duration::from_millis(1000);
/// Over how long the streams ask again when they may only slow down (the last
/// `StreamIsActive` stream closed, a slower heartbeat): nobody waits for it (the values keep
/// coming at the old pace meanwhile), so the wave of whole states is spread five times
/// thinner than [`ASK_SPREAD`]. Changes at every sample (a `StreamIsActive` stream opened)
/// keep [`ASK_SPREAD`]: activation within two samples waits for them.
const SLOWER_SPREAD: Duration = Duration::from_millis(5000);

/// How long after what is asked changed from `was` to `now` the stream of slot `node` asks
/// again: [`ASK_SETTLE`] plus its own point in [`ASK_SPREAD`], or in [`SLOWER_SPREAD`] when
/// the series are the same and nothing is to come sooner (what the node sends meanwhile
/// still proves it fresh).
fn ask_again_after(node: usize, was: &Ask, now: &Ask) -> Duration {
    let slower = was.wanted == now.wanted
        && now.heartbeat >= was.heartbeat
        && (was.every_tick || !now.every_tick);
    let spread = if slower { SLOWER_SPREAD } else { ASK_SPREAD };
    let point = (node as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % spread.as_millis() as u64;
    ASK_SETTLE + Duration::from_millis(point)
}

/// What the collector asks its agents to send (`--agent-stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StreamMode {
    /// Each tick only what changed since the last message, and a heartbeat (agent API
    /// revision 3; an agent of revision 2 sends whole snapshots, read as ever).
    #[default]
    Changes,
    /// Every series of everything, whole, every tick (revision 2's stream).
    Full,
}

impl StreamMode {
    /// The stream request for this mode, asking for `ask` in a stream of changes: one message
    /// per pace, or one per sample while activation is watched ([`Ask::every_tick`]).
    fn request(self, ask: &Ask) -> WatchRequest {
        WatchRequest {
            min_interval_ms: match self {
                StreamMode::Changes if !ask.every_tick => ask.heartbeat.as_millis() as u32,
                _ => 0,
            },
            interest: match self {
                StreamMode::Changes => Some(Interest {
                    series: ask.wanted.series(),
                    changes_only: true,
                    heartbeat_ms: ask.heartbeat.as_millis() as u32,
                }),
                StreamMode::Full => None,
            },
        }
    }

    /// The series a whole snapshot of agent API revision `api` carries on a stream that asked
    /// for `ask`: before revision 3 an agent sends every one whatever was asked.
    fn carries(self, ask: &Ask, api: u32) -> Wanted {
        match self {
            StreamMode::Changes if api >= 3 => ask.wanted,
            _ => Wanted::every(),
        }
    }

    /// The heartbeat pace of a stream that asked for `ask` (0: one per sample interval).
    fn heartbeat(self, ask: &Ask) -> Duration {
        match self {
            StreamMode::Changes => ask.heartbeat,
            StreamMode::Full => Duration::ZERO,
        }
    }
}

/// An agent to follow: its address and, when discovery knows it, the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Agent {
    /// `host:port` of the agent's `--listen`.
    pub address: String,
    /// The node the agent's pod runs on (its EndpointSlice's `nodeName`); `None` for
    /// `--agents` addresses.
    pub node: Option<String>,
}

impl Agent {
    /// An agent at `address` on a node nobody vouched for (`--agents`).
    pub fn at(address: impl Into<String>) -> Agent {
        Agent {
            address: address.into(),
            node: None,
        }
    }
}

/// How agents are dialed over TLS, and what their certificates must name.
#[derive(Clone)]
pub struct AgentTls {
    /// The client configuration (`--agent-ca`, and the client certificate for mutual TLS).
    pub tls: Arc<ClientTls>,
    /// `--agent-tls-server-name`: the name every agent's certificate carries (one certificate
    /// for all agents); `None`: each certificate names its node.
    pub shared_name: Option<String>,
}

/// Whether `agent` may report `node_name`: the node its EndpointSlice names, if known, and the
/// node its certificate names, when certificates are per node. `Err` says why not.
fn check_node(
    agent: &Agent,
    cert: Option<&CertificateDer<'_>>,
    per_node_certificates: bool,
    node_name: &str,
) -> Result<(), String> {
    if let Some(node) = &agent.node {
        if node != node_name {
            return Err(format!(
                "the agent at {} reported node {}, but it runs on node {} (its EndpointSlice): \
                 an agent may only report its own node",
                agent.address,
                crate::quote(node_name),
                crate::quote(node)
            ));
        }
    }
    match cert {
        Some(cert) if per_node_certificates && !tls::names_identity(cert, node_name) => {
            Err(format!(
                "the agent reported node {}, but its certificate names {} (a certificate must \
                 name the node its agent runs on, or give every agent's shared name with \
                 --agent-tls-server-name)",
                crate::quote(node_name),
                crate::quote(&tls::dns_names(cert))
            ))
        }
        _ => Ok(()),
    }
}

/// With a shared agent certificate (`--agent-tls-server-name`), whether `cert` carries that name.
fn check_shared_name(cert: Option<&CertificateDer<'_>>, tls: &AgentTls) -> Result<(), String> {
    match (cert, &tls.shared_name) {
        (Some(cert), Some(name)) if !tls::names_identity(cert, name) => Err(format!(
            "the agent's certificate names {}, not {} (--agent-tls-server-name): it is not a \
             certificate issued to gpuscale's agents",
            crate::quote(&tls::dns_names(cert)),
            crate::quote(name)
        )),
        _ => Ok(()),
    }
}

/// The longest a snapshot is taken to have waited on its way: past the largest `staleAfter`
/// (10 minutes), so one older is stale for every trigger however old it really is.
const MAX_LATE: Duration = Duration::from_secs(11 * 60);

/// When the agent took a snapshot, on this process's monotonic clock: its arrival, less how long
/// after `taken_unix_ns` (the agent's clock) it arrived by `wall` (this host's clock). A snapshot
/// held up on its way (latency, a bandwidth limit) is as old as its data, not as its arrival, so
/// `staleAfter` holds for data that keeps arriving, late (before, 3 s old snapshots arriving
/// every 100 ms through a slow link read as fresh under `staleAfter: 2s`). Node clocks are taken
/// to agree (NTP, as certificates and leases need too): an agent's clock ahead of this one never
/// makes data younger than its arrival; one behind by more than `staleAfter` makes its node's
/// pods read `UNAVAILABLE`, with the age in the message and in `dump`.
fn taken_at(arrived: Instant, wall: SystemTime, taken_unix_ns: u64) -> Instant {
    let wall_ns = wall
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let late = Duration::from_nanos(wall_ns.saturating_sub(taken_unix_ns)).min(MAX_LATE);
    arrived.checked_sub(late).unwrap_or(arrived)
}

/// How often the ingest runtime's clock ticks ([`Lag`]).
const LAG_TICK: Duration = Duration::from_millis(100);
/// A tick this much late means the ingest runtime (or the whole collector) fell behind.
const LAG_LATE: Duration = Duration::from_millis(200);
/// How many times in a row a silent stream is given more time because the collector itself
/// was behind, before it is given up anyway.
const MAX_SILENCE_EXTENSIONS: u32 = 3;

/// Whether the collector itself fell behind lately: a task on the ingest runtime ticks every
/// [`LAG_TICK`] and notes when a tick came [`LAG_LATE`] or more late. A stream that heard
/// nothing for its silence limit while the collector could not read does not prove its link
/// cut: at 5,000 nodes a burst of whole snapshots (a wave of asks, a CPU taken by something
/// else) delayed the reads, streams were given up as silent, and their dialing again brought
/// more whole snapshots, until most nodes read `UNAVAILABLE` (`cargo xtask bench-scale`, 4
/// runs of 6 with `external-push`).
#[derive(Debug)]
struct Lag {
    base: Instant,
    /// Milliseconds after `base` of the newest tick, and of the newest late one (0: never).
    ticked_ms: AtomicU64,
    late_ms: AtomicU64,
}

impl Lag {
    fn new() -> Lag {
        Lag {
            base: Instant::now(),
            ticked_ms: AtomicU64::new(0),
            late_ms: AtomicU64::new(0),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis().max(1) as u64
    }

    /// Ticks forever, noting late ticks. Its start counts as a tick: a collector stopped
    /// before the first one is behind all the same.
    async fn run(self: Arc<Self>) {
        let start = Instant::now();
        self.ticked_ms.store(self.ms(start), Ordering::Relaxed);
        let mut next = start + LAG_TICK;
        loop {
            tokio::time::sleep_until(next.into()).await;
            let now = Instant::now();
            // The late mark first: a stream that reads this tick (Acquire) sees it too, never a
            // fresh tick without the lateness it came with (read between the two, after a
            // stop, the collector looked not behind and dialed again).
            if now.saturating_duration_since(next) >= LAG_LATE {
                self.late_ms.store(self.ms(now), Ordering::Relaxed);
            }
            self.ticked_ms.store(self.ms(now), Ordering::Release);
            next = now + LAG_TICK;
        }
    }

    /// Whether the collector fell behind within `within` of now, or is behind now (its clock
    /// has not ticked for [`LAG_TICK`] + [`LAG_LATE`]).
    fn behind(&self, within: Duration) -> bool {
        let now = self.ms(Instant::now());
        let ago = |ms: u64| Duration::from_millis(now.saturating_sub(ms));
        let ticked = self.ticked_ms.load(Ordering::Acquire);
        let late = self.late_ms.load(Ordering::Relaxed);
        (late != 0 && ago(late) <= within) || (ticked != 0 && ago(ticked) >= LAG_TICK + LAG_LATE)
    }

    /// Notes `at` as a late tick (tests).
    #[cfg(test)]
    fn late_at(&self, at: Instant) {
        self.late_ms.store(self.ms(at), Ordering::Relaxed);
    }
}

/// What one agent's stream follows: its slot in the view, how to dial it and what to ask.
struct Follow {
    cluster: Arc<Cluster>,
    node: usize,
    agent: Agent,
    tls: Option<AgentTls>,
    mode: StreamMode,
    demand: Arc<Demand>,
    lag: Arc<Lag>,
}

async fn stream_once(f: &Follow, ep: &Endpoint) -> Result<(), String> {
    let Follow {
        cluster,
        node,
        agent,
        tls,
        mode,
        demand,
        lag,
    } = f;
    let (node, mode, tls) = (*node, *mode, tls.as_ref());
    let (channel, cert) = connect(ep, tls.map(|t| &*t.tls)).await?;
    if let Some(tls) = tls {
        check_shared_name(cert.as_ref(), tls)?;
    }
    let per_node_certificates = tls.is_some_and(|t| t.shared_name.is_none());
    // The node name last allowed, so it is checked once, not per snapshot.
    let mut allowed: Option<String> = None;
    let client = AgentClient::new(channel).max_decoding_message_size(MAX_AGENT_MESSAGE);
    let silent = |limit: Duration| {
        format!(
            "no snapshot for {:.1}s on an open connection (a cut or half-open link): dialing again",
            limit.as_secs_f64()
        )
    };
    let mut asks = demand.subscribe();
    let mut ask = *asks.borrow_and_update();
    let watch = |ask: Ask| {
        let mut client = client.clone();
        async move {
            tokio::time::timeout(
                FIRST_SNAPSHOT_WITHIN,
                client.watch_snapshots(mode.request(&ask)),
            )
            .await
            .map_err(|_| silent(FIRST_SNAPSHOT_WITHIN))?
            .map_err(|s| format!("WatchSnapshots: {}", s.message()))
            .map(tonic::Response::into_inner)
        }
    };
    let mut stream = watch(ask).await?;
    let mut limit = FIRST_SNAPSHOT_WITHIN;
    cluster.write(|v| {
        let n = &mut v.nodes[node];
        n.connected = true;
        n.last_error.clear();
    });
    tracing::info!("streaming");
    // When to ask again for what changed (the old stream is read until then).
    let mut ask_again: Option<tokio::time::Instant> = None;
    // Times in a row the silence limit passed while the collector itself was behind.
    let mut extended = 0;
    loop {
        let message = tokio::select! {
            m = tokio::time::timeout(limit, stream.message()) => match m {
                Ok(m) => {
                    extended = 0;
                    m
                }
                Err(_) if extended < MAX_SILENCE_EXTENSIONS && lag.behind(limit) => {
                    extended += 1;
                    tracing::debug!(
                        limit_ms = limit.as_millis() as u64,
                        "no snapshot within the silence limit, but the collector was behind: \
                         waiting once more"
                    );
                    continue;
                }
                Err(_) => return Err(silent(limit)),
            },
            // The triggers in use read other series, or at another pace, now: ask again on the
            // same connection, at this stream's point of the spread (the old stream ends; the
            // new one starts whole). A later change may bring the time closer, never later.
            Ok(()) = asks.changed(), if mode == StreamMode::Changes => {
                let now = *asks.borrow_and_update();
                ask_again = (now != ask).then(|| {
                    let at = tokio::time::Instant::now() + ask_again_after(node, &ask, &now);
                    ask_again.map_or(at, |t| t.min(at))
                });
                continue;
            }
            () = sleep_until_some(ask_again) => {
                ask_again = None;
                ask = *asks.borrow_and_update();
                stream = watch(ask).await?;
                limit = FIRST_SNAPSHOT_WITHIN;
                continue;
            }
        };
        match message {
            Ok(Some(snap)) if snap.api_version < MIN_AGENT_API => {
                return Err(format!(
                    "the agent speaks API revision {}, this collector reads {MIN_AGENT_API} and \
                     later: upgrade the agent to this collector's release",
                    snap.api_version
                ))
            }
            Ok(Some(snap)) => {
                let at = taken_at(Instant::now(), SystemTime::now(), snap.taken_unix_ns);
                limit = silence_limit(snap.interval_ns, mode.heartbeat(&ask));
                if allowed.as_deref() != Some(snap.node_name.as_str()) {
                    if let Err(why) =
                        check_node(agent, cert.as_ref(), per_node_certificates, &snap.node_name)
                    {
                        cluster.write(|v| v.refuse(node, why));
                        continue;
                    }
                    allowed = Some(snap.node_name.clone());
                }
                if snap.delta {
                    // Checked once applied: a delta is only part of the node's state.
                    cluster.write_then(|v| v.apply_delta(node, snap, at));
                    continue;
                }
                let carries = mode.carries(&ask, snap.api_version);
                match validate::check(&snap) {
                    Ok(()) => cluster.write(|v| v.update_carrying(node, snap, at, carries)),
                    // The deltas after it follow it: it must be their base.
                    Err(validate::Refused(why)) if mode == StreamMode::Changes => {
                        cluster.write(|v| v.take_refused(node, snap, why, carries))
                    }
                    Err(validate::Refused(why)) => cluster.write(|v| v.refuse(node, why)),
                }
            }
            Ok(None) => return Err("the agent closed the stream".into()),
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                return Err(format!(
                    "the agent sent a snapshot over this collector's limit of {} MiB ({}); \
                     its pods read UNAVAILABLE: report it with the output of `gpuscale-agent \
                     dump --json` on that node",
                    MAX_AGENT_MESSAGE >> 20,
                    s.message()
                ))
            }
            Err(s) => return Err(format!("stream: {}", s.message())),
        }
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the stream of `f.agent` (view slot `f.node`) forever (until the task is dropped).
async fn follow(f: Follow) {
    let span = tracing::info_span!("agent", address = %f.agent.address);
    async move {
        let Follow { cluster, node, .. } = &f;
        let node = *node;
        let ep = match endpoint(&f.agent.address) {
            Ok(ep) => ep,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let mut backoff = BACKOFF_START;
        // Tries come every 500 ms while an agent is away: its error is logged when it changes.
        let mut logged = String::new();
        loop {
            let started = Instant::now();
            let err = stream_once(&f, &ep).await.unwrap_err();
            // A stream that ran a while was healthy: start the backoff afresh.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_START;
            }
            if err != logged {
                tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "agent unavailable");
                logged.clone_from(&err);
            } else {
                tracing::debug!(error = %err, "agent still unavailable");
            }
            cluster.write(|v| {
                let n = &mut v.nodes[node];
                n.connected = false;
                n.last_error = err;
                n.reconnects += 1;
            });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    .instrument(span)
    .await
}

/// The agents being followed.
pub struct Fleet {
    cluster: Arc<Cluster>,
    tls: Option<AgentTls>,
    mode: StreamMode,
    demand: Arc<Demand>,
    /// Where the streams run ([`Fleet::run_on`]).
    runtime: tokio::runtime::Handle,
    streams: Mutex<HashMap<Agent, (usize, tokio::task::AbortHandle)>>,
    /// The streams' runtime's clock, ticking from the first stream on.
    lag: Arc<Lag>,
    ticking: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Fleet {
    /// Follows no agent yet; will dial agents over TLS with `tls` and ask for `mode`'s streams
    /// with the series `demand` names, on the current runtime. Must run on a tokio runtime.
    pub fn new(
        cluster: Arc<Cluster>,
        tls: Option<AgentTls>,
        mode: StreamMode,
        demand: Arc<Demand>,
    ) -> Fleet {
        Fleet {
            cluster,
            tls,
            mode,
            demand,
            runtime: tokio::runtime::Handle::current(),
            streams: Mutex::new(HashMap::new()),
            lag: Arc::new(Lag::new()),
            ticking: Mutex::new(None),
        }
    }

    /// Runs the streams started from now on `runtime`: the collector gives them a runtime of
    /// their own, so thousands of agents' messages never queue a KEDA call behind them.
    #[must_use]
    pub fn run_on(mut self, runtime: tokio::runtime::Handle) -> Fleet {
        self.runtime = runtime;
        self
    }

    /// Makes `agents` the followed set: starts a stream for each new agent, and stops the
    /// streams of agents that left (their nodes leave the view at once); an address now on
    /// another node is a new agent. Invalid addresses are skipped with a warning.
    pub fn set(&self, agents: &[Agent]) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<Agent> = streams
            .keys()
            .filter(|a| !agents.contains(a))
            .cloned()
            .collect();
        for agent in gone {
            if let Some((node, task)) = streams.remove(&agent) {
                task.abort();
                self.cluster.write(|v| v.retire_node(node));
                tracing::info!(address = %agent.address, "agent left; stopped following it");
            }
        }
        if !agents.is_empty() {
            let mut ticking = self.ticking.lock().unwrap_or_else(|e| e.into_inner());
            if ticking.is_none() {
                *ticking = Some(self.runtime.spawn(self.lag.clone().run()).abort_handle());
            }
        }
        for agent in agents {
            if streams.contains_key(agent) {
                continue;
            }
            if let Err(e) = endpoint(&agent.address) {
                tracing::warn!("skipping agent: {e}");
                continue;
            }
            let mut node = 0;
            self.cluster.write(|v| node = v.add_node(&agent.address));
            let task = self.runtime.spawn(follow(Follow {
                cluster: self.cluster.clone(),
                node,
                agent: agent.clone(),
                tls: self.tls.clone(),
                mode: self.mode,
                demand: self.demand.clone(),
                lag: self.lag.clone(),
            }));
            streams.insert(agent.clone(), (node, task.abort_handle()));
            tracing::info!(address = %agent.address, node = ?agent.node, "following agent");
        }
    }

    /// How many agents are followed.
    pub fn len(&self) -> usize {
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no agent is followed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every stream.
    pub fn stop(&self) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (_, task)) in streams.drain() {
            task.abort();
        }
        if let Some(t) = self
            .ticking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuscale_health::pki::Ca;

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn the_collector_is_behind_when_its_clock_ticked_late_lately_or_stopped_ticking() {
        let lag = Arc::new(Lag {
            base: Instant::now() - Duration::from_secs(10),
            ..Lag::new()
        });
        assert!(
            !lag.behind(Duration::from_secs(1)),
            "not started: no evidence"
        );
        let ticking = tokio::spawn(lag.clone().run());
        tokio::time::sleep(LAG_TICK * 3).await;
        assert!(!lag.behind(Duration::from_secs(1)), "on time");
        lag.late_at(Instant::now());
        assert!(lag.behind(Duration::from_secs(1)), "a late tick just now");
        lag.late_at(Instant::now() - Duration::from_secs(3));
        assert!(!lag.behind(Duration::from_secs(1)), "late long ago");
        assert!(lag.behind(Duration::from_secs(5)));
        // A runtime that cannot run its clock: behind now; also before its first tick.
        let fresh = Arc::new(Lag::new());
        let first = tokio::spawn(fresh.clone().run());
        tokio::task::yield_now().await;
        first.abort();
        tokio::time::sleep(LAG_TICK + LAG_LATE + LAG_TICK).await;
        assert!(
            fresh.behind(Duration::from_millis(1)),
            "stopped before its first tick"
        );
        ticking.abort();
        tokio::time::sleep(LAG_TICK + LAG_LATE + LAG_TICK).await;
        assert!(lag.behind(Duration::from_millis(1)), "the clock stopped");
    }

    #[test]
    fn streams_ask_again_within_a_second_for_what_is_waited_for_and_within_five_to_slow_down() {
        use crate::sources::demand::MAX_HEARTBEAT;
        use proto::series::Wanted;
        let ask = |wanted, heartbeat, every_tick| Ask {
            wanted,
            heartbeat,
            every_tick,
        };
        let paced = ask(Wanted::lasts(), MAX_HEARTBEAT, false);
        let series = ask(Wanted::every(), MAX_HEARTBEAT, false);
        let every_tick = ask(Wanted::lasts(), MAX_HEARTBEAT, true);
        let faster = ask(Wanted::lasts(), MAX_HEARTBEAT / 2, false);
        let cases = [
            ("new series", &paced, &series, ASK_SPREAD),
            (
                "a StreamIsActive stream opened",
                &paced,
                &every_tick,
                ASK_SPREAD,
            ),
            (
                "a faster heartbeat (a shorter staleAfter)",
                &paced,
                &faster,
                ASK_SPREAD,
            ),
            (
                "the last StreamIsActive stream closed",
                &every_tick,
                &paced,
                SLOWER_SPREAD,
            ),
            ("a slower heartbeat", &faster, &paced, SLOWER_SPREAD),
        ];
        for (what, was, now, spread) in cases {
            let after: Vec<Duration> = (0..5000)
                .map(|node| ask_again_after(node, was, now))
                .collect();
            assert!(
                after
                    .iter()
                    .all(|d| *d >= ASK_SETTLE && *d < ASK_SETTLE + spread),
                "{what}"
            );
            // Spread: no tenth of the spread holds more than twice its share.
            let mut tenths = [0usize; 10];
            for d in &after {
                tenths[((*d - ASK_SETTLE).as_millis() * 10 / spread.as_millis()) as usize] += 1;
            }
            assert!(tenths.iter().all(|&n| n < 1000), "{what}: {tenths:?}");
        }
        assert!(ASK_SETTLE + ASK_SPREAD < crate::sources::demand::FIRST_READ_WITHIN);
    }

    #[test]
    fn a_silent_stream_is_given_up_after_three_intervals_and_retries_keep_a_heal_under_2s() {
        let none = Duration::ZERO;
        assert_eq!(silence_limit(100_000_000, none), Duration::from_secs(1));
        assert_eq!(silence_limit(10_000_000, none), Duration::from_secs(1));
        assert_eq!(silence_limit(2_000_000_000, none), Duration::from_secs(6));
        // Paced streams: three paces, 1.5 s at the slowest pace asked for.
        let paced = crate::sources::demand::MAX_HEARTBEAT;
        assert_eq!(
            silence_limit(100_000_000, paced),
            Duration::from_millis(1500)
        );
        assert_eq!(
            silence_limit(100_000_000, Duration::from_millis(250)),
            Duration::from_secs(1)
        );
        assert_eq!(silence_limit(2_000_000_000, paced), Duration::from_secs(6));
        // A link healed just after a try's SYN is used by the next try: within the rest of that
        // try (the SYN sent again after 1 s) and one wait.
        assert!(CONNECT_TIMEOUT - Duration::from_secs(1) + BACKOFF_MAX < Duration::from_secs(2));
    }

    #[test]
    fn a_late_snapshot_is_as_old_as_its_data_and_never_younger_than_its_arrival() {
        let arrived = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let before = |d: Duration| (wall - d).duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        // Taken 3 s before it arrived (a slow link): 3 s old on arrival.
        let at = taken_at(arrived, wall, before(Duration::from_secs(3)));
        assert_eq!(arrived - at, Duration::from_secs(3));
        // An agent clock 5 s ahead of this one: as old as its arrival, never younger.
        assert_eq!(
            taken_at(arrived, wall, before(Duration::ZERO) + 5_000_000_000),
            arrived
        );
        // Decades behind: older than any staleAfter, not wrapped round to fresh.
        assert_eq!(arrived - taken_at(arrived, wall, 1), MAX_LATE);
    }

    #[test]
    fn a_discovered_agent_may_report_only_the_node_its_endpoint_slice_names() {
        let agent = Agent {
            address: "10.0.0.7:7701".into(),
            node: Some("gpu-node-7".into()),
        };
        assert_eq!(check_node(&agent, None, false, "gpu-node-7"), Ok(()));
        let why = check_node(&agent, None, false, "gpu-node-1").unwrap_err();
        assert!(
            why.contains("10.0.0.7:7701")
                && why.contains("reported node \"gpu-node-1\"")
                && why.contains("runs on node \"gpu-node-7\""),
            "{why}"
        );
        // A shared certificate does not lift the EndpointSlice's binding.
        let ca = Ca::new("test CA", 1).unwrap();
        let shared = der(&ca.issue(&["gpuscale-agent.ns.svc"], 1).unwrap().cert_pem);
        assert!(check_node(&agent, Some(&shared), false, "gpu-node-1").is_err());
        assert_eq!(
            check_node(&agent, Some(&shared), false, "gpu-node-7"),
            Ok(())
        );
        // `--agents` addresses have no EndpointSlice: nothing to hold the node against.
        assert_eq!(
            check_node(&Agent::at("10.0.0.7:7701"), None, false, "any"),
            Ok(())
        );
    }

    #[test]
    fn per_node_certificates_must_name_the_node_and_a_shared_one_the_shared_name() {
        let ca = Ca::new("test CA", 1).unwrap();
        let node7 = der(&ca.issue(&["gpu-node-7"], 1).unwrap().cert_pem);
        let agent = Agent::at("10.0.0.7:7701");
        assert_eq!(check_node(&agent, Some(&node7), true, "gpu-node-7"), Ok(()));
        let why = check_node(&agent, Some(&node7), true, "gpu-node-1").unwrap_err();
        assert!(
            why.contains("\"gpu-node-7\"") && why.contains("--agent-tls-server-name"),
            "{why}"
        );

        let files = tempfile::tempdir().unwrap();
        let ca_file = files.path().join("ca.crt");
        std::fs::write(&ca_file, &ca.pem().cert_pem).unwrap();
        let tls = AgentTls {
            tls: tls::ClientFiles {
                ca: tls::PemFile::new("--agent-ca", &ca_file),
                identity: None,
            }
            .load(tls::ServerNames::CheckedByCaller)
            .unwrap(),
            shared_name: Some("gpuscale-agent.ns.svc".into()),
        };
        let shared = der(&ca.issue(&["gpuscale-agent.ns.svc"], 1).unwrap().cert_pem);
        assert_eq!(check_shared_name(Some(&shared), &tls), Ok(()));
        let why = check_shared_name(Some(&node7), &tls).unwrap_err();
        assert!(
            why.contains("\"gpu-node-7\"") && why.contains("not \"gpuscale-agent.ns.svc\""),
            "{why}"
        );
    }
}
