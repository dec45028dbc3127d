//! The ring file at `--shm`: creating, reusing, validating and mapping it.
//!
//! This module owns the header and per-GPU region layout drawn in [`crate::ring`], the writer's
//! exclusive lock (`<path>.lock`, an `flock` the kernel drops when the agent dies), and the
//! read-only view `dump` uses. It never interprets samples; [`crate::ring::Ring`] does.
//!
//! A new layout is written to `<path>.tmp-<pid>` and renamed over `path`, so a reader that has
//! the old file mapped keeps a valid mapping (truncating a mapped file would SIGBUS it).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::{Pod, Zeroable};
use memmap2::{Mmap, MmapMut};

use crate::ring::{seq_read, seq_write, Ring, SLOT_WORDS};
use crate::sample::GpuState;
use crate::{Error, Result};

/// First bytes of every ring file.
pub const MAGIC: [u8; 8] = *b"GPUSCRNG";
/// Version of the layout described in [`crate::ring`]; bump on any change.
pub const LAYOUT_VERSION: u32 = 3;
/// Process entries kept in each GPU's snapshot.
pub const MAX_PROCESSES: usize = 64;

const PAGE: usize = 4096;
const LINE: usize = 64;
const HEAD_OFFSET: usize = 0;
const STATE_OFFSET: usize = LINE;
const PROCS_OFFSET: usize = 2 * LINE;
/// Words of one process entry: pid|flags, used memory, sm_util bits, pod UID (16 bytes),
/// container ID (32 bytes).
const PROC_ENTRY_WORDS: usize = 9;
/// Words of the process snapshot payload: count, ts_ns, entries.
const PROCS_WORDS: usize = 2 + MAX_PROCESSES * PROC_ENTRY_WORDS;

/// The fixed part of the file header. 256 bytes, no implicit padding.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct FileHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`].
    pub layout_version: u32,
    /// Bytes before the first GPU region (page aligned).
    pub header_bytes: u32,
    /// Bytes of one sample record.
    pub record_bytes: u32,
    /// Slots per GPU ring (a power of two).
    pub capacity: u32,
    /// GPUs in the file.
    pub gpu_count: u32,
    /// Process entries per snapshot.
    pub max_processes: u32,
    /// Bytes of one GPU region.
    pub region_bytes: u64,
    /// Sampling interval of the writer, nanoseconds.
    pub interval_ns: u64,
    /// When the file was created, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
    /// Node name, NUL padded.
    pub node_name: [u8; 64],
    /// NVIDIA driver version, NUL padded.
    pub driver_version: [u8; 32],
    /// Reserved; zero.
    pub _reserved: [u8; 104],
}

const _: () = assert!(std::mem::size_of::<FileHeader>() == 256);

/// One GPU table entry. 256 bytes, no implicit padding.
///
/// A MIG instance has an entry (and a region) of its own, after its parent's. The MIG fields
/// sit in what layout version 3 first reserved: zero there means a physical GPU without MIG, so
/// files of agents that predate MIG read the same, and the layout version stays 3.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct GpuEntry {
    /// NVML index (a MIG instance: its parent's).
    pub index: u32,
    /// Bit 0: GPM supported. Bit 1: MIG mode enabled (a physical GPU). Bit 2: `gpu_instance_id`
    /// is known (a MIG instance).
    pub flags: u32,
    /// Total device memory, bytes (0 when unknown).
    pub memory_total_bytes: u64,
    /// UUID, NUL padded.
    pub uuid: [u8; 96],
    /// Product name, NUL padded.
    pub name: [u8; 96],
    /// A MIG instance: 1 + the table position of its parent GPU; 0 for a physical GPU.
    pub parent: u32,
    /// A MIG instance: its GPU instance ID on the parent (when flag bit 2 is set).
    pub gpu_instance_id: u32,
    /// Reserved; zero.
    pub _reserved: [u8; 40],
}

const _: () = assert!(std::mem::size_of::<GpuEntry>() == 256);
const _: () = assert!(std::mem::offset_of!(GpuEntry, parent) == 208);

const FLAG_GPM: u32 = 1;
const FLAG_MIG_ENABLED: u32 = 1 << 1;
const FLAG_GPU_INSTANCE_ID: u32 = 1 << 2;

/// What the agent knows about a GPU (or a MIG instance, sampled as a GPU of its own) when it
/// creates the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuInfo {
    /// NVML index (a MIG instance: its parent's).
    pub index: u32,
    /// UUID (`GPU-…`, a MIG instance's `MIG-…`), or empty when NVML could not say.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Total device memory, bytes (0 when unknown); a MIG instance's own share.
    pub memory_total_bytes: u64,
    /// Whether GPM metrics are available.
    pub gpm_supported: bool,
    /// MIG: the UUID of the physical GPU this MIG instance is part of; empty for a physical GPU.
    pub parent_uuid: String,
    /// MIG: the GPU instance ID of this instance on its parent (`nvmlDeviceGetGpuInstanceId`);
    /// `None` for a physical GPU, or when NVML could not say.
    pub gpu_instance_id: Option<u32>,
    /// MIG mode of a physical GPU is enabled (its instances follow it as GPUs of their own).
    pub mig_enabled: bool,
}

impl GpuInfo {
    /// Whether this is a MIG instance rather than a physical GPU.
    pub fn is_mig_instance(&self) -> bool {
        !self.parent_uuid.is_empty()
    }
}

