//! The C ABI the fake speaks: return codes, constants and `#[repr(C)]` structs.
//!
//! Every layout here mirrors the bindgen output of `nvml-wrapper-sys` 0.10
//! (`src/bindings.rs`); the compile-time assertions at the bottom pin the
//! sizes and offsets so a careless edit cannot silently break the ABI.

use std::ffi::{c_char, c_uint, c_void};

/// `nvmlReturn_t`: every NVML entry point returns one of these codes.
pub type NvmlReturn = c_uint;

/// `NVML_SUCCESS`.
pub const NVML_SUCCESS: NvmlReturn = 0;
/// `NVML_ERROR_UNINITIALIZED`: called before `nvmlInit` (or after the last `nvmlShutdown`).
pub const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
/// `NVML_ERROR_INVALID_ARGUMENT`: null pointer, unknown handle, bad index.
pub const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
/// `NVML_ERROR_NOT_SUPPORTED`.
pub const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
/// `NVML_ERROR_NO_PERMISSION`.
pub const NVML_ERROR_NO_PERMISSION: NvmlReturn = 4;
/// `NVML_ERROR_ALREADY_INITIALIZED`.
pub const NVML_ERROR_ALREADY_INITIALIZED: NvmlReturn = 5;
/// `NVML_ERROR_NOT_FOUND`: e.g. no process-utilization samples since the given timestamp.
pub const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
/// `NVML_ERROR_INSUFFICIENT_SIZE`: the buffer is too small; the count out-param says how big.
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
/// `NVML_ERROR_INSUFFICIENT_POWER`.
pub const NVML_ERROR_INSUFFICIENT_POWER: NvmlReturn = 8;
/// `NVML_ERROR_DRIVER_NOT_LOADED`: returned by init when `FAKE_NVML_SCENARIO` is not set.
pub const NVML_ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
/// `NVML_ERROR_TIMEOUT`.
pub const NVML_ERROR_TIMEOUT: NvmlReturn = 10;
/// `NVML_ERROR_IRQ_ISSUE`.
pub const NVML_ERROR_IRQ_ISSUE: NvmlReturn = 11;
/// `NVML_ERROR_LIBRARY_NOT_FOUND`.
pub const NVML_ERROR_LIBRARY_NOT_FOUND: NvmlReturn = 12;
/// `NVML_ERROR_FUNCTION_NOT_FOUND`.
pub const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;
/// `NVML_ERROR_CORRUPTED_INFOROM`.
pub const NVML_ERROR_CORRUPTED_INFOROM: NvmlReturn = 14;
/// `NVML_ERROR_GPU_IS_LOST`: what a GPU with `"fail": "gpu_lost"` answers.
pub const NVML_ERROR_GPU_IS_LOST: NvmlReturn = 15;
/// `NVML_ERROR_RESET_REQUIRED`.
pub const NVML_ERROR_RESET_REQUIRED: NvmlReturn = 16;
/// `NVML_ERROR_OPERATING_SYSTEM`.
pub const NVML_ERROR_OPERATING_SYSTEM: NvmlReturn = 17;
/// `NVML_ERROR_LIB_RM_VERSION_MISMATCH`.
pub const NVML_ERROR_LIB_RM_VERSION_MISMATCH: NvmlReturn = 18;
/// `NVML_ERROR_IN_USE`.
pub const NVML_ERROR_IN_USE: NvmlReturn = 19;
/// `NVML_ERROR_MEMORY`.
pub const NVML_ERROR_MEMORY: NvmlReturn = 20;
/// `NVML_ERROR_NO_DATA`.
pub const NVML_ERROR_NO_DATA: NvmlReturn = 21;
/// `NVML_ERROR_VGPU_ECC_NOT_SUPPORTED`.
pub const NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: NvmlReturn = 22;
/// `NVML_ERROR_INSUFFICIENT_RESOURCES`.
pub const NVML_ERROR_INSUFFICIENT_RESOURCES: NvmlReturn = 23;
/// `NVML_ERROR_FREQ_NOT_SUPPORTED`.
pub const NVML_ERROR_FREQ_NOT_SUPPORTED: NvmlReturn = 24;
/// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`: a versioned struct carried the wrong `version`.
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
/// `NVML_ERROR_DEPRECATED`.
pub const NVML_ERROR_DEPRECATED: NvmlReturn = 26;
/// `NVML_ERROR_NOT_READY`.
pub const NVML_ERROR_NOT_READY: NvmlReturn = 27;
/// `NVML_ERROR_GPU_NOT_FOUND`.
pub const NVML_ERROR_GPU_NOT_FOUND: NvmlReturn = 28;
/// `NVML_ERROR_INVALID_STATE`.
pub const NVML_ERROR_INVALID_STATE: NvmlReturn = 29;
/// `NVML_ERROR_RESET_TYPE_NOT_SUPPORTED`.
pub const NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: NvmlReturn = 30;
/// `NVML_ERROR_UNKNOWN`: what a GPU with `"fail": "unknown"` answers, and what init
/// answers for an unreadable or invalid scenario.
pub const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

