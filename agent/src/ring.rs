//! The lock-free shared-memory ring: one single-writer ring of [`Sample`]s per GPU.
//!
//! This module owns the file layout and the seqlock algorithm. It never blocks the writer and
//! never trusts a reader's view of memory: every record a reader copies is checked against its
//! slot's stamp, so torn or overwritten records are detected, not returned.
//!
//! ```text
//! file (mmap'ed, page aligned)
//! ┌──────────────────────────────────────────────────────────────────────────────┐
//! │ FileHeader (256 B): magic "GPUSCRNG", layout version, header/record/region   │
//! │   sizes, capacity, gpu count, interval, node name, driver version            │
//! │ GpuEntry × gpu_count (256 B each): index, flags (GPM, MIG mode), VRAM total,  │
//! │   UUID, name, MIG parent entry + GPU instance ID (zero: a physical GPU)      │
//! │ … zero padding to a 4 KiB boundary (= header_bytes)                          │
//! ├─ GPU region 0 (region_bytes) ────────────────────────────────────────────────┤
//! │ +0    head   u64  records ever written (writer: Release; readers: Acquire)   │
//! │ +64   state  u64  GpuState code (own cache line, so readers of head and the  │
//! │                   writer's state updates do not share a line)                │
//! │ +128  process snapshot cell: [stamp][count][ts_ns][entry × MAX_PROCESSES]     │
//! │ +…    slots × capacity: [stamp u64][Sample: 8 × u64]                         │
//! ├─ GPU region 1 … ─────────────────────────────────────────────────────────────┤
//! ```
//!
//! A MIG instance is a "GPU" of this layout: an entry and a region of its own, after its parent's.
//!
//! Seqlock slots (Boehm, "Can seqlocks get along with programming language memory models?"):
//! writing record `p` into slot `p % capacity` stores stamp `2p+1` (odd: being written), then the
//! words, then stamp `2p+2`. A reader loads the stamp, copies the words, and loads the stamp again;
//! the copy is record `p` only if both stamps are `2p+2`. Payload words are atomics accessed with
//! `Relaxed`, so a racing read is a stale value, never undefined behaviour; the algorithm is
//! generic over its word storage, so loom checks it on a heap buffer in-process.
//!
//! The writer never waits: when the ring is full it overwrites the oldest slot, and
//! [`Ring::dropped`] counts the records lost that way (iceoryx2's "safely overflowing" queue).

#[cfg(gpuscale_loom)]
use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(gpuscale_loom))]
use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::sample::{Sample, SAMPLE_WORDS};

/// Writes `data` into the seqlock `cell` (`cell[0]` is the stamp) as version `version`.
/// Only one thread may write a given cell, and versions must increase.
pub fn seq_write(cell: &[AtomicU64], version: u64, data: &[u64]) {
    debug_assert_eq!(cell.len(), data.len() + 1);
    // Relaxed: the fence below orders this store before the payload stores.
    cell[0].store(2 * version + 1, Ordering::Relaxed);
    // Release fence: a reader that sees any new payload word also sees the odd stamp on its
    // second stamp load, so it rejects the copy.
    fence(Ordering::Release);
    for (word, value) in cell[1..].iter().zip(data) {
        // Relaxed: publication happens through the stamp store below.
        word.store(*value, Ordering::Relaxed);
    }
    // Release: a reader that loads this stamp with Acquire sees every payload word above.
    cell[0].store(2 * version + 2, Ordering::Release);
}

/// Copies the seqlock `cell` into `out`. Returns the version copied, or `None` when the cell was
/// never written or a write raced with the copy.
pub fn seq_read(cell: &[AtomicU64], out: &mut [u64]) -> Option<u64> {
    debug_assert_eq!(cell.len(), out.len() + 1);
    // Acquire: pairs with the writer's final Release stamp store, so the payload is complete.
    let before = cell[0].load(Ordering::Acquire);
    if before == 0 || before & 1 == 1 {
        return None;
    }
    for (value, word) in out.iter_mut().zip(&cell[1..]) {
        // Relaxed: validated by the stamp re-check below.
        *value = word.load(Ordering::Relaxed);
    }
    // Acquire fence: the payload loads above complete before the stamp re-load below.
    fence(Ordering::Acquire);
    // Relaxed: ordered by the fence above.
    let after = cell[0].load(Ordering::Relaxed);
    (before == after).then_some(before / 2 - 1)
}

