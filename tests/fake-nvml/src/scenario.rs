//! Parsing and validating the JSON scenario (see the crate docs for the format).

use std::ffi::CString;
use std::time::Duration;

use serde::Deserialize;

use crate::ffi::{NvmlReturn, NVML_ERROR_GPU_IS_LOST, NVML_ERROR_UNKNOWN};

const MIB: f64 = 1024.0 * 1024.0;
const DEFAULT_DRIVER_VERSION: &str = "580.159.04";
const DEFAULT_NAME: &str = "NVIDIA Fake GPU";
const DEFAULT_MEMORY_TOTAL_MIB: f64 = 81559.0;
const DEFAULT_TEMP_C: f64 = 40.0;
const DEFAULT_POWER_W: f64 = 70.0;
/// Longest accepted `process_util_delay_ms`; anything longer is surely a typo.
const MAX_DELAY_MS: f64 = 60_000.0;

/// A validated scenario, ready to be served.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scenario {
    pub(crate) driver_version: CString,
    pub(crate) gpus: Vec<Gpu>,
}

/// One GPU of a scenario, in the units NVML reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Gpu {
    pub(crate) name: CString,
    pub(crate) uuid: CString,
    pub(crate) memory_total_bytes: u64,
    pub(crate) memory_used_bytes: u64,
    pub(crate) gpm: bool,
    pub(crate) gpu_util: u32,
    pub(crate) mem_util: u32,
    pub(crate) sm_active: f64,
    pub(crate) sm_occupancy: f64,
    pub(crate) tensor_active: f64,
    pub(crate) dram_active: f64,
    pub(crate) power_mw: u32,
    pub(crate) temp_c: u32,
    pub(crate) processes: Vec<Process>,
    pub(crate) fail: Option<Failure>,
    pub(crate) process_util_delay: Duration,
}

/// One compute process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Process {
    pub(crate) pid: u32,
    pub(crate) used_memory_bytes: u64,
    /// `None`: the process has no utilization sample.
    pub(crate) sm_util: Option<u32>,
}

/// How a GPU fails every per-device call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    GpuLost,
    Unknown,
}

impl Failure {
    pub(crate) fn code(self) -> NvmlReturn {
        match self {
            Failure::GpuLost => NVML_ERROR_GPU_IS_LOST,
            Failure::Unknown => NVML_ERROR_UNKNOWN,
        }
    }
}

#[derive(Deserialize)]
struct RawScenario {
    driver_version: Option<String>,
    gpus: Option<Vec<RawGpu>>,
}

#[derive(Deserialize)]
struct RawGpu {
    name: Option<String>,
    uuid: Option<String>,
    memory_total_mib: Option<f64>,
    gpm: Option<bool>,
    gpu_util: Option<f64>,
    mem_util: Option<f64>,
    sm_active: Option<f64>,
    sm_occupancy: Option<f64>,
    tensor_active: Option<f64>,
    dram_active: Option<f64>,
    memory_used_mib: Option<f64>,
    power_w: Option<f64>,
    temp_c: Option<f64>,
    processes: Option<Vec<RawProcess>>,
    fail: Option<String>,
    process_util_delay_ms: Option<f64>,
}

#[derive(Deserialize)]
struct RawProcess {
    pid: u32,
    used_memory_mib: Option<f64>,
    sm_util: Option<f64>,
}

/// Parses and validates scenario JSON. The error says which key is wrong.
pub(crate) fn parse(text: &str) -> Result<Scenario, String> {
    let raw: RawScenario = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let driver_version = c_string(
        "driver_version",
        raw.driver_version
            .unwrap_or_else(|| DEFAULT_DRIVER_VERSION.to_owned()),
    )?;
    let gpus = raw
        .gpus
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, gpu)| convert_gpu(index, gpu))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, gpu) in gpus.iter().enumerate() {
        if let Some(j) = gpus[..i].iter().position(|g| g.uuid == gpu.uuid) {
            return Err(format!(
                "gpus[{i}].uuid: {:?} is also the uuid of gpus[{j}]",
                gpu.uuid
            ));
        }
    }
    Ok(Scenario {
        driver_version,
        gpus,
    })
}

