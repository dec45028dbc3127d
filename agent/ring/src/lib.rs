//! A lock-free, single-writer ring of fixed-size records over borrowed `AtomicU64` words, for
//! memory that several processes map: the writer never blocks, and readers never write.
//!
//! This crate owns the algorithm and nothing else: the seqlock cell ([`seq_write`],
//! [`seq_read`]) and the ring built on it ([`RingWriter`], [`RingReader`]). It never allocates,
//! maps files or does I/O, and it never interprets a record: a record is `N` `u64` words, and the
//! caller converts (gpuscale's agent stores its 64-byte `Sample` as 8 words; its `shm` module owns
//! the file those words live in and draws its layout). The storage is whatever the caller
//! borrows, an mmap in production and a heap buffer in tests, so Miri and loom check the
//! algorithm in-process.
//!
//! ```text
//! head   &AtomicU64     records ever written = the position the next push takes
//!                       (the caller gives it a cache line of its own, as rtrb does)
//! slots  &[AtomicU64]   capacity × (1 + N) words, capacity a power of two; position p lives in
//!                       slot p % capacity:
//! ┌─────────┬──────────────────┬─────────┬──────────────────┬─────┐
//! │ stamp 0 │ record: N × u64  │ stamp 1 │ record: N × u64  │  …  │
//! └─────────┴──────────────────┴─────────┴──────────────────┴─────┘
//! ```
//!
//! Seqlock slots (Boehm, "Can seqlocks get along with programming language memory models?",
//! MSPC 2012): writing record `p` into slot `p % capacity` stores stamp `2p+1` (odd: being
//! written), then the words, then stamp `2p+2`; then the writer publishes `head = p+1`. A reader
//! loads the stamp, copies the words, and loads the stamp again; the copy is record `p` only if
//! both stamps are `2p+2`. Payload words are atomics accessed with `Relaxed`, so a racing read is
//! a stale value, never undefined behaviour, and a torn or overwritten copy is detected, never
//! returned.
//!
//! The writer never waits: when the ring is full it overwrites the oldest slot, and
//! [`RingReader::dropped`] counts the records lost that way (iceoryx2's "safely overflowing"
//! queue).
//!
//! Writer and reader are different types because a reader may map the words read-only (the
//! agent's `dump` does), and Rust allows nothing but `Relaxed` loads (of at most 8 bytes on
//! 64-bit targets) on read-only memory (`std::sync::atomic`, "Atomic accesses to read-only
//! memory"). So [`RingReader`] and [`seq_read`] load only with `Relaxed` and get the ordering an
//! `Acquire` load would give from a `fence(Acquire)` right after the load: a `Release` store read
//! by a `Relaxed` load synchronizes with a later acquire fence of the reading thread. Only
//! [`RingWriter`] and [`seq_write`] store, and need writable memory.
//!
//! ```
//! use std::sync::atomic::AtomicU64;
//! use gpuscale_ring::{Read, RingReader, RingWriter};
//!
//! let head = AtomicU64::new(0);
//! let slots: Vec<AtomicU64> = (0..4 * RingWriter::<2>::SLOT_WORDS)
//!     .map(|_| AtomicU64::new(0))
//!     .collect();
//! let writer = RingWriter::<2>::new(&head, &slots);
//! let reader = RingReader::<2>::new(&head, &slots);
//! for p in 0..6 {
//!     writer.push(&[p, p * 10]);
//! }
//! assert_eq!(reader.read(5), Read::Record([5, 50]));
//! assert_eq!(reader.read(1), Read::Overwritten);
//! assert_eq!(reader.read(6), Read::NotWritten);
//! assert_eq!((reader.head(), reader.dropped()), (6, 2));
//! ```
//!
//! Checked by unit tests and a concurrent stress test (`cargo test -p gpuscale-ring`; also under
//! Miri, `cargo +nightly miri test -p gpuscale-ring`, where the stress test is smaller; `cargo
//! xtask test` uses the nightly pinned in `agent-ebpf/NIGHTLY`), and by
//! loom models of the seqlock and of a push racing a read, in their own target dir:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p gpuscale-ring --lib
//! --release loom_model`. `cargo xtask test` runs all of them.
#![deny(missing_docs)]

