//! A fake `libnvidia-ml.so`, driven by a JSON scenario, so that the real
//! `nvml-wrapper` code path of the gpuscale agent runs in CI without a GPU.
//!
//! Build this crate (`cargo build -p fake-nvml`) and point NVML loading at
//! `target/<profile>/libfake_nvml.so`, e.g.
//! `nvml_wrapper::Nvml::builder().lib_path(path).init()`. The library exports
//! the NVML C symbols listed below with the real C ABI and struct layouts
//! (those of `nvml-wrapper-sys` 0.10).
//!
//! # Environment
//!
//! * `FAKE_NVML_SCENARIO` — path of the scenario JSON file, read by every
//!   `nvmlInit_v2` / `nvmlInitWithFlags` (and only there: later changes of
//!   the variable are not seen until the next init). Unset: init prints
//!   `fake-nvml: FAKE_NVML_SCENARIO is not set` to stderr and returns
//!   `NVML_ERROR_DRIVER_NOT_LOADED` (9); empty: the same with
//!   `... is set but empty`. Missing, unreadable or invalid file: init prints
//!   one line naming the path and the reason and returns
//!   `NVML_ERROR_UNKNOWN` (999), and nothing changes (an earlier successful
//!   init stays in force).
//!
//! All state (init count, scenario, call counters, GPM samples) lives in the
//! loaded library: it starts afresh when the library is loaded again after
//! the last `dlclose` (nvml-wrapper closes the library when its `Nvml` drops).
//!
//! # Scenario format
//!
//! ```json
//! {"driver_version": "580.159.04",
//!  "gpus": [{"name": "NVIDIA H100 80GB HBM3",
//!            "uuid": "GPU-00000000-0000-0000-0000-000000000000",
//!            "memory_total_mib": 81559, "memory_used_mib": 20000,
//!            "gpm": true,
//!            "gpu_util": 37, "mem_util": 12,
//!            "sm_active": 30, "sm_occupancy": 10, "tensor_active": 25, "dram_active": 15,
//!            "power_w": 350, "temp_c": 60,
//!            "processes": [{"pid": 4242, "used_memory_mib": 18000, "sm_util": 30}],
//!            "process_util_delay_ms": 2.5,
//!            "fail": null},
//!           {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-00000000-0000-0000-0000-000000000001",
//!            "gpm": true, "power_w": 300, "temp_c": 55,
//!            "mig": {"max_devices": 7,
//!                    "instances": [{"index": 0, "gpu_instance_id": 1,
//!                                   "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
//!                                   "uuid": "MIG-00000000-0000-0000-0001-000000000000",
//!                                   "memory_total_mib": 40448, "memory_used_mib": 4000,
//!                                   "sm_active": 40, "sm_occupancy": 20,
//!                                   "tensor_active": 30, "dram_active": 10,
//!                                   "processes": [{"pid": 5151, "used_memory_mib": 3500}]}]}}]}
//! ```
//!
//! Unknown keys are ignored; `null` means "missing". Numbers may be ints or
//! floats; values NVML reports as integers are rounded. Defaults:
//! `driver_version` `"580.159.04"`, no GPUs; per GPU `name`
//! `"NVIDIA Fake GPU"`, `uuid` `GPU-00000000-0000-0000-0000-<index as 12 decimal digits>`,
//! `memory_total_mib` 81559, `temp_c` 40, `power_w` 70, `gpm` false, no
//! processes, everything else 0. Per process `pid` is required,
//! `used_memory_mib` defaults to 0, and a missing `sm_util` means the process
//! has no utilization sample.
//!
//! # MIG
//!
//! A GPU with a `mig` object has MIG mode enabled; its MIG devices are `mig.instances`. Keys of
//! `mig`: `max_devices` (what `nvmlDeviceGetMaxMigDeviceCount` answers, 1 to 255, default 7 as
//! on an A100 or H100) and `instances` (default none). Per instance: `index` (its MIG device
//! index for `nvmlDeviceGetMigDeviceHandleByIndex`, below `max_devices`, default its position in
//! the list; indexes may leave gaps, which answer `NVML_ERROR_NOT_FOUND`), `gpu_instance_id`
//! (`nvmlDeviceGetGpuInstanceId`, default position + 1), `name` (default `"<GPU name> MIG"`),
//! `uuid` (default `MIG-00000000-0000-0000-<GPU index as 4 digits>-<position as 12 digits>`),
//! `memory_total_mib` (default 10240, a `1g.10gb`), `memory_used_mib` (default 0), the GPM loads
//! `sm_active`, `sm_occupancy`, `tensor_active`, `dram_active` (default 0; served by
//! `nvmlGpmMigSampleGet` when the GPU has `"gpm": true`) and `processes` (as for a GPU, without
//! `sm_util`: NVML has no per-process utilization on MIG).
//!
//! What a MIG-enabled GPU answers: mode 1 from `nvmlDeviceGetMigMode` (a GPU without `mig`: 0);
//! its own name, UUID, memory (`memory_used_mib` defaults to the sum of its instances'), power,
//! temperature and whole-GPU GPM sample; all its instances' processes (with their GPU instance
//! IDs) from the compute-process calls; `NVML_ERROR_NOT_SUPPORTED` from
//! `nvmlDeviceGetUtilizationRates` and `nvmlDeviceGetProcessUtilization`, as real MIG mode does.
//! A MIG device handle answers its instance's name, UUID, memory and processes (GPU instance ID
//! set, compute instance 0), the parent's GPM support from `nvmlGpmQueryDeviceSupport`, and
//! `NVML_ERROR_NOT_SUPPORTED` from utilization, power, temperature, per-process utilization,
//! `nvmlGpmSampleGet` (use `nvmlGpmMigSampleGet` on the parent), index and minor number. A
//! parent's `fail` fails its MIG devices too.
//!
//! Rejected: `mig` together with GPU-level `processes` (they run on the instances), duplicate
//! `index` or `gpu_instance_id` within a GPU, `index >= max_devices`, instances whose
//! `memory_total_mib` together exceed the GPU's, `memory_used_mib` above the instance's total,
//! `sm_util` on an instance's process, and a UUID used twice anywhere (GPUs and instances).
//!
//! # Failures
//!
//! `fail` is `null`, `"gpu_lost"` (every call on that GPU returns
//! `NVML_ERROR_GPU_IS_LOST` = 15) or `"unknown"` (`NVML_ERROR_UNKNOWN` =
//! 999); `nvmlDeviceGetCount_v2` and `nvmlDeviceGetHandleByIndex_v2` still
//! succeed. `process_util_delay_ms` makes every
//! `nvmlDeviceGetProcessUtilization` call on that GPU sleep that long first.
//! The scenario is rejected (init fails, or a reload is ignored) for
//! malformed JSON, a wrong type, another `fail` string, negative numbers,
//! `memory_used_mib > memory_total_mib`, duplicate UUIDs or a NUL in a string.
//!
//! # Hot reload
//!
//! Before serving a call the file is stat'ed (at most once per millisecond,
//! process-wide); when its (device, inode, size, mtime, ctime) changed it is
//! re-parsed. Rewrite it atomically (write a temporary file, then rename). A
//! reload that fails keeps the last good scenario and prints one stderr line
//! naming the path and the error, once per distinct failure. GPU handles are
//! `index + 1`, MIG device handles `1 << 31 | GPU index << 8 | MIG device index`; a handle
//! whose GPU (or MIG device index) is not in the current scenario is
//! `NVML_ERROR_INVALID_ARGUMENT`.
//!
//! # Behaviour of note
//!
//! * Init and shutdown are reference counted; other calls before init or
//!   after the last shutdown return `NVML_ERROR_UNINITIALIZED`.
//! * Count protocols (`nvmlDeviceGetComputeRunningProcesses_v2/_v3`,
//!   `nvmlDeviceGetProcessUtilization`): a NULL buffer or `*count` smaller
//!   than needed sets `*count` to the number needed and returns
//!   `NVML_ERROR_INSUFFICIENT_SIZE`; otherwise the entries are written and
//!   `*count` is set to how many. No compute processes: `SUCCESS` with
//!   `*count = 0`. No process with an `sm_util` (or `lastSeenTimeStamp` not in
//!   the past): `NVML_ERROR_NOT_FOUND`, like real NVML's "no activity".
//! * Process utilization samples carry "now" in microseconds since the Unix
//!   epoch.
//! * GPM: `nvmlGpmSampleGet` snapshots `sm_active`, `sm_occupancy`,
//!   `tensor_active` and `dram_active`; `nvmlGpmMetricsGet` answers
//!   `NVML_GPM_METRIC_SM_UTIL`, `_SM_OCCUPANCY`, `_ANY_TENSOR_UTIL` and
//!   `_DRAM_BW_UTIL` from the *second* sample (the load at the end of the
//!   interval); any other metric gets a per-metric `NVML_ERROR_NOT_SUPPORTED`.
//!   Both samples must come from the same GPU (or the same GPU instance, for
//!   `nvmlGpmMigSampleGet` samples), the second taken after the first. On a
//!   GPU without `"gpm": true`, `nvmlGpmSampleGet` and `nvmlGpmMigSampleGet`
//!   return `NVML_ERROR_NOT_SUPPORTED`.
//! * [`fake_nvml_calls`] (not part of NVML) tells how many times an exported
//!   NVML function was called in this process, for tests that must prove a
//!   call was or was not made.
//!
//! No call panics across the FFI boundary: a panic inside is caught and
//! reported as `NVML_ERROR_UNKNOWN`; null or misaligned pointers are
//! `NVML_ERROR_INVALID_ARGUMENT`.

