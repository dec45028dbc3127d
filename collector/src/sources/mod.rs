//! Where the collector's data comes from, and the in-memory state it is kept in.
//!
//! - [`agents`]: one `WatchSnapshots` stream per agent, reconnecting with backoff; the
//!   [`agents::Fleet`] of followed addresses.
//! - [`demand`]: which series the triggers in use read, which the streams ask the agents for.
//! - [`validate`]: what an agent sends, checked before it enters the view.
//! - [`view`]: the cluster view those streams write (node → GPUs → pods, with freshness).
//! - [`pods`]: pod metadata behind one interface, [`pods::PodSource`], and the `--pods-file`
//!   source. The Kubernetes API source is [`crate::kube::pods`].

pub mod agents;
pub mod demand;
pub mod pods;
pub mod validate;
pub mod view;
