//! Per-device queries answered from a scenario, through the real nvml-wrapper.

mod common;

use std::ffi::{c_uint, c_void};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{serial, ScenarioFile, RELOAD_WAIT};
use fake_nvml::ffi::{
    NvmlMemory, NvmlProcessInfo, NVML_ERROR_INSUFFICIENT_SIZE, NVML_ERROR_NOT_FOUND, NVML_SUCCESS,
};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::gpm_metrics_get;
use serde_json::json;

const MIB: u64 = 1024 * 1024;

type ListProcessesFn = unsafe extern "C" fn(*mut c_void, *mut c_uint, *mut NvmlProcessInfo) -> u32;

fn h100() -> serde_json::Value {
    json!({
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-11111111-2222-3333-4444-555555555555",
        "memory_total_mib": 81559, "memory_used_mib": 20000,
        "gpm": true,
        "gpu_util": 37, "mem_util": 12.4,
        "sm_active": 30, "sm_occupancy": 10, "tensor_active": 25, "dram_active": 15.5,
        "power_w": 350.5, "temp_c": 60,
        "processes": [{"pid": 4242, "used_memory_mib": 18000, "sm_util": 30}],
        "fail": null
    })
}

fn now_micros() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since_epoch.as_micros()).unwrap()
}

#[test]
fn device_queries_report_the_scenario() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"driver_version": "999.1.2", "gpus": [h100(), {}]}));
    let nvml = file.init();
    assert_eq!(nvml.sys_driver_version().unwrap(), "999.1.2");
    assert_eq!(nvml.device_count().unwrap(), 2);

    let gpu = nvml.device_by_index(0).unwrap();
    assert_eq!(gpu.name().unwrap(), "NVIDIA H100 80GB HBM3");
    assert_eq!(
        gpu.uuid().unwrap(),
        "GPU-11111111-2222-3333-4444-555555555555"
    );
    assert_eq!(gpu.index().unwrap(), 0);
    assert_eq!(gpu.minor_number().unwrap(), 0);
    let memory = gpu.memory_info().unwrap();
    assert_eq!(memory.total, 81559 * MIB);
    assert_eq!(memory.used, 20000 * MIB);
    assert_eq!(memory.free, 61559 * MIB);
    assert_eq!(memory.reserved, 0);
    assert_eq!(gpu.power_usage().unwrap(), 350_500);
    assert_eq!(gpu.temperature(TemperatureSensor::Gpu).unwrap(), 60);
    let utilization = gpu.utilization_rates().unwrap();
    assert_eq!((utilization.gpu, utilization.memory), (37, 12));

    let defaults = nvml.device_by_index(1).unwrap();
    assert_eq!(defaults.name().unwrap(), "NVIDIA Fake GPU");
    assert_eq!(
        defaults.uuid().unwrap(),
        "GPU-00000000-0000-0000-0000-000000000001"
    );
    assert_eq!(defaults.index().unwrap(), 1);
    assert_eq!(defaults.minor_number().unwrap(), 1);
    assert_eq!(defaults.memory_info().unwrap().total, 81559 * MIB);
    assert_eq!(defaults.memory_info().unwrap().used, 0);
    assert_eq!(defaults.power_usage().unwrap(), 70_000);
    assert_eq!(defaults.temperature(TemperatureSensor::Gpu).unwrap(), 40);
    assert_eq!(defaults.utilization_rates().unwrap().gpu, 0);

    let err = nvml.device_by_index(2).unwrap_err();
    assert!(matches!(err, NvmlError::InvalidArg), "{err:?}");
}

#[test]
fn memory_info_v1_is_exported_too() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [h100()]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    let mut memory = NvmlMemory::default();
    // SAFETY: a valid handle from nvml-wrapper and a writable `nvmlMemory_t`.
    let ret = unsafe {
        nvml.lib()
            .nvmlDeviceGetMemoryInfo(gpu.handle(), (&raw mut memory).cast())
    };
    assert_eq!(ret, NVML_SUCCESS);
    assert_eq!(
        memory,
        NvmlMemory {
            total: 81559 * MIB,
            free: 61559 * MIB,
            used: 20000 * MIB
        }
    );
}

