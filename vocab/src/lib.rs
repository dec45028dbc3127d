//! gpuscale's shared vocabulary, so that every crate (the agent, the collector, the tests and
//! `cargo xtask`, which must build in seconds) reads and writes the same words the same way.
//! Its only dependency is strum, which derives the names.
//!
//! [`duration`]: the one grammar for durations in flags and trigger metadata. [`Metric`]: the
//! metrics, named once for the agent, the wire, triggers, dumps and Prometheus. [`Window`]: the
//! windows the agent keeps. [`GpuState`], [`Attribution`], [`EbpfState`]: what the agent reports
//! of a GPU, a process and its eBPF tracker, with the codes its ring file stores.

pub mod duration;
mod metric;
mod state;
mod window;

pub use metric::{Metric, MAX_POWER_WATTS, MAX_TEMPERATURE_C};
pub use state::{Attribution, EbpfState, GpuState};
pub use window::Window;
