//! The two seqlocked records of the ring file: a GPU's process snapshot and the agent status.
//!
//! Each has a typed value the agent works with ([`ProcessSnapshot`], [`AgentStatus`]) and a
//! `#[repr(C)]` [`Pod`] record it is stored as ([`SnapshotRecord`] of [`ProcessRecord`]s,
//! [`StatusRecord`] of a [`StatusHeader`] and [`DeviceOpenRecord`]s): fixed-width fields,
//! explicit padding, fixed-size NUL-padded byte arrays for text, and `const` size asserts. A
//! record becomes the cell's `u64` words, and back, by a `bytemuck` cast; nothing is shifted by
//! hand. The bytes are those of layout version 3 (the golden test below pins them).
//!
//! Bounds, and what happens beyond them: a snapshot keeps its first [`MAX_PROCESSES`] processes
//! and counts the rest in [`ProcessSnapshot::truncated`]; the status keeps the newest
//! [`MAX_OPENS`] opens; text is cut at a character boundary to one byte less than its field (the
//! eBPF reason to 119 of [`REASON_BYTES`], `comm` and the device to 15); a pod UID or container
//! ID that is not exactly 16 or 32 bytes of hex is stored as absent.
//!
//! This module never touches an atomic: the cells, and the orderings that publish them, are
//! [`super::region`]'s.

use std::mem::size_of;

use bytemuck::{Pod, Zeroable};

use super::layout::{
    get_str, put_str, MAX_OPENS, MAX_PROCESSES, REASON_BYTES, SNAPSHOT_WORDS, STATUS_WORDS,
};
use crate::attribution::Attribution;
use crate::ebpf::EbpfState;

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
    pub attribution: Attribution,
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

/// One process that opened a GPU device file, as the eBPF tracker saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceOpen {
    /// Process (thread-group) ID.
    pub tgid: u32,
    /// Command name (up to 15 bytes).
    pub comm: String,
    /// The opened path after the device prefix (`0`, `ctl`, `-uvm`, …; the ring file keeps up
    /// to 15 bytes).
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

/// [`ProcessRecord::flags`]: `used_memory_bytes` holds a value.
const PROC_USED_MEMORY: u8 = 1;
/// [`ProcessRecord::flags`]: `sm_util` holds a value.
const PROC_SM_UTIL: u8 = 1 << 1;
/// [`ProcessRecord::flags`]: `pod_uid` holds a value.
const PROC_POD_UID: u8 = 1 << 2;
/// [`ProcessRecord::flags`]: `container_id` holds a value.
const PROC_CONTAINER_ID: u8 = 1 << 3;

/// One [`ProcessEntry`] as stored. 72 bytes, no implicit padding.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct ProcessRecord {
    /// Host PID.
    pub pid: u32,
    /// Which optional fields hold a value: bit 0 used memory, 1 SM utilization, 2 pod UID,
    /// 3 container ID.
    pub flags: u8,
    /// The [`Attribution`] code.
    pub source: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// Device memory used, bytes (0 when absent).
    pub used_memory_bytes: u64,
    /// SM utilization, percent (0 when absent).
    pub sm_util: f32,
    /// Zero.
    pub _pad2: u32,
    /// The pod UID's 16 bytes.
    pub pod_uid: [u8; 16],
    /// The container ID's 32 bytes.
    pub container_id: [u8; 32],
}

const _: () = assert!(size_of::<ProcessRecord>() == 72);

/// The fixed part of a stored [`ProcessSnapshot`]. 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct SnapshotHeader {
    /// Records that follow (at most [`MAX_PROCESSES`]).
    pub count: u32,
    /// [`ProcessSnapshot::truncated`].
    pub truncated: u32,
    /// [`ProcessSnapshot::ts_ns`].
    pub ts_ns: u64,
}

const _: () = assert!(size_of::<SnapshotHeader>() == 16);

/// The payload of a GPU's process snapshot cell.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct SnapshotRecord {
    /// Count, truncation, time.
    pub header: SnapshotHeader,
    /// The first `header.count` are the processes; the rest is stale and never read.
    pub processes: [ProcessRecord; MAX_PROCESSES],
}