/// `nvmlDevice_t`: an opaque pointer. The fake encodes `index + 1` as its value for a GPU, and
/// `1 << 31 | gpu index << 8 | MIG device index` for a MIG device.
pub type NvmlDevice = *mut c_void;
/// `nvmlGpmSample_t`: an opaque pointer to a heap-allocated sample owned by the fake.
pub type NvmlGpmSample = *mut c_void;

/// `NVML_DEVICE_MIG_DISABLE`: MIG mode of a GPU whose scenario has no `mig`.
pub const NVML_DEVICE_MIG_DISABLE: c_uint = 0;
/// `NVML_DEVICE_MIG_ENABLE`: MIG mode of a GPU whose scenario has `mig`.
pub const NVML_DEVICE_MIG_ENABLE: c_uint = 1;
/// `NVML_TEMPERATURE_GPU`, the only temperature sensor the fake knows.
pub const NVML_TEMPERATURE_GPU: c_uint = 0;
/// `NVML_VALUE_NOT_AVAILABLE` as an `unsigned int`: GPU/compute instance id of a non-MIG process.
pub const NVML_VALUE_NOT_AVAILABLE_U32: c_uint = 0xFFFF_FFFF;
/// `NVML_GPM_SUPPORT_VERSION`, expected in [`NvmlGpmSupport::version`].
pub const NVML_GPM_SUPPORT_VERSION: c_uint = 1;
/// `NVML_GPM_METRICS_GET_VERSION`, expected in [`NvmlGpmMetricsGet::version`].
pub const NVML_GPM_METRICS_GET_VERSION: c_uint = 1;
/// `NVML_GPM_METRIC_MAX`: length of [`NvmlGpmMetricsGet::metrics`].
pub const NVML_GPM_METRIC_MAX: usize = 210;
/// `NVML_GPM_METRIC_SM_UTIL`, answered from the scenario's `sm_active`.
pub const NVML_GPM_METRIC_SM_UTIL: c_uint = 2;
/// `NVML_GPM_METRIC_SM_OCCUPANCY`, answered from the scenario's `sm_occupancy`.
pub const NVML_GPM_METRIC_SM_OCCUPANCY: c_uint = 3;
/// `NVML_GPM_METRIC_ANY_TENSOR_UTIL`, answered from the scenario's `tensor_active`.
pub const NVML_GPM_METRIC_ANY_TENSOR_UTIL: c_uint = 5;
/// `NVML_GPM_METRIC_DRAM_BW_UTIL`, answered from the scenario's `dram_active`.
pub const NVML_GPM_METRIC_DRAM_BW_UTIL: c_uint = 10;
/// `nvmlMemory_v2` = `NVML_STRUCT_VERSION(Memory, 2)` = `sizeof(nvmlMemory_v2_t) | 2 << 24`.
pub const NVML_MEMORY_V2: c_uint = (std::mem::size_of::<NvmlMemoryV2>() as c_uint) | (2 << 24);

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlUtilization {
    /// Percent of the last sample period during which a kernel ran.
    pub gpu: c_uint,
    /// Percent of the last sample period during which device memory was read or written.
    pub memory: c_uint,
}

/// `nvmlMemory_t` (v1), in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlMemory {
    /// Installed memory.
    pub total: u64,
    /// Unallocated memory.
    pub free: u64,
    /// Allocated memory.
    pub used: u64,
}

/// `nvmlMemory_v2_t`, in bytes. `version` must be [`NVML_MEMORY_V2`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlMemoryV2 {
    /// Struct version, set by the caller.
    pub version: c_uint,
    /// Installed memory.
    pub total: u64,
    /// Memory reserved by the driver (always 0 in the fake).
    pub reserved: u64,
    /// `total - used`.
    pub free: u64,
    /// Allocated memory.
    pub used: u64,
}