#![deny(missing_docs)]

pub mod ffi;
mod scenario;
mod state;

use std::ffi::{c_char, c_uint, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ffi::*;
use scenario::{Gpu, MigInstance, Scenario};

macro_rules! nvml_functions {
    ($($name:ident),* $(,)?) => {
        /// The exported NVML functions, to count their calls.
        #[allow(non_camel_case_types, clippy::enum_variant_names)]
        #[derive(Clone, Copy)]
        enum Func { $($name),* }

        /// Names of [`Func`] variants, in order.
        const FUNC_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

nvml_functions!(
    nvmlInit_v2,
    nvmlInitWithFlags,
    nvmlShutdown,
    nvmlErrorString,
    nvmlSystemGetDriverVersion,
    nvmlDeviceGetCount_v2,
    nvmlDeviceGetHandleByIndex_v2,
    nvmlDeviceGetName,
    nvmlDeviceGetUUID,
    nvmlDeviceGetIndex,
    nvmlDeviceGetMinorNumber,
    nvmlDeviceGetUtilizationRates,
    nvmlDeviceGetMemoryInfo,
    nvmlDeviceGetMemoryInfo_v2,
    nvmlDeviceGetPowerUsage,
    nvmlDeviceGetTemperature,
    nvmlDeviceGetComputeRunningProcesses_v2,
    nvmlDeviceGetComputeRunningProcesses_v3,
    nvmlDeviceGetProcessUtilization,
    nvmlGpmQueryDeviceSupport,
    nvmlGpmSampleAlloc,
    nvmlGpmSampleFree,
    nvmlGpmSampleGet,
    nvmlGpmMetricsGet,
    nvmlDeviceGetMigMode,
    nvmlDeviceGetMaxMigDeviceCount,
    nvmlDeviceGetMigDeviceHandleByIndex,
    nvmlDeviceIsMigDeviceHandle,
    nvmlDeviceGetDeviceHandleFromMigDeviceHandle,
    nvmlDeviceGetGpuInstanceId,
    nvmlGpmMigSampleGet,
);

static CALLS: [AtomicU64; FUNC_NAMES.len()] = [const { AtomicU64::new(0) }; FUNC_NAMES.len()];

/// Counts the call and runs `body`, turning a panic into `NVML_ERROR_UNKNOWN`.
fn call(func: Func, body: impl FnOnce() -> Result<(), NvmlReturn>) -> NvmlReturn {
    CALLS[func as usize].fetch_add(1, Ordering::Relaxed);
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => NVML_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

/// Marks a MIG device handle: `MIG_HANDLE | gpu index << 8 | MIG device index`. GPU handles
/// (`index + 1`) stay below it.
const MIG_HANDLE: usize = 1 << 31;

/// The handle of GPU `index`.
fn gpu_handle(index: usize) -> NvmlDevice {
    std::ptr::without_provenance_mut(index + 1)
}

/// The handle of MIG device `mig_index` of GPU `gpu`.
fn mig_handle(gpu: usize, mig_index: u32) -> Result<NvmlDevice, NvmlReturn> {
    if gpu >= MIG_HANDLE >> 8 || mig_index > scenario::MAX_MIG_DEVICES {
        return Err(NVML_ERROR_UNKNOWN);
    }
    Ok(std::ptr::without_provenance_mut(
        MIG_HANDLE | gpu << 8 | mig_index as usize,
    ))
}

/// A validated device handle and the scenario it was resolved against.
struct Target {
    scenario: Arc<Scenario>,
    /// The GPU, or the parent GPU of a MIG device.
    index: usize,
    /// For a MIG device handle: its position in the parent's `mig.instances`.
    mig: Option<usize>,
}

impl Target {
    /// The physical GPU (for a MIG device, its parent).
    fn gpu(&self) -> &Gpu {
        &self.scenario.gpus[self.index]
    }

    /// The MIG instance a MIG device handle names; `None` for a GPU handle.
    fn instance(&self) -> Option<&MigInstance> {
        let m = self.mig?;
        self.gpu().mig.as_ref().map(|mig| &mig.instances[m])
    }

    /// Whether the handle is a GPU's (not a MIG device's) and that GPU has MIG mode enabled.
    fn mig_enabled_gpu(&self) -> bool {
        self.mig.is_none() && self.gpu().mig.is_some()
    }

    /// The GPU of a GPU handle; `NVML_ERROR_NOT_SUPPORTED` for a MIG device handle (for the
    /// calls real NVML answers only per physical GPU: power, temperature, utilization, …).
    fn physical(&self) -> Result<&Gpu, NvmlReturn> {
        match self.mig {
            None => Ok(self.gpu()),
            Some(_) => Err(NVML_ERROR_NOT_SUPPORTED),
        }
    }
}

/// Resolves a device handle (a GPU's or a MIG device's); fails if uninitialized, unknown (also
/// a MIG device a reload removed), or the GPU is set to fail (which fails its MIG devices too).
fn target(device: NvmlDevice) -> Result<Target, NvmlReturn> {
    let scenario = state::current()?;
    let addr = device.addr();
    let (index, mig) = if addr & MIG_HANDLE != 0 {
        let gpu = (addr & !MIG_HANDLE) >> 8;
        let mig_index = (addr & 0xff) as u32;
        let position = scenario
            .gpus
            .get(gpu)
            .and_then(|g| g.mig.as_ref())
            .and_then(|m| m.at_index(mig_index))
            .map(|(position, _)| position)
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        (gpu, Some(position))
    } else {
        let index = addr
            .checked_sub(1)
            .filter(|&i| i < scenario.gpus.len())
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        (index, None)
    };
    if let Some(fail) = scenario.gpus[index].fail {
        return Err(fail.code());
    }
    Ok(Target {
        scenario,
        index,
        mig,
    })
}

fn check_ptr<T>(ptr: *const T) -> Result<(), NvmlReturn> {
    if ptr.is_null() || !ptr.is_aligned() {
        Err(NVML_ERROR_INVALID_ARGUMENT)
    } else {
        Ok(())
    }
}

/// Writes `value` to an out-parameter.
///
/// # Safety
///
/// `ptr` must be null or valid for a write of `T`.
unsafe fn put<T>(ptr: *mut T, value: T) -> Result<(), NvmlReturn> {
    check_ptr(ptr)?;
    // SAFETY: non-null and aligned (checked), valid for writes (caller's contract).
    unsafe { ptr.write(value) };
    Ok(())
}

/// Reads an in-parameter.
///
/// # Safety
///
/// `ptr` must be null or valid for a read of an initialized `T`.
unsafe fn get<T: Copy>(ptr: *const T) -> Result<T, NvmlReturn> {
    check_ptr(ptr)?;
    // SAFETY: non-null and aligned (checked), valid for reads (caller's contract).
    Ok(unsafe { ptr.read() })
}

/// Copies `value` with its NUL into a caller buffer of `len` bytes.
///
/// # Safety
///
/// `buf` must be null or valid for writes of `len` bytes.
unsafe fn put_c_str(buf: *mut c_char, len: c_uint, value: &CStr) -> Result<(), NvmlReturn> {
    if buf.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    let bytes = value.to_bytes_with_nul();
    if (len as usize) < bytes.len() {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` holds `len >= bytes.len()` writable bytes (caller's contract);
    // the source is our own string, so the two cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len()) };
    Ok(())
}

/// The count protocol shared by the process-listing calls: checks `*count`
/// against `items`, then writes them.
///
/// # Safety
///
/// `count` must be null or valid for reads and writes of a `c_uint`; `buf` must
/// be null or valid for writes of `*count` elements.
unsafe fn put_counted<T>(count: *mut c_uint, buf: *mut T, items: Vec<T>) -> Result<(), NvmlReturn> {
    // SAFETY: forwarded caller contract on `count`.
    let capacity = unsafe { get(count) }?;
    let needed = c_uint::try_from(items.len()).map_err(|_| NVML_ERROR_UNKNOWN)?;
    if needed > 0 && (buf.is_null() || capacity < needed) {
        // SAFETY: as above.
        unsafe { put(count, needed) }?;
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    if needed > 0 {
        check_ptr(buf)?;
        for (i, item) in items.into_iter().enumerate() {
            // SAFETY: `i < needed <= capacity` elements are writable (caller's contract),
            // `buf` is non-null and aligned (checked).
            unsafe { buf.add(i).write(item) };
        }
    }
    // SAFETY: as above.
    unsafe { put(count, needed) }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn error_string(code: NvmlReturn) -> &'static CStr {
    match code {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_NO_PERMISSION => c"Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED => c"Already Initialized",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER => c"Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_TIMEOUT => c"Timeout",
        NVML_ERROR_IRQ_ISSUE => c"Interrupt request issue",
        NVML_ERROR_LIBRARY_NOT_FOUND => c"NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND => c"Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM => c"Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        NVML_ERROR_RESET_REQUIRED => c"GPU requires restart",
        NVML_ERROR_OPERATING_SYSTEM => c"The operating system has blocked the request.",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH => c"RM has detected an NVML/RM version mismatch.",
        NVML_ERROR_IN_USE => c"In use by another client",
        NVML_ERROR_MEMORY => c"Insufficient Memory",
        NVML_ERROR_NO_DATA => c"No data",
        NVML_ERROR_VGPU_ECC_NOT_SUPPORTED => {
            c"The requested vgpu operation is not available on target device, because ECC is enabled"
        }
        NVML_ERROR_INSUFFICIENT_RESOURCES => c"Insufficient resources",
        NVML_ERROR_FREQ_NOT_SUPPORTED => c"Frequency not supported",
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        NVML_ERROR_DEPRECATED => c"Deprecated",
        NVML_ERROR_NOT_READY => c"Not ready",
        NVML_ERROR_GPU_NOT_FOUND => c"GPU not found",
        NVML_ERROR_INVALID_STATE => c"Invalid state",
        NVML_ERROR_RESET_TYPE_NOT_SUPPORTED => c"Reset type not supported",
        NVML_ERROR_UNKNOWN => c"Unknown Error",
        _ => c"Unknown Error",
    }
}

/// `nvmlInit_v2`: loads the scenario named by `FAKE_NVML_SCENARIO` and takes
/// one init reference.
#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    call(Func::nvmlInit_v2, state::init)
}

/// `nvmlInitWithFlags`: like [`nvmlInit_v2`]; the flags are ignored.
#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    call(Func::nvmlInitWithFlags, state::init)
}

/// `nvmlShutdown`: drops one init reference.
#[no_mangle]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    call(Func::nvmlShutdown, state::shutdown)
}

/// `nvmlErrorString`: a static description of `result`.
#[no_mangle]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    CALLS[Func::nvmlErrorString as usize].fetch_add(1, Ordering::Relaxed);
    error_string(result).as_ptr()
}

/// `nvmlSystemGetDriverVersion`: the scenario's `driver_version`.
///
/// # Safety
///
/// `version` must be null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    call(Func::nvmlSystemGetDriverVersion, || {
        let scenario = state::current()?;
        // SAFETY: forwarded caller contract.
        unsafe { put_c_str(version, length, &scenario.driver_version) }
    })
}

/// `nvmlDeviceGetCount_v2`: the number of GPUs in the scenario.
///
/// # Safety
///
/// `device_count` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> NvmlReturn {
    call(Func::nvmlDeviceGetCount_v2, || {
        let scenario = state::current()?;
        let count = c_uint::try_from(scenario.gpus.len()).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(device_count, count) }
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`: the handle of GPU `index` (`index + 1`).
/// Succeeds even for a GPU whose scenario says `fail`.
///
/// # Safety
///
/// `device` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetHandleByIndex_v2, || {
        let scenario = state::current()?;
        let index = usize::try_from(index).map_err(|_| NVML_ERROR_INVALID_ARGUMENT)?;
        if index >= scenario.gpus.len() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: forwarded caller contract.
        unsafe { put(device, gpu_handle(index)) }
    })
}

/// `nvmlDeviceGetName`: the GPU's `name`, or the MIG instance's.
///
/// # Safety
///
/// `name` must be null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: NvmlDevice,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetName, || {
        let t = target(device)?;
        let value = t.instance().map_or(&t.gpu().name, |m| &m.name);
        // SAFETY: forwarded caller contract.
        unsafe { put_c_str(name, length, value) }
    })
}