/// [`DeviceOpenRecord::flags`]: the process has exited.
const OPEN_EXITED: u32 = 1;
/// [`DeviceOpenRecord::flags`]: `pod_uid` holds a value.
const OPEN_POD_UID: u32 = 1 << 1;
/// [`DeviceOpenRecord::flags`]: `container_id` holds a value.
const OPEN_CONTAINER_ID: u32 = 1 << 2;
/// [`DeviceOpenRecord::flags`]: the cgroup still existed when last looked up.
const OPEN_CGROUP_KNOWN: u32 = 1 << 3;

/// One [`DeviceOpen`] as stored. 112 bytes, no implicit padding.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct DeviceOpenRecord {
    /// Process (thread-group) ID.
    pub tgid: u32,
    /// Bit 0 exited, 1 pod UID present, 2 container ID present, 3 cgroup known.
    pub flags: u32,
    /// Command name, NUL padded.
    pub comm: [u8; 16],
    /// Device path suffix, NUL padded.
    pub device: [u8; 16],
    /// The cgroup the process ran in.
    pub cgroup_id: u64,
    /// The pod UID's 16 bytes.
    pub pod_uid: [u8; 16],
    /// The container ID's 32 bytes.
    pub container_id: [u8; 32],
    /// First open, ns since the Unix epoch.
    pub first_open_ns: u64,
    /// Latest open, ns since the Unix epoch.
    pub last_open_ns: u64,
}

const _: () = assert!(size_of::<DeviceOpenRecord>() == 112);

/// The fixed part of a stored [`AgentStatus`]. 152 bytes, no implicit padding.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct StatusHeader {
    /// The [`EbpfState`] code.
    pub ebpf: u32,
    /// Zero.
    pub _pad: u32,
    /// [`AgentStatus::events`].
    pub events: u64,
    /// [`AgentStatus::dropped`].
    pub dropped: u64,
    /// Records that follow (at most [`MAX_OPENS`]).
    pub open_count: u32,
    /// Zero.
    pub _pad2: u32,
    /// [`AgentStatus::ebpf_reason`], NUL padded.
    pub reason: [u8; REASON_BYTES],
}

const _: () = assert!(size_of::<StatusHeader>() == 152);

/// The payload of the agent area's cell.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct StatusRecord {
    /// State, counters, reason.
    pub header: StatusHeader,
    /// The first `header.open_count` are the opens, oldest first; the rest is never read.
    pub opens: [DeviceOpenRecord; MAX_OPENS],
}

