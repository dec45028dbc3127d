//! gpuscale node agent: samples NVML at high frequency into a lock-free shared-memory ring and
//! keeps rolling windows of every metric per GPU.
//!
//! Start at [`daemon`], the composition root of `gpuscale-agent run`. The rest, by concept:
//! - the node's shared state: [`node`] (what samplers write and servers read), [`stats`] (the
//!   loops' own counters), [`stop`] (the stop signal);
//! - sampling: [`sampler`] (NVML: devices, per-tick loops, GPM, per-process utilization),
//!   [`sample`] (the record), [`window`] (rolling statistics), [`live`] (a GPU's current view);
//! - attribution: [`attribution`] (which pod owns a process, and each pod's share of a GPU),
//!   [`cgroup`] (cgroup paths and the procfs resolver), [`ebpf`] (device-open tracking);
//! - the ring file: [`ring`] (the seqlock ring's sample ends), [`shm`] (the file: its layout,
//!   writer and reader, regions and records);
//! - serving: [`server`] (the agent gRPC API), [`metrics`] (health, readiness and Prometheus);
//! - reading a running agent from its ring file: [`cli`] (`dump`, `watch`).
#![deny(missing_docs)]

pub mod attribution;
pub mod cgroup;
pub mod cli;
pub mod daemon;
pub mod ebpf;
pub mod live;
pub mod metrics;
pub mod node;
pub mod ring;
pub mod sample;
pub mod sampler;
pub mod server;
pub mod shm;
pub mod stats;
pub mod stop;
pub mod window;

use std::path::PathBuf;

/// Errors the agent reports to users. Each message names the input at fault and the fix; the
/// underlying error is part of the message (not a `source`), so `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NVML library could not be loaded at all.
    #[error(
        "cannot load the NVML library {path:?}: {error}. Install the NVIDIA driver (or the \
         container toolkit's driver mount) or point --nvml-lib / GPUSCALE_NVML_LIB at \
         libnvidia-ml.so.1"
    )]
    NvmlLoad {
        /// The library path tried.
        path: PathBuf,
        /// What the loader said.
        error: nvml_wrapper::error::NvmlError,
    },
    /// NVML loaded but refused to initialise or enumerate GPUs.
    #[error("NVML from {path:?} failed to {what}: {error}")]
    Nvml {
        /// The library path.
        path: PathBuf,
        /// What the agent was doing.
        what: &'static str,
        /// NVML's error.
        error: nvml_wrapper::error::NvmlError,
    },
    /// A MIG device of a MIG-enabled GPU could not be opened.
    #[error(
        "NVML from {path:?} failed to open MIG device {mig_index} of GPU {gpu} ({uuid}): \
         {error}. The agent samples all MIG instances of a GPU or none (a pod on an instance it \
         missed would read as idle); check the GPU's instances with `nvidia-smi mig -lgi` and \
         restart the agent once they are set up"
    )]
    MigDevice {
        /// The library path.
        path: PathBuf,
        /// NVML index of the parent GPU.
        gpu: u32,
        /// UUID of the parent GPU.
        uuid: String,
        /// The MIG device index (`nvmlDeviceGetMigDeviceHandleByIndex`).
        mig_index: u32,
        /// NVML's error.
        error: nvml_wrapper::error::NvmlError,
    },
    /// The ring file could not be created, opened, sized or mapped.
    #[error("cannot {what} the ring file {path:?}: {error}. Check --shm / GPUSCALE_SHM points at a writable place (default /dev/shm/gpuscale/agent.ring)")]
    Shm {
        /// The ring file path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        error: std::io::Error,
    },
    /// Another agent holds the ring file's writer lock.
    #[error("another gpuscale agent is already writing {path:?} (its lock {path:?}.lock is held); stop it or give this one another --shm")]
    ShmBusy {
        /// The ring file path.
        path: PathBuf,
    },
    /// The ring file's directory (or the lock file in it) is not safe for a root daemon's
    /// files: another user could plant links or files there.
    #[error("the ring file's directory {path:?} is not safe: {why}. Give --shm / GPUSCALE_SHM a path in a directory only this user owns and writes (the agent makes a missing one with mode 0700)")]
    UnsafeRingDir {
        /// The directory (or the file in it).
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The ring file was truncated or replaced while the agent wrote it.
    #[error("the ring file {path:?} {why} while the agent was writing it; stopping so that a restart writes a new one (something else writes to --shm: give each agent its own path)")]
    RingFileLost {
        /// The ring file path.
        path: PathBuf,
        /// What happened to it.
        why: String,
    },
    /// The ring file does not exist.
    #[error("the ring file {path:?} does not exist: is the agent running, and is --shm the same path it was started with?")]
    ShmMissing {
        /// The ring file path.
        path: PathBuf,
    },
    /// The gRPC listen address could not be bound.
    #[error("cannot listen on {addr} (--listen / GPUSCALE_LISTEN): {error}; pick a free address")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// An async runtime or a thread the agent needs could not start.
    #[error("cannot start {what}: {error}")]
    Runtime {
        /// What was starting.
        what: &'static str,
        /// The OS error.
        error: std::io::Error,
    },
    /// The health and metrics server (`--http-listen`) could not bind or failed.
    #[error(transparent)]
    Http(#[from] gpuscale_health::Error),
    /// `--tls-cert`, `--tls-key` or `--tls-client-ca` is unusable.
    #[error(transparent)]
    Tls(#[from] gpuscale_health::tls::TlsError),
    /// The gRPC server stopped with an error.
    #[error("the agent API server failed: {why}")]
    Serve {
        /// What tonic said.
        why: String,
    },
    /// The file exists but is not a ring this build can read.
    #[error("cannot read {path:?} as a gpuscale ring: {why}")]
    BadRingFile {
        /// The file path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// `gpuscale-agent watch --gpu` names a GPU the ring file does not have.
    #[error(
        "--gpu {gpu}: the ring file {} has no such GPU (it has: {have}); give one of those",
        path.display()
    )]
    NoSuchGpu {
        /// The ring file path.
        path: PathBuf,
        /// The NVML index asked for.
        gpu: u32,
        /// The indices the file has, comma separated (`none` when it has none).
        have: String,
    },
    /// `--device-prefix` cannot be matched by the eBPF program.
    #[error(
        "--device-prefix / GPUSCALE_DEVICE_PREFIX {prefix:?} {why}; give an absolute path prefix \
         of at most 32 bytes such as /dev/nvidia"
    )]
    DevicePrefix {
        /// The prefix given.
        prefix: String,
        /// What is wrong with it.
        why: String,
    },
    /// The eBPF device-open tracker could not start (an error with `--ebpf on`; `--ebpf auto`
    /// logs the reason and uses procfs).
    #[error(
        "cannot start eBPF device-open tracking (--ebpf on / GPUSCALE_EBPF): {why}. Fix that, or \
         run with --ebpf auto to fall back to procfs"
    )]
    Ebpf {
        /// What failed and what to do about it.
        why: String,
    },
}

/// Result with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wall-clock time now, nanoseconds since the Unix epoch.
pub use gpuscale_health::ops::unix_now_ns;
