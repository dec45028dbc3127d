//! The agent's sample rings: the `gpuscale-ring` crate (`agent/ring`) specialised to
//! [`Sample`] records.
//!
//! This module only converts samples to and from ring words (bit for bit, with `bytemuck`); it
//! never touches an atomic itself. The seqlock algorithm, its memory orderings, its stress test
//! and its loom models live in `gpuscale-ring`; the file the rings live in, and its layout, in
//! [`crate::shm`].
//!
//! [`SampleWriter`] and [`SampleReader`] are the two ends, different types because a reader may
//! map the ring read-only: [`crate::shm::WriterRegion::ring`] (the sampler, through the writable
//! mapping of `ShmWriter`) gives the writer, [`crate::shm::ReaderRegion::ring`] (`ShmReader`'s
//! read-only mapping, or [`SampleWriter::reader`]) the reader, whose loads are all `Relaxed`,
//! which read-only memory allows.

use gpuscale_ring::{RingReader, RingWriter};
use std::sync::atomic::AtomicU64;

use crate::sample::{Sample, SAMPLE_WORDS};

pub use gpuscale_ring::{seq_read, seq_write};

/// What a reader found at a ring position (a [`Sample`], not yet written, or overwritten).
pub type Read = gpuscale_ring::Read<Sample>;

/// Number of `u64` words per slot: the stamp plus one sample.
pub const SLOT_WORDS: usize = RingReader::<SAMPLE_WORDS>::SLOT_WORDS;

/// The writing end of one GPU's ring. Only one thread (in one process) may push to a ring.
pub struct SampleWriter<'a>(RingWriter<'a, SAMPLE_WORDS>);

impl<'a> SampleWriter<'a> {
    /// The writer of the ring whose write index is `head` and whose slots are `slots`
    /// (`capacity × SLOT_WORDS` words). `capacity` must be a power of two.
    pub fn new(head: &'a AtomicU64, slots: &'a [AtomicU64]) -> SampleWriter<'a> {
        SampleWriter(RingWriter::new(head, slots))
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    /// Appends a sample, overwriting the oldest when full. Never blocks.
    pub fn push(&self, sample: &Sample) {
        self.0.push(&sample.to_words());
    }

    /// A reader of the same ring.
    pub fn reader(&self) -> SampleReader<'a> {
        SampleReader(self.0.reader())
    }
}

/// The reading end of one GPU's ring; safe on a read-only mapping.
#[derive(Clone, Copy)]
pub struct SampleReader<'a>(RingReader<'a, SAMPLE_WORDS>);

impl<'a> SampleReader<'a> {
    /// The reader of the ring whose write index is `head` and whose slots are `slots`
    /// (`capacity × SLOT_WORDS` words). `capacity` must be a power of two.
    pub fn new(head: &'a AtomicU64, slots: &'a [AtomicU64]) -> SampleReader<'a> {
        SampleReader(RingReader::new(head, slots))
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    /// Records ever written (the position the next push takes).
    pub fn head(&self) -> u64 {
        self.0.head()
    }

    /// Records overwritten before anyone could be sure to read them: `head - capacity`.
    pub fn dropped(&self) -> u64 {
        self.0.dropped()
    }

    /// Reads the sample at absolute position `pos`.
    pub fn read(&self, pos: u64) -> Read {
        self.0.read(pos).map(|w| Sample::from_words(&w))
    }

    /// The newest sample, if any.
    pub fn latest(&self) -> Option<Sample> {
        self.0.latest().map(|w| Sample::from_words(&w))
    }

    /// Calls `f` with every sample still in the ring, oldest first, skipping any the writer
    /// overwrites meanwhile. Returns how many were skipped.
    pub fn for_each(&self, mut f: impl FnMut(&Sample)) -> u64 {
        self.0.for_each(|w| f(&Sample::from_words(w)))
    }
}

#[cfg(test)]
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

    /// The algorithm itself is tested in `gpuscale-ring`; this checks that samples go in and
    /// come out whole through every end.
    #[test]
    fn samples_round_trip_through_the_ring_and_overwrites_are_detected() {
        assert_eq!(SLOT_WORDS, SAMPLE_WORDS + 1);
        let (head, slots) = storage(8);
        let writer = SampleWriter::new(&head, &slots);
        let ring = writer.reader();
        assert_eq!(ring.read(0), Read::NotWritten);
        assert_eq!(ring.latest(), None);
        for i in 0..5 {
            writer.push(&sample(i));
        }
        assert_eq!(ring.read(3), Read::Record(sample(3)));
        assert_eq!(ring.read(5), Read::NotWritten);
        for i in 5..20 {
            writer.push(&sample(i));
        }
        assert_eq!(ring.read(3), Read::Overwritten);
        assert_eq!((ring.head(), ring.dropped(), ring.capacity()), (20, 12, 8));
        assert_eq!(writer.capacity(), 8);
        assert_eq!(ring.latest(), Some(sample(19)));
        let reader = SampleReader::new(&head, &slots);
        assert_eq!(reader.latest(), ring.latest());
        let mut seen = vec![];
        assert_eq!(reader.for_each(|s| seen.push(s.ts_ns)), 0);
        assert_eq!(seen, (12..20).collect::<Vec<_>>());
    }
}