/// `nvmlDeviceGetUUID`: the GPU's `uuid`, or the MIG instance's.
///
/// # Safety
///
/// `uuid` must be null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: NvmlDevice,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetUUID, || {
        let t = target(device)?;
        let value = t.instance().map_or(&t.gpu().uuid, |m| &m.uuid);
        // SAFETY: forwarded caller contract.
        unsafe { put_c_str(uuid, length, value) }
    })
}

/// `nvmlDeviceGetIndex`: the GPU's position in the scenario; `NVML_ERROR_NOT_SUPPORTED` on a
/// MIG device.
///
/// # Safety
///
/// `index` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: NvmlDevice, index: *mut c_uint) -> NvmlReturn {
    call(Func::nvmlDeviceGetIndex, || {
        let t = target(device)?;
        t.physical()?;
        let value = c_uint::try_from(t.index).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(index, value) }
    })
}

/// `nvmlDeviceGetMinorNumber`: equal to the index; `NVML_ERROR_NOT_SUPPORTED` on a MIG device.
///
/// # Safety
///
/// `minor_number` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: NvmlDevice,
    minor_number: *mut c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetMinorNumber, || {
        let t = target(device)?;
        t.physical()?;
        let value = c_uint::try_from(t.index).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(minor_number, value) }
    })
}