/// What a reader found at a ring position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Read {
    /// The record at that position.
    Record(Sample),
    /// The writer has not published that position yet.
    NotWritten,
    /// The writer overwrote that position (or was overwriting it during the copy).
    Overwritten,
}

/// Number of `u64` words per slot: the stamp plus one sample.
pub const SLOT_WORDS: usize = SAMPLE_WORDS + 1;

/// One single-writer ring over borrowed word storage (an mmap in production, a heap buffer in
/// tests).
pub struct Ring<'a> {
    head: &'a AtomicU64,
    slots: &'a [AtomicU64],
    capacity: u64,
}

impl<'a> Ring<'a> {
    /// A ring whose write index is `head` and whose slots are `slots` (`capacity × SLOT_WORDS`
    /// words). `capacity` must be a power of two.
    pub fn new(head: &'a AtomicU64, slots: &'a [AtomicU64]) -> Ring<'a> {
        let capacity = (slots.len() / SLOT_WORDS) as u64;
        assert!(
            capacity.is_power_of_two(),
            "ring capacity must be a power of two"
        );
        assert_eq!(slots.len(), capacity as usize * SLOT_WORDS);
        Ring {
            head,
            slots,
            capacity,
        }
    }

    fn cell(&self, pos: u64) -> &'a [AtomicU64] {
        let i = (pos & (self.capacity - 1)) as usize * SLOT_WORDS;
        &self.slots[i..i + SLOT_WORDS]
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Appends a record, overwriting the oldest when full. Never blocks. Only one thread (in one
    /// process) may push to a ring.
    pub fn push(&self, sample: &Sample) {
        // Relaxed: only this writer stores `head`.
        let pos = self.head.load(Ordering::Relaxed);
        seq_write(self.cell(pos), pos, &sample.to_words());
        // Release: a reader that sees the new head finds the record published.
        self.head.store(pos + 1, Ordering::Release);
    }

    /// Records ever written (the position the next push takes).
    pub fn head(&self) -> u64 {
        // Acquire: pairs with the writer's Release store in `push`.
        self.head.load(Ordering::Acquire)
    }

    /// Records overwritten before anyone could be sure to read them: `head - capacity`.
    pub fn dropped(&self) -> u64 {
        self.head().saturating_sub(self.capacity)
    }

    /// Reads the record at absolute position `pos`.
    pub fn read(&self, pos: u64) -> Read {
        let mut words = [0u64; SAMPLE_WORDS];
        match seq_read(self.cell(pos), &mut words) {
            Some(v) if v == pos => Read::Record(Sample::from_words(&words)),
            Some(v) if v < pos => Read::NotWritten,
            Some(_) => Read::Overwritten,
            None if pos >= self.head() => Read::NotWritten,
            None => Read::Overwritten,
        }
    }

    /// The newest record, if any.
    pub fn latest(&self) -> Option<Sample> {
        // The newest slot may be overwritten while we read it; then the next one is newer still.
        for _ in 0..4 {
            let head = self.head();
            if head == 0 {
                return None;
            }
            if let Read::Record(s) = self.read(head - 1) {
                return Some(s);
            }
        }
        None
    }

    /// Calls `f` with every record still in the ring, oldest first, skipping any the writer
    /// overwrites meanwhile. Returns how many were skipped.
    pub fn for_each(&self, mut f: impl FnMut(&Sample)) -> u64 {
        let head = self.head();
        let mut skipped = 0;
        for pos in head.saturating_sub(self.capacity)..head {
            match self.read(pos) {
                Read::Record(s) => f(&s),
                Read::Overwritten => skipped += 1,
                Read::NotWritten => break,
            }
        }
        skipped
    }
}