fn convert_gpu(index: usize, raw: RawGpu) -> Result<Gpu, String> {
    let at = |key: &str| format!("gpus[{index}].{key}");
    let name = c_string(&at("name"), raw.name.unwrap_or_else(|| DEFAULT_NAME.into()))?;
    let uuid = c_string(
        &at("uuid"),
        raw.uuid
            .unwrap_or_else(|| format!("GPU-00000000-0000-0000-0000-{index:012}")),
    )?;
    let memory_total_bytes = bytes(
        &at("memory_total_mib"),
        raw.memory_total_mib.unwrap_or(DEFAULT_MEMORY_TOTAL_MIB),
    )?;
    let memory_used_bytes = bytes(&at("memory_used_mib"), raw.memory_used_mib.unwrap_or(0.0))?;
    if memory_used_bytes > memory_total_bytes {
        return Err(format!(
            "{}: {} MiB used is more than memory_total_mib",
            at("memory_used_mib"),
            memory_used_bytes as f64 / MIB
        ));
    }
    let fail = match raw.fail.as_deref() {
        None => None,
        Some("gpu_lost") => Some(Failure::GpuLost),
        Some("unknown") => Some(Failure::Unknown),
        Some(other) => {
            return Err(format!(
                "{}: {other:?} is not one of null, \"gpu_lost\", \"unknown\"",
                at("fail")
            ))
        }
    };
    let delay_ms = non_negative(
        &at("process_util_delay_ms"),
        raw.process_util_delay_ms.unwrap_or(0.0),
    )?;
    if delay_ms > MAX_DELAY_MS {
        return Err(format!(
            "{}: {delay_ms} ms is longer than the {MAX_DELAY_MS} ms limit",
            at("process_util_delay_ms")
        ));
    }
    let processes = raw
        .processes
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(p, process)| {
            let at = |key: &str| format!("gpus[{index}].processes[{p}].{key}");
            Ok(Process {
                pid: process.pid,
                used_memory_bytes: bytes(
                    &at("used_memory_mib"),
                    process.used_memory_mib.unwrap_or(0.0),
                )?,
                sm_util: process
                    .sm_util
                    .map(|v| rounded_u32(&at("sm_util"), v))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Gpu {
        name,
        uuid,
        memory_total_bytes,
        memory_used_bytes,
        gpm: raw.gpm.unwrap_or(false),
        gpu_util: rounded_u32(&at("gpu_util"), raw.gpu_util.unwrap_or(0.0))?,
        mem_util: rounded_u32(&at("mem_util"), raw.mem_util.unwrap_or(0.0))?,
        sm_active: non_negative(&at("sm_active"), raw.sm_active.unwrap_or(0.0))?,
        sm_occupancy: non_negative(&at("sm_occupancy"), raw.sm_occupancy.unwrap_or(0.0))?,
        tensor_active: non_negative(&at("tensor_active"), raw.tensor_active.unwrap_or(0.0))?,
        dram_active: non_negative(&at("dram_active"), raw.dram_active.unwrap_or(0.0))?,
        power_mw: rounded_u32(
            &at("power_w"),
            non_negative(&at("power_w"), raw.power_w.unwrap_or(DEFAULT_POWER_W))? * 1000.0,
        )?,
        temp_c: rounded_u32(&at("temp_c"), raw.temp_c.unwrap_or(DEFAULT_TEMP_C))?,
        processes,
        fail,
        process_util_delay: Duration::from_secs_f64(delay_ms / 1000.0),
    })
}

fn c_string(key: &str, value: String) -> Result<CString, String> {
    CString::new(value).map_err(|_| format!("{key}: contains a NUL character"))
}

fn non_negative(key: &str, value: f64) -> Result<f64, String> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(format!("{key}: must be a non-negative number, got {value}"))
    }
}

fn rounded_u32(key: &str, value: f64) -> Result<u32, String> {
    let rounded = non_negative(key, value)?.round();
    if rounded <= f64::from(u32::MAX) {
        Ok(rounded as u32)
    } else {
        Err(format!("{key}: {value} does not fit in a u32"))
    }
}