/// `nvmlDeviceGetUtilizationRates`: `gpu_util` and `mem_util`. `NVML_ERROR_NOT_SUPPORTED` on a
/// MIG device and on a GPU in MIG mode, as on real hardware.
///
/// # Safety
///
/// `utilization` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: NvmlDevice,
    utilization: *mut NvmlUtilization,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetUtilizationRates, || {
        let t = target(device)?;
        if t.mig_enabled_gpu() {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        let gpu = t.physical()?;
        let value = NvmlUtilization {
            gpu: gpu.gpu_util,
            memory: gpu.mem_util,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(utilization, value) }
    })
}

/// (total, used) bytes of a GPU or MIG device (validated: used <= total).
fn memory_of(t: &Target) -> (u64, u64) {
    match t.instance() {
        Some(m) => (m.memory_total_bytes, m.memory_used_bytes),
        None => (t.gpu().memory_total_bytes, t.gpu().memory_used_bytes),
    }
}

/// `nvmlDeviceGetMemoryInfo` (v1), in bytes: the GPU's, or the MIG instance's.
///
/// # Safety
///
/// `memory` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: NvmlDevice,
    memory: *mut NvmlMemory,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetMemoryInfo, || {
        let t = target(device)?;
        let (total, used) = memory_of(&t);
        let value = NvmlMemory {
            total,
            free: total - used,
            used,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(memory, value) }
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`, in bytes (the GPU's, or the MIG instance's); `reserved` is 0.
/// `memory.version` must be [`NVML_MEMORY_V2`].
///
/// # Safety
///
/// `memory` must be null or valid for reads and writes of an `NvmlMemoryV2`
/// whose `version` is initialized.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetMemoryInfo_v2, || {
        let t = target(device)?;
        check_ptr(memory)?;
        // SAFETY: `memory` is non-null and aligned (checked) and its `version` is
        // readable (caller's contract); no reference is created.
        let version = unsafe { get(&raw const (*memory).version) }?;
        if version != NVML_MEMORY_V2 {
            return Err(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let (total, used) = memory_of(&t);
        let value = NvmlMemoryV2 {
            version,
            total,
            reserved: 0,
            free: total - used,
            used,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(memory, value) }
    })
}

/// `nvmlDeviceGetPowerUsage`, in milliwatts; `NVML_ERROR_NOT_SUPPORTED` on a MIG device (power
/// is the physical GPU's).
///
/// # Safety
///
/// `power` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: NvmlDevice,
    power: *mut c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetPowerUsage, || {
        let t = target(device)?;
        let gpu = t.physical()?;
        // SAFETY: forwarded caller contract.
        unsafe { put(power, gpu.power_mw) }
    })
}

/// `nvmlDeviceGetTemperature`: only sensor 0 (`NVML_TEMPERATURE_GPU`);
/// others, and MIG devices, are `NVML_ERROR_NOT_SUPPORTED`.
///
/// # Safety
///
/// `temp` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: NvmlDevice,
    sensor_type: c_uint,
    temp: *mut c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetTemperature, || {
        let t = target(device)?;
        let gpu = t.physical()?;
        if sensor_type != NVML_TEMPERATURE_GPU {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        // SAFETY: forwarded caller contract.
        unsafe { put(temp, gpu.temp_c) }
    })
}

/// Shared body of the compute-process listings.
///
/// # Safety
///
/// As for [`nvmlDeviceGetComputeRunningProcesses_v3`].
unsafe fn running_processes(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> Result<(), NvmlReturn> {
    let t = target(device)?;
    let info = |gpu_instance_id: c_uint, compute_instance_id: c_uint| {
        move |p: &scenario::Process| NvmlProcessInfo {
            pid: p.pid,
            used_gpu_memory: p.used_memory_bytes,
            gpu_instance_id,
            compute_instance_id,
        }
    };
    let items = match (t.instance(), &t.gpu().mig) {
        // A MIG device: its own processes, in its GPU instance (compute instance 0).
        (Some(m), _) => m.processes.iter().map(info(m.gpu_instance_id, 0)).collect(),
        // A GPU in MIG mode: every instance's processes, as real NVML answers a privileged caller.
        (None, Some(mig)) => mig
            .instances
            .iter()
            .flat_map(|m| m.processes.iter().map(info(m.gpu_instance_id, 0)))
            .collect(),
        (None, None) => t
            .gpu()
            .processes
            .iter()
            .map(info(
                NVML_VALUE_NOT_AVAILABLE_U32,
                NVML_VALUE_NOT_AVAILABLE_U32,
            ))
            .collect(),
    };
    // SAFETY: forwarded caller contract.
    unsafe { put_counted(info_count, infos, items) }
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`: the scenario's processes (GPU and
/// compute instance ids are `0xFFFFFFFF`: no MIG). On a MIG device: that instance's processes,
/// with its `gpu_instance_id` and compute instance 0; on a GPU in MIG mode: all its instances'.
///
/// Count protocol: with `infos` NULL or `*info_count` too small, `*info_count`
/// becomes the number of processes and the call returns
/// `NVML_ERROR_INSUFFICIENT_SIZE` — except with no processes, which is
/// `SUCCESS` and `*info_count = 0`.
///
/// # Safety
///
/// `info_count` must be null or valid for reads and writes; `infos` must be
/// null or valid for writes of `*info_count` elements.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetComputeRunningProcesses_v3, || {
        // SAFETY: forwarded caller contract.
        unsafe { running_processes(device, info_count, infos) }
    })
}

