//! MIG: a MIG-enabled GPU and its MIG devices, answered from a scenario through the real
//! nvml-wrapper calls the agent makes.

mod common;

use std::ffi::{c_uint, c_void};
use std::thread::sleep;

use common::{serial, ScenarioFile, RELOAD_WAIT};
use fake_nvml::ffi::{NVML_ERROR_NOT_SUPPORTED, NVML_SUCCESS};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::gpm_metrics_get;
use nvml_wrapper::{Device, Nvml};
use serde_json::json;

const MIB: u64 = 1024 * 1024;
const PARENT: &str = "GPU-11111111-2222-3333-4444-555555555555";
const MIG_A: &str = "MIG-aaaaaaaa-0000-4000-8000-000000000001";
const MIG_B: &str = "MIG-bbbbbbbb-0000-4000-8000-000000000002";

type GpuInstanceIdFn = unsafe extern "C" fn(*mut c_void, *mut c_uint) -> u32;

/// An H100 in MIG mode: slot 0 holds GI 1 (one process), slot 1 is empty, slot 2 holds GI 5.
fn h100_mig(a_sm: f64) -> serde_json::Value {
    json!({
        "name": "NVIDIA H100 80GB HBM3", "uuid": PARENT, "gpm": true,
        "memory_total_mib": 81559, "power_w": 300, "temp_c": 55, "gpu_util": 99,
        "sm_active": 20,
        "mig": {"instances": [
            {"uuid": MIG_A, "gpu_instance_id": 1, "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
             "memory_total_mib": 40448, "memory_used_mib": 4000,
             "sm_active": a_sm, "sm_occupancy": 20, "tensor_active": 30, "dram_active": 10,
             "processes": [{"pid": 5151, "used_memory_mib": 3500}]},
            {"index": 2, "uuid": MIG_B, "gpu_instance_id": 5, "memory_total_mib": 10240,
             "memory_used_mib": 1000, "sm_active": 70}
        ]}
    })
}

/// `nvmlDeviceGetGpuInstanceId`, which nvml-wrapper 0.13 does not wrap.
fn gpu_instance_id(nvml: &Nvml, device: &Device<'_>) -> Result<u32, u32> {
    // SAFETY: the symbol's C signature is `GpuInstanceIdFn`.
    let f: GpuInstanceIdFn = unsafe { common::symbol(nvml, "nvmlDeviceGetGpuInstanceId") };
    let mut id: c_uint = 0;
    // SAFETY: a handle from this library and a valid out-pointer.
    match unsafe { f(device.handle().cast(), &mut id) } {
        NVML_SUCCESS => Ok(id),
        code => Err(code),
    }
}

#[test]
fn a_mig_gpu_enumerates_its_instances_and_skips_empty_slots() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{"uuid": "GPU-plain"}, h100_mig(40.0)]}));
    let nvml = file.init();
    let plain = nvml.device_by_index(0).unwrap();
    let mode = plain.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (0, 0), "MIG off: mode 0");
    assert_eq!(plain.mig_device_count().unwrap(), 0);

    let gpu = nvml.device_by_index(1).unwrap();
    let mode = gpu.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (1, 1));
    assert_eq!(gpu.mig_device_count().unwrap(), 7, "an H100's maximum");
    assert!(!gpu.mig_is_mig_device_handle().unwrap());

    let a = gpu.mig_device_by_index(0).unwrap();
    assert!(matches!(
        gpu.mig_device_by_index(1),
        Err(NvmlError::NotFound)
    ));
    let b = gpu.mig_device_by_index(2).unwrap();
    assert!(matches!(
        gpu.mig_device_by_index(7),
        Err(NvmlError::InvalidArg)
    ));
    assert!(matches!(
        plain.mig_device_by_index(0),
        Err(NvmlError::NotSupported)
    ));

    assert!(a.mig_is_mig_device_handle().unwrap());
    assert_eq!(a.uuid().unwrap(), MIG_A);
    assert_eq!(a.name().unwrap(), "NVIDIA H100 80GB HBM3 MIG 3g.40gb");
    assert_eq!(b.uuid().unwrap(), MIG_B);
    assert_eq!(b.name().unwrap(), "NVIDIA H100 80GB HBM3 MIG");
    assert_eq!(a.mig_parent_device().unwrap().uuid().unwrap(), PARENT);
    assert!(matches!(
        gpu.mig_parent_device(),
        Err(NvmlError::InvalidArg)
    ));
    assert_eq!(gpu_instance_id(&nvml, &a), Ok(1));
    assert_eq!(gpu_instance_id(&nvml, &b), Ok(5));
    assert_eq!(gpu_instance_id(&nvml, &gpu), Err(NVML_ERROR_NOT_SUPPORTED));
}