// The crate's own loom models swap in loom's atomics; every other build (the agent, Miri) uses
// std's. `--cfg loom` outside this crate's tests changes nothing.
#[cfg(all(test, loom))]
use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(all(test, loom)))]
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Writes `data` into the seqlock `cell` (`cell[0]` is the stamp) as version `version`.
/// Only one thread may write a given cell, and versions must increase. Needs writable memory.
#[inline]
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
    // Release: a reader whose stamp load reads this store (then fences Acquire) sees every
    // payload word above.
    cell[0].store(2 * version + 2, Ordering::Release);
}

/// Copies the seqlock `cell` into `out`. Returns the version copied, or `None` when the cell was
/// never written or a write raced with the copy. Only loads (`Relaxed`), so `cell` may be
/// mapped read-only.
#[inline]
pub fn seq_read(cell: &[AtomicU64], out: &mut [u64]) -> Option<u64> {
    debug_assert_eq!(cell.len(), out.len() + 1);
    // Relaxed: read-only memory allows no Acquire load; the fence below gives its ordering.
    let before = cell[0].load(Ordering::Relaxed);
    if before == 0 || before & 1 == 1 {
        return None;
    }
    // Acquire fence: pairs with the writer's final Release stamp store read above, so the
    // payload loads below see (at least) that version's words.
    fence(Ordering::Acquire);
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read<T> {
    /// The record at that position.
    Record(T),
    /// The writer has not published that position yet.
    NotWritten,
    /// The writer overwrote that position (or was overwriting it during the copy).
    Overwritten,
}

impl<T> Read<T> {
    /// The same outcome with the record converted by `f` (ring words into the caller's type).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Read<U> {
        match self {
            Read::Record(r) => Read::Record(f(r)),
            Read::NotWritten => Read::NotWritten,
            Read::Overwritten => Read::Overwritten,
        }
    }
}

/// The borrowed words of one ring, validated; shared by the writer and the reader type.
#[derive(Clone, Copy)]
struct Storage<'a, const N: usize> {
    head: &'a AtomicU64,
    slots: &'a [AtomicU64],
    capacity: u64,
}

impl<'a, const N: usize> Storage<'a, N> {
    const SLOT_WORDS: usize = N + 1;

    fn new(head: &'a AtomicU64, slots: &'a [AtomicU64]) -> Storage<'a, N> {
        let capacity = slots.len() / Self::SLOT_WORDS;
        assert!(
            capacity.is_power_of_two(),
            "ring capacity must be a power of two (got {} words, {} slots of {} words)",
            slots.len(),
            capacity,
            Self::SLOT_WORDS
        );
        assert_eq!(
            slots.len(),
            capacity * Self::SLOT_WORDS,
            "ring storage must be whole slots of {} words",
            Self::SLOT_WORDS
        );
        Storage {
            head,
            slots,
            capacity: capacity as u64,
        }
    }

    fn cell(&self, pos: u64) -> &'a [AtomicU64] {
        let i = (pos & (self.capacity - 1)) as usize * Self::SLOT_WORDS;
        &self.slots[i..i + Self::SLOT_WORDS]
    }
}

/// The writing end of a ring of `N`-word records. Only one writer (one thread, in one process)
/// may push to a ring at a time; it needs the words mapped writable.
pub struct RingWriter<'a, const N: usize>(Storage<'a, N>);

impl<'a, const N: usize> RingWriter<'a, N> {
    /// Words per slot: the stamp plus one record.
    pub const SLOT_WORDS: usize = N + 1;

    /// The writer of the ring whose write index is `head` and whose slots are `slots`
    /// (`capacity ×` [`Self::SLOT_WORDS`] words, `capacity` a power of two). Panics otherwise.
    pub fn new(head: &'a AtomicU64, slots: &'a [AtomicU64]) -> RingWriter<'a, N> {
        RingWriter(Storage::new(head, slots))
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.0.capacity
    }

    /// Appends a record, overwriting the oldest when full. Never blocks.
    pub fn push(&self, record: &[u64; N]) {
        // Relaxed: only this writer stores `head`, so it reads its own latest store.
        let pos = self.0.head.load(Ordering::Relaxed);
        seq_write(self.0.cell(pos), pos, record);
        // Release: a reader whose head load reads `pos + 1` (then fences Acquire) finds record
        // `pos` published.
        self.0.head.store(pos + 1, Ordering::Release);
    }

    /// A reader of the same words (for a writer that also reads, as the agent does in-process).
    pub fn reader(&self) -> RingReader<'a, N> {
        RingReader(self.0)
    }
}

