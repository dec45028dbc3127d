//! The NVML sampler: one thread per GPU writing a [`Sample`] per interval into that GPU's ring,
//! plus one slower thread for per-process SM utilization.
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::error::{nvml_sym, nvml_try};
use nvml_wrapper::gpm::{gpm_metrics_get, GpmSample};
use nvml_wrapper::{Device, Nvml};

use crate::cgroup::{Attribution, ProcfsResolver};
use crate::ebpf::{EbpfConfig, EbpfMode, Tracker};
use crate::live::GpuLive;
use crate::metrics::Stats;
use crate::sample::{GpuState, Sample, Slot};
use crate::shm::{
    self, AgentStatus, DeviceOpen, EbpfState, GpuInfo, ProcessEntry, ProcessSnapshot, Region,
    ShmWriter, Source,
};
use crate::window::GpuWindows;
use crate::{unix_now_ns, Error, Result};

/// GPM needs two samples about this far apart.
pub const GPM_MIN_SPACING: Duration = Duration::from_millis(100);
/// Wake-up jitter tolerated against [`GPM_MIN_SPACING`], so that at a 100 ms interval every tick
/// refreshes GPM instead of every other one.
const GPM_SPACING_SLACK: Duration = Duration::from_millis(10);
/// A GPM value older than this is reported as absent rather than held.
const GPM_MAX_AGE: Duration = Duration::from_secs(2);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the agent status (eBPF counters, device opens) is published.
const STATUS_PERIOD: Duration = Duration::from_secs(1);
/// How long an unchanged PID list keeps its pod attribution before procfs is read again.
pub const REATTRIBUTE_EVERY: Duration = Duration::from_secs(1);
/// History the ring keeps at the configured interval.
pub const RING_HISTORY: Duration = Duration::from_secs(600);

/// How often per-process utilization is read for GPUs with more than one process.
pub fn proc_util_period(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(1))
}

/// What `gpuscale-agent run` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Path of `libnvidia-ml.so.1` (or the fake).
    pub nvml_lib: PathBuf,
    /// Ring file path.
    pub shm: PathBuf,
    /// Sampling interval.
    pub interval: Duration,
    /// Node name written into the ring.
    pub node_name: String,
    /// Where `/proc` of the host's PID namespace is (NVML reports host PIDs).
    pub proc_root: PathBuf,
    /// eBPF device-open tracking (`--ebpf`, `--device-prefix`, `--cgroup-root`).
    pub ebpf: EbpfConfig,
}

