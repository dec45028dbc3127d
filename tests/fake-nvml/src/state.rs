//! Process-global state: init reference count, the current scenario and its
//! hot reload, the GPM sample registry.

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::ffi::{
    NvmlReturn, NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_UNINITIALIZED, NVML_ERROR_UNKNOWN,
};
use crate::scenario::{self, Scenario};

/// Environment variable naming the scenario file.
pub(crate) const SCENARIO_ENV: &str = "FAKE_NVML_SCENARIO";
/// The scenario file is stat'ed at most this often.
const RECHECK_EVERY: Duration = Duration::from_millis(1);

/// What identifies one version of the scenario file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(meta: &Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Default)]
struct State {
    init_count: u64,
    path: PathBuf,
    scenario: Option<Arc<Scenario>>,
    file_id: Option<FileId>,
    last_check: Option<Instant>,
    /// The last reload failure reported on stderr, to report each one once.
    last_error: Option<String>,
}

static STATE: Mutex<State> = Mutex::new(State {
    init_count: 0,
    path: PathBuf::new(),
    scenario: None,
    file_id: None,
    last_check: None,
    last_error: None,
});

fn state() -> MutexGuard<'static, State> {
    // A panic while holding the lock (caught at the FFI boundary) leaves the
    // state consistent enough: every field is replaced wholesale.
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes one diagnostic line to stderr, never failing.
pub(crate) fn warn(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "fake-nvml: {message}");
}

/// Reads and parses the scenario at `path`, with the identity of what was read.
fn load(path: &Path) -> Result<(Scenario, FileId), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let id = file
        .metadata()
        .map(|m| FileId::of(&m))
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let scenario =
        scenario::parse(&text).map_err(|e| format!("invalid scenario {}: {e}", path.display()))?;
    Ok((scenario, id))
}

/// `nvmlInit*`: (re)loads the scenario named by the environment and bumps the
/// reference count. A failure leaves the state untouched.
pub(crate) fn init() -> Result<(), NvmlReturn> {
    let path = match std::env::var_os(SCENARIO_ENV) {
        None => {
            warn(&format!("{SCENARIO_ENV} is not set"));
            return Err(NVML_ERROR_DRIVER_NOT_LOADED);
        }
        Some(p) if p.is_empty() => {
            warn(&format!("{SCENARIO_ENV} is set but empty"));
            return Err(NVML_ERROR_DRIVER_NOT_LOADED);
        }
        Some(p) => PathBuf::from(p),
    };
    let (scenario, id) = load(&path).map_err(|e| {
        warn(&e);
        NVML_ERROR_UNKNOWN
    })?;
    let mut st = state();
    st.init_count += 1;
    st.path = path;
    st.scenario = Some(Arc::new(scenario));
    st.file_id = Some(id);
    st.last_check = Some(Instant::now());
    st.last_error = None;
    Ok(())
}

/// `nvmlShutdown`: drops one reference; the last one forgets the scenario.
pub(crate) fn shutdown() -> Result<(), NvmlReturn> {
    let mut st = state();
    if st.init_count == 0 {
        return Err(NVML_ERROR_UNINITIALIZED);
    }
    st.init_count -= 1;
    if st.init_count == 0 {
        st.scenario = None;
        st.file_id = None;
        st.last_check = None;
        st.last_error = None;
    }
    Ok(())
}

/// The scenario to serve a call from, after reloading the file if it changed.
pub(crate) fn current() -> Result<Arc<Scenario>, NvmlReturn> {
    let mut st = state();
    if st.init_count == 0 {
        return Err(NVML_ERROR_UNINITIALIZED);
    }
    st.refresh_if_due();
    st.scenario.clone().ok_or(NVML_ERROR_UNINITIALIZED)
}

impl State {
    fn refresh_if_due(&mut self) {
        let now = Instant::now();
        if self
            .last_check
            .is_some_and(|t| now.duration_since(t) < RECHECK_EVERY)
        {
            return;
        }
        self.last_check = Some(now);
        let id = match fs::metadata(&self.path) {
            Ok(meta) => FileId::of(&meta),
            Err(e) => {
                let msg = format!("cannot stat {}: {e}", self.path.display());
                self.report(msg);
                return;
            }
        };
        if self.file_id == Some(id) {
            return;
        }
        match load(&self.path) {
            Ok((scenario, id)) => {
                self.scenario = Some(Arc::new(scenario));
                self.file_id = Some(id);
                self.last_error = None;
            }
            Err(e) => {
                // Remember the broken version so it is not re-parsed every millisecond.
                self.file_id = Some(id);
                self.report(e);
            }
        }
    }

    fn report(&mut self, error: String) {
        if self.last_error.as_ref() != Some(&error) {
            warn(&format!(
                "reload failed, keeping the last good scenario: {error}"
            ));
            self.last_error = Some(error);
        }
    }
}

/// What a GPM sample captured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GpmSnapshot {
    /// The GPU sampled (for a MIG sample, the parent).
    pub(crate) device: usize,
    /// The GPU instance of a `nvmlGpmMigSampleGet` sample; `None` for the whole GPU.
    pub(crate) gpu_instance_id: Option<u32>,
    /// Global order of `nvmlGpmSampleGet` calls.
    pub(crate) seq: u64,
    pub(crate) taken_at: Instant,
    pub(crate) sm_active: f64,
    pub(crate) sm_occupancy: f64,
    pub(crate) tensor_active: f64,
    pub(crate) dram_active: f64,
}

/// The heap object an `nvmlGpmSample_t` points to.
#[derive(Debug, Default)]
pub(crate) struct GpmSampleSlot {
    pub(crate) snapshot: Option<GpmSnapshot>,
}

/// Live samples by address. Handles are only ever used as keys here and never
/// dereferenced, so a stale or foreign handle is an error rather than UB.
static SAMPLES: Mutex<BTreeMap<usize, Box<GpmSampleSlot>>> = Mutex::new(BTreeMap::new());
static SAMPLE_SEQ: AtomicU64 = AtomicU64::new(0);

fn samples() -> MutexGuard<'static, BTreeMap<usize, Box<GpmSampleSlot>>> {
    SAMPLES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Allocates a sample and returns its address (the `nvmlGpmSample_t`).
pub(crate) fn sample_alloc() -> *mut GpmSampleSlot {
    let mut slot = Box::<GpmSampleSlot>::default();
    let ptr: *mut GpmSampleSlot = &mut *slot;
    samples().insert(ptr as usize, slot);
    ptr
}

/// Frees a sample; unknown handles are an invalid argument.
pub(crate) fn sample_free(handle: usize) -> Result<(), NvmlReturn> {
    samples()
        .remove(&handle)
        .map(drop)
        .ok_or(NVML_ERROR_INVALID_ARGUMENT)
}

/// Next value of the global sample order.
pub(crate) fn next_sample_seq() -> u64 {
    SAMPLE_SEQ.fetch_add(1, Ordering::Relaxed) + 1
}

/// Runs `f` on the live sample `handle`.
pub(crate) fn with_sample<R>(
    handle: usize,
    f: impl FnOnce(&mut GpmSampleSlot) -> R,
) -> Result<R, NvmlReturn> {
    let mut guard = samples();
    let slot = guard.get_mut(&handle).ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
    Ok(f(slot))
}
