//! The NVML sampler: one thread per GPU writing a [`Sample`] per interval into that GPU's ring,
//! plus one slower thread for per-process SM utilization ([`proc_util`]). [`devices`] finds what
//! to sample, [`gpm`] computes the GPM values, [`crate::attribution::owners`] ties processes to
//! pods.
//!
//! Owns every NVML call the agent makes, through `nvml-wrapper`. It must never let one GPU wait
//! for another, and never put `nvmlDeviceGetProcessUtilization` (2.5 ms on an H100) on a device's
//! per-interval path: that call runs on its own thread, only for GPUs with more than one process,
//! every [`proc_util_period`].
//!
//! A GPU whose calls fail is marked `lost` (NVML `GPU_IS_LOST`) or `error` and retried with
//! exponential backoff (1 s doubling to 30 s); meanwhile its ring keeps receiving empty samples
//! in that state every interval, so readers see when it went away. A value NVML does not support
//! on a device (utilization on a MIG instance, power on a MIG handle, …) is absent, not an error.
//!
//! MIG: each MIG instance of a MIG-enabled GPU is sampled as a device of its own, listed right
//! after its parent (one thread and one ring region each): its memory and processes from its MIG
//! handle, its GPM values from `nvmlGpmMigSampleGet` on the parent. The parent keeps its own
//! memory, power and temperature; its processes are listed (and attributed to pods) only under
//! its instances, so that no pod is counted twice.

pub mod checked;
pub mod devices;
pub mod gpm;
pub mod proc_util;

use std::path::Path;
use std::thread::Scope;
use std::time::{Duration, Instant};

use gpuscale_health::ops::lock;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use crate::attribution::Owners;
use crate::node::Node;
use crate::sample::{GpuState, Metric, Sample, Slot};
use crate::shm::{self, ProcessEntry, ProcessSnapshot, WriterRegion};
use crate::stop::Stop;
use crate::unix_now_ns;
pub use devices::{load_nvml, Devices};
use gpm::Gpm;
pub use proc_util::proc_util_period;

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts, in `scope`, one sampler thread per device of `devices` (writing into the ring region
/// of the same position) and the per-process utilization thread. They sample on one grid from
/// now until `stop`.
pub fn spawn<'scope, 'env, 'n>(
    scope: &'scope Scope<'scope, 'env>,
    nvml: &'n Nvml,
    devices: &'env Devices<'n>,
    regions: &'env [WriterRegion<'env>],
    node: &'env Node,
    proc_root: &'env Path,
    stop: &'env Stop,
) where
    'n: 'env,
{
    let epoch = Instant::now();
    let interval = node.interval;
    for (i, (device, region)) in devices.devices.iter().zip(regions).enumerate() {
        let parent = devices.parents[i].map(|p| &devices.devices[p]);
        std::thread::Builder::new()
            .name(format!("sampler-{i}"))
            .spawn_scoped(scope, move || {
                let _span = tracing::info_span!("sampler", gpu = i).entered();
                DeviceLoop::new(nvml, device, parent, region, node, i, interval, proc_root)
                    .run(epoch, stop);
            })
            .expect("spawning a sampler thread");
    }
    if !devices.devices.is_empty() {
        let devices = &devices.devices;
        std::thread::Builder::new()
            .name("proc-util".into())
            .spawn_scoped(scope, move || proc_util::run(devices, node, interval, stop))
            .expect("spawning the process-utilization thread");
    }
}

/// Why a device could not be sampled.
pub(crate) enum Failure {
    /// NVML's `GPU_IS_LOST`.
    Lost,
    /// Any other failure.
    Error(NvmlError),
}

pub(crate) fn classify(e: NvmlError) -> Failure {
    match e {
        NvmlError::GpuLost => Failure::Lost,
        e => Failure::Error(e),
    }
}

/// What a [`DeviceLoop`] samples.
#[derive(Clone, Copy)]
enum Kind<'a, 'n> {
    /// A physical GPU without MIG.
    Gpu,
    /// A physical GPU in MIG mode: its processes belong to its instances' loops.
    MigParent,
    /// A MIG instance of `parent`; GPM through the parent when the instance ID is known.
    MigInstance {
        parent: &'a Device<'n>,
        gpu_instance_id: Option<u32>,
    },
}

struct DeviceLoop<'a, 'n> {
    nvml: &'n Nvml,
    device: &'a Device<'n>,
    kind: Kind<'a, 'n>,
    region: &'a WriterRegion<'a>,
    agent: &'a Node,
    gpu: usize,
    gpm: Option<Gpm<'n>>,
    state: GpuState,
    backoff: Duration,
    retry_at: Instant,
    proc_version: u64,
    interval: Duration,
    owners: Owners,
    /// Metrics (bit [`Metric::index`]) already warned about as out of range on this GPU.
    warned: u32,
}

