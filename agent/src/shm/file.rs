//! Opening the ring file at `--shm`: [`ShmWriter`] creates or reuses it under the writer lock,
//! [`ShmReader`] maps it read-only; both validate it against [`super::layout`] first.
//!
//! This module owns the crash discipline: the writer's exclusive lock (`<path>.lock`, an `flock`
//! the kernel drops when the agent dies, which readers check to say whether an agent runs), a
//! file of the same layout, GPUs and interval kept across restarts (history survives), and a new
//! layout written to a temp name and renamed over the old file (a reader's mapping of the old
//! one stays valid). It never touches the live words itself: it hands out the writer or reader
//! types of [`super::region`] over its mapping.
//!
//! And the agent runs as root, so nothing another user controls is followed or trusted: the
//! directory is made with mode 0700 and refused when it (or a link to it) belongs to another
//! user or others may write to it; the lock file is opened without following links, mode 0600,
//! and must be this user's; the new file is written under a random name created exclusively
//! (`tempfile`, `O_EXCL`, 0600) and renamed into place; an existing file is reused only when it
//! is a regular file of this user, opened without following links. A file truncated or replaced
//! while the agent writes it is caught ([`RingWatch`], and the SIGBUS guard of `super::guard`)
//! and the agent stops with [`Error::RingFileLost`] instead of dying of SIGBUS.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use bytemuck::Zeroable;
use memmap2::{Mmap, MmapMut};

use super::layout::{
    agent_area_offset, file_bytes, get_str, gpu_entry_offset, header_bytes, put_str, region_bytes,
    write_gpu_table, FileHeader, GpuEntry, GpuInfo, HEADER_BYTES, LAYOUT_VERSION, MAGIC,
    MAX_PROCESSES, STATUS_WORDS,
};
use super::records::AgentStatus;
use super::region::{AgentAreaReader, AgentAreaWriter, ReaderRegion, WriterRegion};
use crate::{Error, Result};

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
    if bytes.len() < HEADER_BYTES {
        return Err(bad(format!(
            "{} bytes is too short for a gpuscale ring header",
            bytes.len()
        )));
    }
    let header: FileHeader = bytemuck::pod_read_unaligned(&bytes[..HEADER_BYTES]);
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
    let want = file_bytes(&header);
    if (bytes.len() as u64) < want {
        return Err(bad(format!(
            "it is truncated: {} bytes, the header needs {want}",
            bytes.len()
        )));
    }
    let entries: Vec<GpuEntry> = (0..gpu_count)
        .map(|i| {
            let at = gpu_entry_offset(i);
            bytemuck::pod_read_unaligned::<GpuEntry>(&bytes[at..at + HEADER_BYTES])
        })
        .collect();
    let gpus = entries.iter().map(|e| e.info(&entries)).collect();
    Ok(Layout { header, gpus })
}

/// `n` words at byte `start` of `map`, the mapping of a file that [`parse_layout`] accepted.
/// Only for the mapping an [`ShmWriter`] or [`ShmReader`] holds: memory that is shared with
/// other processes and, past the GPU table, only ever accessed through atomics.
fn words_at(map: &[u8], start: usize, n: usize) -> &[AtomicU64] {
    let aligned = start.is_multiple_of(8) && map.as_ptr().addr().is_multiple_of(8);
    assert!(aligned && start + n * 8 <= map.len());
    // SAFETY: `map` is a page-aligned file mapping (the only callers pass `self.map`) that
    // outlives the borrow returned; `start` is a multiple of 8 and the range is in bounds
    // (asserted). Every access to these words goes through atomics, which is how the other
    // process (or thread) writes them too.
    unsafe { std::slice::from_raw_parts(map.as_ptr().add(start).cast::<AtomicU64>(), n) }
}

/// The words of each GPU region of `map`.
fn region_words<'a>(h: &FileHeader, map: &'a [u8]) -> impl Iterator<Item = &'a [AtomicU64]> {
    let (first, bytes) = (h.header_bytes as usize, h.region_bytes as usize);
    (0..h.gpu_count as usize).map(move |i| words_at(map, first + i * bytes, bytes / 8))
}

/// The agent area's seqlock cell (stamp and payload) in `map`.
fn agent_cell<'a>(h: &FileHeader, map: &'a [u8]) -> &'a [AtomicU64] {
    words_at(map, agent_area_offset(h), 1 + STATUS_WORDS)
}

