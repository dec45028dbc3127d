//! The agent's gRPC API (`gpuscale.agent.v1.Agent`, see `proto/agent.proto` and `docs/API.md`):
//! snapshots of every GPU's and pod's windows, once or as a stream.
//!
//! Owns turning the live view into protobuf messages and serving them, next to
//! `grpc.health.v1` (SERVING once every GPU reported, as `/readyz`; NOT_SERVING when stopping).
//! It never calls NVML and holds a GPU's lock only while copying that GPU's summaries out.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gpuscale_health::ops::serve_until_stopped;
use gpuscale_health::tls::ServerTls;
use proto::agent::agent_server::{Agent as AgentApi, AgentServer};
use proto::agent::{
    DeviceOpen, GpuState as PbGpuState, GpuSummary, MetricSummary, NodeSnapshot, PodSummary,
    ProcessUsage, SnapshotRequest, WatchRequest, WindowStats,
};
use proto::series::Wanted;
use tokio_stream::Stream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::live::GpuLive;
use crate::node::Node;
use crate::sample::{GpuState, Metric};
use crate::stop::Stop;
use crate::window::{GpuWindows, Window};
use crate::{unix_now_ns, Error, Result};

/// Revision of the v1 API this agent speaks: 2 sends metrics and attributions as enums; 3 reads a
/// stream's `Interest` (only the series named, only what changed); 4 paces heartbeats
/// (`Interest.heartbeat_ms`).
pub const API_VERSION: u32 = 4;

fn metrics(
    windows: &GpuWindows,
    last: impl Fn(Metric) -> Option<f64>,
    wanted: &Wanted,
) -> Vec<MetricSummary> {
    Metric::ALL
        .into_iter()
        .filter(|&m| wanted.any(m))
        .map(|m| MetricSummary {
            metric: proto::agent::Metric::from(m) as i32,
            last: if wanted.last(m) { last(m) } else { None },
            windows: Window::ALL
                .into_iter()
                .filter(|&w| wanted.window(m, w))
                .filter_map(|w| {
                    windows.metric(m, w).map(|s| WindowStats {
                        window_s: w.secs(),
                        avg: s.avg,
                        min: s.min,
                        max: s.max,
                        p95: s.p95,
                        count: s.count,
                    })
                })
                .collect(),
        })
        .collect()
}

fn gpu_summary(
    info: &crate::shm::GpuInfo,
    live: &GpuLive,
    pods: &mut Vec<PodSummary>,
    wanted: &Wanted,
) -> GpuSummary {
    // `last` is the newest sample's value: unavailable when the GPU is not ok right now.
    let ok = live.state == GpuState::Ok;
    let gpu_metrics = metrics(
        &live.windows,
        |m| {
            ok.then(|| live.windows.last(m.index()).map(f64::from))
                .flatten()
        },
        wanted,
    );
    for (uid, pod) in &live.pods {
        pods.push(PodSummary {
            pod_uid: uid.clone(),
            gpu_uuid: info.uuid.clone(),
            container_ids: pod.container_ids.clone(),
            pids: pod.pids.clone(),
            shared: pod.shared,
            newest_sample_unix_ns: live.newest_ns,
            metrics: metrics(
                &pod.windows,
                |m| {
                    ok.then(|| pod.windows.last(m.index()).map(f64::from))
                        .flatten()
                },
                wanted,
            ),
            attribution: proto::agent::Attribution::from(pod.attribution) as i32,
        });
    }
    GpuSummary {
        index: info.index,
        uuid: info.uuid.clone(),
        name: info.name.clone(),
        state: PbGpuState::from(live.state) as i32,
        gpm_supported: info.gpm_supported,
        memory_total_bytes: info.memory_total_bytes,
        newest_sample_unix_ns: live.newest_ns,
        parent_uuid: info.parent_uuid.clone(),
        gpu_instance_id: info.gpu_instance_id,
        mig_enabled: info.mig_enabled,
        metrics: gpu_metrics,
        processes: live
            .processes
            .iter()
            .map(|p| ProcessUsage {
                pid: p.pid,
                used_memory_bytes: p.used_memory_bytes,
                sm_util: p.sm_util.map(f64::from),
                pod_uid: p.pod_uid.clone().unwrap_or_default(),
                container_id: p.container_id.clone().unwrap_or_default(),
                attribution: proto::agent::Attribution::from(p.attribution) as i32,
            })
            .collect(),
    }
}

