//! The ring file at `--shm`: its layout, the agent's writer that creates or reuses it, and the
//! read-only view `dump`, `watch` and the collector-less tools use.
//!
//! By concept:
//! - [`layout`]: the bytes of the file (its module doc draws them), the header, the GPU table,
//!   every offset and size, and [`LAYOUT_VERSION`];
//! - [`file`](mod@file): [`ShmWriter`] (a safe directory, writer lock, create or reuse, map
//!   writable, [`RingWatch`] for a file truncated or replaced under it) and [`ShmReader`] (map
//!   read-only, validate, is a writer alive); `guard`: no SIGBUS from a truncated file;
//! - [`region`]: the per-GPU regions and the agent area, a writer type ([`WriterRegion`],
//!   [`AgentAreaWriter`]) and a reader type ([`ReaderRegion`], [`AgentAreaReader`]) of each;
//! - [`records`]: the process snapshot and the agent status, and the `Pod` records their seqlock
//!   cells hold.
//!
//! It never interprets samples, and publishes nothing with orderings of its own (its state word
//! is a `Relaxed` status): the seqlock ring and cells of the `gpuscale-ring` crate, through
//! [`crate::ring`], do that. The [`Attribution`] and the [`EbpfState`] a record stores (by their
//! stored codes) are the vocabulary's (`vocab`), re-exported here.

pub mod file;
mod guard;
pub mod layout;
pub mod records;
pub mod region;

pub use file::{capacity_for, lock_path, Params, RingWatch, ShmReader, ShmWriter, WriterParts};
pub use layout::{
    FileHeader, GpuEntry, GpuInfo, LAYOUT_VERSION, MAGIC, MAX_OPENS, MAX_PROCESSES, REASON_BYTES,
};
pub use records::{AgentStatus, DeviceOpen, ProcessEntry, ProcessSnapshot};
pub use region::{AgentAreaReader, AgentAreaWriter, ReaderRegion, WriterRegion};
pub use vocab::{Attribution, EbpfState};
