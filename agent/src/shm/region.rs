//! The live parts of a mapped ring file, each as a writer type and a reader type: a GPU's region
//! ([`WriterRegion`], [`ReaderRegion`]: its sample ring, state word and process snapshot) and
//! the agent area ([`AgentAreaWriter`], [`AgentAreaReader`]: the agent status).
//!
//! Only [`super::ShmWriter`] hands out writers, over its writable mapping; [`super::ShmReader`]
//! hands out readers only, over a read-only mapping, where Rust allows nothing but `Relaxed`
//! atomic loads. So every load a reader does is `Relaxed`, followed by an acquire fence where it
//! publishes (the ring's head and stamps, and the seqlock cells, in `gpuscale-ring`), never an
//! `Acquire` load or a read-modify-write. The state word publishes nothing, and is a plain
//! `Relaxed` status. This module never encodes a record itself ([`super::records`] does).

use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{
    slots_offset, HEAD_OFFSET, PROCS_OFFSET, SNAPSHOT_WORDS, STATE_OFFSET, STATUS_WORDS,
};
use super::records::{AgentStatus, ProcessSnapshot};
use crate::ring::{seq_read, seq_write, SampleReader, SampleWriter, SLOT_WORDS};
use crate::sample::GpuState;

/// How often a reader retries a seqlock cell the writer keeps rewriting before giving up.
const SEQ_TRIES: usize = 16;

/// The words of one GPU's region, split by use.
#[derive(Clone, Copy)]
struct Words<'a> {
    head: &'a AtomicU64,
    state: &'a AtomicU64,
    procs: &'a [AtomicU64],
    slots: &'a [AtomicU64],
}

impl<'a> Words<'a> {
    fn new(words: &'a [AtomicU64], capacity: usize) -> Words<'a> {
        let slots = slots_offset() / 8;
        Words {
            head: &words[HEAD_OFFSET / 8],
            state: &words[STATE_OFFSET / 8],
            procs: &words[PROCS_OFFSET / 8..PROCS_OFFSET / 8 + 1 + SNAPSHOT_WORDS],
            slots: &words[slots..slots + capacity * SLOT_WORDS],
        }
    }
}

/// One GPU's region of a read-only (or writable) mapping, for reading only.
#[derive(Clone, Copy)]
pub struct ReaderRegion<'a>(Words<'a>);

impl<'a> ReaderRegion<'a> {
    /// The region in `words` (one region's worth) with `capacity` slots.
    pub(super) fn new(words: &'a [AtomicU64], capacity: usize) -> ReaderRegion<'a> {
        ReaderRegion(Words::new(words, capacity))
    }

    /// The GPU's sample ring.
    pub fn ring(&self) -> SampleReader<'a> {
        SampleReader::new(self.0.head, self.0.slots)
    }

    /// The GPU's state as the writer last published it.
    pub fn state(&self) -> GpuState {
        // Relaxed: a standalone status word; no other data hangs off it (and read-only memory
        // allows no other load).
        GpuState::from_code(self.0.state.load(Ordering::Relaxed))
    }

    /// The latest process snapshot; `None` when none was written yet or the writer kept
    /// rewriting it during every attempt.
    pub fn processes(&self) -> Option<ProcessSnapshot> {
        let mut w = [0u64; SNAPSHOT_WORDS];
        (0..SEQ_TRIES)
            .find_map(|_| seq_read(self.0.procs, &mut w).map(|_| ProcessSnapshot::from_words(&w)))
    }
}

/// One GPU's region of the writer's mapping: pushes samples, publishes the state and the process
/// snapshot. Only one thread may write a region.
pub struct WriterRegion<'a>(Words<'a>);

impl<'a> WriterRegion<'a> {
    /// The region in `words` (one region's worth, of a writable mapping) with `capacity` slots.
    pub(super) fn new(words: &'a [AtomicU64], capacity: usize) -> WriterRegion<'a> {
        WriterRegion(Words::new(words, capacity))
    }

    /// The GPU's sample ring, writing end (its [`SampleWriter::reader`] reads it).
    pub fn ring(&self) -> SampleWriter<'a> {
        SampleWriter::new(self.0.head, self.0.slots)
    }