/// The agent's writable, exclusively locked ring file.
pub struct ShmWriter {
    path: PathBuf,
    header: FileHeader,
    gpus: Vec<GpuInfo>,
    // Released in `Drop`, before the mapping goes.
    guard: std::sync::Arc<super::guard::Guard>,
    map: MmapMut,
    file: File,
    reused: bool,
    _lock: File,
}

impl Drop for ShmWriter {
    fn drop(&mut self) {
        self.guard.release();
    }
}

/// Watches an open ring file for what would otherwise go unnoticed or kill the agent: the file
/// truncated (a SIGBUS caught in the mapping, or the file now shorter than its layout) or
/// replaced (the path now names another file, or none). Independent of the writer's borrows, so
/// the agent's status thread can check it once a second; meaningful while its writer lives.
#[derive(Debug)]
pub struct RingWatch {
    path: PathBuf,
    file: File,
    len: u64,
    dev_ino: (u64, u64),
    guard: std::sync::Arc<super::guard::Guard>,
}

impl RingWatch {
    /// `Ok` while the file is whole and still at its path; else [`Error::RingFileLost`].
    pub fn check(&self) -> Result<()> {
        let lost = |why: String| Error::RingFileLost {
            path: self.path.clone(),
            why,
        };
        if self.guard.hit() {
            return Err(lost(
                "was truncated (a write past its new end was caught)".into(),
            ));
        }
        let now = self
            .file
            .metadata()
            .map_err(|e| lost(format!("could not be examined ({e})")))?;
        if now.len() < self.len {
            return Err(lost(format!(
                "was truncated to {} bytes (its layout needs {})",
                now.len(),
                self.len
            )));
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.dev_ino => Ok(()),
            Ok(_) => Err(lost("was replaced by another file".into())),
            Err(e) => Err(lost(format!("was removed ({e})"))),
        }
    }
}

