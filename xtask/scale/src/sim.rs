//! Simulated agents: many nodes in one process, each serving the real agent API
//! (`gpuscale.agent.v1.Agent`, `proto/agent.proto`) on an address of its own, with snapshots
//! shaped as a real agent's for the same GPUs and pods (checked against one in
//! `tests/shape.rs`).
//!
//! A real agent assembles and encodes a snapshot for every interval; a simulator doing that for
//! thousands of nodes would take the cores the collector is measured on. So each node keeps its
//! snapshot encoded, and a tick only rewrites what changes every interval: the sample times
//! (9-byte varints patched in place) and `taken_unix_ns` and `seq`, appended last (protobuf
//! keeps the last value of a field). A change of a pod's value re-encodes the node. The
//! collector decodes exactly what it would decode from real agents of that size.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, DecodeContext, WireType};
use prost::Message;
use proto::agent::{
    Attribution, EbpfState, GpuState, GpuSummary, MetricSummary, NodeSnapshot, PodSummary,
    ProcessUsage, SnapshotRequest, WatchRequest,
};
use proto::series::Wanted;
use tonic::{Request, Response, Status};
use vocab::Metric;

/// The agent API revision the simulator speaks (the real agent's `API_VERSION`).
pub const API_VERSION: u32 = 4;
/// Memory of each simulated GPU (an H100 80GB HBM3 as NVML reports it), bytes.
pub const GPU_MEMORY_BYTES: u64 = 81_559 << 20;
/// A pod's `gpu_util` until [`Node::set_gpu_util`] changes it.
pub const DEFAULT_POD_GPU_UTIL: f64 = 20.0;

/// What every simulated node has.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// GPUs per node.
    pub gpus: usize,
    /// Pods per GPU, each with one process on it (more than one: the GPU is shared).
    pub pods_per_gpu: usize,
    /// The sampling interval: one snapshot per interval on every stream.
    pub interval: Duration,
}

impl Shape {
    /// Pods per node.
    pub fn pods(&self) -> usize {
        self.gpus * self.pods_per_gpu
    }
}

/// Name of simulated node `node`.
pub fn node_name(node: usize) -> String {
    format!("sim-node-{node:05}")
}

/// UUID of GPU `gpu` of node `node`.
pub fn gpu_uuid(node: usize, gpu: usize) -> String {
    format!("GPU-{node:08x}-{gpu:04x}-4000-8000-000000000000")
}

/// UID of pod `pod` (numbered across the node's GPUs, GPU-major) of node `node`.
pub fn pod_uid(node: usize, pod: usize) -> String {
    format!("{node:08x}-{pod:04x}-4000-8000-5ca1e0000000")
}

/// Container ID of pod `pod` of node `node` (64 hex digits, as containerd makes them).
pub fn container_id(node: usize, pod: usize) -> String {
    format!("{node:032x}{pod:032x}")
}

/// The PID of the process of pod `pod` (the same on every node: they are different hosts).
pub fn pid(pod: usize) -> u32 {
    4096 + pod as u32
}

/// A metric whose every statistic and last value are `v`, over every window.
fn steady(metric: Metric, v: f64, samples_per_s: u32) -> MetricSummary {
    MetricSummary::steady(metric, v, |w| w.secs() * samples_per_s)
}

/// The value of `metric` for a GPU, or a pod's share of one, at `util` % and `vram` bytes.
fn value(metric: Metric, util: f64, vram: u64) -> f64 {
    match metric {
        Metric::SmActive => util * 0.8,
        Metric::GpuUtil => util,
        Metric::SmOccupancy => util * 0.3,
        Metric::TensorActive => util * 0.6,
        Metric::DramActive => util * 0.4,
        Metric::MemUtil => util * 0.3,
        Metric::VramUsedBytes => vram as f64,
        Metric::VramUsedPct => vram as f64 * 100.0 / GPU_MEMORY_BYTES as f64,
        Metric::PowerWatts => 100.0 + util * 5.0,
        Metric::TemperatureC => 40.0 + util * 0.4,
    }
}

/// Memory each pod's process holds, bytes (18 GiB).
const POD_VRAM: u64 = 18 << 30;