/// `text` as exactly `N` bytes of hex (dashes ignored), or `None`.
fn hex_bytes<const N: usize>(text: Option<&str>) -> Option<[u8; N]> {
    let digits: Vec<u8> = text?.bytes().filter(|&b| b != b'-').collect();
    let mut out = [0u8; N];
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
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

/// Stores `value` into `field` and sets `bit` in `flags` when there is one.
fn put_opt<T: Copy, F: std::ops::BitOrAssign>(
    field: &mut T,
    flags: &mut F,
    bit: F,
    value: Option<T>,
) {
    if let Some(v) = value {
        *field = v;
        *flags |= bit;
    }
}

impl ProcessRecord {
    /// The record of `p`.
    pub fn new(p: &ProcessEntry) -> ProcessRecord {
        let mut r = ProcessRecord::zeroed();
        let mut flags = 0;
        r.pid = p.pid;
        r.source = p.attribution.code();
        put_opt(
            &mut r.used_memory_bytes,
            &mut flags,
            PROC_USED_MEMORY,
            p.used_memory_bytes,
        );
        put_opt(&mut r.sm_util, &mut flags, PROC_SM_UTIL, p.sm_util);
        let uid = hex_bytes(p.pod_uid.as_deref());
        put_opt(&mut r.pod_uid, &mut flags, PROC_POD_UID, uid);
        let cid = hex_bytes(p.container_id.as_deref());
        put_opt(&mut r.container_id, &mut flags, PROC_CONTAINER_ID, cid);
        r.flags = flags;
        r
    }

    /// The entry this record stores.
    pub fn entry(&self) -> ProcessEntry {
        let has = |bit: u8| self.flags & bit != 0;
        ProcessEntry {
            pid: self.pid,
            used_memory_bytes: has(PROC_USED_MEMORY).then_some(self.used_memory_bytes),
            sm_util: has(PROC_SM_UTIL).then_some(self.sm_util),
            pod_uid: has(PROC_POD_UID).then(|| uid_text(&self.pod_uid)),
            container_id: has(PROC_CONTAINER_ID).then(|| to_hex(&self.container_id)),
            attribution: Attribution::from_code(self.source.into()),
        }
    }
}

impl ProcessSnapshot {
    /// The snapshot as the cell's payload words, and how many of them carry data (the rest of
    /// the cell need not be rewritten). Keeps the first [`MAX_PROCESSES`] processes.
    pub(super) fn to_words(&self) -> ([u64; SNAPSHOT_WORDS], usize) {
        let mut words = [0u64; SNAPSHOT_WORDS];
        let record: &mut SnapshotRecord = bytemuck::cast_mut(&mut words);
        let n = self.processes.len().min(MAX_PROCESSES);
        record.header = SnapshotHeader {
            count: n as u32,
            truncated: self.truncated,
            ts_ns: self.ts_ns,
        };
        for (r, p) in record.processes.iter_mut().zip(&self.processes) {
            *r = ProcessRecord::new(p);
        }
        let used = size_of::<SnapshotHeader>() + n * size_of::<ProcessRecord>();
        (words, used / 8)
    }

    /// The snapshot stored in the cell's payload words.
    pub(super) fn from_words(words: &[u64; SNAPSHOT_WORDS]) -> ProcessSnapshot {
        let record: &SnapshotRecord = bytemuck::cast_ref(words);
        let n = (record.header.count as usize).min(MAX_PROCESSES);
        ProcessSnapshot {
            ts_ns: record.header.ts_ns,
            processes: record.processes[..n]
                .iter()
                .map(ProcessRecord::entry)
                .collect(),
            truncated: record.header.truncated,
        }
    }
}

impl DeviceOpenRecord {
    /// The record of `o`.
    pub fn new(o: &DeviceOpen) -> DeviceOpenRecord {
        let mut r = DeviceOpenRecord::zeroed();
        let mut flags = 0;
        r.tgid = o.tgid;
        put_str(&mut r.comm, &o.comm);
        put_str(&mut r.device, &o.device);
        r.cgroup_id = o.cgroup_id;
        let uid = hex_bytes(o.pod_uid.as_deref());
        put_opt(&mut r.pod_uid, &mut flags, OPEN_POD_UID, uid);
        let cid = hex_bytes(o.container_id.as_deref());
        put_opt(&mut r.container_id, &mut flags, OPEN_CONTAINER_ID, cid);
        r.first_open_ns = o.first_open_ns;
        r.last_open_ns = o.last_open_ns;
        for (on, bit) in [(o.exited, OPEN_EXITED), (o.cgroup_known, OPEN_CGROUP_KNOWN)] {
            if on {
                flags |= bit;
            }
        }
        r.flags = flags;
        r
    }

    /// The open this record stores.
    pub fn open(&self) -> DeviceOpen {
        let has = |bit: u32| self.flags & bit != 0;
        DeviceOpen {
            tgid: self.tgid,
            comm: get_str(&self.comm),
            device: get_str(&self.device),
            cgroup_id: self.cgroup_id,
            cgroup_known: has(OPEN_CGROUP_KNOWN),
            pod_uid: has(OPEN_POD_UID).then(|| uid_text(&self.pod_uid)),
            container_id: has(OPEN_CONTAINER_ID).then(|| to_hex(&self.container_id)),
            first_open_ns: self.first_open_ns,
            last_open_ns: self.last_open_ns,
            exited: has(OPEN_EXITED),
        }
    }
}

impl StatusHeader {
    /// The header of `st` with `open_count` opens.
    pub fn new(st: &AgentStatus, open_count: usize) -> StatusHeader {
        let mut h = StatusHeader::zeroed();
        h.ebpf = st.ebpf.code().into();
        h.events = st.events;
        h.dropped = st.dropped;
        h.open_count = open_count.min(MAX_OPENS) as u32;
        put_str(&mut h.reason, &st.ebpf_reason);
        h
    }

    /// The status this header stores, without its opens.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            ebpf: EbpfState::from_code(self.ebpf.into()),
            ebpf_reason: get_str(&self.reason),
            events: self.events,
            dropped: self.dropped,
            opens: Vec::new(),
        }
    }
}