impl<'a, 'n> DeviceLoop<'a, 'n> {
    /// The loop of device `gpu` (a position in `agent.gpus`); `parent` is the physical GPU of a
    /// MIG instance.
    #[allow(clippy::too_many_arguments)]
    fn new(
        nvml: &'n Nvml,
        device: &'a Device<'n>,
        parent: Option<&'a Device<'n>>,
        region: &'a WriterRegion<'a>,
        agent: &'a Node,
        gpu: usize,
        interval: Duration,
        proc_root: &Path,
    ) -> Self {
        let info = &agent.gpus[gpu];
        let kind = match parent {
            Some(parent) => Kind::MigInstance {
                parent,
                gpu_instance_id: info.gpu_instance_id,
            },
            None if info.mig_enabled => Kind::MigParent,
            None => Kind::Gpu,
        };
        DeviceLoop {
            nvml,
            device,
            kind,
            region,
            agent,
            gpu,
            gpm: agent.gpus[gpu].gpm_supported.then(Gpm::default),
            state: GpuState::Starting,
            backoff: BACKOFF_START,
            retry_at: Instant::now(),
            proc_version: 0,
            interval,
            owners: Owners::new(proc_root, agent.tracker.clone()),
            warned: 0,
        }
    }

    /// Samples on the grid `epoch + k × interval` (shared by every GPU, so one snapshot carries
    /// every GPU's sample of a tick) until `stop`.
    fn run(mut self, epoch: Instant, stop: &Stop) {
        let interval = self.interval;
        let mut next = epoch;
        loop {
            if stop.wait_until(next) {
                return;
            }
            let now = Instant::now();
            // Fell behind (a slow NVML call)? Skip the missed ticks, staying on the grid.
            while next <= now {
                next += interval;
            }
            let (sample, processes) = if now >= self.retry_at {
                let started = Instant::now();
                let s = self.sample(now);
                self.agent.stats.gpus[self.gpu]
                    .sample_seconds
                    .observe(started.elapsed().as_secs_f64());
                s
            } else {
                (Sample::empty(unix_now_ns(), self.state), Vec::new())
            };
            self.region.ring().push(&sample);
            self.agent.record(self.gpu, &sample, processes);
        }
    }

    fn set_state(&mut self, state: GpuState, why: Option<&NvmlError>) {
        if state != self.state {
            match (state, why) {
                (GpuState::Ok, _) => tracing::info!("GPU sampled ({})", state.name()),
                (_, Some(e)) => {
                    tracing::warn!(error = %e, "GPU is {}; retrying with backoff", state.name())
                }
                _ => {}
            }
        }
        self.state = state;
        self.region.set_state(state);
    }

    fn sample(&mut self, now: Instant) -> (Sample, Vec<ProcessEntry>) {
        match self.try_sample(now) {
            Ok(s) => {
                self.backoff = BACKOFF_START;
                self.set_state(GpuState::Ok, None);
                s
            }
            Err(f) => {
                let stats = &self.agent.stats.gpus[self.gpu];
                let (state, e) = match f {
                    Failure::Lost => {
                        stats.lost.inc();
                        (GpuState::Lost, NvmlError::GpuLost)
                    }
                    Failure::Error(e) => {
                        stats.errors.inc();
                        (GpuState::Error, e)
                    }
                };
                self.set_state(state, Some(&e));
                self.retry_at = now + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                if let Some(g) = &mut self.gpm {
                    g.reset();
                }
                (Sample::empty(unix_now_ns(), state), Vec::new())
            }
        }
    }

    fn try_sample(&mut self, now: Instant) -> Result<(Sample, Vec<ProcessEntry>), Failure> {
        let d = self.device;
        let mut s = Sample::empty(unix_now_ns(), GpuState::Ok);
        // NOT_SUPPORTED on MIG instances and on GPUs in MIG mode: absent, never 0.
        if let Some(util) = optional(d.utilization_rates())? {
            self.put(&mut s, Slot::GpuUtil, f64::from(util.gpu));
            self.put(&mut s, Slot::MemUtil, f64::from(util.memory));
        }
        if let Some(m) = optional(d.memory_info())? {
            let total = self.agent.gpus[self.gpu].memory_total_bytes;
            if self
                .accept(Metric::VramUsedBytes, m.used as f64, total)
                .is_some()
            {
                s.set_vram_used(m.used);
            }
        }
        if let Some(mw) = optional(d.power_usage())? {
            self.put(&mut s, Slot::PowerWatts, f64::from(mw) / 1000.0);
        }
        if let Some(t) = optional(d.temperature(TemperatureSensor::Gpu))? {
            self.put(&mut s, Slot::TemperatureC, f64::from(t));
        }
        if let Some(v) = self.gpm_values(now)? {
            for (slot, v) in gpm::SLOTS.into_iter().zip(v) {
                self.put(&mut s, slot, f64::from(v));
            }
        }
        let procs = match self.kind {
            // In MIG mode NVML lists every instance's processes here too; they are read (and
            // attributed) per instance, so a pod is never counted on both.
            Kind::MigParent => Vec::new(),
            Kind::Gpu | Kind::MigInstance { .. } => {
                optional(d.running_compute_processes())?.unwrap_or_default()
            }
        };
        s.process_count = procs.len() as u32;
        let processes = self.publish_processes(s.ts_ns, &procs);
        Ok((s, processes))
    }