/// Node `node`'s snapshot with pod `gpu_util` values `values` (one per pod), every sample taken
/// at `sample_ns` and the snapshot at `taken_ns`: what a real agent with these GPUs and pods
/// sends, with steady windows.
pub fn snapshot(
    node: usize,
    shape: &Shape,
    values: &[f64],
    seq: u64,
    sample_ns: u64,
    taken_ns: u64,
) -> NodeSnapshot {
    let samples_per_s = (1_000 / shape.interval.as_millis().max(1)) as u32;
    let shared = shape.pods_per_gpu > 1;
    let mut pods = Vec::with_capacity(shape.pods());
    let gpus = (0..shape.gpus)
        .map(|g| {
            let uuid = gpu_uuid(node, g);
            let mine = g * shape.pods_per_gpu..(g + 1) * shape.pods_per_gpu;
            let util = values[mine.clone()].iter().sum::<f64>().min(100.0);
            let vram = POD_VRAM * shape.pods_per_gpu as u64;
            for p in mine.clone() {
                pods.push(PodSummary {
                    pod_uid: pod_uid(node, p),
                    gpu_uuid: uuid.clone(),
                    container_ids: vec![container_id(node, p)],
                    pids: vec![pid(p)],
                    shared,
                    newest_sample_unix_ns: sample_ns,
                    // A real agent splits every metric of a GPU with GPM among its pods.
                    metrics: Metric::ALL
                        .map(|m| steady(m, value(m, values[p], POD_VRAM), samples_per_s))
                        .to_vec(),
                    attribution: Attribution::Procfs as i32,
                });
            }
            GpuSummary {
                index: g as u32,
                uuid,
                name: "NVIDIA H100 80GB HBM3".into(),
                state: GpuState::Ok as i32,
                gpm_supported: true,
                memory_total_bytes: GPU_MEMORY_BYTES,
                newest_sample_unix_ns: sample_ns,
                metrics: Metric::ALL
                    .map(|m| steady(m, value(m, util, vram), samples_per_s))
                    .to_vec(),
                processes: mine
                    .map(|p| ProcessUsage {
                        pid: pid(p),
                        used_memory_bytes: Some(POD_VRAM),
                        sm_util: Some(values[p]),
                        pod_uid: pod_uid(node, p),
                        container_id: container_id(node, p),
                        attribution: Attribution::Procfs as i32,
                    })
                    .collect(),
                ..GpuSummary::default()
            }
        })
        .collect();
    NodeSnapshot {
        api_version: API_VERSION,
        node_name: node_name(node),
        agent_version: concat!(env!("CARGO_PKG_VERSION"), "-sim").into(),
        driver_version: "580.159.04".into(),
        taken_unix_ns: taken_ns,
        interval_ns: shape.interval.as_nanos() as u64,
        seq,
        gpus,
        pods,
        ebpf: "off".into(),
        ebpf_state: EbpfState::Off as i32,
        ..NodeSnapshot::default()
    }
}

/// Field numbers of the sample times and of the per-snapshot fields (`proto/agent.proto`).
const GPU_NEWEST_SAMPLE: u32 = 7;
const POD_NEWEST_SAMPLE: u32 = 6;
const NODE_GPUS: u32 = 8;
const NODE_PODS: u32 = 9;
const NODE_TAKEN: u32 = 5;
const NODE_SEQ: u32 = 7;

/// Writes `v` (below 2⁶³) as a varint of exactly 9 bytes (padded with continuation bytes where
/// it is shorter; every protobuf decoder reads such a varint).
fn put_varint9(slot: &mut [u8], v: u64) {
    debug_assert!(v < 1 << 63);
    for (i, b) in slot.iter_mut().enumerate().take(8) {
        *b = ((v >> (7 * i)) as u8 & 0x7f) | 0x80;
    }
    slot[8] = (v >> 56) as u8 & 0x7f;
}

/// A node's snapshot encoded without its times, and where the sample times go.
struct Encoded {
    bytes: Vec<u8>,
    stamps: Vec<usize>,
}

/// `sub` (a GPU or pod entry, its sample time left out) as repeated field `field` of the
/// snapshot, followed inside it by a 9-byte sample time at an offset recorded in `stamps`.
fn push_entry(
    out: &mut Vec<u8>,
    field: u32,
    sub: &impl Message,
    stamp_field: u32,
    stamps: &mut Vec<usize>,
) {
    let mut body = sub.encode_to_vec();
    encode_key(stamp_field, WireType::Varint, &mut body);
    let at = body.len();
    body.extend_from_slice(&[0; 9]);
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(body.len() as u64, out);
    stamps.push(out.len() + at);
    out.extend_from_slice(&body);
}