/// `nvmlDeviceGetComputeRunningProcesses_v2`: same struct and behaviour as
/// [`nvmlDeviceGetComputeRunningProcesses_v3`].
///
/// # Safety
///
/// As for [`nvmlDeviceGetComputeRunningProcesses_v3`].
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetComputeRunningProcesses_v2, || {
        // SAFETY: forwarded caller contract.
        unsafe { running_processes(device, info_count, infos) }
    })
}

/// `nvmlDeviceGetProcessUtilization`: one sample per process with an
/// `sm_util`, stamped "now" (µs since the Unix epoch), if now is after
/// `last_seen_time_stamp`; none → `NVML_ERROR_NOT_FOUND`. Sleeps the GPU's
/// `process_util_delay_ms` first. Count protocol as for the process list.
/// `NVML_ERROR_NOT_SUPPORTED` on a MIG device and on a GPU in MIG mode.
///
/// # Safety
///
/// `process_samples_count` must be null or valid for reads and writes;
/// `utilization` must be null or valid for writes of `*process_samples_count`
/// elements.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: NvmlDevice,
    utilization: *mut NvmlProcessUtilizationSample,
    process_samples_count: *mut c_uint,
    last_seen_time_stamp: u64,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetProcessUtilization, || {
        let t = target(device)?;
        if t.mig_enabled_gpu() {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        t.physical()?;
        check_ptr(process_samples_count)?;
        let delay = t.gpu().process_util_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let now = now_micros();
        let items: Vec<_> = if now > last_seen_time_stamp {
            t.gpu()
                .processes
                .iter()
                .filter_map(|p| {
                    p.sm_util.map(|sm_util| NvmlProcessUtilizationSample {
                        pid: p.pid,
                        time_stamp: now,
                        sm_util,
                        mem_util: 0,
                        enc_util: 0,
                        dec_util: 0,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        if items.is_empty() {
            // SAFETY: forwarded caller contract.
            unsafe { put(process_samples_count, 0) }?;
            return Err(NVML_ERROR_NOT_FOUND);
        }
        // SAFETY: forwarded caller contract.
        unsafe { put_counted(process_samples_count, utilization, items) }
    })
}

/// `nvmlGpmQueryDeviceSupport`: `isSupportedDevice` is 1 iff the GPU (for a MIG device: its
/// parent) has `"gpm": true`. `gpm_support.version` must be [`NVML_GPM_SUPPORT_VERSION`].
///
/// # Safety
///
/// `gpm_support` must be null or valid for reads and writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: NvmlDevice,
    gpm_support: *mut NvmlGpmSupport,
) -> NvmlReturn {
    call(Func::nvmlGpmQueryDeviceSupport, || {
        let t = target(device)?;
        // SAFETY: forwarded caller contract.
        let support = unsafe { get(gpm_support) }?;
        if support.version != NVML_GPM_SUPPORT_VERSION {
            return Err(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let value = NvmlGpmSupport {
            version: support.version,
            is_supported_device: c_uint::from(t.gpu().gpm),
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(gpm_support, value) }
    })
}

/// `nvmlGpmSampleAlloc`: allocates an empty sample.
///
/// # Safety
///
/// `gpm_sample` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(gpm_sample: *mut NvmlGpmSample) -> NvmlReturn {
    call(Func::nvmlGpmSampleAlloc, || {
        state::current()?;
        check_ptr(gpm_sample)?;
        let handle = state::sample_alloc().cast();
        // SAFETY: forwarded caller contract.
        unsafe { put(gpm_sample, handle) }
    })
}

/// `nvmlGpmSampleFree`: frees a sample from [`nvmlGpmSampleAlloc`]; anything
/// else (including a second free) is `NVML_ERROR_INVALID_ARGUMENT`.
#[no_mangle]
pub extern "C" fn nvmlGpmSampleFree(gpm_sample: NvmlGpmSample) -> NvmlReturn {
    call(Func::nvmlGpmSampleFree, || {
        state::sample_free(gpm_sample.addr())
    })
}

/// `nvmlGpmSampleGet`: snapshots the GPU's GPM loads into the sample (in MIG mode too: the
/// whole GPU's); `NVML_ERROR_NOT_SUPPORTED` on a GPU without `"gpm": true` and on a MIG device
/// handle (its loads come from [`nvmlGpmMigSampleGet`] on the parent).
#[no_mangle]
pub extern "C" fn nvmlGpmSampleGet(device: NvmlDevice, gpm_sample: NvmlGpmSample) -> NvmlReturn {
    call(Func::nvmlGpmSampleGet, || {
        let t = target(device)?;
        let gpu = t.physical()?;
        if !gpu.gpm {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        let loads = [
            gpu.sm_active,
            gpu.sm_occupancy,
            gpu.tensor_active,
            gpu.dram_active,
        ];
        take_gpm_sample(gpm_sample, t.index, None, loads)
    })
}

/// `nvmlGpmMigSampleGet`: snapshots the GPM loads of the MIG instance with GPU instance ID
/// `gpu_instance_id` of GPU `device` into the sample. `NVML_ERROR_NOT_SUPPORTED` on a GPU
/// without `"gpm": true` or without MIG mode; `NVML_ERROR_INVALID_ARGUMENT` for a MIG device
/// handle (pass the parent) or a GPU instance ID the GPU does not have.
#[no_mangle]
pub extern "C" fn nvmlGpmMigSampleGet(
    device: NvmlDevice,
    gpu_instance_id: c_uint,
    gpm_sample: NvmlGpmSample,
) -> NvmlReturn {
    call(Func::nvmlGpmMigSampleGet, || {
        let t = target(device)?;
        if t.mig.is_some() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let gpu = t.gpu();
        let Some(mig) = gpu.mig.as_ref().filter(|_| gpu.gpm) else {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        };
        let (_, m) = mig
            .by_gpu_instance_id(gpu_instance_id)
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        let loads = [m.sm_active, m.sm_occupancy, m.tensor_active, m.dram_active];
        take_gpm_sample(gpm_sample, t.index, Some(gpu_instance_id), loads)
    })
}

/// Fills the sample `gpm_sample` with `loads` (`sm_active`, `sm_occupancy`, `tensor_active`,
/// `dram_active`) of GPU `gpu` (or of its GPU instance `gpu_instance_id`).
fn take_gpm_sample(
    gpm_sample: NvmlGpmSample,
    gpu: usize,
    gpu_instance_id: Option<u32>,
    loads: [f64; 4],
) -> Result<(), NvmlReturn> {
    let [sm_active, sm_occupancy, tensor_active, dram_active] = loads;
    state::with_sample(gpm_sample.addr(), |slot| {
        slot.snapshot = Some(state::GpmSnapshot {
            device: gpu,
            gpu_instance_id,
            seq: state::next_sample_seq(),
            taken_at: std::time::Instant::now(),
            sm_active,
            sm_occupancy,
            tensor_active,
            dram_active,
        });
    })
}

/// The value and names the fake serves for a GPM metric, or `None` if unsupported.
fn gpm_metric(
    id: c_uint,
    snapshot: &state::GpmSnapshot,
) -> Option<(f64, &'static CStr, &'static CStr)> {
    match id {
        NVML_GPM_METRIC_SM_UTIL => Some((snapshot.sm_active, c"SM_UTIL", c"SM utilization")),
        NVML_GPM_METRIC_SM_OCCUPANCY => {
            Some((snapshot.sm_occupancy, c"SM_OCCUPANCY", c"SM occupancy"))
        }
        NVML_GPM_METRIC_ANY_TENSOR_UTIL => Some((
            snapshot.tensor_active,
            c"ANY_TENSOR_UTIL",
            c"Any tensor utilization",
        )),
        NVML_GPM_METRIC_DRAM_BW_UTIL => Some((
            snapshot.dram_active,
            c"DRAM_BW_UTIL",
            c"DRAM bandwidth utilization",
        )),
        _ => None,
    }
}

/// `nvmlGpmMetricsGet`: fills `nvmlReturn`, `value` and `metricInfo` of the
/// first `numMetrics` entries from `sample2`'s snapshot.
///
/// Errors: `version` not [`NVML_GPM_METRICS_GET_VERSION`] →
/// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`; unknown or never-filled samples,
/// samples of different GPUs (or GPU instances), `sample2` not taken after `sample1`, or
/// `numMetrics` above [`NVML_GPM_METRIC_MAX`] → `NVML_ERROR_INVALID_ARGUMENT`.
/// Metric names point at static strings of this library.
///
/// # Safety
///
/// `metrics_get` must be null or valid for reads and writes of an initialized
/// `NvmlGpmMetricsGet`.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMetricsGet(metrics_get: *mut NvmlGpmMetricsGet) -> NvmlReturn {
    call(Func::nvmlGpmMetricsGet, || {
        let scenario = state::current()?;
        check_ptr(metrics_get)?;
        // SAFETY: `metrics_get` is non-null and aligned (checked) and readable
        // (caller's contract); raw field places create no references. The same
        // holds for the three reads below.
        let version = unsafe { get(&raw const (*metrics_get).version) }?;
        if version != NVML_GPM_METRICS_GET_VERSION {
            return Err(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        // SAFETY: see above.
        let num_metrics = unsafe { get(&raw const (*metrics_get).num_metrics) }?;
        // SAFETY: see above.
        let sample1 = unsafe { get(&raw const (*metrics_get).sample1) }?;
        // SAFETY: see above.
        let sample2 = unsafe { get(&raw const (*metrics_get).sample2) }?;
        let num_metrics = usize::try_from(num_metrics)
            .ok()
            .filter(|&n| n <= NVML_GPM_METRIC_MAX)
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        let first = state::with_sample(sample1.addr(), |s| s.snapshot)?
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        let second = state::with_sample(sample2.addr(), |s| s.snapshot)?
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        if first.device != second.device
            || first.gpu_instance_id != second.gpu_instance_id
            || second.seq <= first.seq
            || second.taken_at < first.taken_at
        {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let gpu = scenario
            .gpus
            .get(second.device)
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        if let Some(fail) = gpu.fail {
            return Err(fail.code());
        }
        // SAFETY: `metrics_get` is non-null, aligned and valid (as above); taking a raw
        // place creates no reference.
        let metrics: *mut NvmlGpmMetric = unsafe { &raw mut (*metrics_get).metrics }.cast();
        for i in 0..num_metrics {
            // SAFETY: `i < num_metrics <= NVML_GPM_METRIC_MAX`, so the element is inside
            // the caller's struct, which is readable and writable (caller's contract).
            let entry = unsafe { metrics.add(i) };
            // SAFETY: as above; `entry` is aligned because the struct is.
            let metric_id = unsafe { (&raw const (*entry).metric_id).read() };
            let filled = match gpm_metric(metric_id, &second) {
                Some((value, short_name, long_name)) => NvmlGpmMetric {
                    metric_id,
                    nvml_return: NVML_SUCCESS,
                    value,
                    metric_info: NvmlGpmMetricInfo {
                        short_name: short_name.as_ptr().cast_mut(),
                        long_name: long_name.as_ptr().cast_mut(),
                        unit: c"%".as_ptr().cast_mut(),
                    },
                },
                None => NvmlGpmMetric {
                    metric_id,
                    nvml_return: NVML_ERROR_NOT_SUPPORTED,
                    value: 0.0,
                    metric_info: NvmlGpmMetricInfo {
                        short_name: std::ptr::null_mut(),
                        long_name: std::ptr::null_mut(),
                        unit: std::ptr::null_mut(),
                    },
                },
            };
            // SAFETY: as above.
            unsafe { entry.write(filled) };
        }
        Ok(())
    })
}

/// `nvmlDeviceGetMigMode`: current and pending mode are both `NVML_DEVICE_MIG_ENABLE` (1) for
/// a GPU with `mig` in the scenario, else `NVML_DEVICE_MIG_DISABLE` (0), as an H100 without MIG
/// answers. `NVML_ERROR_NOT_SUPPORTED` on a MIG device handle.
///
/// # Safety
///
/// `current_mode` and `pending_mode` must each be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: NvmlDevice,
    current_mode: *mut c_uint,
    pending_mode: *mut c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetMigMode, || {
        let t = target(device)?;
        let gpu = t.physical()?;
        let mode = if gpu.mig.is_some() {
            NVML_DEVICE_MIG_ENABLE
        } else {
            NVML_DEVICE_MIG_DISABLE
        };
        check_ptr(current_mode)?;
        check_ptr(pending_mode)?;
        // SAFETY: forwarded caller contract (both checked before either write).
        unsafe { put(current_mode, mode) }?;
        // SAFETY: as above.
        unsafe { put(pending_mode, mode) }
    })
}

/// `nvmlDeviceGetMaxMigDeviceCount`: the GPU's `mig.max_devices` (default 7); 0 for a GPU
/// without MIG mode. `NVML_ERROR_NOT_SUPPORTED` on a MIG device handle.
///
/// # Safety
///
/// `count` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: NvmlDevice,
    count: *mut c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetMaxMigDeviceCount, || {
        let t = target(device)?;
        let gpu = t.physical()?;
        let value = gpu.mig.as_ref().map_or(0, |m| m.max_devices);
        // SAFETY: forwarded caller contract.
        unsafe { put(count, value) }
    })
}

/// `nvmlDeviceGetMigDeviceHandleByIndex`: the handle of the MIG instance whose `index` is
/// `index`. `NVML_ERROR_NOT_FOUND` for an empty slot below `mig.max_devices`;
/// `NVML_ERROR_INVALID_ARGUMENT` at or above it or for a MIG device handle;
/// `NVML_ERROR_NOT_SUPPORTED` for a GPU without MIG mode.
///
/// # Safety
///
/// `mig_device` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: NvmlDevice,
    index: c_uint,
    mig_device: *mut NvmlDevice,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetMigDeviceHandleByIndex, || {
        let t = target(device)?;
        if t.mig.is_some() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let mig = t.gpu().mig.as_ref().ok_or(NVML_ERROR_NOT_SUPPORTED)?;
        if index >= mig.max_devices {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        mig.at_index(index).ok_or(NVML_ERROR_NOT_FOUND)?;
        let handle = mig_handle(t.index, index)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(mig_device, handle) }
    })
}

/// `nvmlDeviceIsMigDeviceHandle`: 1 for a MIG device handle, 0 for a GPU's.
///
/// # Safety
///
/// `is_mig_device` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: NvmlDevice,
    is_mig_device: *mut c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceIsMigDeviceHandle, || {
        let t = target(device)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(is_mig_device, c_uint::from(t.mig.is_some())) }
    })
}

