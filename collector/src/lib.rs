//! gpuscale cluster collector.
#![deny(missing_docs)]

pub mod selector;
pub mod trigger;