/// The node's state now, every series.
pub fn snapshot(agent: &Node, seq: u64) -> NodeSnapshot {
    snapshot_of(agent, seq, &Wanted::every())
}

/// The node's state now, with the series `wanted`.
pub fn snapshot_of(agent: &Node, seq: u64, wanted: &Wanted) -> NodeSnapshot {
    let mut pods = Vec::new();
    let gpus = agent
        .gpus
        .iter()
        .enumerate()
        .map(|(i, info)| agent.with_live(i, |live| gpu_summary(info, live, &mut pods, wanted)))
        .collect();
    let status = agent.status();
    let ebpf = match status.ebpf_reason.as_str() {
        "" => status.ebpf.name().to_owned(),
        why => format!("{}: {why}", status.ebpf.name()),
    };
    NodeSnapshot {
        opens: status
            .opens
            .into_iter()
            .map(|o| DeviceOpen {
                pid: o.tgid,
                comm: o.comm,
                device: o.device,
                pod_uid: o.pod_uid.unwrap_or_default(),
                container_id: o.container_id.unwrap_or_default(),
                last_open_unix_ns: o.last_open_ns,
                exited: o.exited,
            })
            .collect(),
        ebpf,
        ebpf_state: proto::agent::EbpfState::from(status.ebpf) as i32,
        ebpf_detail: status.ebpf_reason,
        api_version: API_VERSION,
        node_name: agent.node_name.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        driver_version: agent.driver_version.clone(),
        taken_unix_ns: unix_now_ns(),
        interval_ns: agent.interval.as_nanos() as u64,
        seq,
        gpus,
        pods,
        ..NodeSnapshot::default()
    }
}

/// The tonic service.
pub struct Service {
    agent: Arc<Node>,
    seq: AtomicU64,
    stop: Arc<Stop>,
    built: Arc<Built>,
    /// Where the paced streams' turns are counted from ([`next_turn`]).
    epoch: tokio::time::Instant,
}

/// The first turn of a stream paced at `every` at or after `after`. Turns fall on one grid of
/// `every` from `epoch` for every stream of this agent, so streams paced alike (two collector
/// replicas) read the same tick and share it ([`Built`]); an agent's grid starts when it does,
/// so a cluster's agents do not send all at once.
fn next_turn(
    epoch: tokio::time::Instant,
    after: tokio::time::Instant,
    every: Duration,
) -> tokio::time::Instant {
    let (since, every) = (
        after.saturating_duration_since(epoch).as_nanos(),
        every.as_nanos().max(1),
    );
    let turns = since.div_ceil(every);
    epoch + Duration::from_nanos(u64::try_from(turns * every).unwrap_or(u64::MAX))
}

/// The node's state as last built for a stream, shared by the streams that ask for the same
/// series in the same tick: a second collector replica costs the agent its own delta and
/// encoding, not a second reading of every window. Kept only while more than one stream is
/// open (one stream has no one to share with).
#[derive(Default)]
struct Built {
    /// Open streams.
    streams: std::sync::atomic::AtomicUsize,
    /// ([`Node::samples`] count when built, its series, the state).
    last: std::sync::Mutex<Option<(u64, Wanted, NodeSnapshot)>>,
}

impl Built {
    /// The node's state at sample count `tick` with the series `wanted`, as message `seq` of a
    /// stream: built once per tick and series, whichever stream asks first.
    fn get(&self, agent: &Node, tick: u64, wanted: &Wanted, seq: u64) -> NodeSnapshot {
        if self.streams.load(Ordering::Relaxed) < 2 {
            return snapshot_of(agent, seq, wanted);
        }
        let mut last = gpuscale_health::ops::lock(&self.last);
        if let Some((t, w, snap)) = &*last {
            if *t == tick && w == wanted {
                return NodeSnapshot {
                    seq,
                    ..snap.clone()
                };
            }
        }
        let snap = snapshot_of(agent, seq, wanted);
        *last = Some((tick, *wanted, snap.clone()));
        snap
    }
}

