//! Attribution: which pod each GPU process belongs to ([`owners`]: eBPF's record of the device
//! open when there is one, else the process's cgroup in procfs), and each pod's share of its
//! GPU's values ([`split`], pure). [`Attribution`] says how a process's pod was found.

pub mod owners;
pub mod split;

pub use owners::Owners;
pub use split::{attribute, PodValues, Proc};

/// How a process was tied (or not) to a pod, named once for the ring file, the API and dumps.
pub use vocab::Attribution;