#[test]
fn compute_processes_follow_the_count_protocol() {
    let _serial = serial();
    let seven: Vec<_> = (0..7)
        .map(|i| json!({"pid": 100 + i, "used_memory_mib": i}))
        .collect();
    let file = ScenarioFile::new(&json!({"gpus": [
        {"processes": []},
        {"processes": [{"pid": 4242, "used_memory_mib": 18000}]},
        {"processes": seven},
    ]}));
    let nvml = file.init();
    let calls = || common::calls(&nvml, "nvmlDeviceGetComputeRunningProcesses_v3");

    let idle = nvml.device_by_index(0).unwrap();
    assert_eq!(idle.running_compute_processes_count().unwrap(), 0);
    let before = calls();
    assert!(idle.running_compute_processes().unwrap().is_empty());
    assert_eq!(calls(), before + 1, "no data call when the count is 0");

    let one = nvml.device_by_index(1).unwrap();
    assert_eq!(one.running_compute_processes_count().unwrap(), 1);
    let processes = one.running_compute_processes().unwrap();
    assert_eq!(processes.len(), 1);
    assert_eq!(processes[0].pid, 4242);
    assert_eq!(
        processes[0].used_gpu_memory,
        UsedGpuMemory::Used(18000 * MIB)
    );
    assert_eq!(processes[0].gpu_instance_id, None);
    assert_eq!(processes[0].compute_instance_id, None);

    let busy = nvml.device_by_index(2).unwrap();
    assert_eq!(busy.running_compute_processes_count().unwrap(), 7);
    let processes = busy.running_compute_processes().unwrap();
    let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, (100..107).collect::<Vec<_>>());
    assert_eq!(processes[6].used_gpu_memory, UsedGpuMemory::Used(6 * MIB));

    // The raw protocol, on both exported versions: a short buffer says how many.
    for name in [
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetComputeRunningProcesses_v2",
    ] {
        // SAFETY: both take (nvmlDevice_t, unsigned int *, nvmlProcessInfo_t *).
        let list: ListProcessesFn = unsafe { common::symbol(&nvml, name) };
        // SAFETY: `busy` is a live device of `nvml`.
        let device = unsafe { busy.handle() }.cast::<c_void>();
        let mut buffer = [NvmlProcessInfo::default(); 8];
        let mut count = 3;
        // SAFETY: `buffer` has room for `count` (3) entries.
        let ret = unsafe { list(device, &mut count, buffer.as_mut_ptr()) };
        assert_eq!((ret, count), (NVML_ERROR_INSUFFICIENT_SIZE, 7), "{name}");
        assert_eq!(buffer[0], NvmlProcessInfo::default(), "nothing written");
        count = 8;
        // SAFETY: as above, with room for 8 entries.
        let ret = unsafe { list(device, &mut count, buffer.as_mut_ptr()) };
        assert_eq!((ret, count), (NVML_SUCCESS, 7), "{name}");
        assert_eq!(buffer[6].pid, 106);
        assert_eq!(buffer[6].used_gpu_memory, 6 * MIB);
        assert_eq!(buffer[6].gpu_instance_id, u32::MAX);
        // A NULL buffer is a count query whatever `*count` says.
        // SAFETY: NULL buffer, writable count.
        let ret = unsafe { list(device, &mut count, std::ptr::null_mut()) };
        assert_eq!((ret, count), (NVML_ERROR_INSUFFICIENT_SIZE, 7), "{name}");
    }
}

