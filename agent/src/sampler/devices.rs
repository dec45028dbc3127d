//! Finding what to sample: NVML loaded from its path, every GPU, and each MIG-enabled GPU's MIG
//! instances, each described as a GPU of the ring file.

use std::path::Path;

use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
use nvml_wrapper::{Device, Nvml};

use crate::shm::GpuInfo;
use crate::{Error, Result};

/// Every device the agent samples: physical GPUs, each followed by its MIG instances.
pub struct Devices<'n> {
    /// The NVML handles, in the agent's GPU order.
    pub devices: Vec<Device<'n>>,
    /// Per device: the position of its physical GPU when it is a MIG instance.
    pub parents: Vec<Option<usize>>,
    /// Per device: its description for the ring file and the API.
    pub gpus: Vec<GpuInfo>,
    /// The NVIDIA driver version.
    pub driver_version: String,
}

/// Opens every GPU NVML (loaded from `lib_path`) reports, and the MIG instances of each
/// MIG-enabled one; logs what it found.
pub fn open<'n>(nvml: &'n Nvml, lib_path: &Path) -> Result<Devices<'n>> {
    let nvml_err = |what: &'static str| {
        let path = lib_path.to_owned();
        move |error| Error::Nvml { path, what, error }
    };
    let driver_version = nvml
        .sys_driver_version()
        .unwrap_or_else(|_| "unknown".into());
    let count = nvml.device_count().map_err(nvml_err("count GPUs"))?;
    let mut out = Devices {
        devices: Vec::new(),
        parents: Vec::new(),
        gpus: Vec::new(),
        driver_version,
    };
    for i in 0..count {
        let device = nvml.device_by_index(i).map_err(nvml_err("open a GPU"))?;
        let info = describe(&device, i);
        let instances = if info.mig_enabled {
            mig_instances(nvml, lib_path, &device, &info)?
        } else {
            Vec::new()
        };
        let parent = out.devices.len();
        out.devices.push(device);
        out.parents.push(None);
        out.gpus.push(info);
        for (d, info) in instances {
            out.devices.push(d);
            out.parents.push(Some(parent));
            out.gpus.push(info);
        }
    }
    if out.gpus.is_empty() {
        tracing::warn!("NVML reports zero GPUs on this node; the agent runs and reports none");
    }
    for g in &out.gpus {
        if g.is_mig_instance() {
            tracing::info!(gpu = g.index, uuid = %g.uuid, name = %g.name, parent = %g.parent_uuid, gpu_instance_id = ?g.gpu_instance_id, gpm = g.gpm_supported, "found MIG instance");
        } else {
            tracing::info!(gpu = g.index, uuid = %g.uuid, name = %g.name, gpm = g.gpm_supported, mig = g.mig_enabled, "found GPU");
        }
    }
    Ok(out)
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