impl AgentStatus {
    /// The status as the cell's payload words, and how many of them carry data. Keeps the
    /// newest [`MAX_OPENS`] opens.
    pub(super) fn to_words(&self) -> ([u64; STATUS_WORDS], usize) {
        let mut words = [0u64; STATUS_WORDS];
        let record: &mut StatusRecord = bytemuck::cast_mut(&mut words);
        let n = self.opens.len().min(MAX_OPENS);
        record.header = StatusHeader::new(self, n);
        let newest = &self.opens[self.opens.len() - n..];
        for (r, o) in record.opens.iter_mut().zip(newest) {
            *r = DeviceOpenRecord::new(o);
        }
        let used = size_of::<StatusHeader>() + n * size_of::<DeviceOpenRecord>();
        (words, used / 8)
    }

    /// The status stored in the cell's payload words.
    pub(super) fn from_words(words: &[u64; STATUS_WORDS]) -> AgentStatus {
        let record: &StatusRecord = bytemuck::cast_ref(words);
        let n = (record.header.open_count as usize).min(MAX_OPENS);
        AgentStatus {
            opens: record.opens[..n]
                .iter()
                .map(DeviceOpenRecord::open)
                .collect(),
            ..record.header.status()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn cid() -> String {
        "0123456789abcdef".repeat(4)
    }

    fn full_process() -> ProcessEntry {
        ProcessEntry {
            pid: u32::MAX,
            used_memory_bytes: Some(u64::MAX),
            sm_util: Some(100.0),
            pod_uid: Some(UID.into()),
            container_id: Some(cid()),
            attribution: Attribution::Unknown,
        }
    }

    fn full_open() -> DeviceOpen {
        DeviceOpen {
            tgid: u32::MAX,
            comm: "a".repeat(15),
            device: "-caps/nvidia-ca".into(),
            cgroup_id: u64::MAX,
            cgroup_known: true,
            pod_uid: Some(UID.into()),
            container_id: Some(cid()),
            first_open_ns: u64::MAX - 1,
            last_open_ns: u64::MAX,
            exited: true,
        }
    }

    #[test]
    fn a_process_record_round_trips_a_full_entry_and_drops_ids_that_are_not_exact_hex() {
        let p = full_process();
        assert_eq!(ProcessRecord::new(&p).entry(), p);
        let absent = ProcessEntry {
            pid: 7,
            ..ProcessEntry::default()
        };
        assert_eq!(ProcessRecord::new(&absent).entry(), absent);
        // An ID longer (or shorter, or not hex) than its field is absent, never cut.
        let odd = ProcessEntry {
            pod_uid: Some(format!("{UID}00")),
            container_id: Some(format!("{}ab", cid())),
            ..full_process()
        };
        let back = ProcessRecord::new(&odd).entry();
        assert_eq!((back.pod_uid, back.container_id), (None, None));
        let not_hex = ProcessEntry {
            pod_uid: Some(UID.replace('f', "g")),
            ..full_process()
        };
        assert_eq!(ProcessRecord::new(&not_hex).entry().pod_uid, None);
    }

    #[test]
    fn a_device_open_record_round_trips_a_full_open_and_cuts_long_names_to_15_bytes() {
        let o = full_open();
        assert_eq!(DeviceOpenRecord::new(&o).open(), o);
        let long = DeviceOpen {
            comm: "a-very-long-command-name".into(),
            device: "-caps/nvidia-cap12345".into(),
            pod_uid: Some(format!("{UID}-0")),
            ..full_open()
        };
        let back = DeviceOpenRecord::new(&long).open();
        assert_eq!(back.comm, "a-very-long-com");
        assert_eq!(back.device, "-caps/nvidia-ca");
        assert_eq!(back.pod_uid, None, "an overlong UID is absent, not cut");
        assert_eq!(back.container_id, Some(cid()));
        // A multi-byte character that does not fit whole is left out.
        let utf8 = DeviceOpen {
            comm: "python-traineré".into(),
            ..full_open()
        };
        assert_eq!(DeviceOpenRecord::new(&utf8).open().comm, "python-trainer");
    }

    #[test]
    fn a_status_header_round_trips_a_full_header_and_cuts_the_reason_to_119_bytes() {
        let st = AgentStatus {
            ebpf: EbpfState::Unavailable,
            ebpf_reason: "r".repeat(REASON_BYTES - 1),
            events: u64::MAX,
            dropped: u64::MAX - 1,
            opens: vec![],
        };
        let h = StatusHeader::new(&st, 1000);
        assert_eq!(h.open_count as usize, MAX_OPENS);
        assert_eq!(h.status(), st);
        let long = AgentStatus {
            ebpf_reason: format!("{}é and more", "r".repeat(REASON_BYTES - 2)),
            ..st.clone()
        };
        assert_eq!(
            StatusHeader::new(&long, 0).status().ebpf_reason,
            "r".repeat(REASON_BYTES - 2),
            "cut at a character boundary, one NUL kept"
        );
    }

    #[test]
    fn a_snapshot_record_keeps_the_first_64_processes_and_the_truncation_count() {
        let snap = ProcessSnapshot {
            ts_ns: 9,
            processes: (0..70)
                .map(|i| ProcessEntry {
                    pid: i,
                    used_memory_bytes: (i % 2 == 0).then_some(u64::from(i) << 20),
                    sm_util: (i % 3 == 0).then_some(i as f32),
                    pod_uid: (i % 4 == 0).then(|| format!("{i:08x}-0000-4000-8000-00000000abcd")),
                    container_id: (i % 5 == 0).then(|| format!("{i:064x}")),
                    attribution: [
                        Attribution::None,
                        Attribution::Procfs,
                        Attribution::Ebpf,
                        Attribution::Unknown,
                    ][i as usize % 4],
                })
                .collect(),
            truncated: 6,
        };
        let (words, used) = snap.to_words();
        assert_eq!(used, SNAPSHOT_WORDS, "a full snapshot fills the cell");
        let back = ProcessSnapshot::from_words(&words);
        assert_eq!(back.processes.len(), MAX_PROCESSES);
        assert_eq!(back.processes[..], snap.processes[..MAX_PROCESSES]);
        assert_eq!(back.truncated, 6);
        let empty = ProcessSnapshot::default();
        assert_eq!(empty.to_words().1, 2);
        assert_eq!(ProcessSnapshot::from_words(&empty.to_words().0), empty);
    }

    /// The words the bit-packed codec of layout version 3 wrote for these values: the records
    /// store the same bytes, so files of older agents read the same and the version stays 3.
    #[test]
    fn records_store_the_bytes_of_layout_version_3() {
        let snap = ProcessSnapshot {
            ts_ns: 0x1122_3344_5566_7788,
            processes: vec![ProcessEntry {
                pid: 4242,
                used_memory_bytes: Some(18 << 30),
                sm_util: Some(37.5),
                pod_uid: Some(UID.into()),
                container_id: Some(cid()),
                attribution: Attribution::Ebpf,
            }],
            truncated: 3,
        };
        let (words, used) = snap.to_words();
        let ids = [
            0x7869_5a4b_3c2d_1e0f,
            0xf0e1_d2c3_b4a5_9687,
            0xefcd_ab89_6745_2301,
            0xefcd_ab89_6745_2301,
            0xefcd_ab89_6745_2301,
            0xefcd_ab89_6745_2301,
        ];
        let mut want = vec![
            0x0000_0003_0000_0001,
            0x1122_3344_5566_7788,
            0x0000_020f_0000_1092,
            0x0000_0004_8000_0000,
            0x0000_0000_4216_0000,
        ];
        want.extend(ids);
        assert_eq!(&words[..used], &want[..]);

        let st = AgentStatus {
            ebpf: EbpfState::Unavailable,
            ebpf_reason: "no BTF".into(),
            events: 7,
            dropped: 2,
            opens: vec![DeviceOpen {
                tgid: 99,
                comm: "python3".into(),
                device: "ctl".into(),
                cgroup_id: 0xabcdef,
                cgroup_known: true,
                pod_uid: Some(UID.into()),
                container_id: Some(cid()),
                first_open_ns: 1000,
                last_open_ns: 2000,
                exited: true,
            }],
        };
        let (words, used) = st.to_words();
        let mut want = vec![3, 7, 2, 1, 0x0000_4654_4220_6f6e];
        want.extend([0; REASON_BYTES / 8 - 1]);
        want.extend([
            0x0000_000f_0000_0063,
            0x0033_6e6f_6874_7970,
            0,
            0x0000_0000_006c_7463,
            0,
            0x00ab_cdef,
        ]);
        want.extend(ids);
        want.extend([1000, 2000]);
        assert_eq!(&words[..used], &want[..]);
        assert_eq!(AgentStatus::from_words(&words), st);
    }
}