#[test]
fn mig_devices_report_memory_and_processes_but_no_utilization_power_or_temperature() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [h100_mig(40.0)]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    let a = gpu.mig_device_by_index(0).unwrap();

    let memory = a.memory_info().unwrap();
    assert_eq!((memory.total, memory.used), (40448 * MIB, 4000 * MIB));
    let procs = a.running_compute_processes().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(procs[0].pid, 5151);
    assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(3500 * MIB));
    assert_eq!(procs[0].gpu_instance_id, Some(1));
    assert_eq!(procs[0].compute_instance_id, Some(0));
    let b = gpu.mig_device_by_index(2).unwrap();
    assert!(b.running_compute_processes().unwrap().is_empty());

    for unsupported in [
        a.utilization_rates().map(drop),
        a.power_usage().map(drop),
        a.temperature(TemperatureSensor::Gpu).map(drop),
        a.process_utilization_stats(None).map(drop),
        a.gpm_sample().map(drop),
        a.index().map(drop),
        a.mig_mode().map(drop),
    ] {
        assert!(
            matches!(unsupported, Err(NvmlError::NotSupported)),
            "{unsupported:?}"
        );
    }
    assert!(a.gpm_support().unwrap(), "the parent's GPM support");

    // The parent in MIG mode: its own power, temperature and memory (used: its instances'
    // together), every instance's processes, and no utilization.
    assert_eq!(gpu.power_usage().unwrap(), 300_000);
    assert_eq!(gpu.temperature(TemperatureSensor::Gpu).unwrap(), 55);
    let memory = gpu.memory_info().unwrap();
    assert_eq!((memory.total, memory.used), (81559 * MIB, 5000 * MIB));
    let all = gpu.running_compute_processes().unwrap();
    assert_eq!(all.iter().map(|p| p.pid).collect::<Vec<_>>(), [5151]);
    assert_eq!(all[0].gpu_instance_id, Some(1));
    assert!(matches!(
        gpu.utilization_rates(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        gpu.process_utilization_stats(None),
        Err(NvmlError::NotSupported)
    ));
}

#[test]
fn gpm_mig_samples_give_each_instance_its_own_loads() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [h100_mig(40.0)]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    let ids = [
        GpmMetricId::SmUtil,
        GpmMetricId::SmOccupancy,
        GpmMetricId::AnyTensorUtil,
        GpmMetricId::DramBwUtil,
    ];
    let values = |first, second| -> Vec<f64> {
        gpm_metrics_get(&nvml, first, second, &ids)
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().value)
            .collect()
    };

    let a1 = gpu.gpm_mig_sample(1).unwrap();
    let b1 = gpu.gpm_mig_sample(5).unwrap();
    let whole1 = gpu.gpm_sample().unwrap();
    file.write(&json!({"gpus": [h100_mig(55.0)]}));
    sleep(RELOAD_WAIT);
    let a2 = gpu.gpm_mig_sample(1).unwrap();
    let b2 = gpu.gpm_mig_sample(5).unwrap();
    let whole2 = gpu.gpm_sample().unwrap();
    assert_eq!(values(&a1, &a2), [55.0, 20.0, 30.0, 10.0]);
    assert_eq!(values(&b1, &b2)[0], 70.0);
    assert_eq!(values(&whole1, &whole2)[0], 20.0, "the whole GPU's");

    // Samples of two instances, or of an instance and the whole GPU, do not pair.
    for (x, y) in [(&a1, &b2), (&a1, &whole2)] {
        let err = gpm_metrics_get(&nvml, x, y, &ids).unwrap_err();
        assert!(matches!(err, NvmlError::InvalidArg), "{err:?}");
    }
    // An unknown GPU instance, a MIG handle as the "parent", a GPU without MIG.
    assert!(matches!(gpu.gpm_mig_sample(2), Err(NvmlError::InvalidArg)));
    let a = gpu.mig_device_by_index(0).unwrap();
    assert!(matches!(a.gpm_mig_sample(1), Err(NvmlError::InvalidArg)));
    file.write(&json!({"gpus": [{"gpm": true}]}));
    sleep(RELOAD_WAIT);
    assert!(matches!(
        gpu.gpm_mig_sample(1),
        Err(NvmlError::NotSupported)
    ));
}

#[test]
fn a_lost_parent_loses_its_instances_and_a_reload_can_remove_one() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [h100_mig(40.0)]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    let a = gpu.mig_device_by_index(0).unwrap();
    let b = gpu.mig_device_by_index(2).unwrap();

    let mut lost = h100_mig(40.0);
    lost["fail"] = json!("gpu_lost");
    file.write(&json!({"gpus": [lost]}));
    sleep(RELOAD_WAIT);
    assert!(matches!(a.memory_info(), Err(NvmlError::GpuLost)));
    assert!(matches!(gpu.gpm_mig_sample(1), Err(NvmlError::GpuLost)));

    let mut one = h100_mig(40.0);
    one["mig"]["instances"] = json!([one["mig"]["instances"][0].clone()]);
    file.write(&json!({"gpus": [one]}));
    sleep(RELOAD_WAIT);
    assert_eq!(a.uuid().unwrap(), MIG_A);
    assert!(matches!(b.uuid(), Err(NvmlError::InvalidArg)));
    assert!(matches!(
        gpu.mig_device_by_index(2),
        Err(NvmlError::NotFound)
    ));
}