    /// Sets `slot` of `s` to `raw` when NVML's value can be what it claims ([`Self::accept`]);
    /// otherwise leaves it unmeasured for this sample.
    fn put(&mut self, s: &mut Sample, slot: Slot, raw: f64) {
        if let Some(v) = self.accept(slot.metric(), raw, 0) {
            s.set(slot, v as f32);
        }
    }

    /// [`checked::accept`]; a value NVML gave that `metric` cannot have is counted, and logged
    /// once per metric.
    fn accept(&mut self, metric: Metric, raw: f64, vram_total_bytes: u64) -> Option<f64> {
        let accepted = checked::accept(metric, raw, vram_total_bytes);
        if accepted.is_some() {
            return accepted;
        }
        self.agent.stats.gpus[self.gpu].out_of_range.inc();
        let bit = 1 << metric.index();
        if self.warned & bit == 0 {
            self.warned |= bit;
            tracing::warn!(
                %metric,
                value = raw,
                "NVML reported a value {metric} cannot have; left unmeasured for that sample \
                 (this and later ones are counted in gpuscale_agent_nvml_out_of_range_total, \
                 logged once)"
            );
        }
        None
    }

    fn gpm_values(&mut self, now: Instant) -> Result<Option<[f32; 4]>, Failure> {
        let Some(g) = &mut self.gpm else {
            return Ok(None);
        };
        let (device, kind) = (self.device, self.kind);
        g.values(self.nvml, now, || match kind {
            Kind::Gpu | Kind::MigParent => Some(device.gpm_sample()),
            Kind::MigInstance {
                parent,
                gpu_instance_id: Some(id),
            } => Some(parent.gpm_mig_sample(id)),
            // Without its GPU instance ID an instance's GPM cannot be read.
            Kind::MigInstance {
                gpu_instance_id: None,
                ..
            } => None,
        })
    }

    /// Attributes the processes to pods, writes them to the ring file's snapshot, and returns
    /// them.
    fn publish_processes(
        &mut self,
        ts_ns: u64,
        procs: &[nvml_wrapper::struct_wrappers::device::ProcessInfo],
    ) -> Vec<ProcessEntry> {
        let mut pu = lock(&self.agent.proc_util[self.gpu]);
        // NVML has no per-process utilization on MIG instances: their split by SM stays absent.
        pu.wanted = procs.len() > 1 && !matches!(self.kind, Kind::MigInstance { .. });
        let fresh = pu
            .at
            .is_some_and(|at| at.elapsed() <= 3 * proc_util_period(self.interval));
        let mut processes: Vec<ProcessEntry> = procs
            .iter()
            .map(|p| ProcessEntry {
                pid: p.pid,
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
                // NVML lists only processes with non-zero utilization since the last look, so a
                // process missing from a fresh answer measured 0.
                sm_util: (fresh && procs.len() > 1)
                    .then(|| pu.sm_util.get(&p.pid).copied().unwrap_or(0.0)),
                ..ProcessEntry::default()
            })
            .collect();
        drop(pu);
        self.owners.attribute(&mut processes);
        let truncated = processes.len().saturating_sub(shm::MAX_PROCESSES) as u32;
        self.proc_version += 1;
        let snapshot = ProcessSnapshot {
            ts_ns,
            processes,
            truncated,
        };
        self.region.write_processes(self.proc_version, &snapshot);
        snapshot.processes
    }
}

/// `Ok(None)` for NVML's "not supported"-like answers (the value is absent), `Err` for a GPU
/// that is lost or failing.
pub(crate) fn optional<T>(r: Result<T, NvmlError>) -> Result<Option<T>, Failure> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported | NvmlError::NoPermission | NvmlError::FunctionNotFound) => {
            Ok(None)
        }
        Err(NvmlError::FailedToLoadSymbol(_)) => Ok(None),
        Err(e) => Err(classify(e)),
    }
}