/// Counts an open stream in [`Built`] while it lives.
struct StreamOpen(Arc<Built>);

impl StreamOpen {
    fn new(built: &Arc<Built>) -> StreamOpen {
        built.streams.fetch_add(1, Ordering::Relaxed);
        StreamOpen(built.clone())
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::Relaxed) <= 2 {
            // No one left to share with: free the copy.
            *gpuscale_health::ops::lock(&self.0.last) = None;
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<NodeSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for Service {
    async fn get_snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<NodeSnapshot>, Status> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(snapshot(&self.agent, seq)))
    }

    type WatchSnapshotsStream = SnapshotStream;

    async fn watch_snapshots(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchSnapshotsStream>, Status> {
        let peer = request.remote_addr();
        let terms = proto::delta::StreamTerms::of(request.get_ref());
        let min = terms.every;
        let agent = self.agent.clone();
        let epoch = self.epoch;
        let stop = self.stop.stopped();
        let mut samples = agent.samples();
        // Every GPU samples on the same grid; wait this long after the first sample of a tick
        // so one snapshot carries the whole tick.
        let settle = (agent.interval / 10).min(Duration::from_millis(5));
        tracing::info!(
            ?peer,
            min_interval_ms = min.as_millis() as u64,
            series = terms.wanted.count(),
            changes_only = terms.changes_only,
            heartbeat_ms = terms.heartbeat.as_millis() as u64,
            "collector subscribed"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let open = StreamOpen::new(&self.built);
        tokio::spawn(async move {
            tokio::pin!(stop);
            let built = &open.0;
            let mut seq = 0u64;
            let mut sent = proto::delta::Sender::new();
            // When the last message sent was taken, on this agent's clock: the pace holds on
            // the clock the messages carry (and the collector ages data by).
            let mut last_taken: Option<u64> = None;
            loop {
                // The current state at once, then after every tick's samples. A full channel
                // means a slow collector: skip this tick rather than queue stale state (the
                // next delta carries what changed since the last one sent); a closed one means
                // it went away. A heartbeat waits for its pace.
                match tx.try_reserve() {
                    Ok(permit) => {
                        let tick = *samples.borrow();
                        let snap = built.get(&agent, tick, &terms.wanted, seq);
                        let message = if terms.changes_only {
                            sent.next(snap)
                        } else {
                            snap
                        };
                        // A clock set back: due, as for the first message.
                        let since = last_taken
                            .and_then(|t| message.taken_unix_ns.checked_sub(t))
                            .map(Duration::from_nanos);
                        if terms.due(proto::delta::is_heartbeat(&message), since) {
                            last_taken = Some(message.taken_unix_ns);
                            permit.send(Ok(message));
                        }
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => break,
                }
                seq += 1;
                let sent_at = tokio::time::Instant::now();
                // A stream paced slower than the samples wakes once per turn (on the agent's
                // grid, `min` apart), not at every tick between (each wake costs this thread a
                // context switch), and reads the newest tick then; one whose node stopped
                // sampling waits for the next sample (no heartbeat: a heartbeat says the node
                // samples).
                if min > agent.interval {
                    let turn = next_turn(epoch, sent_at + min / 2, min);
                    tokio::select! {
                        _ = &mut stop => break,
                        () = tokio::time::sleep_until(turn) => {}
                    }
                    if matches!(samples.has_changed(), Ok(true)) {
                        samples.borrow_and_update();
                        continue;
                    }
                }
                tokio::select! {
                    _ = &mut stop => break,
                    changed = samples.changed() => if changed.is_err() { break },
                }
                tokio::time::sleep(settle).await;
                tokio::time::sleep_until(sent_at + min).await;
                samples.borrow_and_update();
            }
            tracing::info!(?peer, "collector stream ended");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Binds `addr` now, so a taken port fails the agent at start rather than after NVML is up.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    gpuscale_health::ops::bind(addr).map_err(|error| Error::Listen { addr, error })
}

/// Serves the agent API on `listener` until `stop` fires. Runs its own small tokio runtime;
/// call it from a dedicated thread.
/// With `tls`, the port speaks TLS (mutual TLS when it has a client CA).
pub fn serve(
    listener: std::net::TcpListener,
    tls: Option<Arc<ServerTls>>,
    agent: Arc<Node>,
    stop: Arc<Stop>,
) -> Result<()> {
    let addr = listener.local_addr().ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("grpc")
        .enable_all()
        .build()
        .map_err(|error| Error::Runtime {
            what: "the gRPC runtime",
            error,
        })?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|error| Error::Runtime {
                what: "the gRPC listener",
                error,
            })?;
        tracing::info!(?addr, tls = tls.is_some(), "serving the agent API");
        let incoming =
            gpuscale_health::tls::incoming(listener, tls, "--listen").map_err(|error| {
                Error::Runtime {
                    what: "the gRPC listener",
                    error,
                }
            })?;
        let (reporter, health) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::NotServing).await;
        tokio::spawn(report_health(reporter, agent.clone(), stop.clone()));
        let service = Service {
            agent,
            seq: AtomicU64::new(0),
            stop: stop.clone(),
            built: Arc::default(),
            epoch: tokio::time::Instant::now(),
        };
        let server = gpuscale_health::ops::grpc_server(MAX_STREAMS_PER_CONNECTION)
            .add_service(
                AgentServer::new(service)
                    .max_decoding_message_size(gpuscale_health::ops::MAX_REQUEST_BYTES),
            )
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, stop.stopped());
        // Streams end on stop; a client that never hangs up gets the grace period only.
        serve_until_stopped("the agent API", server, stop.stopped(), async {})
            .await
            .unwrap_or(Ok(()))
            .map_err(|e| Error::Serve { why: e.to_string() })
    })
}

/// Concurrent streams one connection may hold open on the agent's port: a collector holds one
/// snapshot stream per connection, `dump` and health checks a few more.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// How often `grpc.health.v1` re-reads readiness.
const HEALTH_PERIOD: Duration = Duration::from_millis(250);

/// Sets the status of the whole server (`""`) and of the agent API.
async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(<AgentServer<Service> as NamedService>::NAME, status)
        .await;
}