/// A stop signal the sampler threads wait on between samples (and async tasks through
/// [`Stop::stopped`]).
pub struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Stop {
    fn default() -> Self {
        Stop {
            stopped: Mutex::new(false),
            cv: Condvar::new(),
            tx: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Stop {
    /// Asks every loop waiting on this signal to finish.
    pub fn trigger(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
        self.tx.send_replace(true);
    }

    /// Resolves once [`Stop::trigger`] has been called.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }

    /// Whether [`Stop::trigger`] was called.
    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until [`Stop::trigger`] is called.
    pub fn wait(&self) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        while !*stopped {
            stopped = self.cv.wait(stopped).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sleeps until `deadline`; returns `true` when stopped meanwhile.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *stopped {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .cv
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Loads NVML from `path`, mapping failures to errors that name the path and the flag.
pub fn load_nvml(path: &Path) -> Result<Nvml> {
    Nvml::builder()
        .lib_path(path.as_os_str())
        .init()
        .map_err(|error| match error {
            NvmlError::LibloadingError(_) | NvmlError::FailedToLoadSymbol(_) => Error::NvmlLoad {
                path: path.to_owned(),
                error,
            },
            error => Error::Nvml {
                path: path.to_owned(),
                what: "initialise",
                error,
            },
        })
}

fn describe(device: &Device<'_>, index: u32) -> GpuInfo {
    GpuInfo {
        index,
        uuid: device.uuid().unwrap_or_default(),
        name: device.name().unwrap_or_else(|_| "unknown".into()),
        memory_total_bytes: device.memory_info().map_or(0, |m| m.total),
        gpm_supported: device.gpm_support().unwrap_or(false),
        // NOT_SUPPORTED (a GPU without MIG), or any other answer: MIG is not in use.
        mig_enabled: device
            .mig_mode()
            .is_ok_and(|m| m.current == nvml_wrapper_sys::bindings::NVML_DEVICE_MIG_ENABLE),
        ..GpuInfo::default()
    }
}

/// `nvmlDeviceGetGpuInstanceId` of a MIG device. nvml-wrapper 0.13 has no wrapper for it, so
/// this calls the symbol from nvml-wrapper-sys's table of the library `nvml` loaded.
fn gpu_instance_id(nvml: &Nvml, device: &Device<'_>) -> Result<u32, NvmlError> {
    let sym = nvml_sym(nvml.lib().nvmlDeviceGetGpuInstanceId.as_ref())?;
    // SAFETY: a handle of `nvml`'s library, used while `nvml` is alive; only passed to NVML.
    let handle: nvml_wrapper_sys::bindings::nvmlDevice_t = unsafe { device.handle() };
    let mut id: std::ffi::c_uint = 0;
    // SAFETY: `sym` is the library's `nvmlDeviceGetGpuInstanceId` with the C signature bindgen
    // generated from nvml.h; `handle` is valid (above) and `id` a valid out-pointer.
    nvml_try(unsafe { sym(handle, &mut id) })?;
    Ok(id)
}

/// The MIG instances of the MIG-enabled GPU `parent` (described by `info`), in MIG device index
/// order, each described as a GPU of its own.
///
/// Fails when a filled slot cannot be opened: sampling some instances and not others would show
/// the pods of the missing ones as using no GPU.
fn mig_instances<'n>(
    nvml: &'n Nvml,
    lib_path: &Path,
    parent: &Device<'n>,
    info: &GpuInfo,
) -> Result<Vec<(Device<'n>, GpuInfo)>> {
    let max = parent.mig_device_count().map_err(|error| Error::Nvml {
        path: lib_path.to_owned(),
        what: "count the MIG devices of a MIG-enabled GPU",
        error,
    })?;
    let mut out = Vec::new();
    for mig_index in 0..max {
        let device = match parent.mig_device_by_index(mig_index) {
            Ok(d) => d,
            // An empty slot: MIG device indexes can be sparse.
            Err(NvmlError::NotFound) => continue,
            Err(error) => {
                return Err(Error::MigDevice {
                    path: lib_path.to_owned(),
                    gpu: info.index,
                    uuid: info.uuid.clone(),
                    mig_index,
                    error,
                })
            }
        };
        let gpu_instance_id = match gpu_instance_id(nvml, &device) {
            Ok(id) => Some(id),
            Err(error) => {
                tracing::warn!(gpu = info.index, mig_index, %error, "cannot read the GPU instance ID of a MIG device; its GPM values are unavailable");
                None
            }
        };
        let mig = GpuInfo {
            index: info.index,
            uuid: device.uuid().unwrap_or_default(),
            name: device.name().unwrap_or_else(|_| "unknown".into()),
            memory_total_bytes: device.memory_info().map_or(0, |m| m.total),
            // GPM of an instance is read through its parent (nvmlGpmMigSampleGet).
            gpm_supported: info.gpm_supported && gpu_instance_id.is_some(),
            parent_uuid: info.uuid.clone(),
            gpu_instance_id,
            mig_enabled: false,
        };
        out.push((device, mig));
    }
    Ok(out)
}

/// Per-process SM utilization the slow thread measured for one GPU.
#[derive(Default)]
struct ProcUtil {
    /// Set by the device sampler: the GPU has more than one process.
    wanted: bool,
    /// When the map was last refreshed.
    at: Option<Instant>,
    sm_util: HashMap<u32, f32>,
}

/// Everything the device threads share with the rest of the agent (the gRPC server).
pub struct Agent {
    /// Node name reported with the data.
    pub node_name: String,
    /// NVIDIA driver version.
    pub driver_version: String,
    /// Sampling interval.
    pub interval: Duration,
    /// The GPUs being sampled.
    pub gpus: Vec<GpuInfo>,
    live: Vec<Mutex<GpuLive>>,
    proc_util: Vec<Mutex<ProcUtil>>,
    samples: tokio::sync::watch::Sender<u64>,
    status: Mutex<AgentStatus>,
    tracker: Option<Arc<Tracker>>,
    /// Progress and timing of the loops, for `/healthz` and `/metrics`.
    pub(crate) stats: Stats,
}

impl Agent {
    /// A look at one GPU's live view (windows, processes, pods), under its lock: keep `f` short,
    /// the GPU's sampler waits for it.
    pub fn with_live<T>(&self, gpu: usize, f: impl FnOnce(&GpuLive) -> T) -> T {
        f(&self.live[gpu].lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Agent-wide status: the eBPF tracker's state and recent GPU device opens.
    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A receiver that sees a new value after every recorded sample of any GPU.
    pub fn samples(&self) -> tokio::sync::watch::Receiver<u64> {
        self.samples.subscribe()
    }

    /// Takes one tick's sample of GPU `gpu` into the live view and the stats, and wakes the
    /// snapshot streams.
    fn record(&self, gpu: usize, sample: &Sample, processes: Vec<ProcessEntry>) {
        let mut live = self.live[gpu].lock().unwrap_or_else(|e| e.into_inner());
        live.record(sample, processes);
        // Under the live lock, so a scrape sees the sample with its processes.
        self.stats.gpus[gpu].record(sample);
        drop(live);
        self.samples.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
impl Agent {
    /// An agent on node `test-node` with `gpus` and nothing sampled, for other modules' tests.
    pub(crate) fn for_tests(gpus: Vec<GpuInfo>, interval: Duration) -> Agent {
        Agent {
            node_name: "test-node".into(),
            driver_version: "580.159.04".into(),
            interval,
            live: gpus
                .iter()
                .map(|g| {
                    Mutex::new(GpuLive::new(
                        GpuWindows::for_gpu(),
                        g.memory_total_bytes,
                        interval,
                    ))
                })
                .collect(),
            proc_util: gpus.iter().map(|_| Mutex::default()).collect(),
            stats: Stats::new(gpus.len()),
            gpus,
            samples: tokio::sync::watch::channel(0).0,
            status: Mutex::new(AgentStatus::default()),
            tracker: None,
        }
    }

    /// Records a sample of GPU `gpu` as a sampler tick does.
    pub(crate) fn tick_for_tests(&self, gpu: usize, sample: &Sample, processes: Vec<ProcessEntry>) {
        self.record(gpu, sample, processes);
    }

    /// Sets the agent-wide status as the status loop does.
    pub(crate) fn set_status_for_tests(&self, status: AgentStatus) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }
}

/// Runs the agent until `stop` fires: loads NVML, opens the ring, rebuilds windows from its
/// history when the file is reused, and samples every GPU. `ready` is called once sampling has
/// started.
pub fn run(config: &Config, stop: &Stop, ready: impl FnOnce(Arc<Agent>)) -> Result<()> {
    let (tracker, ebpf_state, ebpf_reason) = start_ebpf(&config.ebpf)?;
    let nvml = load_nvml(&config.nvml_lib)?;
    let nvml_err = |what: &'static str| {
        let path = config.nvml_lib.clone();
        move |error| Error::Nvml { path, what, error }
    };
    let driver = nvml
        .sys_driver_version()
        .unwrap_or_else(|_| "unknown".into());
    let count = nvml.device_count().map_err(nvml_err("count GPUs"))?;
    // Every sampled device: physical GPUs, each followed by its MIG instances (whose `parents`
    // entry is the position of their GPU).
    let mut devices = Vec::new();
    let mut parents = Vec::new();
    let mut gpus: Vec<GpuInfo> = Vec::new();
    for i in 0..count {
        let device = nvml.device_by_index(i).map_err(nvml_err("open a GPU"))?;
        let info = describe(&device, i);
        let instances = if info.mig_enabled {
            mig_instances(&nvml, &config.nvml_lib, &device, &info)?
        } else {
            Vec::new()
        };
        let parent = devices.len();
        devices.push(device);
        parents.push(None);
        gpus.push(info);
        for (d, info) in instances {
            devices.push(d);
            parents.push(Some(parent));
            gpus.push(info);
        }
    }
    if gpus.is_empty() {
        tracing::warn!("NVML reports zero GPUs on this node; the agent runs and reports none");
    }
    for g in &gpus {
        if g.is_mig_instance() {
            tracing::info!(gpu = g.index, uuid = %g.uuid, name = %g.name, parent = %g.parent_uuid, gpu_instance_id = ?g.gpu_instance_id, gpm = g.gpm_supported, "found MIG instance");
        } else {
            tracing::info!(gpu = g.index, uuid = %g.uuid, name = %g.name, gpm = g.gpm_supported, mig = g.mig_enabled, "found GPU");
        }
    }
    let params = shm::Params {
        capacity: shm::capacity_for(config.interval, RING_HISTORY),
        interval_ns: config.interval.as_nanos() as u64,
        node_name: config.node_name.clone(),
        driver_version: driver.clone(),
    };
    let writer = ShmWriter::open(&config.shm, &params, &gpus)?;
    let regions = writer.regions();
    let live = regions
        .iter()
        .zip(&gpus)
        .map(|(r, g)| {
            let w = if writer.reused() {
                GpuWindows::from_ring(&r.ring(), g.memory_total_bytes, config.interval)
            } else {
                GpuWindows::for_gpu_at(config.interval)
            };
            Mutex::new(GpuLive::new(w, g.memory_total_bytes, config.interval))
        })
        .collect();
    if writer.reused() {
        tracing::info!(path = %config.shm.display(), "reused the ring file; windows rebuilt from its history");
    }
    tracing::info!(
        path = %config.shm.display(),
        driver = %driver,
        gpus = gpus.len(),
        interval = %vocab::duration::format(config.interval),
        capacity = writer.capacity(),
        "sampling"
    );
    let agent = Arc::new(Agent {
        node_name: config.node_name.clone(),
        driver_version: driver,
        interval: config.interval,
        proc_util: gpus.iter().map(|_| Mutex::default()).collect(),
        stats: Stats::new(gpus.len()),
        gpus,
        live,
        samples: tokio::sync::watch::channel(0).0,
        status: Mutex::new(AgentStatus {
            ebpf: ebpf_state,
            ebpf_reason: ebpf_reason.clone(),
            ..AgentStatus::default()
        }),
        tracker,
    });
    let epoch = Instant::now();
    std::thread::scope(|s| {
        for (i, (device, region)) in devices.iter().zip(&regions).enumerate() {
            let agent = &*agent;
            let nvml = &nvml;
            let parent = parents[i].map(|p| &devices[p]);
            std::thread::Builder::new()
                .name(format!("sampler-{i}"))
                .spawn_scoped(s, move || {
                    let _span = tracing::info_span!("sampler", gpu = i).entered();
                    DeviceLoop::new(
                        nvml,
                        device,
                        parent,
                        region,
                        agent,
                        i,
                        config.interval,
                        &config.proc_root,
                    )
                    .run(epoch, stop);
                })
                .expect("spawning a sampler thread");
        }
        if !devices.is_empty() {
            let agent = &*agent;
            let devices = &devices;
            std::thread::Builder::new()
                .name("proc-util".into())
                .spawn_scoped(s, move || {
                    proc_util_loop(devices, agent, config.interval, stop)
                })
                .expect("spawning the process-utilization thread");
        }
        {
            let agent = &*agent;
            let area = writer.agent_area();
            std::thread::Builder::new()
                .name("status".into())
                .spawn_scoped(s, move || status_loop(agent, &area, stop))
                .expect("spawning the status thread");
        }
        ready(agent.clone());
        stop.wait();
    });
    if let Some(t) = &agent.tracker {
        t.stop();
    }
    tracing::info!("stopped sampling");
    Ok(())
}

/// Starts eBPF tracking as `--ebpf` says; returns the tracker and the state `dump` reports.
/// `auto` falls back to procfs with one warning saying why; `on` fails the agent instead.
fn start_ebpf(config: &EbpfConfig) -> Result<(Option<Arc<Tracker>>, EbpfState, String)> {
    if !crate::ebpf::built_with_ebpf() {
        tracing::info!(
            "this agent was built without its eBPF object (the eBPF toolchain was missing at \
             build time); GPU processes are attributed through procfs"
        );
    }
    match config.mode {
        EbpfMode::Off => Ok((None, EbpfState::Off, String::new())),
        EbpfMode::On => {
            let t = Tracker::load(config)?;
            let hook = t.hook().describe().to_owned();
            Ok((Some(t), EbpfState::On, hook))
        }
        EbpfMode::Auto => match Tracker::load(config) {
            Ok(t) => {
                let hook = t.hook().describe().to_owned();
                Ok((Some(t), EbpfState::On, hook))
            }
            Err(e @ Error::DevicePrefix { .. }) => Err(e),
            Err(e) => {
                let why = match e {
                    Error::Ebpf { why } => why,
                    e => e.to_string(),
                };
                tracing::warn!(
                    "eBPF device-open tracking is unavailable ({why}); attributing GPU processes \
                     through procfs"
                );
                Ok((None, EbpfState::Unavailable, why))
            }
        },
    }
}

/// Publishes the agent-wide status (eBPF counters, recent device opens) once a second, to the
/// ring file for `dump` and to memory for the gRPC API.
fn status_loop(agent: &Agent, area: &crate::shm::AgentArea<'_>, stop: &Stop) {
    let mut version = 0;
    loop {
        let mut status = agent.status();
        if let Some(t) = &agent.tracker {
            let stats = t.stats();
            status.events = stats.events;
            status.dropped = stats.dropped;
            status.opens = t
                .recent_opens()
                .into_iter()
                .map(|o| DeviceOpen {
                    tgid: o.tgid,
                    comm: o.comm,
                    device: o.device,
                    cgroup_id: o.cgroup_id,
                    cgroup_known: o.cgroup_path.is_some(),
                    pod_uid: o.pod.as_ref().map(|p| p.pod_uid.clone()),
                    container_id: o.pod.and_then(|p| p.container_id),
                    first_open_ns: o.first_open_unix_ns,
                    last_open_ns: o.last_open_unix_ns,
                    exited: o.exited,
                })
                .collect();
            *agent.status.lock().unwrap_or_else(|e| e.into_inner()) = status.clone();
        }
        version += 1;
        area.write(version, &status);
        agent.stats.status.beat();
        if stop.wait_until(Instant::now() + STATUS_PERIOD) {
            return;
        }
    }
}

/// Why a device could not be sampled.
enum Failure {
    Lost,
    Error(NvmlError),
}

fn classify(e: NvmlError) -> Failure {
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
    region: &'a Region<'a>,
    agent: &'a Agent,
    gpu: usize,
    gpm: Option<GpmState<'n>>,
    state: GpuState,
    backoff: Duration,
    retry_at: Instant,
    proc_version: u64,
    interval: Duration,
    resolver: ProcfsResolver,
    /// The processes of the last full attribution, and when it ran.
    attributed: Vec<ProcessEntry>,
    attributed_at: Option<Instant>,
}

struct GpmState<'n> {
    prev: Option<(GpmSample<'n>, Instant)>,
    values: Option<([f32; 4], Instant)>,
}

impl<'a, 'n> DeviceLoop<'a, 'n> {
    /// The loop of device `gpu` (a position in `agent.gpus`); `parent` is the physical GPU of a
    /// MIG instance.
    #[allow(clippy::too_many_arguments)]
    fn new(
        nvml: &'n Nvml,
        device: &'a Device<'n>,
        parent: Option<&'a Device<'n>>,
        region: &'a Region<'a>,
        agent: &'a Agent,
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
            gpm: agent.gpus[gpu].gpm_supported.then_some(GpmState {
                prev: None,
                values: None,
            }),
            state: GpuState::Starting,
            backoff: BACKOFF_START,
            retry_at: Instant::now(),
            proc_version: 0,
            interval,
            resolver: ProcfsResolver::new(proc_root),
            attributed: Vec::new(),
            attributed_at: None,
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
                    g.prev = None;
                    g.values = None;
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
            s.set(Slot::GpuUtil, util.gpu as f32);
            s.set(Slot::MemUtil, util.memory as f32);
        }
        if let Some(m) = optional(d.memory_info())? {
            s.set_vram_used(m.used);
        }
        if let Some(mw) = optional(d.power_usage())? {
            s.set(Slot::PowerWatts, mw as f32 / 1000.0);
        }
        if let Some(t) = optional(d.temperature(TemperatureSensor::Gpu))? {
            s.set(Slot::TemperatureC, t as f32);
        }
        if let Some(v) = self.gpm_values(now)? {
            for (slot, v) in [
                Slot::SmActive,
                Slot::SmOccupancy,
                Slot::TensorActive,
                Slot::DramActive,
            ]
            .into_iter()
            .zip(v)
            {
                s.set(slot, v);
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

    fn gpm_values(&mut self, now: Instant) -> Result<Option<[f32; 4]>, Failure> {
        let Some(g) = &mut self.gpm else {
            return Ok(None);
        };
        let due = g
            .prev
            .as_ref()
            .is_none_or(|(_, at)| now.duration_since(*at) + GPM_SPACING_SLACK >= GPM_MIN_SPACING);
        if due {
            let sample = match self.kind {
                Kind::Gpu | Kind::MigParent => self.device.gpm_sample(),
                Kind::MigInstance {
                    parent,
                    gpu_instance_id: Some(id),
                } => parent.gpm_mig_sample(id),
                Kind::MigInstance {
                    gpu_instance_id: None,
                    ..
                } => return Ok(None),
            };
            let Some(sample) = optional(sample)? else {
                return Ok(None);
            };
            if let Some((prev, _)) = &g.prev {
                const IDS: [GpmMetricId; 4] = [
                    GpmMetricId::SmUtil,
                    GpmMetricId::SmOccupancy,
                    GpmMetricId::AnyTensorUtil,
                    GpmMetricId::DramBwUtil,
                ];
                let results = gpm_metrics_get(self.nvml, prev, &sample, &IDS).map_err(classify)?;
                let mut values = [0f32; 4];
                let mut all = true;
                for (v, r) in values.iter_mut().zip(results) {
                    match r {
                        Ok(r) => *v = r.value as f32,
                        Err(_) => all = false,
                    }
                }
                // A partial answer is reported as absent rather than mixing old and new values.
                g.values = all.then_some((values, now));
            }
            g.prev = Some((sample, now));
        }
        Ok(g.values
            .filter(|(_, at)| now.duration_since(*at) <= GPM_MAX_AGE)
            .map(|(v, _)| v))
    }

    /// Ties each process to its pod. Reading procfs for every process on every sample was a
    /// quarter of the agent's CPU, so an unchanged PID list reuses the previous answers for up
    /// to [`REATTRIBUTE_EVERY`] (the resolver re-checks start times then, catching PID reuse).
    fn attribute(&mut self, processes: &mut [ProcessEntry]) {
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        let fresh = self
            .attributed_at
            .is_some_and(|at| at.elapsed() < REATTRIBUTE_EVERY);
        if fresh && pids == self.attributed.iter().map(|p| p.pid).collect::<Vec<_>>() {
            for (p, known) in processes.iter_mut().zip(&self.attributed) {
                p.pod_uid.clone_from(&known.pod_uid);
                p.container_id.clone_from(&known.container_id);
                p.source = known.source;
            }
            return;
        }
        for p in processes.iter_mut() {
            // eBPF saw the process open the GPU, with the cgroup it ran in: preferred.
            if let Some(info) = self.agent.tracker.as_ref().and_then(|t| t.process(p.pid)) {
                if info.cgroup_path.is_none() {
                    // Its cgroup is gone: unknown, never a guess.
                    p.source = Source::Unknown;
                    continue;
                }
                if let Some(pod) = info.pod {
                    p.pod_uid = Some(pod.pod_uid);
                    p.container_id = pod.container_id;
                }
                p.source = Source::Ebpf;
                continue;
            }
            // Missed by eBPF (off, unavailable, or its events dropped): procfs.
            match self.resolver.resolve(p.pid) {
                Attribution::Pod(pod) => {
                    p.pod_uid = Some(pod.pod_uid);
                    p.container_id = pod.container_id;
                    p.source = Source::Procfs;
                }
                Attribution::NotInPod { .. } => p.source = Source::Procfs,
                Attribution::Unknown { reason } => {
                    tracing::debug!(pid = p.pid, %reason, "cannot attribute process");
                    p.source = Source::Unknown;
                }
            }
        }
        self.resolver.evict_missing(&pids);
        self.attributed = processes.to_vec();
        self.attributed_at = Some(Instant::now());
    }

    /// Attributes the processes to pods, writes them to the ring file's snapshot, and returns
    /// them.
    fn publish_processes(
        &mut self,
        ts_ns: u64,
        procs: &[nvml_wrapper::struct_wrappers::device::ProcessInfo],
    ) -> Vec<ProcessEntry> {
        let mut pu = self.agent.proc_util[self.gpu]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
        self.attribute(&mut processes);
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
fn optional<T>(r: Result<T, NvmlError>) -> Result<Option<T>, Failure> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported | NvmlError::NoPermission | NvmlError::FunctionNotFound) => {
            Ok(None)
        }
        Err(NvmlError::FailedToLoadSymbol(_)) => Ok(None),
        Err(e) => Err(classify(e)),
    }
}

/// The slow path: per-process SM utilization for GPUs whose sampler asked for it.
fn proc_util_loop(devices: &[Device<'_>], agent: &Agent, interval: Duration, stop: &Stop) {
    let _span = tracing::info_span!("proc_util").entered();
    let period = proc_util_period(interval);
    let mut last_seen = vec![0u64; devices.len()];
    let mut next = Instant::now();
    loop {
        agent.stats.proc_util.beat();
        next += period;
        if stop.wait_until(next) {
            return;
        }
        for (i, d) in devices.iter().enumerate() {
            let wanted = agent.proc_util[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .wanted;
            if !wanted {
                continue;
            }
            // Samples since our last look; the first look covers one period.
            let since = match last_seen[i] {
                0 => (unix_now_ns() / 1000).saturating_sub(period.as_micros() as u64),
                t => t,
            };
            let map = match d.process_utilization_stats(since) {
                Ok(samples) => {
                    let mut acc: HashMap<u32, (u64, u32)> = HashMap::new();
                    for s in samples {
                        last_seen[i] = last_seen[i].max(s.timestamp);
                        let e = acc.entry(s.pid).or_default();
                        e.0 += u64::from(s.sm_util);
                        e.1 += 1;
                    }
                    acc.into_iter()
                        .map(|(pid, (sum, n))| (pid, sum as f32 / n as f32))
                        .collect()
                }
                // NOT_FOUND: no process ran a kernel since `since` — a measured zero.
                Err(NvmlError::NotFound) => HashMap::new(),
                Err(e) => {
                    tracing::debug!(gpu = i, error = %e, "per-process utilization unavailable");
                    continue;
                }
            };
            let mut pu = agent.proc_util[i].lock().unwrap_or_else(|e| e.into_inner());
            pu.sm_util = map;
            pu.at = Some(Instant::now());
        }
    }
}
