//! `cargo xtask bench-scale`: how the collector holds up with thousands of nodes. [`sim`]
//! serves the real agent API for many simulated nodes from one process; the binary
//! (`src/main.rs`) runs them against a real collector under a KEDA-like load and measures it.

pub mod sim;