    /// Publishes the GPU's state.
    pub fn set_state(&self, state: GpuState) {
        // Relaxed: see `ReaderRegion::state`.
        self.0.state.store(state as u64, Ordering::Relaxed);
    }

    /// Publishes a process snapshot; `version` must increase per call.
    pub fn write_processes(&self, version: u64, snap: &ProcessSnapshot) {
        let (words, used) = snap.to_words();
        seq_write(&self.0.procs[..=used], version, &words[..used]);
    }

    /// The same region, for reading (the writer's own view of what it wrote).
    pub fn reader(&self) -> ReaderRegion<'a> {
        ReaderRegion(self.0)
    }
}

/// The agent area of the writer's mapping: one seqlock cell holding the [`AgentStatus`].
pub struct AgentAreaWriter<'a> {
    cell: &'a [AtomicU64],
}

impl<'a> AgentAreaWriter<'a> {
    /// The area whose cell (stamp and payload) is `cell`, of a writable mapping.
    pub(super) fn new(cell: &'a [AtomicU64]) -> AgentAreaWriter<'a> {
        debug_assert_eq!(cell.len(), 1 + STATUS_WORDS);
        AgentAreaWriter { cell }
    }

    /// Publishes the status; `version` must increase per call.
    pub fn write(&self, version: u64, status: &AgentStatus) {
        let (words, used) = status.to_words();
        seq_write(&self.cell[..=used], version, &words[..used]);
    }
}

/// The agent area of a read-only (or writable) mapping, for reading only.
#[derive(Clone, Copy)]
pub struct AgentAreaReader<'a> {
    cell: &'a [AtomicU64],
}

impl<'a> AgentAreaReader<'a> {
    /// The area whose cell (stamp and payload) is `cell`.
    pub(super) fn new(cell: &'a [AtomicU64]) -> AgentAreaReader<'a> {
        debug_assert_eq!(cell.len(), 1 + STATUS_WORDS);
        AgentAreaReader { cell }
    }

    /// The latest status; `None` when never written (or the writer kept rewriting it).
    pub fn read(&self) -> Option<AgentStatus> {
        let mut w = [0u64; STATUS_WORDS];
        (0..SEQ_TRIES)
            .find_map(|_| seq_read(self.cell, &mut w).map(|_| AgentStatus::from_words(&w)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{region_bytes, AGENT_AREA_BYTES};
    use super::*;
    use crate::sample::{Sample, Slot};

    fn heap(bytes: usize) -> Vec<AtomicU64> {
        (0..bytes / 8).map(|_| AtomicU64::new(0)).collect()
    }

    /// The regions on a heap buffer (as `ShmWriter` and `ShmReader` build them on a mapping):
    /// what the writer publishes, the reader of the same words reads back.
    #[test]
    fn a_reader_region_reads_what_its_writer_region_wrote() {
        let words = heap(region_bytes(1024));
        let w = WriterRegion::new(&words, 1024);
        let r = ReaderRegion::new(&words, 1024);
        assert_eq!((r.ring().head(), r.processes()), (0, None));
        let mut s = Sample::empty(7, GpuState::Ok);
        s.set(Slot::GpuUtil, 50.0);
        w.ring().push(&s);
        w.set_state(GpuState::Error);
        let snap = ProcessSnapshot {
            ts_ns: 7,
            ..ProcessSnapshot::default()
        };
        w.write_processes(1, &snap);
        assert_eq!(r.ring().latest(), Some(s));
        assert_eq!(r.ring().capacity(), 1024);
        assert_eq!(r.state(), GpuState::Error);
        assert_eq!(r.processes(), Some(snap));
        assert_eq!(w.reader().ring().latest(), w.ring().reader().latest());

        let area = heap(AGENT_AREA_BYTES);
        let cell = &area[..1 + STATUS_WORDS];
        assert_eq!(AgentAreaReader::new(cell).read(), None);
        let st = AgentStatus {
            events: 3,
            ..AgentStatus::default()
        };
        AgentAreaWriter::new(cell).write(1, &st);
        assert_eq!(AgentAreaReader::new(cell).read(), Some(st));
    }
}