#[test]
fn process_utilization_returns_the_sm_util_of_processes_that_have_one() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{"processes": [
        {"pid": 1, "sm_util": 30},
        {"pid": 2, "sm_util": null},
        {"pid": 3},
        {"pid": 4, "sm_util": 12.6},
    ]}]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();

    let start = now_micros();
    let samples = gpu.process_utilization_stats(start - 1_000_000).unwrap();
    let end = now_micros();
    let got: Vec<(u32, u32)> = samples.iter().map(|s| (s.pid, s.sm_util)).collect();
    assert_eq!(got, [(1, 30), (4, 13)]);
    for sample in &samples {
        assert!((start..=end).contains(&sample.timestamp), "{sample:?}");
        assert_eq!(
            (sample.mem_util, sample.enc_util, sample.dec_util),
            (0, 0, 0)
        );
    }
    // `None` (timestamp 0) asks for everything buffered.
    assert_eq!(gpu.process_utilization_stats(None).unwrap().len(), 2);

    // Nothing newer than a timestamp in the future.
    let err = gpu
        .process_utilization_stats(now_micros() + 60_000_000)
        .unwrap_err();
    assert!(matches!(err, NvmlError::NotFound), "{err:?}");
}

#[test]
fn process_utilization_is_not_found_when_no_process_has_sm_util() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [
        {"processes": [{"pid": 7, "used_memory_mib": 100}]},
        {},
    ]}));
    let nvml = file.init();
    for index in 0..2 {
        let gpu = nvml.device_by_index(index).unwrap();
        let err = gpu.process_utilization_stats(None).unwrap_err();
        assert!(matches!(err, NvmlError::NotFound), "{err:?}");
    }
    // The raw call answers NOT_FOUND even to the NULL-buffer count query.
    let gpu = nvml.device_by_index(0).unwrap();
    let mut count = 5;
    // SAFETY: a valid handle, a NULL buffer and a writable count.
    let ret = unsafe {
        nvml.lib().nvmlDeviceGetProcessUtilization(
            gpu.handle(),
            std::ptr::null_mut(),
            &mut count,
            0,
        )
    };
    assert_eq!((ret, count), (NVML_ERROR_NOT_FOUND, 0));
}

#[test]
fn process_utilization_sleeps_the_configured_delay_on_every_call() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{
        "process_util_delay_ms": 100,
        "processes": [{"pid": 1, "sm_util": 5}],
    }]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    let start = Instant::now();
    assert_eq!(gpu.process_utilization_stats(None).unwrap().len(), 1);
    // nvml-wrapper makes two calls (count, then data): two delays.
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    let start = Instant::now();
    assert_eq!(gpu.utilization_rates().unwrap().gpu, 0);
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "other calls are not delayed"
    );
}

#[test]
fn gpm_metrics_come_from_the_second_sample() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [h100()]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    assert!(gpu.gpm_support().unwrap());

    let first = gpu.gpm_sample().unwrap();
    let mut later = h100();
    later["sm_active"] = json!(60);
    later["sm_occupancy"] = json!(45.5);
    file.write(&json!({"gpus": [later]}));
    sleep(RELOAD_WAIT);
    let second = gpu.gpm_sample().unwrap();

    let ids = [
        GpmMetricId::SmUtil,
        GpmMetricId::SmOccupancy,
        GpmMetricId::AnyTensorUtil,
        GpmMetricId::DramBwUtil,
        GpmMetricId::Fp64Util,
    ];
    let results = gpm_metrics_get(&nvml, &first, &second, &ids).unwrap();
    let values: Vec<f64> = results[..4]
        .iter()
        .map(|r| r.as_ref().unwrap().value)
        .collect();
    assert_eq!(values, [60.0, 45.5, 25.0, 15.5]);
    let sm = results[0].as_ref().unwrap();
    assert_eq!(sm.metric_id, GpmMetricId::SmUtil);
    assert_eq!(sm.metric_info.unit, "%");
    assert!(!sm.metric_info.short_name.is_empty());
    assert!(
        matches!(results[4], Err(NvmlError::NotSupported)),
        "{:?}",
        results[4]
    );

    // Samples in the wrong order are rejected.
    let err = gpm_metrics_get(&nvml, &second, &first, &ids).unwrap_err();
    assert!(matches!(err, NvmlError::InvalidArg), "{err:?}");
    first.free().unwrap();
    second.free().unwrap();
}