impl GpuEntry {
    /// The entry of `info`, whose parent (for a MIG instance) is looked up in `table`, the
    /// whole list being written.
    fn from_info(info: &GpuInfo, table: &[GpuInfo]) -> GpuEntry {
        let mut e = GpuEntry::zeroed();
        e.index = info.index;
        for (on, flag) in [
            (info.gpm_supported, FLAG_GPM),
            (info.mig_enabled, FLAG_MIG_ENABLED),
            (info.gpu_instance_id.is_some(), FLAG_GPU_INSTANCE_ID),
        ] {
            if on {
                e.flags |= flag;
            }
        }
        e.memory_total_bytes = info.memory_total_bytes;
        put_str(&mut e.uuid, &info.uuid);
        put_str(&mut e.name, &info.name);
        if info.is_mig_instance() {
            // The sampler lists every MIG instance after its parent, so the parent is found.
            e.parent = table
                .iter()
                .position(|g| !g.is_mig_instance() && g.uuid == info.parent_uuid)
                .map_or(0, |p| p as u32 + 1);
        }
        e.gpu_instance_id = info.gpu_instance_id.unwrap_or(0);
        e
    }

    /// The entry's info; `table` holds the entries of the whole file (for the parent's UUID).
    fn info(&self, table: &[GpuEntry]) -> GpuInfo {
        let parent = (self.parent as usize)
            .checked_sub(1)
            .and_then(|p| table.get(p));
        GpuInfo {
            index: self.index,
            uuid: get_str(&self.uuid),
            name: get_str(&self.name),
            memory_total_bytes: self.memory_total_bytes,
            gpm_supported: self.flags & FLAG_GPM != 0,
            parent_uuid: parent.map(|p| get_str(&p.uuid)).unwrap_or_default(),
            gpu_instance_id: (self.flags & FLAG_GPU_INSTANCE_ID != 0)
                .then_some(self.gpu_instance_id),
            mig_enabled: self.flags & FLAG_MIG_ENABLED != 0,
        }
    }
}

/// Writes the GPU table of `gpus` into `map` (the file's bytes).
fn write_gpu_table(map: &mut [u8], gpus: &[GpuInfo]) {
    for (i, g) in gpus.iter().enumerate() {
        let at = 256 + i * 256;
        map[at..at + 256].copy_from_slice(bytemuck::bytes_of(&GpuEntry::from_info(g, gpus)));
    }
}

fn put_str(dst: &mut [u8], s: &str) {
    let mut n = s.len().min(dst.len() - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn get_str(src: &[u8]) -> String {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}

/// Parameters of a ring file.
#[derive(Clone, Debug)]
pub struct Params {
    /// Slots per GPU (rounded up to a power of two).
    pub capacity: u32,
    /// Sampling interval, nanoseconds.
    pub interval_ns: u64,
    /// Node name.
    pub node_name: String,
    /// Driver version.
    pub driver_version: String,
}

/// Slots needed to keep `history` of samples at `interval`, as a power of two, at least 1024.
pub fn capacity_for(interval: std::time::Duration, history: std::time::Duration) -> u32 {
    let n = history.as_nanos().div_ceil(interval.as_nanos().max(1));
    (n.clamp(1024, 1 << 22) as u32).next_power_of_two()
}

fn region_bytes(capacity: u32) -> usize {
    (slots_offset() + capacity as usize * SLOT_WORDS * 8).next_multiple_of(PAGE)
}

fn slots_offset() -> usize {
    (PROCS_OFFSET + (1 + PROCS_WORDS) * 8).next_multiple_of(LINE)
}

fn header_bytes(gpu_count: usize) -> usize {
    (256 + gpu_count * 256).next_multiple_of(PAGE)
}

/// How a process was tied (or not) to a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Source {
    /// Not looked up yet.
    #[default]
    None = 0,
    /// From `/proc/<pid>/cgroup`.
    Procfs = 1,
    /// From the eBPF device-open tracker.
    Ebpf = 2,
    /// Looked up, but the process's cgroup could not be read (it exited, or no permission).
    Unknown = 3,
}

impl Source {
    /// The name dumps and the API use (`procfs`, `ebpf`, `unknown`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Procfs => "procfs",
            Source::Ebpf => "ebpf",
            Source::Unknown => "unknown",
        }
    }

    fn from_code(code: u64) -> Source {
        match code {
            1 => Source::Procfs,
            2 => Source::Ebpf,
            3 => Source::Unknown,
            _ => Source::None,
        }
    }
}

/// A running process on a GPU, as kept in the snapshot.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ProcessEntry {
    /// Host PID.
    pub pid: u32,
    /// Device memory used, bytes (`None` when NVML could not say).
    pub used_memory_bytes: Option<u64>,
    /// SM utilization, percent, from NVML's per-process samples (`None` when not measured).
    pub sm_util: Option<f32>,
    /// The pod's UID (dashed form) when the process is in a pod.
    pub pod_uid: Option<String>,
    /// The container's 64-hex ID when known.
    pub container_id: Option<String>,
    /// How the pod was found.
    pub source: Source,
}