fn encode(snap: NodeSnapshot) -> Encoded {
    let NodeSnapshot {
        mut gpus, mut pods, ..
    } = snap.clone();
    let head = NodeSnapshot {
        gpus: Vec::new(),
        pods: Vec::new(),
        taken_unix_ns: 0,
        seq: 0,
        ..snap
    };
    let mut bytes = head.encode_to_vec();
    let mut stamps = Vec::with_capacity(gpus.len() + pods.len());
    for g in &mut gpus {
        g.newest_sample_unix_ns = 0;
        push_entry(&mut bytes, NODE_GPUS, g, GPU_NEWEST_SAMPLE, &mut stamps);
    }
    for p in &mut pods {
        p.newest_sample_unix_ns = 0;
        push_entry(&mut bytes, NODE_PODS, p, POD_NEWEST_SAMPLE, &mut stamps);
    }
    Encoded { bytes, stamps }
}

/// An encoded `NodeSnapshot`, sent as it is (a `prost::Message` that only encodes).
#[derive(Clone, Debug, Default)]
pub struct Frame(pub Bytes);

impl Message for Frame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

struct State {
    values: Vec<f64>,
    /// The snapshot encoded with the series it carries (one reader asks for one set).
    encoded: Option<(Wanted, Encoded)>,
    seq: u64,
    /// Counts value changes, so a stream of changes knows whether its reader has them.
    version: u64,
}

/// One simulated node.
pub struct Node {
    /// Its number (names, UUIDs and UIDs derive from it).
    pub index: usize,
    shape: Shape,
    state: Mutex<State>,
}

impl Node {
    /// Node `index` with every pod at [`DEFAULT_POD_GPU_UTIL`].
    pub fn new(index: usize, shape: Shape) -> Node {
        Node {
            index,
            shape,
            state: Mutex::new(State {
                values: vec![DEFAULT_POD_GPU_UTIL; shape.pods()],
                encoded: None,
                seq: 0,
                version: 0,
            }),
        }
    }

    /// Sets pod `pod`'s `gpu_util` (every window and the last value); the next snapshot has it.
    pub fn set_gpu_util(&self, pod: usize, value: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.values[pod] = value;
        s.encoded = None;
        s.version += 1;
    }

    /// How many times values changed.
    fn version(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).version
    }

    /// The snapshot now, every series, encoded, and the next `seq`.
    pub fn frame(&self) -> Frame {
        self.next_frame(None, Wanted::every()).0
    }

    /// The next message of a stream whose reader has the values of version `has` (`None`: a
    /// stream of whole snapshots, or one that sent nothing yet): a heartbeat (a delta with the
    /// header alone, as a real agent sends when only sample times moved) when it has the
    /// current values, else the whole snapshot (a real agent would send the changed entries
    /// alone: whole is the dearer case for the collector), with the series `wanted`. Also the
    /// version it brings.
    pub fn next_frame(&self, has: Option<u64>, wanted: Wanted) -> (Frame, u64) {
        let now = unix_now_ns();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = s.seq;
        s.seq += 1;
        let version = s.version;
        if has == Some(version) {
            let heartbeat = NodeSnapshot {
                delta: true,
                ..snapshot(
                    self.index,
                    &Shape {
                        gpus: 0,
                        pods_per_gpu: 0,
                        ..self.shape
                    },
                    &[],
                    now,
                    seq,
                    now,
                )
            };
            return (Frame(heartbeat.encode_to_vec().into()), version);
        }
        if s.encoded.as_ref().is_none_or(|(w, _)| *w != wanted) {
            let mut snap = snapshot(self.index, &self.shape, &s.values, 0, 0, 0);
            for g in &mut snap.gpus {
                wanted.retain(&mut g.metrics);
            }
            for p in &mut snap.pods {
                wanted.retain(&mut p.metrics);
            }
            s.encoded = Some((wanted, encode(snap)));
        }
        let (_, e) = s.encoded.as_mut().expect("encoded above");
        for &at in &e.stamps {
            put_varint9(&mut e.bytes[at..at + 9], now);
        }
        let mut out = BytesMut::with_capacity(e.bytes.len() + 22);
        out.extend_from_slice(&e.bytes);
        encode_key(NODE_TAKEN, WireType::Varint, &mut out);
        encode_varint(now, &mut out);
        encode_key(NODE_SEQ, WireType::Varint, &mut out);
        encode_varint(seq, &mut out);
        (Frame(out.freeze()), version)
    }
}

