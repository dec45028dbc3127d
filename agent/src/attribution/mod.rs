//! Attribution: which pod each GPU process belongs to ([`owners`]: eBPF's record of the device
//! open when there is one, else the process's cgroup in procfs), and each pod's share of its
//! GPU's values ([`split`], pure). [`Source`] says how a process's pod was found.

pub mod owners;
pub mod split;

pub use owners::Owners;
pub use split::{attribute, PodValues, Proc};

/// How a process was tied (or not) to a pod. Stored in the ring file by its [`Source::code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Source {
    /// Not looked up yet.
    #[default]
    None = 0,
    /// From `/proc/<pid>/cgroup`.
    Procfs = 1,
    /// From the eBPF device-open tracker.
    Ebpf = 2,
    /// Looked up, but the process's cgroup could not be read (it exited, or no permission).
    Unknown = 3,
}

impl Source {
    /// The name dumps and the API use (`procfs`, `ebpf`, `unknown`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Procfs => "procfs",
            Source::Ebpf => "ebpf",
            Source::Unknown => "unknown",
        }
    }

    /// The code stored in the ring file.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The source of a stored `code`; an unknown code is [`Source::None`].
    pub fn from_code(code: u8) -> Source {
        match code {
            1 => Source::Procfs,
            2 => Source::Ebpf,
            3 => Source::Unknown,
            _ => Source::None,
        }
    }
}