/// `nvmlDeviceGetDeviceHandleFromMigDeviceHandle`: the parent GPU's handle of a MIG device;
/// `NVML_ERROR_INVALID_ARGUMENT` for a GPU handle.
///
/// # Safety
///
/// `device` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: NvmlDevice,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetDeviceHandleFromMigDeviceHandle, || {
        let t = target(mig_device)?;
        if t.mig.is_none() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: forwarded caller contract.
        unsafe { put(device, gpu_handle(t.index)) }
    })
}

/// `nvmlDeviceGetGpuInstanceId`: a MIG device's `gpu_instance_id`; `NVML_ERROR_NOT_SUPPORTED`
/// for a GPU handle.
///
/// # Safety
///
/// `id` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: NvmlDevice,
    id: *mut c_uint,
) -> NvmlReturn {
    call(Func::nvmlDeviceGetGpuInstanceId, || {
        let t = target(device)?;
        let m = t.instance().ok_or(NVML_ERROR_NOT_SUPPORTED)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(id, m.gpu_instance_id) }
    })
}

/// Test hook, not NVML: how many times the exported NVML function `name`
/// (e.g. `"nvmlDeviceGetProcessUtilization"`) has been called in this process
/// since the library was loaded. Unknown names and null give 0.
///
/// # Safety
///
/// `name` must be null or point to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn fake_nvml_calls(name: *const c_char) -> u64 {
    if name.is_null() {
        return 0;
    }
    // SAFETY: non-null and NUL-terminated (caller's contract).
    let name = unsafe { CStr::from_ptr(name) };
    let Ok(name) = name.to_str() else {
        return 0;
    };
    FUNC_NAMES
        .iter()
        .position(|&n| n == name)
        .map_or(0, |i| CALLS[i].load(Ordering::Relaxed))
}
