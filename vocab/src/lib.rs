//! gpuscale's shared vocabulary, with no dependencies, so that every crate (the agent, the
//! collector, and `cargo xtask`, which must build in seconds) reads and writes the same words the
//! same way.
//!
//! [`duration`]: the one grammar for durations in flags and trigger metadata. [`Metric`]: the
//! metrics, named once for the agent, the wire, triggers, dumps and Prometheus.

pub mod duration;
mod metric;

pub use metric::Metric;