fn bytes(key: &str, mib: f64) -> Result<u64, String> {
    let bytes = (non_negative(key, mib)? * MIB).round();
    // 2^63 bytes is far beyond any GPU and keeps the cast exact enough.
    if bytes < 9.2e18 {
        Ok(bytes as u64)
    } else {
        Err(format!("{key}: {mib} MiB is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_object_is_a_scenario_without_gpus() {
        let s = parse("{}").unwrap();
        assert_eq!(s.driver_version.to_str().unwrap(), "580.159.04");
        assert!(s.gpus.is_empty());
    }

    #[test]
    fn missing_gpu_keys_take_their_defaults() {
        let s = parse(r#"{"gpus": [{}, {"name": "X", "fail": null}]}"#).unwrap();
        let g = &s.gpus[0];
        assert_eq!(g.name.to_str().unwrap(), "NVIDIA Fake GPU");
        assert_eq!(
            g.uuid.to_str().unwrap(),
            "GPU-00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            s.gpus[1].uuid.to_str().unwrap(),
            "GPU-00000000-0000-0000-0000-000000000001"
        );
        assert_eq!(g.memory_total_bytes, 81559 * 1024 * 1024);
        assert_eq!(g.memory_used_bytes, 0);
        assert!(!g.gpm);
        assert_eq!((g.gpu_util, g.mem_util), (0, 0));
        assert_eq!((g.temp_c, g.power_mw), (40, 70_000));
        assert!(g.processes.is_empty());
        assert_eq!(g.fail, None);
        assert_eq!(g.process_util_delay, Duration::ZERO);
    }

    #[test]
    fn floats_are_rounded_and_units_converted() {
        let s = parse(
            r#"{"gpus": [{"gpu_util": 36.6, "power_w": 350.25, "memory_used_mib": 0.5,
                "sm_active": 30.5, "process_util_delay_ms": 2.5,
                "processes": [{"pid": 1, "sm_util": 29.4, "used_memory_mib": 2}, {"pid": 2, "sm_util": null}]}],
                "unknown_key": [1, 2, 3]}"#,
        )
        .unwrap();
        let g = &s.gpus[0];
        assert_eq!(g.gpu_util, 37);
        assert_eq!(g.power_mw, 350_250);
        assert_eq!(g.memory_used_bytes, 512 * 1024);
        assert_eq!(g.sm_active, 30.5);
        assert_eq!(g.process_util_delay, Duration::from_micros(2500));
        assert_eq!(g.processes[0].sm_util, Some(29));
        assert_eq!(g.processes[0].used_memory_bytes, 2 * 1024 * 1024);
        assert_eq!(g.processes[1].sm_util, None);
    }

    #[test]
    fn invalid_scenarios_name_the_offending_key() {
        let cases = [
            (r#"{"gpus": [{"fail": "melted"}]}"#, "gpus[0].fail"),
            (r#"{"gpus": [{}, {"gpu_util": -1}]}"#, "gpus[1].gpu_util"),
            (
                r#"{"gpus": [{"memory_total_mib": 10, "memory_used_mib": 11}]}"#,
                "gpus[0].memory_used_mib",
            ),
            (
                r#"{"gpus": [{"uuid": "GPU-a"}, {"uuid": "GPU-a"}]}"#,
                "gpus[1].uuid",
            ),
            (
                r#"{"gpus": [{"processes": [{"pid": 1, "sm_util": -5}]}]}"#,
                "gpus[0].processes[0].sm_util",
            ),
            (r#"{"gpus": [{"gpu_util": 1e12}]}"#, "gpus[0].gpu_util"),
            (r#"{"gpus": [{"name": "a\u0000b"}]}"#, "gpus[0].name"),
        ];
        for (json, key) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.contains(key), "{json}: {err}");
        }
    }

    #[test]
    fn malformed_json_and_wrong_types_are_rejected() {
        assert!(parse("{").is_err());
        assert!(parse(r#"{"gpus": [{"gpu_util": "high"}]}"#).is_err());
        assert!(parse(r#"{"gpus": [{"processes": [{"sm_util": 3}]}]}"#).is_err());
    }
}
