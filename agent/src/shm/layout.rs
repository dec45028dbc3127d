//! The bytes of the ring file: the header, the GPU table, and where every region, cell and slot
//! sits.
//!
//! This module owns the picture below, [`LAYOUT_VERSION`] and every offset and size; it never
//! maps, locks or opens anything (that is [`super::file`]) and never touches an atomic (that is
//! [`super::region`]).
//!
//! ```text
//! file (mmap'ed, page aligned)
//! ┌──────────────────────────────────────────────────────────────────────────────┐
//! │ FileHeader (256 B): magic "GPUSCRNG", layout version, header/record/region   │
//! │   sizes, capacity, gpu count, max processes, interval, creation time, node   │
//! │   name, driver version                                                       │
//! │ GpuEntry × gpu_count (256 B each): index, flags (GPM, MIG mode, instance ID  │
//! │   known), VRAM total, UUID, name, MIG parent entry + GPU instance ID (zero:  │
//! │   a physical GPU)                                                            │
//! │ … zero padding to a 4 KiB boundary (= header_bytes)                          │
//! ├─ GPU region 0 (region_bytes, page aligned) ──────────────────────────────────┤
//! │ +0    head   u64  records ever written (writer: Release store; readers:      │
//! │                   Relaxed load + Acquire fence)                              │
//! │ +64   state  u64  GpuState code (own cache line, so readers of head and the  │
//! │                   writer's state updates do not share a line)                │
//! │ +128  process snapshot cell: [stamp] SnapshotRecord: [SnapshotHeader: count, │
//! │                   truncated, ts_ns][ProcessRecord (72 B) × MAX_PROCESSES]    │
//! │ +…    (to a 64 B line) slots × capacity: [stamp u64][Sample: 8 × u64]        │
//! ├─ GPU region 1 … ─────────────────────────────────────────────────────────────┤
//! ├─ agent area (AGENT_AREA_BYTES, page aligned) ────────────────────────────────┤
//! │ one seqlock cell: [stamp] StatusRecord: [StatusHeader: eBPF state, events,   │
//! │   dropped, open count, eBPF reason (120 B)][DeviceOpenRecord (112 B) ×       │
//! │   MAX_OPENS]                                                                 │
//! └──────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! A MIG instance is a "GPU" of this layout: an entry and a region of its own, after its parent's.
//! Every word after the GPU table is an `AtomicU64`; readers map the file read-only and only
//! load (`Relaxed`), which Rust allows on read-only memory. The records of the two seqlock cells
//! are `#[repr(C)]` `Pod` types in [`super::records`], copied to and from the cell's words.
//!
//! A new layout is written to `<path>.tmp-<pid>` and renamed over `path`, so a reader that has
//! the old file mapped keeps a valid mapping (truncating a mapped file would SIGBUS it).

use bytemuck::{Pod, Zeroable};

use super::records::{SnapshotRecord, StatusRecord};
use crate::ring::SLOT_WORDS;

/// First bytes of every ring file.
pub const MAGIC: [u8; 8] = *b"GPUSCRNG";
/// Version of the layout drawn in this module's doc; bump on any change.
pub const LAYOUT_VERSION: u32 = 3;
/// Process entries kept in each GPU's snapshot.
pub const MAX_PROCESSES: usize = 64;
/// GPU device opens kept in the agent area (the newest).
pub const MAX_OPENS: usize = 128;
/// Bytes of the eBPF status reason (at most one less is kept: the text is NUL terminated).
pub const REASON_BYTES: usize = 120;

pub(super) const PAGE: usize = 4096;
const LINE: usize = 64;
/// Bytes of [`FileHeader`], and of each [`GpuEntry`].
pub(super) const HEADER_BYTES: usize = 256;
pub(super) const HEAD_OFFSET: usize = 0;
pub(super) const STATE_OFFSET: usize = LINE;
pub(super) const PROCS_OFFSET: usize = 2 * LINE;
/// Words of the process snapshot cell's payload (a [`SnapshotRecord`]).
pub(super) const SNAPSHOT_WORDS: usize = std::mem::size_of::<SnapshotRecord>() / 8;
/// Words of the agent area cell's payload (a [`StatusRecord`]).
pub(super) const STATUS_WORDS: usize = std::mem::size_of::<StatusRecord>() / 8;
/// Bytes of the agent area at the end of the file (stamp + payload, page aligned).
pub(super) const AGENT_AREA_BYTES: usize = ((1 + STATUS_WORDS) * 8).next_multiple_of(PAGE);

