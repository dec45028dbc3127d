//! The command-line readers of a running agent: [`dump`] (what its ring holds, rebuilt into
//! windows) and [`watch`] (every new sample as it is written). Both map the ring file read-only
//! through [`crate::shm::ShmReader`], own their printing (text and `--json`), and never write to
//! the file, touch NVML or use the network.

pub mod dump;
pub mod watch;

/// The ring file every command uses when `--shm` / `GPUSCALE_SHM` is not given.
pub const DEFAULT_SHM: &str = "/dev/shm/gpuscale/agent.ring";
