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
//!            "fail": null}]}
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
//! `index + 1`; a handle whose index is not in the current scenario is
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
//!   Both samples must come from the same GPU, the second taken after the
//!   first. On a GPU without `"gpm": true`, `nvmlGpmSampleGet` returns
//!   `NVML_ERROR_NOT_SUPPORTED`.
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
use scenario::{Gpu, Scenario};

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

/// A validated device handle and the scenario it was resolved against.
struct Target {
    scenario: Arc<Scenario>,
    index: usize,
}

impl Target {
    fn gpu(&self) -> &Gpu {
        &self.scenario.gpus[self.index]
    }
}

/// Resolves a device handle; fails if uninitialized, unknown, or the GPU is set to fail.
fn target(device: NvmlDevice) -> Result<Target, NvmlReturn> {
    let scenario = state::current()?;
    let index = device
        .addr()
        .checked_sub(1)
        .filter(|&i| i < scenario.gpus.len())
        .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
    if let Some(fail) = scenario.gpus[index].fail {
        return Err(fail.code());
    }
    Ok(Target { scenario, index })
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
        unsafe { put(device, std::ptr::without_provenance_mut(index + 1)) }
    })
}

/// `nvmlDeviceGetName`.
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
        // SAFETY: forwarded caller contract.
        unsafe { put_c_str(name, length, &t.gpu().name) }
    })
}

/// `nvmlDeviceGetUUID`.
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
        // SAFETY: forwarded caller contract.
        unsafe { put_c_str(uuid, length, &t.gpu().uuid) }
    })
}

/// `nvmlDeviceGetIndex`: the GPU's position in the scenario.
///
/// # Safety
///
/// `index` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: NvmlDevice, index: *mut c_uint) -> NvmlReturn {
    call(Func::nvmlDeviceGetIndex, || {
        let t = target(device)?;
        let value = c_uint::try_from(t.index).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(index, value) }
    })
}

/// `nvmlDeviceGetMinorNumber`: equal to the index.
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
        let value = c_uint::try_from(t.index).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: forwarded caller contract.
        unsafe { put(minor_number, value) }
    })
}

/// `nvmlDeviceGetUtilizationRates`: `gpu_util` and `mem_util`.
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
        let value = NvmlUtilization {
            gpu: t.gpu().gpu_util,
            memory: t.gpu().mem_util,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(utilization, value) }
    })
}

/// `nvmlDeviceGetMemoryInfo` (v1), in bytes.
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
        let gpu = t.gpu();
        let value = NvmlMemory {
            total: gpu.memory_total_bytes,
            free: gpu.memory_total_bytes - gpu.memory_used_bytes,
            used: gpu.memory_used_bytes,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(memory, value) }
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`, in bytes; `reserved` is 0. `memory.version`
/// must be [`NVML_MEMORY_V2`].
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
        let gpu = t.gpu();
        let value = NvmlMemoryV2 {
            version,
            total: gpu.memory_total_bytes,
            reserved: 0,
            free: gpu.memory_total_bytes - gpu.memory_used_bytes,
            used: gpu.memory_used_bytes,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(memory, value) }
    })
}

/// `nvmlDeviceGetPowerUsage`, in milliwatts.
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
        // SAFETY: forwarded caller contract.
        unsafe { put(power, t.gpu().power_mw) }
    })
}

/// `nvmlDeviceGetTemperature`: only sensor 0 (`NVML_TEMPERATURE_GPU`);
/// others are `NVML_ERROR_NOT_SUPPORTED`.
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
        if sensor_type != NVML_TEMPERATURE_GPU {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        // SAFETY: forwarded caller contract.
        unsafe { put(temp, t.gpu().temp_c) }
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
    let items = t
        .gpu()
        .processes
        .iter()
        .map(|p| NvmlProcessInfo {
            pid: p.pid,
            used_gpu_memory: p.used_memory_bytes,
            gpu_instance_id: NVML_VALUE_NOT_AVAILABLE_U32,
            compute_instance_id: NVML_VALUE_NOT_AVAILABLE_U32,
        })
        .collect();
    // SAFETY: forwarded caller contract.
    unsafe { put_counted(info_count, infos, items) }
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`: the scenario's processes (GPU and
/// compute instance ids are `0xFFFFFFFF`: no MIG).
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

/// `nvmlGpmQueryDeviceSupport`: `isSupportedDevice` is 1 iff the GPU has
/// `"gpm": true`. `gpm_support.version` must be [`NVML_GPM_SUPPORT_VERSION`].
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

/// `nvmlGpmSampleGet`: snapshots the GPU's GPM loads into the sample;
/// `NVML_ERROR_NOT_SUPPORTED` on a GPU without `"gpm": true`.
#[no_mangle]
pub extern "C" fn nvmlGpmSampleGet(device: NvmlDevice, gpm_sample: NvmlGpmSample) -> NvmlReturn {
    call(Func::nvmlGpmSampleGet, || {
        let t = target(device)?;
        let gpu = t.gpu();
        if !gpu.gpm {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        state::with_sample(gpm_sample.addr(), |slot| {
            slot.snapshot = Some(state::GpmSnapshot {
                device: t.index,
                seq: state::next_sample_seq(),
                taken_at: std::time::Instant::now(),
                sm_active: gpu.sm_active,
                sm_occupancy: gpu.sm_occupancy,
                tensor_active: gpu.tensor_active,
                dram_active: gpu.dram_active,
            });
        })
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
/// samples of different GPUs, `sample2` not taken after `sample1`, or
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