#[test]
fn gpm_rejects_samples_from_different_gpus() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [h100(), {"gpm": true, "uuid": "GPU-b"}]}));
    let nvml = file.init();
    let a = nvml.device_by_index(0).unwrap().gpm_sample().unwrap();
    let b = nvml.device_by_index(1).unwrap().gpm_sample().unwrap();
    let err = gpm_metrics_get(&nvml, &a, &b, &[GpmMetricId::SmUtil]).unwrap_err();
    assert!(matches!(err, NvmlError::InvalidArg), "{err:?}");
}

#[test]
fn gpm_is_unsupported_on_gpus_without_it() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{"sm_active": 50}]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    assert!(!gpu.gpm_support().unwrap());
    let before = common::calls(&nvml, "nvmlGpmSampleFree");
    let err = gpu.gpm_sample().unwrap_err();
    assert!(matches!(err, NvmlError::NotSupported), "{err:?}");
    assert_eq!(
        common::calls(&nvml, "nvmlGpmSampleFree"),
        before + 1,
        "nvml-wrapper frees the sample it allocated"
    );
}

#[test]
fn gpu_lost_scenario_fails_only_that_gpu() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [
        {"fail": "gpu_lost", "gpm": true, "processes": [{"pid": 1, "sm_util": 3}]},
        {"gpu_util": 44},
        {"fail": "unknown"},
    ]}));
    let nvml = file.init();
    assert_eq!(nvml.device_count().unwrap(), 3);

    let lost = nvml.device_by_index(0).unwrap();
    let results = [
        lost.name().map(drop),
        lost.uuid().map(drop),
        lost.index().map(drop),
        lost.memory_info().map(drop),
        lost.utilization_rates().map(drop),
        lost.power_usage().map(drop),
        lost.temperature(TemperatureSensor::Gpu).map(drop),
        lost.running_compute_processes().map(drop),
        lost.process_utilization_stats(None).map(drop),
        lost.gpm_support().map(drop),
        lost.gpm_sample().map(drop),
    ];
    for result in results {
        assert!(matches!(result, Err(NvmlError::GpuLost)), "{result:?}");
    }

    let healthy = nvml.device_by_index(1).unwrap();
    assert_eq!(healthy.utilization_rates().unwrap().gpu, 44);

    let unknown = nvml.device_by_index(2).unwrap();
    let err = unknown.utilization_rates().unwrap_err();
    assert!(matches!(err, NvmlError::Unknown), "{err:?}");

    // Recovery is a scenario rewrite away.
    file.write(&json!({"gpus": [{"gpu_util": 1}, {"gpu_util": 44}, {}]}));
    sleep(RELOAD_WAIT);
    assert_eq!(lost.utilization_rates().unwrap().gpu, 1);
}

#[test]
fn concurrent_threads_per_gpu_are_served() {
    let _serial = serial();
    let gpus: Vec<_> = (0..4).map(|i| json!({"gpu_util": i * 10})).collect();
    let file = ScenarioFile::new(&json!({ "gpus": gpus }));
    let nvml = file.init();
    std::thread::scope(|scope| {
        for index in 0..4 {
            let nvml = &nvml;
            scope.spawn(move || {
                let gpu = nvml.device_by_index(index).unwrap();
                for _ in 0..500 {
                    assert_eq!(gpu.utilization_rates().unwrap().gpu, index * 10);
                    assert!(gpu.running_compute_processes().unwrap().is_empty());
                }
            });
        }
    });
}