/// Hex text (dashes ignored) into `out`; `false` unless it is exactly `out.len()` bytes of hex.
fn hex_to(text: &str, out: &mut [u8]) -> bool {
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if digits.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(digits.chunks(2)) {
        let Ok(byte) = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("x"), 16) else {
            return false;
        };
        *o = byte;
    }
    true
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn uid_text(b: &[u8; 16]) -> String {
    let h = to_hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn words_to_bytes<const N: usize>(w: &[u64]) -> [u8; N] {
    let mut out = [0u8; N];
    for (chunk, word) in out.chunks_mut(8).zip(w) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

fn bytes_to_words(b: &[u8], w: &mut [u64]) {
    for (word, chunk) in w.iter_mut().zip(b.chunks(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(chunk);
        *word = u64::from_le_bytes(a);
    }
}

/// The processes on one GPU at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSnapshot {
    /// When the list was read, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Processes (at most [`MAX_PROCESSES`]).
    pub processes: Vec<ProcessEntry>,
    /// Processes NVML reported beyond [`MAX_PROCESSES`].
    pub truncated: u32,
}

/// Encodes the snapshot; returns the words and how many of them carry data (the rest of the
/// cell need not be rewritten).
fn encode_procs(snap: &ProcessSnapshot) -> ([u64; PROCS_WORDS], usize) {
    let mut w = [0u64; PROCS_WORDS];
    let n = snap.processes.len().min(MAX_PROCESSES);
    w[0] = n as u64 | (u64::from(snap.truncated) << 32);
    w[1] = snap.ts_ns;
    for (i, p) in snap.processes.iter().take(n).enumerate() {
        let e = &mut w[2 + i * PROC_ENTRY_WORDS..2 + (i + 1) * PROC_ENTRY_WORDS];
        let mut uid = [0u8; 16];
        let mut cid = [0u8; 32];
        let has_uid = p.pod_uid.as_deref().is_some_and(|t| hex_to(t, &mut uid));
        let has_cid = p
            .container_id
            .as_deref()
            .is_some_and(|t| hex_to(t, &mut cid));
        let flags = u64::from(p.used_memory_bytes.is_some())
            | u64::from(p.sm_util.is_some()) << 1
            | u64::from(has_uid) << 2
            | u64::from(has_cid) << 3
            | (p.source as u64) << 8;
        e[0] = u64::from(p.pid) | flags << 32;
        e[1] = p.used_memory_bytes.unwrap_or(0);
        e[2] = u64::from(p.sm_util.unwrap_or(0.0).to_bits());
        bytes_to_words(&uid, &mut e[3..5]);
        bytes_to_words(&cid, &mut e[5..9]);
    }
    (w, 2 + n * PROC_ENTRY_WORDS)
}

fn decode_procs(w: &[u64; PROCS_WORDS]) -> ProcessSnapshot {
    let n = ((w[0] & 0xffff_ffff) as usize).min(MAX_PROCESSES);
    let processes = (0..n)
        .map(|i| {
            let e = &w[2 + i * PROC_ENTRY_WORDS..2 + (i + 1) * PROC_ENTRY_WORDS];
            let flags = e[0] >> 32;
            ProcessEntry {
                pid: e[0] as u32,
                used_memory_bytes: (flags & 1 != 0).then_some(e[1]),
                sm_util: (flags & 2 != 0).then(|| f32::from_bits(e[2] as u32)),
                pod_uid: (flags & 4 != 0).then(|| uid_text(&words_to_bytes(&e[3..5]))),
                container_id: (flags & 8 != 0).then(|| to_hex(&words_to_bytes::<32>(&e[5..9]))),
                source: Source::from_code((flags >> 8) & 0xff),
            }
        })
        .collect();
    ProcessSnapshot {
        ts_ns: w[1],
        processes,
        truncated: (w[0] >> 32) as u32,
    }
}

/// GPU device opens kept in the agent area (the newest).
pub const MAX_OPENS: usize = 128;
/// Words of one device-open entry.
const OPEN_WORDS: usize = 14;
/// Bytes of the eBPF status reason.
const REASON_BYTES: usize = 120;
/// Words of the agent area payload: state, events, dropped, count, reason, entries.
const AGENT_WORDS: usize = 4 + REASON_BYTES / 8 + MAX_OPENS * OPEN_WORDS;
/// Bytes of the agent area at the end of the file (stamp + payload, page aligned).
const AGENT_AREA_BYTES: usize = ((1 + AGENT_WORDS) * 8).next_multiple_of(PAGE);

fn agent_area_offset(h: &FileHeader) -> usize {
    h.header_bytes as usize + h.region_bytes as usize * h.gpu_count as usize
}

/// Whether the agent's eBPF device-open tracker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EbpfState {
    /// Not reported (an agent that has not started its tracker yet).
    #[default]
    Unknown = 0,
    /// Loaded and attached.
    On = 1,
    /// Turned off with `--ebpf off`.
    Off = 2,
    /// `--ebpf auto` could not load it; the reason says why; procfs is used.
    Unavailable = 3,
}

impl EbpfState {
    /// The name dumps use.
    pub fn name(self) -> &'static str {
        match self {
            EbpfState::Unknown => "unknown",
            EbpfState::On => "on",
            EbpfState::Off => "off",
            EbpfState::Unavailable => "unavailable",
        }
    }

    fn from_code(c: u64) -> EbpfState {
        match c {
            1 => EbpfState::On,
            2 => EbpfState::Off,
            3 => EbpfState::Unavailable,
            _ => EbpfState::Unknown,
        }
    }
}