/// This process's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `dir`, the directory of ring file `path` (mode 0700, parents too) if missing, then checks nobody else controls it: it
/// must be a directory owned by this user that group and others may not write to, and if the
/// path is a link, the link must be this user's or root's (a link in a shared directory such as
/// `/dev/shm` planted by another user would send the files elsewhere).
fn secure_dir(path: &Path, dir: &Path) -> Result<()> {
    let unsafe_dir = |why: String| Error::UnsafeRingDir {
        path: dir.to_owned(),
        why,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| Error::Shm {
            path: path.to_owned(),
            what: "create its directory",
            error,
        })?;
    let me = euid();
    let link = std::fs::symlink_metadata(dir).map_err(|e| unsafe_dir(e.to_string()))?;
    if link.file_type().is_symlink() && link.uid() != me && link.uid() != 0 {
        return Err(unsafe_dir(format!(
            "it is a link owned by uid {}, not by this user (uid {me}) or root",
            link.uid()
        )));
    }
    let m = std::fs::metadata(dir).map_err(|e| unsafe_dir(e.to_string()))?;
    if !m.is_dir() {
        return Err(unsafe_dir("it is not a directory".into()));
    }
    if m.uid() != me {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not by this user (uid {me})",
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "group or others may write to it (mode {:o})",
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Opens (or makes, mode 0600) the lock file without following a link, and checks it is a
/// regular file of this user; an older one readable by others is made 0600.
fn open_lock(path: &Path) -> Result<File> {
    let lock_path = lock_path(path);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(|error| Error::Shm {
            path: path.to_owned(),
            what: "create its lock file",
            error,
        })?;
    let unsafe_lock = |why: String| Error::UnsafeRingDir {
        path: lock_path.clone(),
        why,
    };
    let m = lock.metadata().map_err(|e| unsafe_lock(e.to_string()))?;
    if !m.is_file() || m.uid() != euid() {
        return Err(unsafe_lock(format!(
            "the lock file is not a regular file of this user (uid {})",
            m.uid()
        )));
    }
    if m.mode() & 0o077 != 0 {
        lock.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| unsafe_lock(format!("cannot make it 0600: {e}")))?;
    }
    Ok(lock)
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
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        secure_dir(path, dir)?;
        let lock = open_lock(path)?;
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
        header.created_unix_ns = crate::unix_now_ns();
        put_str(&mut header.node_name, &params.node_name);
        put_str(&mut header.driver_version, &params.driver_version);
        let total = file_bytes(&header);

        // A random name, created exclusively (O_EXCL, so never through a planted link), 0600.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(io("create"))?;
        tmp.as_file().set_len(total).map_err(io("size"))?;
        // SAFETY: the file is ours (a fresh random name, under the writer lock); a truncation
        // while mapped is caught by the SIGBUS guard the writer registers below.
        let mut map = unsafe { MmapMut::map_mut(tmp.as_file()) }.map_err(io("map"))?;
        write_gpu_table(&mut map, gpus);
        map[..HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
        let file = tmp
            .persist(path)
            .map_err(|e| e.error)
            .map_err(io("rename into place"))?;
        Ok(ShmWriter {
            path: path.to_owned(),
            header,
            gpus: gpus.to_vec(),
            guard: std::sync::Arc::new(super::guard::Guard::new(map.as_ptr(), map.len())),
            map,
            file,
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
        // Not through a link, and only a regular file of this user: anything else is replaced.
        let Ok(file) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        else {
            return Ok(None);
        };
        match file.metadata() {
            Ok(m) if m.is_file() && m.uid() == euid() => {}
            _ => {
                tracing::warn!(path = %path.display(), "existing ring file is not a regular file of this user; writing a new one");
                return Ok(None);
            }
        }
        // SAFETY: we hold the writer lock, so no other agent resizes the file; readers only map;
        // a truncation by anything else is caught by the SIGBUS guard registered below.
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
            guard: std::sync::Arc::new(super::guard::Guard::new(map.as_ptr(), map.len())),
            map,
            file,
            reused: true,
            _lock: lock,
        };
        w.map[..HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
        write_gpu_table(&mut w.map, gpus);
        Ok(Some(w))
    }

    /// Whether an existing file's history was kept.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// A [`RingWatch`] over this file, for checking it from another thread.
    pub fn watch(&self) -> Result<RingWatch> {
        let file = self.file.try_clone().map_err(|error| Error::Shm {
            path: self.path.clone(),
            what: "watch",
            error,
        })?;
        let m = file.metadata().map_err(|error| Error::Shm {
            path: self.path.clone(),
            what: "examine",
            error,
        })?;
        Ok(RingWatch {
            path: self.path.clone(),
            file,
            len: self.map.len() as u64,
            dev_ino: (m.dev(), m.ino()),
            guard: self.guard.clone(),
        })
    }

    /// The GPUs in the file, in region order.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    /// The writing ends of the file: one region per GPU, in file order, and the agent-status
    /// area. They borrow the writer mutably, so no second set can exist while these do: each
    /// seqlock in the file must have exactly one writer:
    ///
    /// ```compile_fail,E0499
    /// fn two_writers(w: &mut agent::shm::ShmWriter) {
    ///     let first = w.parts();
    ///     let second = w.parts(); // refused: `first` still borrows `w`
    ///     drop((first, second));
    /// }
    /// ```
    pub fn parts(&mut self) -> WriterParts<'_> {
        let capacity = self.header.capacity as usize;
        WriterParts {
            regions: region_words(&self.header, &self.map)
                .map(|words| WriterRegion::new(words, capacity))
                .collect(),
            agent_area: AgentAreaWriter::new(agent_cell(&self.header, &self.map)),
        }
    }

    /// Slots per GPU.
    pub fn capacity(&self) -> u32 {
        self.header.capacity
    }
}

/// What [`ShmWriter::parts`] hands out: the only writing ends of one open ring file.
pub struct WriterParts<'a> {
    /// One region per GPU (its ring, state and process snapshot), in file order.
    pub regions: Vec<WriterRegion<'a>>,
    /// The agent-wide status area (one thread only).
    pub agent_area: AgentAreaWriter<'a>,
}

/// A read-only view of a ring file, as `dump` uses it.
pub struct ShmReader {
    header: FileHeader,
    gpus: Vec<GpuInfo>,
    // Before `map`: released before the mapping goes.
    guard: super::guard::Guard,
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
        // layouts are renamed over it); anything else truncating it is caught by the guard
        // (reads past the new end then see zeros, and `truncated` says so).
        let map = unsafe { Mmap::map(&file) }.map_err(|error| Error::Shm {
            path: path.to_owned(),
            what: "map",
            error,
        })?;
        let guard = super::guard::Guard::new(map.as_ptr(), map.len());
        let layout = parse_layout(path, &map)?;
        let writer_alive = match File::open(lock_path(path)) {
            Ok(lock) => !flock(&lock, libc::LOCK_SH).unwrap_or(false),
            Err(_) => false,
        };
        Ok(ShmReader {
            header: layout.header,
            gpus: layout.gpus,
            guard,
            map,
            writer_alive,
        })
    }

    /// Whether the file was truncated under this view (what was read since may be zeros).
    pub fn truncated(&self) -> bool {
        self.guard.hit()
    }

    /// The regions, one per GPU, for reading.
    pub fn regions(&self) -> Vec<ReaderRegion<'_>> {
        let capacity = self.header.capacity as usize;
        region_words(&self.header, &self.map)
            .map(|words| ReaderRegion::new(words, capacity))
            .collect()
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

    /// The agent-wide status area, for reading.
    pub fn agent_area(&self) -> AgentAreaReader<'_> {
        AgentAreaReader::new(agent_cell(&self.header, &self.map))
    }

    /// The agent-wide status (eBPF state, device opens); `None` when never written.
    pub fn agent_status(&self) -> Option<AgentStatus> {
        self.agent_area().read()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        Attribution, DeviceOpen, EbpfState, ProcessEntry, ProcessSnapshot, MAX_OPENS,
    };
    use super::*;
    use crate::sample::{GpuState, Sample, Slot};

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

    pub(super) fn params() -> Params {
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.ring");
        let mut w = ShmWriter::open(&path, &params(), &[gpu(0), gpu(1)]).unwrap();
        assert!(!w.reused());
        let regions = w.parts().regions;
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
                attribution: Attribution::Procfs,
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
        let mut w2 = ShmWriter::open(&path, &params(), &[gpu(0), gpu(1)]).unwrap();
        assert!(w2.reused());
        assert_eq!(w2.parts().regions[1].reader().ring().latest(), Some(s));
        drop(w2);
        let w3 = ShmWriter::open(&path, &params(), &[gpu(0)]).unwrap();
        assert!(!w3.reused(), "other GPUs must get a fresh file");
        // The old reader's mapping stays valid after the rename.
        assert_eq!(rr[1].ring().latest(), Some(s));
    }

    #[test]
    fn mig_instances_keep_their_parent_and_instance_id_and_old_entries_read_as_plain_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mig.ring");
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
        let dir = tempfile::tempdir().unwrap();
        let missing = ShmReader::open(&dir.path().join("nope"))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let e = ShmReader::open(&junk).err().unwrap().to_string();
        assert!(e.contains("not a gpuscale ring file"), "{e}");
        std::fs::write(&junk, b"short").unwrap();
        assert!(ShmReader::open(&junk).is_err());

        let path = dir.path().join("v.ring");
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ring");
        let mut w = ShmWriter::open(&path, &params(), &[gpu(0)]).unwrap();
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
        w.parts().agent_area.write(1, &st);
        let back = ShmReader::open(&path).unwrap().agent_status().unwrap();
        assert_eq!(back.opens.len(), MAX_OPENS);
        assert_eq!(back.opens[..], st.opens[200 - MAX_OPENS..]);
        assert_eq!(
            (back.ebpf, back.events, back.dropped),
            (EbpfState::Unavailable, 7, 2)
        );
        assert_eq!(back.ebpf_reason, "tracefs is not mounted");
    }
}

