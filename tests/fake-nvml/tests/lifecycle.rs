//! Init, shutdown, hot reload and diagnostics of the fake, through nvml-wrapper.
//!
//! Tests whose fake prints to stderr re-run themselves in a child process
//! (see `common::run_in_child`) so the parent can assert on the diagnostics.

mod common;

use std::path::PathBuf;
use std::thread::sleep;

use common::{fake_lines, is_child, run_in_child, serial, ScenarioFile, RELOAD_WAIT};
use nvml_wrapper::error::NvmlError;
use serde_json::json;

fn missing_scenario_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fake-nvml-no-such-dir")
        .join("scenario.json")
}

#[test]
fn init_fails_cleanly_without_the_scenario_env_var() {
    let _serial = serial();
    if !is_child() {
        let stderr = run_in_child("init_fails_cleanly_without_the_scenario_env_var");
        assert_eq!(
            fake_lines(&stderr),
            ["fake-nvml: FAKE_NVML_SCENARIO is not set"]
        );
        return;
    }
    std::env::remove_var("FAKE_NVML_SCENARIO");
    let err = common::init_fake().unwrap_err();
    assert!(matches!(err, NvmlError::DriverNotLoaded), "{err:?}");
}

#[test]
fn init_fails_cleanly_when_the_scenario_file_is_missing() {
    let _serial = serial();
    if !is_child() {
        let stderr = run_in_child("init_fails_cleanly_when_the_scenario_file_is_missing");
        let lines = fake_lines(&stderr);
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains("cannot read"), "{stderr}");
        assert!(
            lines[0].contains(&missing_scenario_path().display().to_string()),
            "{stderr}"
        );
        return;
    }
    std::env::set_var("FAKE_NVML_SCENARIO", missing_scenario_path());
    let err = common::init_fake().unwrap_err();
    assert!(matches!(err, NvmlError::Unknown), "{err:?}");
}

#[test]
fn init_fails_cleanly_when_the_scenario_is_invalid() {
    let _serial = serial();
    if !is_child() {
        let stderr = run_in_child("init_fails_cleanly_when_the_scenario_is_invalid");
        let lines = fake_lines(&stderr);
        assert_eq!(lines.len(), 2, "{stderr}");
        assert!(lines[0].contains("invalid scenario"), "{stderr}");
        assert!(lines[0].contains("scenario.json"), "{stderr}");
        assert!(lines[0].contains("gpus[0].fail"), "{stderr}");
        assert!(lines[1].contains("line 1 column"), "{stderr}");
        return;
    }
    let file = ScenarioFile::new(&json!({"gpus": [{"fail": "melted"}]}));
    let err = file.try_init().unwrap_err();
    assert!(matches!(err, NvmlError::Unknown), "{err:?}");
    file.write_raw("{\"gpus\": [");
    let err = file.try_init().unwrap_err();
    assert!(matches!(err, NvmlError::Unknown), "{err:?}");
}

#[test]
fn init_and_shutdown_are_reference_counted() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{}]}));
    let first = file.init();
    let second = file.init();
    drop(second);
    assert_eq!(first.device_count().unwrap(), 1);

    // Drop the remaining reference behind nvml-wrapper's back.
    // SAFETY: plain C call without arguments into the loaded library.
    assert_eq!(unsafe { first.lib().nvmlShutdown() }, 0);
    let err = first.device_count().unwrap_err();
    assert!(matches!(err, NvmlError::Uninitialized), "{err:?}");
    // SAFETY: as above; a second shutdown has nothing left to release.
    assert_eq!(unsafe { first.lib().nvmlShutdown() }, 1);

    // Take it back so that `first`'s Drop has a reference to release.
    // SAFETY: as above.
    assert_eq!(unsafe { first.lib().nvmlInit_v2() }, 0);
    assert_eq!(first.device_count().unwrap(), 1);
}

#[test]
fn init_with_flags_loads_the_scenario_too() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{}, {}]}));
    std::env::set_var("FAKE_NVML_SCENARIO", file.path());
    let nvml = nvml_wrapper::Nvml::builder()
        .lib_path(common::lib_path().as_os_str())
        .flags(nvml_wrapper::bitmasks::InitFlags::NO_GPUS)
        .init()
        .unwrap();
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert_eq!(common::calls(&nvml, "nvmlInitWithFlags"), 1);
}