/// One process that opened a GPU device file, as the eBPF tracker saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceOpen {
    /// Process (thread-group) ID.
    pub tgid: u32,
    /// Command name (up to 15 bytes).
    pub comm: String,
    /// The opened path after the device prefix (`0`, `ctl`, `-uvm`, …; up to 16 bytes).
    pub device: String,
    /// The cgroup the process ran in.
    pub cgroup_id: u64,
    /// Whether that cgroup still existed when last looked up (else the pod is unknown).
    pub cgroup_known: bool,
    /// The pod's UID, when the cgroup is a pod's.
    pub pod_uid: Option<String>,
    /// The container's ID, when known.
    pub container_id: Option<String>,
    /// First open, ns since the Unix epoch.
    pub first_open_ns: u64,
    /// Latest open, ns since the Unix epoch.
    pub last_open_ns: u64,
    /// Whether the process has exited.
    pub exited: bool,
}

/// Agent-wide status kept at the end of the ring file for `dump`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentStatus {
    /// The eBPF tracker's state.
    pub ebpf: EbpfState,
    /// Why eBPF is unavailable (empty otherwise).
    pub ebpf_reason: String,
    /// Device-open events received from the kernel.
    pub events: u64,
    /// Events the kernel dropped because the ring buffer was full.
    pub dropped: u64,
    /// Recent device opens, newest last (at most [`MAX_OPENS`]).
    pub opens: Vec<DeviceOpen>,
}

fn str_words<const N: usize>(text: &str, out: &mut [u64]) {
    let mut b = [0u8; N];
    put_str(&mut b, text);
    bytes_to_words(&b, out);
}

fn encode_status(st: &AgentStatus) -> ([u64; AGENT_WORDS], usize) {
    let mut w = [0u64; AGENT_WORDS];
    let n = st.opens.len().min(MAX_OPENS);
    w[0] = st.ebpf as u64;
    w[1] = st.events;
    w[2] = st.dropped;
    w[3] = n as u64;
    str_words::<REASON_BYTES>(&st.ebpf_reason, &mut w[4..4 + REASON_BYTES / 8]);
    let base = 4 + REASON_BYTES / 8;
    let skip = st.opens.len() - n;
    for (i, o) in st.opens.iter().skip(skip).enumerate() {
        let e = &mut w[base + i * OPEN_WORDS..base + (i + 1) * OPEN_WORDS];
        let mut uid = [0u8; 16];
        let mut cid = [0u8; 32];
        let has_uid = o.pod_uid.as_deref().is_some_and(|t| hex_to(t, &mut uid));
        let has_cid = o
            .container_id
            .as_deref()
            .is_some_and(|t| hex_to(t, &mut cid));
        let flags = u64::from(o.exited)
            | u64::from(has_uid) << 1
            | u64::from(has_cid) << 2
            | u64::from(o.cgroup_known) << 3;
        e[0] = u64::from(o.tgid) | flags << 32;
        str_words::<16>(&o.comm, &mut e[1..3]);
        str_words::<16>(&o.device, &mut e[3..5]);
        e[5] = o.cgroup_id;
        bytes_to_words(&uid, &mut e[6..8]);
        bytes_to_words(&cid, &mut e[8..12]);
        e[12] = o.first_open_ns;
        e[13] = o.last_open_ns;
    }
    (w, base + n * OPEN_WORDS)
}

fn decode_status(w: &[u64; AGENT_WORDS]) -> AgentStatus {
    let n = (w[3] as usize).min(MAX_OPENS);
    let base = 4 + REASON_BYTES / 8;
    let opens = (0..n)
        .map(|i| {
            let e = &w[base + i * OPEN_WORDS..base + (i + 1) * OPEN_WORDS];
            let flags = e[0] >> 32;
            DeviceOpen {
                tgid: e[0] as u32,
                comm: get_str(&words_to_bytes::<16>(&e[1..3])),
                device: get_str(&words_to_bytes::<16>(&e[3..5])),
                cgroup_id: e[5],
                cgroup_known: flags & 8 != 0,
                pod_uid: (flags & 2 != 0).then(|| uid_text(&words_to_bytes(&e[6..8]))),
                container_id: (flags & 4 != 0).then(|| to_hex(&words_to_bytes::<32>(&e[8..12]))),
                first_open_ns: e[12],
                last_open_ns: e[13],
                exited: flags & 1 != 0,
            }
        })
        .collect();
    AgentStatus {
        ebpf: EbpfState::from_code(w[0]),
        ebpf_reason: get_str(&words_to_bytes::<REASON_BYTES>(&w[4..4 + REASON_BYTES / 8])),
        events: w[1],
        dropped: w[2],
        opens,
    }
}

/// The agent-wide area at the end of a mapped file: one seqlock cell.
pub struct AgentArea<'a> {
    cell: &'a [AtomicU64],
}

impl AgentArea<'_> {
    /// Publishes the status (writer only); `version` must increase per call.
    pub fn write(&self, version: u64, status: &AgentStatus) {
        let (words, used) = encode_status(status);
        seq_write(&self.cell[..=used], version, &words[..used]);
    }

    /// The latest status; `None` when never written (or the writer kept rewriting it).
    pub fn read(&self) -> Option<AgentStatus> {
        let mut w = [0u64; AGENT_WORDS];
        (0..16).find_map(|_| seq_read(self.cell, &mut w).map(|_| decode_status(&w)))
    }
}