/// `nvmlProcessInfo_t` = `nvmlProcessInfo_v2_t` (used by both the `_v2` and `_v3` calls).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlProcessInfo {
    /// Process id.
    pub pid: c_uint,
    /// Device memory used by the process, in bytes.
    pub used_gpu_memory: u64,
    /// MIG GPU instance, [`NVML_VALUE_NOT_AVAILABLE_U32`] when MIG is off.
    pub gpu_instance_id: c_uint,
    /// MIG compute instance, [`NVML_VALUE_NOT_AVAILABLE_U32`] when MIG is off.
    pub compute_instance_id: c_uint,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlProcessUtilizationSample {
    /// Process id.
    pub pid: c_uint,
    /// CPU timestamp of the sample, microseconds since the Unix epoch.
    pub time_stamp: u64,
    /// SM utilization, percent.
    pub sm_util: c_uint,
    /// Frame-buffer utilization, percent (always 0 in the fake).
    pub mem_util: c_uint,
    /// Encoder utilization, percent (always 0 in the fake).
    pub enc_util: c_uint,
    /// Decoder utilization, percent (always 0 in the fake).
    pub dec_util: c_uint,
}

/// `nvmlGpmSupport_t`. `version` must be [`NVML_GPM_SUPPORT_VERSION`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlGpmSupport {
    /// Struct version, set by the caller.
    pub version: c_uint,
    /// 1 when the device supports GPM.
    pub is_supported_device: c_uint,
}

/// The anonymous `metricInfo` struct inside `nvmlGpmMetric_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NvmlGpmMetricInfo {
    /// Short metric name (static NUL-terminated string or null).
    pub short_name: *mut c_char,
    /// Long metric name (static NUL-terminated string or null).
    pub long_name: *mut c_char,
    /// Unit (static NUL-terminated string or null).
    pub unit: *mut c_char,
}

/// `nvmlGpmMetric_t`: one requested metric, in and out.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NvmlGpmMetric {
    /// In: which metric (`NVML_GPM_METRIC_*`).
    pub metric_id: c_uint,
    /// Out: per-metric status.
    pub nvml_return: NvmlReturn,
    /// Out: the value (a percentage for the metrics the fake serves).
    pub value: f64,
    /// Out: names of the metric.
    pub metric_info: NvmlGpmMetricInfo,
}

/// `nvmlGpmMetricsGet_t`. `version` must be [`NVML_GPM_METRICS_GET_VERSION`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NvmlGpmMetricsGet {
    /// Struct version, set by the caller.
    pub version: c_uint,
    /// How many entries of `metrics` are requested.
    pub num_metrics: c_uint,
    /// The earlier sample.
    pub sample1: NvmlGpmSample,
    /// The later sample.
    pub sample2: NvmlGpmSample,
    /// Requested metrics; the first `num_metrics` are read and filled.
    pub metrics: [NvmlGpmMetric; NVML_GPM_METRIC_MAX],
}

// Layouts as laid out by bindgen for x86_64 / aarch64 Linux (LP64).
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<NvmlUtilization>() == 8);
    assert!(size_of::<NvmlMemory>() == 24);
    assert!(size_of::<NvmlMemoryV2>() == 40);
    assert!(offset_of!(NvmlMemoryV2, total) == 8);
    assert!(offset_of!(NvmlMemoryV2, used) == 32);
    assert!(size_of::<NvmlProcessInfo>() == 24);
    assert!(offset_of!(NvmlProcessInfo, used_gpu_memory) == 8);
    assert!(offset_of!(NvmlProcessInfo, gpu_instance_id) == 16);
    assert!(offset_of!(NvmlProcessInfo, compute_instance_id) == 20);
    assert!(size_of::<NvmlProcessUtilizationSample>() == 32);
    assert!(offset_of!(NvmlProcessUtilizationSample, time_stamp) == 8);
    assert!(offset_of!(NvmlProcessUtilizationSample, sm_util) == 16);
    assert!(offset_of!(NvmlProcessUtilizationSample, dec_util) == 28);
    assert!(size_of::<NvmlGpmSupport>() == 8);
    assert!(size_of::<NvmlGpmMetric>() == 40);
    assert!(offset_of!(NvmlGpmMetric, value) == 8);
    assert!(offset_of!(NvmlGpmMetric, metric_info) == 16);
    assert!(offset_of!(NvmlGpmMetricsGet, sample1) == 8);
    assert!(offset_of!(NvmlGpmMetricsGet, metrics) == 24);
    assert!(size_of::<NvmlGpmMetricsGet>() == 24 + 40 * NVML_GPM_METRIC_MAX);
    assert!(NVML_MEMORY_V2 == 0x0200_0028);
};