// The cells hold whole words, and keep the sizes of layout version 3.
const _: () = assert!(std::mem::size_of::<SnapshotRecord>() == SNAPSHOT_WORDS * 8);
const _: () = assert!(std::mem::size_of::<StatusRecord>() == STATUS_WORDS * 8);
const _: () = assert!(SNAPSHOT_WORDS == 2 + MAX_PROCESSES * 9);
const _: () = assert!(STATUS_WORDS == 4 + REASON_BYTES / 8 + MAX_OPENS * 14);

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

const _: () = assert!(std::mem::size_of::<FileHeader>() == HEADER_BYTES);

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

const _: () = assert!(std::mem::size_of::<GpuEntry>() == HEADER_BYTES);
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
    pub(super) fn from_info(info: &GpuInfo, table: &[GpuInfo]) -> GpuEntry {
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
    pub(super) fn info(&self, table: &[GpuEntry]) -> GpuInfo {
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

/// Byte offset of GPU table entry `i`.
pub(super) fn gpu_entry_offset(i: usize) -> usize {
    HEADER_BYTES + i * HEADER_BYTES
}

/// Writes the GPU table of `gpus` into `map` (the file's bytes).
pub(super) fn write_gpu_table(map: &mut [u8], gpus: &[GpuInfo]) {
    for (i, g) in gpus.iter().enumerate() {
        let at = gpu_entry_offset(i);
        map[at..at + HEADER_BYTES]
            .copy_from_slice(bytemuck::bytes_of(&GpuEntry::from_info(g, gpus)));
    }
}

/// Copies `s` into `dst`, cut at a character boundary so that at least one NUL is left.
pub(super) fn put_str(dst: &mut [u8], s: &str) {
    let mut n = s.len().min(dst.len() - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// The text of a NUL-padded field.
pub(super) fn get_str(src: &[u8]) -> String {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}

/// Bytes of one GPU region of `capacity` slots.
pub(super) fn region_bytes(capacity: u32) -> usize {
    (slots_offset() + capacity as usize * SLOT_WORDS * 8).next_multiple_of(PAGE)
}

/// Byte offset of the first slot in a GPU region.
pub(super) fn slots_offset() -> usize {
    (PROCS_OFFSET + (1 + SNAPSHOT_WORDS) * 8).next_multiple_of(LINE)
}

/// Bytes before the first GPU region of a file with `gpu_count` GPUs.
pub(super) fn header_bytes(gpu_count: usize) -> usize {
    gpu_entry_offset(gpu_count).next_multiple_of(PAGE)
}

/// Byte offset of the agent area (after the last GPU region).
pub(super) fn agent_area_offset(h: &FileHeader) -> usize {
    h.header_bytes as usize + h.region_bytes as usize * h.gpu_count as usize
}

/// Bytes of the whole file.
pub(super) fn file_bytes(h: &FileHeader) -> u64 {
    agent_area_offset(h) as u64 + AGENT_AREA_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_keeps_the_offsets_of_layout_version_3() {
        // Snapshot cell: stamp + 578 words from +128, slots from the next line.
        assert_eq!(slots_offset(), (128 + 579 * 8_usize).next_multiple_of(64));
        assert_eq!(slots_offset(), 4800);
        assert_eq!(AGENT_AREA_BYTES, 4 * PAGE);
        assert_eq!(header_bytes(0), PAGE);
        assert_eq!(header_bytes(15), PAGE);
        assert_eq!(header_bytes(16), 2 * PAGE);
    }

    #[test]
    fn text_fields_keep_a_nul_and_cut_at_a_character_boundary() {
        let mut b = [0u8; 8];
        put_str(&mut b, "abcdefé");
        assert_eq!(get_str(&b), "abcdef", "é would not fit whole");
        let mut b = [0u8; 8];
        put_str(&mut b, "abcdefgh");
        assert_eq!(get_str(&b), "abcdefg");
    }
}