fn agent_area_of<'a>(header: &FileHeader, base: *const u8, len: usize) -> AgentArea<'a> {
    let start = agent_area_offset(header);
    assert!(start + AGENT_AREA_BYTES <= len);
    // SAFETY: as in `regions_of`: a page-aligned mapping of `len` bytes that outlives 'a,
    // `start` is page aligned, the range is in bounds (asserted), accessed only through atomics.
    let cell =
        unsafe { std::slice::from_raw_parts(base.add(start) as *const AtomicU64, 1 + AGENT_WORDS) };
    AgentArea { cell }
}

/// A validated view of one GPU's region in a mapped file.
pub struct Region<'a> {
    words: &'a [AtomicU64],
    capacity: usize,
}

impl<'a> Region<'a> {
    /// The GPU's sample ring.
    pub fn ring(&self) -> Ring<'a> {
        let at = slots_offset() / 8;
        Ring::new(
            &self.words[HEAD_OFFSET / 8],
            &self.words[at..at + self.capacity * SLOT_WORDS],
        )
    }

    /// The GPU's state as the writer last published it.
    pub fn state(&self) -> GpuState {
        // Relaxed: a standalone status word; no other data hangs off it.
        GpuState::from_code(self.words[STATE_OFFSET / 8].load(Ordering::Relaxed) as u32)
    }

    /// Publishes the GPU's state (writer only).
    pub fn set_state(&self, state: GpuState) {
        // Relaxed: see `state`.
        self.words[STATE_OFFSET / 8].store(state as u64, Ordering::Relaxed);
    }

    fn procs_cell(&self) -> &'a [AtomicU64] {
        &self.words[PROCS_OFFSET / 8..PROCS_OFFSET / 8 + 1 + PROCS_WORDS]
    }

    /// The latest process snapshot; `None` when none was written yet or the writer kept
    /// rewriting it during every attempt.
    pub fn processes(&self) -> Option<ProcessSnapshot> {
        let mut w = [0u64; PROCS_WORDS];
        (0..16).find_map(|_| seq_read(self.procs_cell(), &mut w).map(|_| decode_procs(&w)))
    }

    /// Publishes a process snapshot (writer only); `version` must increase per call.
    pub fn write_processes(&self, version: u64, snap: &ProcessSnapshot) {
        let (words, used) = encode_procs(snap);
        seq_write(&self.procs_cell()[..=used], version, &words[..used]);
    }
}

/// The parts of a mapped ring file shared by the writer and readers.
struct Layout {
    header: FileHeader,
    gpus: Vec<GpuInfo>,
}

fn parse_layout(path: &Path, bytes: &[u8]) -> Result<Layout> {
    let bad = |why: String| Error::BadRingFile {
        path: path.to_owned(),
        why,
    };
    if bytes.len() < 256 {
        return Err(bad(format!(
            "{} bytes is too short for a gpuscale ring header",
            bytes.len()
        )));
    }
    let header: FileHeader = bytemuck::pod_read_unaligned(&bytes[..256]);
    if header.magic != MAGIC {
        return Err(bad(
            "it is not a gpuscale ring file (wrong magic bytes); point --shm at the agent's ring"
                .into(),
        ));
    }
    if header.layout_version != LAYOUT_VERSION {
        return Err(bad(format!(
            "it has ring layout version {}, this binary reads version {LAYOUT_VERSION}; use the \
             gpuscale-agent binary that wrote it",
            header.layout_version
        )));
    }
    let gpu_count = header.gpu_count as usize;
    if gpu_count > 1024
        || header.header_bytes as usize != header_bytes(gpu_count)
        || header.record_bytes as usize != std::mem::size_of::<crate::sample::Sample>()
        || header.max_processes as usize != MAX_PROCESSES
        || !header.capacity.is_power_of_two()
        || header.region_bytes as usize != region_bytes(header.capacity)
    {
        return Err(bad(
            "its header is inconsistent (corrupted or written by a different build)".into(),
        ));
    }
    let want = agent_area_offset(&header) as u64 + AGENT_AREA_BYTES as u64;
    if (bytes.len() as u64) < want {
        return Err(bad(format!(
            "it is truncated: {} bytes, the header needs {want}",
            bytes.len()
        )));
    }
    let entries: Vec<GpuEntry> = (0..gpu_count)
        .map(|i| {
            let at = 256 + i * 256;
            bytemuck::pod_read_unaligned::<GpuEntry>(&bytes[at..at + 256])
        })
        .collect();
    let gpus = entries.iter().map(|e| e.info(&entries)).collect();
    Ok(Layout { header, gpus })
}

fn regions_of<'a>(h: &FileHeader, base: *const u8, len: usize) -> Vec<Region<'a>> {
    (0..h.gpu_count as usize)
        .map(|i| {
            let start = h.header_bytes as usize + i * h.region_bytes as usize;
            let n = h.region_bytes as usize / 8;
            assert!(start + n * 8 <= len);
            // SAFETY: `base` is a page-aligned mapping of `len` bytes that outlives 'a (the
            // caller ties 'a to the mapping); `start` is a multiple of 8 and the range is in
            // bounds (asserted). Every access to the words goes through atomics, which is how
            // the other process (or thread) writes them too.
            let words =
                unsafe { std::slice::from_raw_parts(base.add(start) as *const AtomicU64, n) };
            Region {
                words,
                capacity: h.capacity as usize,
            }
        })
        .collect()
}

fn now_ns() -> u64 {
    crate::unix_now_ns()
}