#[test]
fn an_atomic_rewrite_is_seen_by_the_next_call() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{"gpu_util": 37, "power_w": 350}]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();
    assert_eq!(gpu.utilization_rates().unwrap().gpu, 37);

    file.write(&json!({"gpus": [{"gpu_util": 80, "power_w": 400}]}));
    sleep(RELOAD_WAIT);
    assert_eq!(gpu.utilization_rates().unwrap().gpu, 80);
    assert_eq!(gpu.power_usage().unwrap(), 400_000);

    // Same size, same shape: only the inode and times tell the versions apart.
    file.write(&json!({"gpus": [{"gpu_util": 81, "power_w": 400}]}));
    sleep(RELOAD_WAIT);
    assert_eq!(gpu.utilization_rates().unwrap().gpu, 81);
}

#[test]
fn a_broken_rewrite_keeps_the_last_good_values() {
    let _serial = serial();
    if !is_child() {
        let stderr = run_in_child("a_broken_rewrite_keeps_the_last_good_values");
        let lines = fake_lines(&stderr);
        assert_eq!(lines.len(), 2, "one line per distinct failure:\n{stderr}");
        for line in &lines {
            assert!(line.contains("keeping the last good scenario"), "{line}");
            assert!(line.contains("scenario.json"), "{line}");
        }
        assert!(lines[0].contains("line 1 column"), "{stderr}");
        assert!(lines[1].contains("gpus[0].fail"), "{stderr}");
        return;
    }
    let file = ScenarioFile::new(&json!({"gpus": [{"gpu_util": 37}]}));
    let nvml = file.init();
    let gpu = nvml.device_by_index(0).unwrap();

    file.write_raw("{ not json");
    for _ in 0..3 {
        sleep(RELOAD_WAIT);
        assert_eq!(gpu.utilization_rates().unwrap().gpu, 37);
    }
    file.write(&json!({"gpus": [{"gpu_util": 99, "fail": "melted"}]}));
    for _ in 0..3 {
        sleep(RELOAD_WAIT);
        assert_eq!(gpu.utilization_rates().unwrap().gpu, 37);
    }
    file.write(&json!({"gpus": [{"gpu_util": 55}]}));
    sleep(RELOAD_WAIT);
    assert_eq!(gpu.utilization_rates().unwrap().gpu, 55);
}

#[test]
fn a_reload_that_removes_a_gpu_invalidates_its_handle() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [{"name": "A"}, {"name": "B"}]}));
    let nvml = file.init();
    let second = nvml.device_by_index(1).unwrap();
    assert_eq!(second.name().unwrap(), "B");

    file.write(&json!({"gpus": [{"name": "A"}]}));
    sleep(RELOAD_WAIT);
    assert_eq!(nvml.device_count().unwrap(), 1);
    let err = second.name().unwrap_err();
    assert!(matches!(err, NvmlError::InvalidArg), "{err:?}");
    let err = nvml.device_by_index(1).unwrap_err();
    assert!(matches!(err, NvmlError::InvalidArg), "{err:?}");
}

#[test]
fn fake_nvml_calls_counts_each_exported_function() {
    let _serial = serial();
    let file = ScenarioFile::new(&json!({"gpus": [
        {"processes": [{"pid": 1, "sm_util": 10}]},
    ]}));
    let nvml = file.init();
    let count = |name| common::calls(&nvml, name);
    assert!(count("nvmlInit_v2") >= 1);
    assert_eq!(count("no_such_function"), 0);

    let gpu = nvml.device_by_index(0).unwrap();
    let (procs, util, name) = (
        count("nvmlDeviceGetComputeRunningProcesses_v3"),
        count("nvmlDeviceGetProcessUtilization"),
        count("nvmlDeviceGetName"),
    );
    assert_eq!(gpu.running_compute_processes().unwrap().len(), 1);
    gpu.name().unwrap();
    gpu.name().unwrap();
    // nvml-wrapper lists processes with two calls: the count, then the data.
    assert_eq!(count("nvmlDeviceGetComputeRunningProcesses_v3"), procs + 2);
    assert_eq!(count("nvmlDeviceGetProcessUtilization"), util);
    assert_eq!(count("nvmlDeviceGetName"), name + 2);

    assert_eq!(gpu.process_utilization_stats(None).unwrap().len(), 1);
    assert_eq!(count("nvmlDeviceGetProcessUtilization"), util + 2);
}