/// Keeps `grpc.health.v1` in step with [`crate::metrics::readiness`]: SERVING once every GPU
/// reported, NOT_SERVING from the moment `stop` fires.
async fn report_health(reporter: HealthReporter, agent: Arc<Node>, stop: Arc<Stop>) {
    let stopped = stop.stopped();
    tokio::pin!(stopped);
    let mut last = None;
    loop {
        let status = match crate::metrics::readiness(&agent) {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        if last != Some(status) {
            set_health(&reporter, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(HEALTH_PERIOD) => {}
        }
    }
    set_health(&reporter, ServingStatus::NotServing).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{Sample, Slot};
    use crate::shm::{Attribution, GpuInfo, ProcessEntry};

    const UID: &str = "0a0a0a0a-1111-4222-8333-444444444444";

    fn last(ms: &[MetricSummary], name: &str) -> Option<f64> {
        ms.iter()
            .find(|m| m.vocab_metric().map(Metric::name) == Some(name))
            .and_then(|m| m.last)
    }

    #[test]
    fn a_mig_instance_is_a_gpu_of_its_own_naming_its_parent_and_its_pods() {
        let parent = GpuInfo {
            uuid: "GPU-p".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            gpm_supported: true,
            mig_enabled: true,
            ..GpuInfo::default()
        };
        let instance = GpuInfo {
            uuid: "MIG-a".into(),
            name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb".into(),
            memory_total_bytes: 10 << 30,
            gpm_supported: true,
            parent_uuid: "GPU-p".into(),
            gpu_instance_id: Some(7),
            ..GpuInfo::default()
        };
        let agent = Node::for_tests(vec![parent, instance], Duration::from_millis(100));
        // What NVML gives: the parent's power (no utilization in MIG mode); the instance's GPM
        // and memory (no utilization, power or temperature).
        let mut p = Sample::empty(unix_now_ns(), GpuState::Ok);
        p.set(Slot::PowerWatts, 300.0);
        agent.record(0, &p, vec![]);
        let mut s = Sample::empty(unix_now_ns(), GpuState::Ok);
        s.set(Slot::SmActive, 40.0);
        s.set_vram_used(4 << 30);
        let process = ProcessEntry {
            pid: 11,
            used_memory_bytes: Some(3 << 30),
            pod_uid: Some(UID.into()),
            attribution: Attribution::Procfs,
            ..ProcessEntry::default()
        };
        agent.record(1, &s, vec![process]);

        let snap = snapshot(&agent, 0);
        let [g0, g1] = &snap.gpus[..] else {
            panic!("two GPUs: {:?}", snap.gpus)
        };
        assert!(g0.mig_enabled);
        assert_eq!((g0.parent_uuid.as_str(), g0.gpu_instance_id), ("", None));
        assert_eq!(last(&g0.metrics, "power_watts"), Some(300.0));
        assert_eq!(last(&g0.metrics, "gpu_util"), None);
        assert!(!g1.mig_enabled);
        assert_eq!(
            (g1.parent_uuid.as_str(), g1.gpu_instance_id),
            ("GPU-p", Some(7))
        );
        assert_eq!(g1.uuid, "MIG-a");
        // The pod is on the instance alone: the instance's values, under its MIG UUID.
        let [pod] = &snap.pods[..] else {
            panic!("one pod: {:?}", snap.pods)
        };
        assert_eq!(
            (pod.pod_uid.as_str(), pod.gpu_uuid.as_str()),
            (UID, "MIG-a")
        );
        assert_eq!(last(&pod.metrics, "sm_active"), Some(40.0));
        assert_eq!(
            last(&pod.metrics, "vram_used_bytes"),
            Some(4.0 * (1u64 << 30) as f64)
        );
        assert_eq!(last(&pod.metrics, "gpu_util"), None, "unavailable, never 0");
    }

    #[test]
    fn a_stream_with_interest_gets_only_the_series_it_names() {
        use proto::agent::{Interest, Series};
        let node = Node::for_tests(vec![GpuInfo::default()], Duration::from_millis(100));
        let mut s = Sample::empty(unix_now_ns(), GpuState::Ok);
        s.set(Slot::SmActive, 40.0);
        s.set(Slot::GpuUtil, 55.0);
        s.set(Slot::PowerWatts, 300.0);
        let process = ProcessEntry {
            pid: 11,
            pod_uid: Some(UID.into()),
            attribution: Attribution::Procfs,
            ..ProcessEntry::default()
        };
        node.record(0, &s, vec![process]);
        let series = |metric: Metric, window_s| Series {
            metric: proto::agent::Metric::from(metric) as i32,
            window_s,
        };
        let interest = Interest {
            series: vec![
                series(Metric::SmActive, 30),
                series(Metric::GpuUtil, 0),
                // A window and a metric this build does not know (a newer collector's): left out.
                series(Metric::PowerWatts, 7),
                Series {
                    metric: 99,
                    window_s: 0,
                },
            ],
            changes_only: true,
            heartbeat_ms: 0,
        };
        let wanted = Wanted::of(&interest);
        assert_eq!(wanted.count(), 2);
        let snap = snapshot_of(&node, 0, &wanted);
        for (owner, ms) in [
            ("GPU", &snap.gpus[0].metrics),
            ("pod", &snap.pods[0].metrics),
        ] {
            let names: Vec<_> = ms.iter().map(|m| m.vocab_metric().unwrap()).collect();
            assert_eq!(names, [Metric::SmActive, Metric::GpuUtil], "{owner}");
            let (sm, util) = (&ms[0], &ms[1]);
            assert_eq!(
                sm.last, None,
                "{owner}: sm_active's last value was not asked for"
            );
            let windows: Vec<u32> = sm.windows.iter().map(|w| w.window_s).collect();
            assert_eq!(windows, [30], "{owner}");
            assert_eq!((util.last, util.windows.len()), (Some(55.0), 0), "{owner}");
        }
        // No series named: every one, as GetSnapshot sends.
        let every = Wanted::of(&Interest::default());
        assert_eq!(every, Wanted::every());
        let (a, b) = (snapshot_of(&node, 0, &every), snapshot(&node, 0));
        assert_eq!(b.pods[0].metrics.len(), Metric::ALL.len());
        assert_eq!((a.gpus, a.pods), (b.gpus, b.pods));
    }

    #[test]
    fn paced_turns_fall_on_one_grid_every_pace_apart() {
        let epoch = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        let every = ms(500);
        // A stream that began off the grid joins it, at least half a pace after its first
        // message; then one turn per pace, wherever in it the message went out.
        for (sent, turn) in [
            (1_300, 2_000),
            (1_130, 1_500),
            (1_010, 1_500),
            (2_003, 2_500),
        ] {
            assert_eq!(
                next_turn(epoch, epoch + ms(sent) + every / 2, every),
                epoch + ms(turn),
                "sent at {sent} ms"
            );
        }
        assert_eq!(
            next_turn(epoch, epoch + ms(2_500), every),
            epoch + ms(2_500)
        );
        assert_eq!(next_turn(epoch, epoch, every), epoch);
    }

    #[test]
    fn streams_asking_the_same_series_in_one_tick_share_one_reading() {
        let node = Node::for_tests(vec![GpuInfo::default()], Duration::from_millis(100));
        let built = Arc::new(Built::default());
        let wanted = Wanted::lasts();
        let pause = || std::thread::sleep(Duration::from_millis(2));
        // One stream: nothing to share, nothing kept.
        let one = StreamOpen::new(&built);
        let a = built.get(&node, 7, &wanted, 0);
        pause();
        assert_ne!(
            built.get(&node, 7, &wanted, 1).taken_unix_ns,
            a.taken_unix_ns
        );
        assert!(gpuscale_health::ops::lock(&built.last).is_none());
        // Two: the second reads what the first built in that tick, as its own message.
        let two = StreamOpen::new(&built);
        let first = built.get(&node, 8, &wanted, 3);
        pause();
        let second = built.get(&node, 8, &wanted, 9);
        assert_eq!((second.taken_unix_ns, second.seq), (first.taken_unix_ns, 9));
        // Another tick, or other series: read again.
        pause();
        assert_ne!(
            built.get(&node, 9, &wanted, 4).taken_unix_ns,
            first.taken_unix_ns
        );
        let every = built.get(&node, 9, &Wanted::every(), 4);
        assert_eq!(every.gpus[0].metrics.len(), Metric::ALL.len());
        drop(two);
        assert!(
            gpuscale_health::ops::lock(&built.last).is_none(),
            "one stream left: the copy is freed"
        );
        drop(one);
    }

    #[test]
    fn the_ebpf_state_is_sent_typed_for_programs_and_in_words_for_people() {
        use crate::shm::{AgentStatus, EbpfState};
        use proto::agent::EbpfState as Wire;
        let node = Node::for_tests(vec![GpuInfo::default()], Duration::from_millis(100));
        for (state, reason, wire, words) in [
            (
                EbpfState::On,
                "fentry on do_sys_openat2",
                Wire::On,
                "on: fentry on do_sys_openat2",
            ),
            (EbpfState::Off, "", Wire::Off, "off"),
            (
                EbpfState::Unavailable,
                "BTF is missing",
                Wire::Unavailable,
                "unavailable: BTF is missing",
            ),
        ] {
            node.set_status(AgentStatus {
                ebpf: state,
                ebpf_reason: reason.into(),
                ..AgentStatus::default()
            });
            let snap = snapshot(&node, 0);
            assert_eq!(snap.ebpf_state(), wire);
            assert_eq!(Wire::vocab(snap.ebpf_state), state);
            assert_eq!(snap.ebpf_detail, reason);
            assert_eq!(snap.ebpf, words);
        }
    }
}