/// The agent's writable, exclusively locked ring file.
pub struct ShmWriter {
    path: PathBuf,
    header: FileHeader,
    gpus: Vec<GpuInfo>,
    map: MmapMut,
    reused: bool,
    _lock: File,
}

impl std::fmt::Debug for ShmWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmWriter")
            .field("path", &self.path)
            .finish()
    }
}

/// Path of the lock file that marks a live writer.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a valid open descriptor owned by `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

impl ShmWriter {
    /// Opens `path` for writing: takes the writer lock, reuses the file when its layout matches
    /// `params` and `gpus` (so history survives an agent restart), and otherwise writes a fresh
    /// file.
    pub fn open(path: &Path, params: &Params, gpus: &[GpuInfo]) -> Result<ShmWriter> {
        let io = |what: &'static str| {
            let path = path.to_owned();
            move |error| Error::Shm { path, what, error }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("create its directory"))?;
        }
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path(path))
            .map_err(io("create its lock file"))?;
        if !flock(&lock, libc::LOCK_EX).map_err(io("lock"))? {
            return Err(Error::ShmBusy {
                path: path.to_owned(),
            });
        }
        let capacity = params.capacity.next_power_of_two();
        if let Some(w) = Self::reuse(path, params, capacity, gpus, &lock)? {
            return Ok(w);
        }
        let count = gpus.len();
        let mut header = FileHeader::zeroed();
        header.magic = MAGIC;
        header.layout_version = LAYOUT_VERSION;
        header.header_bytes = header_bytes(count) as u32;
        header.record_bytes = std::mem::size_of::<crate::sample::Sample>() as u32;
        header.capacity = capacity;
        header.gpu_count = count as u32;
        header.max_processes = MAX_PROCESSES as u32;
        header.region_bytes = region_bytes(capacity) as u64;
        header.interval_ns = params.interval_ns;
        header.created_unix_ns = now_ns();
        put_str(&mut header.node_name, &params.node_name);
        put_str(&mut header.driver_version, &params.driver_version);
        let total = agent_area_offset(&header) as u64 + AGENT_AREA_BYTES as u64;

        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create"))?;
        file.set_len(total).map_err(io("size"))?;
        // SAFETY: the file is ours (a fresh temp name, under the writer lock) and nothing else
        // truncates it while mapped.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io("map"))?;
        write_gpu_table(&mut map, gpus);
        map[..256].copy_from_slice(bytemuck::bytes_of(&header));
        std::fs::rename(&tmp, path).map_err(io("rename into place"))?;
        Ok(ShmWriter {
            path: path.to_owned(),
            header,
            gpus: gpus.to_vec(),
            map,
            reused: false,
            _lock: lock,
        })
    }

    fn reuse(
        path: &Path,
        params: &Params,
        capacity: u32,
        gpus: &[GpuInfo],
        lock: &File,
    ) -> Result<Option<ShmWriter>> {
        let Ok(file) = OpenOptions::new().read(true).write(true).open(path) else {
            return Ok(None);
        };
        // SAFETY: we hold the writer lock, so no other agent resizes the file; readers only map.
        let Ok(map) = (unsafe { MmapMut::map_mut(&file) }) else {
            return Ok(None);
        };
        let Ok(layout) = parse_layout(path, &map) else {
            tracing::info!(path = %path.display(), "existing ring file is not reusable; writing a new one");
            return Ok(None);
        };
        let same = layout.header.capacity == capacity
            && layout.header.interval_ns == params.interval_ns
            && layout.gpus.len() == gpus.len()
            && layout.gpus.iter().zip(gpus).all(|(a, b)| {
                a.uuid == b.uuid
                    && a.index == b.index
                    && a.parent_uuid == b.parent_uuid
                    && a.gpu_instance_id == b.gpu_instance_id
            });
        if !same {
            tracing::info!(path = %path.display(), "existing ring file has other GPUs or another interval; writing a new one");
            return Ok(None);
        }
        let mut header = layout.header;
        put_str(&mut header.driver_version, &params.driver_version);
        let lock = lock.try_clone().map_err(|error| Error::Shm {
            path: path.to_owned(),
            what: "lock",
            error,
        })?;
        let mut w = ShmWriter {
            path: path.to_owned(),
            header,
            gpus: gpus.to_vec(),
            map,
            reused: true,
            _lock: lock,
        };
        w.map[..256].copy_from_slice(bytemuck::bytes_of(&header));
        write_gpu_table(&mut w.map, gpus);
        Ok(Some(w))
    }

    /// Whether an existing file's history was kept.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The GPUs in the file, in region order.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// The regions, one per GPU.
    pub fn regions(&self) -> Vec<Region<'_>> {
        regions_of(&self.header, self.map.as_ptr(), self.map.len())
    }

    /// Slots per GPU.
    pub fn capacity(&self) -> u32 {
        self.header.capacity
    }

    /// The agent-wide status area.
    pub fn agent_area(&self) -> AgentArea<'_> {
        agent_area_of(&self.header, self.map.as_ptr(), self.map.len())
    }
}

/// A read-only view of a ring file, as `dump` uses it.
pub struct ShmReader {
    header: FileHeader,
    gpus: Vec<GpuInfo>,
    map: Mmap,
    writer_alive: bool,
}