/// The ring file as a root daemon must treat it: nothing another user controls is followed.
#[cfg(test)]
mod safety_tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::sample::{GpuState, Sample, Slot};

    fn gpus() -> Vec<GpuInfo> {
        vec![GpuInfo {
            index: 0,
            uuid: "GPU-00000000".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            ..GpuInfo::default()
        }]
    }

    use super::tests::params;

    /// Truncates `path` to 0 bytes, as another process would under the agent.
    fn truncate_to_nothing(path: &Path) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_directory_is_made_0700_and_the_lock_and_ring_are_0600() {
        let top = tempfile::tempdir().unwrap();
        let path = top.path().join("made/by/agent/agent.ring");
        let w = ShmWriter::open(&path, &params(), &gpus()).unwrap();
        for d in ["made", "made/by", "made/by/agent"] {
            assert_eq!(mode(&top.path().join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&lock_path(&path)), 0o600);
        drop(w);
        // A lock file an older agent left readable by others is made 0600.
        std::fs::set_permissions(lock_path(&path), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(ShmWriter::open(&path, &params(), &gpus()).unwrap());
        assert_eq!(mode(&lock_path(&path)), 0o600);
    }

    #[test]
    fn a_directory_others_may_write_to_is_refused_naming_it_and_the_fix() {
        let top = tempfile::tempdir().unwrap();
        let shared = top.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        for m in [0o777, 0o1777, 0o770] {
            std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(m)).unwrap();
            let e = ShmWriter::open(&shared.join("agent.ring"), &params(), &gpus()).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, Error::UnsafeRingDir { .. })
                    && msg.contains("shared")
                    && msg.contains("group or others may write")
                    && msg.contains("--shm"),
                "{msg}"
            );
            assert!(!shared.join("agent.ring.lock").exists(), "nothing written");
        }
    }

    #[test]
    fn links_planted_at_the_lock_the_ring_and_the_old_temp_name_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.ring");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "root's file").unwrap();

        // At the lock: refused, the link's target untouched.
        symlink(&victim, lock_path(&path)).unwrap();
        let e = ShmWriter::open(&path, &params(), &gpus()).unwrap_err();
        assert!(e.to_string().contains("lock file"), "{e}");
        std::fs::remove_file(lock_path(&path)).unwrap();

        // At the ring and at the temp name older agents used: replaced, never written through.
        symlink(&victim, &path).unwrap();
        let old_tmp = dir
            .path()
            .join(format!("agent.ring.tmp-{}", std::process::id()));
        symlink(&victim, &old_tmp).unwrap();
        let w = ShmWriter::open(&path, &params(), &gpus()).unwrap();
        assert!(!w.reused());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file");
        let ring = std::fs::symlink_metadata(&path).unwrap();
        assert!(ring.file_type().is_file() && ring.len() > 0);
        // And no temp file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_truncated_ring_is_caught_without_a_sigbus_and_a_replaced_one_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.ring");
        let mut w = ShmWriter::open(&path, &params(), &gpus()).unwrap();
        let watch = w.watch().unwrap();
        assert_eq!(watch.check().ok(), Some(()));
        // Truncated to nothing under the writer: every access to the mapping is past the end.
        truncate_to_nothing(&path);
        let regions = w.parts().regions;
        let mut s = Sample::empty(42, GpuState::Ok);
        s.set(Slot::GpuUtil, 37.0);
        regions[0].ring().push(&s); // would be SIGBUS without the guard
        let lost = watch.check().unwrap_err().to_string();
        assert!(
            lost.contains("was truncated") && lost.contains("agent.ring"),
            "{lost}"
        );
        drop(regions);
        drop(w);

        // Replaced (another file renamed over the path): noticed too.
        let w = ShmWriter::open(&path, &params(), &gpus()).unwrap();
        let watch = w.watch().unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, "x").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let lost = watch.check().unwrap_err().to_string();
        assert!(lost.contains("was replaced"), "{lost}");
        std::fs::remove_file(&path).unwrap();
        assert!(watch
            .check()
            .unwrap_err()
            .to_string()
            .contains("was removed"));
    }

    #[test]
    fn as_root_a_directory_or_a_link_of_another_user_is_refused() {
        if euid() != 0 {
            if std::env::var("GPUSCALE_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!("needs root; GPUSCALE_REQUIRE_PRIVILEGED=1 forbids skipping it");
            }
            eprintln!("skipped: as_root_a_directory_or_a_link_of_another_user_is_refused: needs root (chown)");
            return;
        }
        let nobody = 65534;
        let top = tempfile::tempdir().unwrap();
        // A directory another user made (say, in /dev/shm before the agent first ran).
        let theirs = top.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(nobody), Some(nobody)).unwrap();
        let e = ShmWriter::open(&theirs.join("agent.ring"), &params(), &gpus())
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        // A link another user planted where the agent's directory should be, to a directory
        // root owns: refused, though the target looks safe.
        let target = top.path().join("etc-like");
        std::fs::create_dir(&target).unwrap();
        let link = top.path().join("gpuscale");
        symlink(&target, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(nobody), Some(nobody)).unwrap();
        let e = ShmWriter::open(&link.join("agent.ring"), &params(), &gpus())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a link owned by uid 65534"), "{e}");
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
        // A link root made (as /var/run → /run) is fine.
        std::os::unix::fs::lchown(&link, Some(0), Some(0)).unwrap();
        drop(ShmWriter::open(&link.join("agent.ring"), &params(), &gpus()).unwrap());
    }

    #[test]
    fn a_reader_of_a_truncated_file_is_told_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.ring");
        let w = ShmWriter::open(&path, &params(), &gpus()).unwrap();
        let r = ShmReader::open(&path).unwrap();
        assert!(!r.truncated());
        truncate_to_nothing(&path);
        // Would be SIGBUS: the whole mapping is past the file's end now.
        assert_eq!(r.regions()[0].ring().latest(), None);
        assert!(r.truncated());
        drop(r);
        drop(w);
    }
}