/// The reading end of a ring of `N`-word records. Any number of readers, in any process, may
/// read while the writer pushes; a reader only loads (`Relaxed`), so the words may be mapped
/// read-only.
#[derive(Clone, Copy)]
pub struct RingReader<'a, const N: usize>(Storage<'a, N>);

impl<'a, const N: usize> RingReader<'a, N> {
    /// Words per slot: the stamp plus one record.
    pub const SLOT_WORDS: usize = N + 1;

    /// The reader of the ring whose write index is `head` and whose slots are `slots`
    /// (`capacity ×` [`Self::SLOT_WORDS`] words, `capacity` a power of two). Panics otherwise.
    pub fn new(head: &'a AtomicU64, slots: &'a [AtomicU64]) -> RingReader<'a, N> {
        RingReader(Storage::new(head, slots))
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.0.capacity
    }

    /// Records ever written (the position the next push takes).
    pub fn head(&self) -> u64 {
        // Relaxed: read-only memory allows no Acquire load; the fence below gives its ordering.
        let head = self.0.head.load(Ordering::Relaxed);
        // Acquire fence: pairs with the writer's Release store of `head` in `push`, so every
        // record below `head` is published for the slot reads that follow.
        fence(Ordering::Acquire);
        head
    }

    /// Records overwritten before anyone could be sure to read them: `head - capacity`.
    pub fn dropped(&self) -> u64 {
        self.head().saturating_sub(self.0.capacity)
    }

    /// Reads the record at absolute position `pos`.
    pub fn read(&self, pos: u64) -> Read<[u64; N]> {
        let mut words = [0u64; N];
        match seq_read(self.0.cell(pos), &mut words) {
            Some(v) if v == pos => Read::Record(words),
            Some(v) if v < pos => Read::NotWritten,
            Some(_) => Read::Overwritten,
            None if pos >= self.head() => Read::NotWritten,
            None => Read::Overwritten,
        }
    }

    /// The newest record, if any.
    pub fn latest(&self) -> Option<[u64; N]> {
        // The newest slot may be overwritten while we read it; then the next one is newer still.
        for _ in 0..4 {
            let head = self.head();
            if head == 0 {
                return None;
            }
            if let Read::Record(r) = self.read(head - 1) {
                return Some(r);
            }
        }
        None
    }

    /// Calls `f` with every record still in the ring, oldest first, skipping any the writer
    /// overwrites meanwhile. Returns how many were skipped.
    pub fn for_each(&self, mut f: impl FnMut(&[u64; N])) -> u64 {
        let head = self.head();
        let mut skipped = 0;
        for pos in head.saturating_sub(self.0.capacity)..head {
            match self.read(pos) {
                Read::Record(r) => f(&r),
                Read::Overwritten => skipped += 1,
                Read::NotWritten => break,
            }
        }
        skipped
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Words per record in these tests: the agent's (a 64-byte sample).
    const N: usize = 8;

    fn storage(capacity: usize) -> (AtomicU64, Vec<AtomicU64>) {
        (
            AtomicU64::new(0),
            (0..capacity * RingWriter::<N>::SLOT_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    /// The record written at position `p`: every word differs from every word of every other
    /// position, so a torn or misplaced copy cannot compare equal.
    fn record(p: u64) -> [u64; N] {
        std::array::from_fn(|i| p * N as u64 + i as u64 + 1)
    }

    #[test]
    fn reader_sees_records_in_order_then_overwrites_are_detected() {
        let (head, slots) = storage(8);
        let writer = RingWriter::<N>::new(&head, &slots);
        let ring = RingReader::<N>::new(&head, &slots);
        assert_eq!((writer.capacity(), ring.capacity()), (8, 8));
        assert_eq!(ring.read(0), Read::NotWritten);
        assert_eq!(ring.latest(), None);
        for i in 0..5 {
            writer.push(&record(i));
        }
        assert_eq!(ring.read(3), Read::Record(record(3)));
        assert_eq!(ring.read(5), Read::NotWritten);
        for i in 5..20 {
            writer.push(&record(i));
        }
        assert_eq!(ring.read(3), Read::Overwritten);
        assert_eq!(ring.read(20), Read::NotWritten);
        assert_eq!(ring.dropped(), 12);
        assert_eq!(ring.latest(), Some(record(19)));
        assert_eq!(writer.reader().latest(), Some(record(19)));
        let mut seen = vec![];
        assert_eq!(ring.for_each(|r| seen.push(r[0])), 0);
        assert_eq!(seen, (12..20).map(|p| record(p)[0]).collect::<Vec<_>>());
    }

    #[test]
    fn seqlock_rejects_a_cell_never_written_or_being_written() {
        let cell: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let mut out = [0u64; 2];
        assert_eq!(seq_read(&cell, &mut out), None, "never written");
        seq_write(&cell, 4, &[7, 8]);
        assert_eq!(seq_read(&cell, &mut out), Some(4));
        assert_eq!(out, [7, 8]);
        // A writer that died (or is) between its odd and even stamp stores.
        cell[0].store(2 * 5 + 1, Ordering::Relaxed);
        assert_eq!(seq_read(&cell, &mut out), None, "being written");
    }

    #[test]
    fn read_maps_a_record_and_keeps_the_other_outcomes() {
        assert_eq!(Read::Record([1u64, 2]).map(|w| w[1]), Read::Record(2));
        assert_eq!(Read::<[u64; 2]>::NotWritten.map(|w| w[1]), Read::NotWritten);
        assert_eq!(
            Read::<[u64; 2]>::Overwritten.map(|w| w[1]),
            Read::Overwritten
        );
    }

    #[test]
    #[should_panic(expected = "ring capacity must be a power of two")]
    fn storage_of_a_capacity_that_is_not_a_power_of_two_is_refused() {
        let (head, slots) = storage(6);
        RingReader::<N>::new(&head, &slots);
    }

    #[test]
    #[should_panic(expected = "ring storage must be whole slots")]
    fn storage_that_is_not_whole_slots_is_refused() {
        let (head, mut slots) = storage(4);
        slots.push(AtomicU64::new(0));
        RingWriter::<N>::new(&head, &slots);
    }

    /// Stress: a writer laps a small ring many times while readers copy records. Every record a
    /// reader accepts must be exactly the one written at that position (no torn record), and
    /// positions must only move forward. Under Miri (about a thousand times slower, but it checks
    /// every access for data races and explores weak-memory outcomes) the writer laps the ring
    /// fewer times.
    #[test]
    fn concurrent_readers_never_see_a_torn_or_misplaced_record() {
        const CAPACITY: u64 = 16;
        let total: u64 = if cfg!(miri) { 1_000 } else { 300_000 };
        let (head, slots) = storage(CAPACITY as usize);
        let writer = RingWriter::<N>::new(&head, &slots);
        let ring = RingReader::<N>::new(&head, &slots);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..total {
                    writer.push(&record(i));
                }
            });
            for _ in 0..2 {
                s.spawn(|| {
                    let (mut ok, mut lost) = (0u64, 0u64);
                    let mut last = None;
                    while ring.head() < total {
                        let h = ring.head();
                        for pos in h.saturating_sub(CAPACITY)..h {
                            match ring.read(pos) {
                                Read::Record(r) => {
                                    assert_eq!(r, record(pos), "torn record at {pos}");
                                    ok += 1;
                                }
                                Read::Overwritten => lost += 1,
                                Read::NotWritten => panic!("{pos} below head {h} not written"),
                            }
                        }
                        if let Some(l) = ring.latest() {
                            assert!(Some(l[0]) >= last, "latest went backwards");
                            last = Some(l[0]);
                        }
                    }
                    assert!(ok > 0, "reader never read a record ({lost} lost)");
                });
            }
        });
        assert_eq!(ring.head(), total);
        assert_eq!(ring.dropped(), total - CAPACITY);
    }
}

