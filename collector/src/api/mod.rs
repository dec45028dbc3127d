//! What the collector serves: KEDA's external-scaler gRPC API ([`scaler`]), the debug API that
//! `dump` and `query` read ([`debug`]), health and readiness ([`http`]) and Prometheus series
//! ([`metrics`]). Every answer comes from memory; nothing here dials an agent or the Kubernetes
//! API.

pub mod debug;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod scaler;