impl ShmReader {
    /// Maps `path` read-only and validates it.
    pub fn open(path: &Path) -> Result<ShmReader> {
        let file = File::open(path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                Error::ShmMissing {
                    path: path.to_owned(),
                }
            } else {
                Error::Shm {
                    path: path.to_owned(),
                    what: "open",
                    error,
                }
            }
        })?;
        // SAFETY: a read-only shared mapping; the writer never shrinks a file in place (new
        // layouts are renamed over it), so the mapping stays valid while we hold it.
        let map = unsafe { Mmap::map(&file) }.map_err(|error| Error::Shm {
            path: path.to_owned(),
            what: "map",
            error,
        })?;
        let layout = parse_layout(path, &map)?;
        let writer_alive = match File::open(lock_path(path)) {
            Ok(lock) => !flock(&lock, libc::LOCK_SH).unwrap_or(false),
            Err(_) => false,
        };
        Ok(ShmReader {
            header: layout.header,
            gpus: layout.gpus,
            map,
            writer_alive,
        })
    }

    /// The regions, one per GPU.
    pub fn regions(&self) -> Vec<Region<'_>> {
        regions_of(&self.header, self.map.as_ptr(), self.map.len())
    }

    /// The GPUs in the file.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// Node name written by the agent.
    pub fn node_name(&self) -> String {
        get_str(&self.header.node_name)
    }

    /// Driver version written by the agent.
    pub fn driver_version(&self) -> String {
        get_str(&self.header.driver_version)
    }

    /// The writer's sampling interval, nanoseconds.
    pub fn interval_ns(&self) -> u64 {
        self.header.interval_ns
    }

    /// Slots per GPU.
    pub fn capacity(&self) -> u32 {
        self.header.capacity
    }

    /// Whether an agent holds the writer lock right now.
    pub fn writer_alive(&self) -> bool {
        self.writer_alive
    }

    /// The agent-wide status (eBPF state, device opens).
    pub fn agent_status(&self) -> Option<AgentStatus> {
        agent_area_of(&self.header, self.map.as_ptr(), self.map.len()).read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{Sample, Slot};

    fn gpu(i: u32) -> GpuInfo {
        GpuInfo {
            index: i,
            uuid: format!("GPU-{i:08}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            gpm_supported: i == 0,
            ..GpuInfo::default()
        }
    }

    /// GPU `i` in MIG mode and its instance with GPU instance ID `gi`.
    fn mig(i: u32, gi: u32) -> [GpuInfo; 2] {
        let parent = GpuInfo {
            mig_enabled: true,
            ..gpu(i)
        };
        let instance = GpuInfo {
            index: i,
            uuid: format!("MIG-{i:08}-{gi}"),
            name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb".into(),
            memory_total_bytes: 10 << 30,
            gpm_supported: true,
            parent_uuid: parent.uuid.clone(),
            gpu_instance_id: Some(gi),
            mig_enabled: false,
        };
        [parent, instance]
    }

    fn params() -> Params {
        Params {
            capacity: 1024,
            interval_ns: 100_000_000,
            node_name: "node-a".into(),
            driver_version: "580.159.04".into(),
        }
    }

    #[test]
    fn capacity_keeps_ten_minutes_at_the_default_interval() {
        use std::time::Duration;
        let c = capacity_for(Duration::from_millis(100), Duration::from_secs(600));
        assert!(c >= 6000 && c.is_power_of_two(), "{c}");
        assert_eq!(
            capacity_for(Duration::from_secs(10), Duration::from_secs(600)),
            1024
        );
    }

    #[test]
    fn reader_sees_what_the_writer_wrote_and_a_restart_keeps_history() {
        let dir = tempdir();
        let path = dir.join("agent.ring");
        let w = ShmWriter::open(&path, &params(), &[gpu(0), gpu(1)]).unwrap();
        assert!(!w.reused());
        let regions = w.regions();
        let mut s = Sample::empty(42, GpuState::Ok);
        s.set(Slot::GpuUtil, 37.0);
        regions[1].ring().push(&s);
        regions[1].set_state(GpuState::Lost);
        let snap = ProcessSnapshot {
            ts_ns: 42,
            processes: vec![ProcessEntry {
                pid: 4242,
                used_memory_bytes: Some(18 << 30),
                sm_util: None,
                pod_uid: Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()),
                container_id: Some("ab".repeat(32)),
                source: Source::Procfs,
            }],
            truncated: 0,
        };
        regions[1].write_processes(1, &snap);

        let r = ShmReader::open(&path).unwrap();
        assert!(r.writer_alive());
        assert_eq!(r.gpus(), &[gpu(0), gpu(1)]);
        assert_eq!(r.node_name(), "node-a");
        let rr = r.regions();
        assert_eq!(rr[1].ring().latest(), Some(s));
        assert_eq!(rr[1].state(), GpuState::Lost);
        assert_eq!(rr[1].processes(), Some(snap));
        assert_eq!(rr[0].ring().latest(), None);
        assert_eq!(rr[0].processes(), None);

        assert!(matches!(
            ShmWriter::open(&path, &params(), &[gpu(0), gpu(1)]),
            Err(Error::ShmBusy { .. })
        ));
        drop(regions);
        drop(w);
        assert!(!ShmReader::open(&path).unwrap().writer_alive());
        let w2 = ShmWriter::open(&path, &params(), &[gpu(0), gpu(1)]).unwrap();
        assert!(w2.reused());
        assert_eq!(w2.regions()[1].ring().latest(), Some(s));
        drop(w2);
        let w3 = ShmWriter::open(&path, &params(), &[gpu(0)]).unwrap();
        assert!(!w3.reused(), "other GPUs must get a fresh file");
        // The old reader's mapping stays valid after the rename.
        assert_eq!(rr[1].ring().latest(), Some(s));
    }

    #[test]
    fn mig_instances_keep_their_parent_and_instance_id_and_old_entries_read_as_plain_gpus() {
        let dir = tempdir();
        let path = dir.join("mig.ring");
        let [p, a] = mig(0, 7);
        let [_, b] = mig(0, 9);
        let table = [gpu(1), p, a, b];
        let w = ShmWriter::open(&path, &params(), &table).unwrap();
        let r = ShmReader::open(&path).unwrap();
        assert_eq!(r.gpus(), &table);
        assert_eq!(r.gpus()[2].parent_uuid, "GPU-00000000");
        assert!(r.gpus()[3].is_mig_instance() && !r.gpus()[1].is_mig_instance());
        assert_eq!(r.regions().len(), 4, "one region per instance");
        drop(w);
        // Another instance set (the GPU was repartitioned) gets a fresh file.
        let [p, c] = mig(0, 8);
        let w = ShmWriter::open(&path, &params(), &[gpu(1), p, c]).unwrap();
        assert!(!w.reused());
        drop(w);

        // An entry written before MIG existed (reserved bytes zero) is a physical GPU.
        let entry = GpuEntry::from_info(&gpu(3), &[]);
        assert_eq!(bytemuck::bytes_of(&entry)[208..], [0u8; 48]);
        let info = entry.info(&[entry]);
        assert_eq!(info, gpu(3));
        assert!(!info.mig_enabled && info.gpu_instance_id.is_none());
    }

    #[test]
    fn dump_rejects_missing_foreign_and_other_version_files_clearly() {
        let dir = tempdir();
        let missing = ShmReader::open(&dir.join("nope"))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let e = ShmReader::open(&junk).err().unwrap().to_string();
        assert!(e.contains("not a gpuscale ring file"), "{e}");
        std::fs::write(&junk, b"short").unwrap();
        assert!(ShmReader::open(&junk).is_err());

        let path = dir.join("v.ring");
        drop(ShmWriter::open(&path, &params(), &[gpu(0)]).unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8] = 99;
        std::fs::write(&path, &bytes).unwrap();
        let e = ShmReader::open(&path).err().unwrap().to_string();
        assert!(e.contains("layout version 99"), "{e}");
        bytes[8] = LAYOUT_VERSION as u8;
        bytes.truncate(5000);
        std::fs::write(&path, &bytes).unwrap();
        let e = ShmReader::open(&path).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn agent_status_round_trips_and_keeps_the_newest_opens() {
        let dir = tempdir();
        let path = dir.join("a.ring");
        let w = ShmWriter::open(&path, &params(), &[gpu(0)]).unwrap();
        let st = AgentStatus {
            ebpf: EbpfState::Unavailable,
            ebpf_reason: "tracefs is not mounted".into(),
            events: 7,
            dropped: 2,
            opens: (0..200u32)
                .map(|i| DeviceOpen {
                    tgid: i,
                    comm: "python3".into(),
                    device: "0".into(),
                    cgroup_id: u64::from(i) + 1000,
                    cgroup_known: i % 2 == 0,
                    pod_uid: (i % 2 == 0).then(|| format!("{i:08x}-0000-4000-8000-00000000abcd")),
                    container_id: (i % 4 == 0).then(|| format!("{i:064x}")),
                    first_open_ns: u64::from(i),
                    last_open_ns: u64::from(i) + 5,
                    exited: i % 3 == 0,
                })
                .collect(),
        };
        assert_eq!(ShmReader::open(&path).unwrap().agent_status(), None);
        w.agent_area().write(1, &st);
        let back = ShmReader::open(&path).unwrap().agent_status().unwrap();
        assert_eq!(back.opens.len(), MAX_OPENS);
        assert_eq!(back.opens[..], st.opens[200 - MAX_OPENS..]);
        assert_eq!(
            (back.ebpf, back.events, back.dropped),
            (EbpfState::Unavailable, 7, 2)
        );
        assert_eq!(back.ebpf_reason, "tracefs is not mounted");
    }

    #[test]
    fn process_snapshot_round_trips_with_absent_fields() {
        let snap = ProcessSnapshot {
            ts_ns: 9,
            processes: (0..70)
                .map(|i| ProcessEntry {
                    pid: i,
                    used_memory_bytes: (i % 2 == 0).then_some(u64::from(i) << 20),
                    sm_util: (i % 3 == 0).then_some(i as f32),
                    pod_uid: (i % 4 == 0).then(|| format!("{i:08x}-0000-4000-8000-00000000abcd")),
                    container_id: (i % 5 == 0).then(|| format!("{i:064x}")),
                    source: [Source::None, Source::Procfs, Source::Ebpf, Source::Unknown]
                        [i as usize % 4],
                })
                .collect(),
            truncated: 6,
        };
        let back = decode_procs(&encode_procs(&snap).0);
        assert_eq!(back.processes.len(), MAX_PROCESSES);
        assert_eq!(back.processes[..], snap.processes[..MAX_PROCESSES]);
        assert_eq!(back.truncated, 6);
    }

    /// A scratch directory, removed when dropped.
    pub(crate) struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn tempdir() -> TempDir {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "gpuscale-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