#[cfg(all(test, not(gpuscale_loom)))]
mod tests {
    use super::*;
    use crate::sample::{GpuState, Slot};

    fn storage(capacity: usize) -> (AtomicU64, Vec<AtomicU64>) {
        (
            AtomicU64::new(0),
            (0..capacity * SLOT_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    fn sample(i: u64) -> Sample {
        let mut s = Sample::empty(i, GpuState::Ok);
        s.set(Slot::GpuUtil, i as f32);
        s.set_vram_used(i * 3);
        s
    }

    #[test]
    fn reader_sees_records_in_order_then_overwrites_are_detected() {
        let (head, slots) = storage(8);
        let ring = Ring::new(&head, &slots);
        assert_eq!(ring.read(0), Read::NotWritten);
        assert_eq!(ring.latest(), None);
        for i in 0..5 {
            ring.push(&sample(i));
        }
        assert_eq!(ring.read(3), Read::Record(sample(3)));
        assert_eq!(ring.read(5), Read::NotWritten);
        for i in 5..20 {
            ring.push(&sample(i));
        }
        assert_eq!(ring.read(3), Read::Overwritten);
        assert_eq!(ring.dropped(), 12);
        assert_eq!(ring.latest(), Some(sample(19)));
        let mut seen = vec![];
        assert_eq!(ring.for_each(|s| seen.push(s.ts_ns)), 0);
        assert_eq!(seen, (12..20).collect::<Vec<_>>());
    }

    /// Stress: a writer laps a small ring many times while readers copy records. Every record a
    /// reader accepts must be exactly the one written at that position (no torn record), and
    /// positions must only move forward.
    #[test]
    fn concurrent_readers_never_see_a_torn_or_misplaced_record() {
        let (head, slots) = storage(16);
        let ring = Ring::new(&head, &slots);
        let total = 300_000u64;
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..total {
                    ring.push(&sample(i));
                }
            });
            for _ in 0..2 {
                s.spawn(|| {
                    let (mut ok, mut lost) = (0u64, 0u64);
                    let mut last = None;
                    while ring.head() < total {
                        let h = ring.head();
                        for pos in h.saturating_sub(16)..h {
                            match ring.read(pos) {
                                Read::Record(r) => {
                                    assert_eq!(r, sample(pos), "torn record at {pos}");
                                    ok += 1;
                                }
                                Read::Overwritten => lost += 1,
                                Read::NotWritten => panic!("{pos} below head {h} not written"),
                            }
                        }
                        if let Some(l) = ring.latest() {
                            assert!(Some(l.ts_ns) >= last, "latest went backwards");
                            last = Some(l.ts_ns);
                        }
                    }
                    assert!(ok > 0, "reader never read a record ({lost} lost)");
                });
            }
        });
        assert_eq!(ring.head(), total);
        assert_eq!(ring.dropped(), total - 16);
    }
}

/// Loom model of the seqlock core: every interleaving (bounded preemption) of a writer that
/// rewrites a cell and a reader that copies it must give either an untorn copy of one version or
/// a detected race. The ring's head publication (Release/Acquire) sits on top of this and is
/// covered by the stress test. Run with
/// `RUSTFLAGS="--cfg gpuscale_loom" cargo test -p agent --lib --release ring::loom_model`
/// (`cargo xtask test` does).
#[cfg(all(test, gpuscale_loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    fn data(version: u64) -> [u64; 2] {
        [version * 10 + 1, version * 10 + 2]
    }

    #[test]
    fn seqlock_never_returns_a_torn_copy() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let cell: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
            let w = cell.clone();
            let writer = loom::thread::spawn(move || {
                for v in 0..2 {
                    seq_write(&w, v, &data(v));
                }
            });
            let mut out = [0u64; 2];
            for _ in 0..2 {
                if let Some(v) = seq_read(&cell, &mut out) {
                    assert!(v < 2);
                    assert_eq!(out, data(v), "torn copy accepted as version {v}");
                }
            }
            writer.join().unwrap();
            assert_eq!(seq_read(&cell, &mut out), Some(1));
            assert_eq!(out, data(1));
        });
    }
}
