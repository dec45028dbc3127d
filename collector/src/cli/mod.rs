//! The command-line clients of a running collector: [`dump`] (its cluster view) and [`query`]
//! (what KEDA would be told for one trigger). They talk to the collector over gRPC only and own
//! the printing, text and `--json`.

pub mod dump;
pub mod query;