/// What the simulated agents sent.
#[derive(Debug, Default)]
pub struct Sent {
    /// gRPC message bytes (5-byte frame header included), all streams.
    pub bytes: AtomicU64,
    /// Snapshots sent.
    pub snapshots: AtomicU64,
    /// Snapshots not sent because the collector had not taken the previous ones (a real agent
    /// skips them too: a slow reader gets the newest state, not a queue).
    pub skipped: AtomicU64,
    /// `Watch` streams opened (the collector asks again with a new stream).
    pub streams: AtomicU64,
}

/// The agent API of one simulated node.
#[derive(Clone)]
pub struct AgentService {
    node: Arc<Node>,
    sent: Arc<Sent>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl AgentService {
    /// The API of `node`, counting what it sends in `sent`.
    pub fn new(node: Arc<Node>, sent: Arc<Sent>) -> AgentService {
        AgentService { node, sent }
    }

    /// A snapshot at once and then one per interval (at least `min_interval_ms` apart), as
    /// `WatchSnapshots` of a real agent; skipped while the reader is behind.
    fn watch(
        &self,
        request: &WatchRequest,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<Frame, Status>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let node = self.node.clone();
        let sent = self.sent.clone();
        sent.streams.fetch_add(1, Ordering::Relaxed);
        let terms = proto::delta::StreamTerms::of(request);
        let every = node.shape.interval.max(terms.every);
        tokio::spawn(async move {
            // The first message at once; then turns on the node's own grid. A real agent
            // samples (and paces) on a grid that began when it started, so a cluster's agents
            // send spread over the interval, not in step, even when every stream was asked
            // again at the same moment; the node's number gives it its phase.
            let every_ns = every.as_nanos().max(1) as u64;
            let phase = (node.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % every_ns;
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_nanos(phase),
                every,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // The values the reader has (streams of changes only).
            let mut has = None;
            let mut last_sent: Option<tokio::time::Instant> = None;
            let mut first = true;
            loop {
                if !std::mem::take(&mut first) {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = tx.closed() => break,
                    }
                }
                // Nothing new: a heartbeat, at its pace (as a real agent).
                let quiet = has == Some(node.version());
                if !terms.due(quiet, last_sent.map(|t| t.elapsed())) {
                    continue;
                }
                let (frame, version) = node.next_frame(has, terms.wanted);
                let len = frame.0.len() as u64 + 5;
                match tx.try_send(Ok(frame)) {
                    Ok(()) => {
                        last_sent = Some(tokio::time::Instant::now());
                        sent.bytes.fetch_add(len, Ordering::Relaxed);
                        sent.snapshots.fetch_add(1, Ordering::Relaxed);
                        if terms.changes_only {
                            has = Some(version);
                        }
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        sent.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for AgentService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/gpuscale.agent.v1.Agent/WatchSnapshots" => {
                    let watch = tower::service_fn(move |r: Request<WatchRequest>| {
                        let stream = me.watch(r.get_ref());
                        async move { Ok::<_, Status>(Response::new(stream)) }
                    });
                    tonic::server::Grpc::new(
                        tonic_prost::ProstCodec::<Frame, WatchRequest>::default(),
                    )
                    .server_streaming(watch, req)
                    .await
                }
                "/gpuscale.agent.v1.Agent/GetSnapshot" => {
                    let get = tower::service_fn(move |_: Request<SnapshotRequest>| {
                        let frame = me.node.frame();
                        async move { Ok::<_, Status>(Response::new(frame)) }
                    });
                    tonic::server::Grpc::new(
                        tonic_prost::ProstCodec::<Frame, SnapshotRequest>::default(),
                    )
                    .unary(get, req)
                    .await
                }
                other => Status::unimplemented(format!("{other} is not simulated")).into_http(),
            })
        })
    }
}

impl tonic::server::NamedService for AgentService {
    const NAME: &'static str = "gpuscale.agent.v1.Agent";
}

/// The address of simulated node `node`: `127.1.X.Y:7701`, one loopback address per node, so
/// thousands of nodes need no port juggling (all of 127.0.0.0/8 is local on Linux).
pub fn address(node: usize) -> SocketAddr {
    let (hi, lo) = (node / 250, node % 250 + 1);
    SocketAddr::from((
        [127, 1 + (hi / 256) as u8, (hi % 256) as u8, lo as u8],
        7701,
    ))
}

/// Binds node `node`'s address now (so a taken one fails the run at once, naming it).
pub fn bind(node: usize) -> anyhow::Result<std::net::TcpListener> {
    let addr = address(node);
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("simulated node {node}: could not listen on {addr}: {e}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `service` on `listener` until the runtime stops.
pub async fn serve(listener: std::net::TcpListener, service: AgentService) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