/// Loom models: every interleaving (bounded preemption) of a writer and a reader, with every
/// value a `Relaxed` load may return. Run with
/// `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p gpuscale-ring --lib
/// --release loom_model` (`cargo xtask test` does).
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;

    /// Preemptions per execution (bounded, so the models finish in seconds).
    const PREEMPTIONS: usize = 3;

    fn data(version: u64) -> [u64; 2] {
        [version * 10 + 1, version * 10 + 2]
    }

    fn words(n: usize) -> Arc<Vec<AtomicU64>> {
        Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    /// The seqlock core: a reader copying a cell that a writer rewrites gets either an untorn
    /// copy of one version or a detected race. (A `seq_read` without its second stamp check, or
    /// without the fence after its first stamp load, fails this model.)
    #[test]
    fn seqlock_never_returns_a_torn_copy() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(PREEMPTIONS);
        builder.check(|| {
            let cell = words(3);
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

    /// The ring on top: the head and the slot stamps together. A writer pushes three records
    /// into a two-slot ring (so it wraps, overwriting position 0) while a reader reads the
    /// head, `dropped`, every position the head says is in the ring plus the next one, and the
    /// head again. A record the reader accepts is exactly the one written at that position; a
    /// position below the head it saw is never "not written", and is returned whole unless a
    /// later push reuses its slot; head and dropped never go backwards and agree with each other.
    /// (A head store without Release, or a head load without its Acquire fence, fails this
    /// model.)
    ///
    /// The writer runs on the model's main thread and the reader on a spawned one: the other way
    /// round, loom 0.7 never schedules the writer's pushes before the reader's first head load
    /// (the writer starts with a load of the same word), and the model would check nothing.
    #[test]
    fn push_racing_read_never_returns_a_torn_or_misplaced_record() {
        const CAPACITY: u64 = 2;
        const PUSHES: u64 = 3;
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(PREEMPTIONS);
        builder.check(|| {
            let head = Arc::new(AtomicU64::new(0));
            let slots = words(CAPACITY as usize * RingWriter::<2>::SLOT_WORDS);
            let (h, s) = (head.clone(), slots.clone());
            let reader = loom::thread::spawn(move || {
                let r = RingReader::<2>::new(&h, &s);
                let h1 = r.head();
                let dropped = r.dropped();
                for pos in h1.saturating_sub(CAPACITY)..=h1 {
                    let published = pos < h1;
                    let reused = pos + CAPACITY < PUSHES;
                    match r.read(pos) {
                        Read::Record(rec) => {
                            assert_eq!(rec, data(pos), "torn or misplaced record at {pos}")
                        }
                        Read::NotWritten => {
                            assert!(!published, "{pos} below head {h1} read as not written")
                        }
                        Read::Overwritten => assert!(
                            !published || reused,
                            "{pos} below head {h1} read as overwritten, but no push reuses its slot"
                        ),
                    }
                }
                let h2 = r.head();
                assert!(h1 <= h2 && h2 <= PUSHES, "head went {h1} -> {h2}");
                assert!(
                    h1.saturating_sub(CAPACITY) <= dropped
                        && dropped <= h2.saturating_sub(CAPACITY),
                    "dropped {dropped} outside heads {h1}..{h2}"
                );
            });
            let w = RingWriter::<2>::new(&head, &slots);
            for p in 0..PUSHES {
                w.push(&data(p));
            }
            reader.join().unwrap();
            let r = w.reader();
            assert_eq!((r.head(), r.dropped()), (PUSHES, PUSHES - CAPACITY));
            assert_eq!(r.read(0), Read::Overwritten);
            assert_eq!(r.read(PUSHES), Read::NotWritten);
            assert_eq!(r.latest(), Some(data(PUSHES - 1)));
            let mut seen = vec![];
            assert_eq!(r.for_each(|rec| seen.push(*rec)), 0);
            assert_eq!(seen, [data(1), data(2)]);
        });
    }

    /// `latest` racing a wrapping writer: whatever it returns is a whole record, never older
    /// than the head the reader saw before asking. (Writer on the main thread, as above.)
    #[test]
    fn latest_racing_push_returns_a_whole_record_no_older_than_the_head() {
        const CAPACITY: u64 = 2;
        const PUSHES: u64 = 3;
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(PREEMPTIONS);
        builder.check(|| {
            let head = Arc::new(AtomicU64::new(0));
            let slots = words(CAPACITY as usize * RingWriter::<2>::SLOT_WORDS);
            let (h, s) = (head.clone(), slots.clone());
            let reader = loom::thread::spawn(move || {
                let r = RingReader::<2>::new(&h, &s);
                let before = r.head();
                if let Some(rec) = r.latest() {
                    let p = (0..PUSHES).find(|&p| data(p) == rec);
                    assert!(p.is_some(), "latest returned a torn record {rec:?}");
                    assert!(
                        p.unwrap() + 1 >= before,
                        "latest {p:?} older than head {before}"
                    );
                }
            });
            let w = RingWriter::<2>::new(&head, &slots);
            for p in 0..PUSHES {
                w.push(&data(p));
            }
            reader.join().unwrap();
        });
    }
}
