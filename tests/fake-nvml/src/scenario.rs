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
/// `nvmlDeviceGetMaxMigDeviceCount` of an A100 or H100, the default `mig.max_devices`.
const DEFAULT_MAX_MIG_DEVICES: u32 = 7;
/// Largest accepted `mig.max_devices` (MIG device handles keep the index in 8 bits).
pub(crate) const MAX_MIG_DEVICES: u32 = 255;
/// Memory of an H100's smallest profile (`1g.10gb`), the default instance `memory_total_mib`.
const DEFAULT_MIG_MEMORY_TOTAL_MIB: f64 = 10240.0;

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
    /// `Some` when MIG mode is enabled: the GPU's MIG devices.
    pub(crate) mig: Option<Mig>,
}

/// A MIG-enabled GPU's MIG devices.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mig {
    /// What `nvmlDeviceGetMaxMigDeviceCount` answers; every instance's `index` is below it.
    pub(crate) max_devices: u32,
    pub(crate) instances: Vec<MigInstance>,
}

impl Mig {
    /// The instance at MIG device index `index`, if that slot is filled.
    pub(crate) fn at_index(&self, index: u32) -> Option<(usize, &MigInstance)> {
        self.instances
            .iter()
            .enumerate()
            .find(|(_, m)| m.index == index)
    }

    /// The instance with GPU instance ID `id`.
    pub(crate) fn by_gpu_instance_id(&self, id: u32) -> Option<(usize, &MigInstance)> {
        self.instances
            .iter()
            .enumerate()
            .find(|(_, m)| m.gpu_instance_id == id)
    }
}

/// One MIG device (a GPU instance with its compute instance), in the units NVML reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MigInstance {
    /// MIG device index on the parent (`nvmlDeviceGetMigDeviceHandleByIndex`).
    pub(crate) index: u32,
    /// GPU instance ID (`nvmlDeviceGetGpuInstanceId`).
    pub(crate) gpu_instance_id: u32,
    pub(crate) name: CString,
    pub(crate) uuid: CString,
    pub(crate) memory_total_bytes: u64,
    pub(crate) memory_used_bytes: u64,
    pub(crate) sm_active: f64,
    pub(crate) sm_occupancy: f64,
    pub(crate) tensor_active: f64,
    pub(crate) dram_active: f64,
    pub(crate) processes: Vec<Process>,
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
    mig: Option<RawMig>,
}

#[derive(Deserialize)]
struct RawMig {
    max_devices: Option<u32>,
    instances: Option<Vec<RawMigInstance>>,
}

#[derive(Deserialize)]
struct RawMigInstance {
    index: Option<u32>,
    gpu_instance_id: Option<u32>,
    name: Option<String>,
    uuid: Option<String>,
    memory_total_mib: Option<f64>,
    memory_used_mib: Option<f64>,
    sm_active: Option<f64>,
    sm_occupancy: Option<f64>,
    tensor_active: Option<f64>,
    dram_active: Option<f64>,
    processes: Option<Vec<RawProcess>>,
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
    // UUIDs are unique across GPUs and MIG instances, as NVML's are.
    let mut uuids: Vec<(String, &CString)> = Vec::new();
    for (i, gpu) in gpus.iter().enumerate() {
        let instances = gpu.mig.iter().flat_map(|m| m.instances.iter().enumerate());
        let keys = std::iter::once((format!("gpus[{i}].uuid"), &gpu.uuid)).chain(
            instances.map(|(m, inst)| (format!("gpus[{i}].mig.instances[{m}].uuid"), &inst.uuid)),
        );
        for (key, uuid) in keys {
            if let Some((other, _)) = uuids.iter().find(|(_, u)| *u == uuid) {
                let other = other.trim_end_matches(".uuid");
                return Err(format!("{key}: {uuid:?} is also the uuid of {other}"));
            }
            uuids.push((key, uuid));
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
    let mut memory_used_bytes = bytes(&at("memory_used_mib"), raw.memory_used_mib.unwrap_or(0.0))?;
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
    let processes = convert_processes(&at("processes"), raw.processes.unwrap_or_default())?;
    let mig = raw
        .mig
        .map(|m| convert_mig(index, &name, memory_total_bytes, m))
        .transpose()?;
    if let Some(mig) = &mig {
        if !processes.is_empty() {
            return Err(format!(
                "{}: a MIG-enabled GPU runs its processes on its MIG instances; list them under \
                 mig.instances[].processes",
                at("processes")
            ));
        }
        // In MIG mode the GPU's used memory is its instances' together, unless set.
        if raw.memory_used_mib.is_none() {
            memory_used_bytes = mig.instances.iter().map(|m| m.memory_used_bytes).sum();
        }
    }
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
        mig,
    })
}

/// Converts a process list found at `key` (`gpus[0].processes`, …).
fn convert_processes(key: &str, raw: Vec<RawProcess>) -> Result<Vec<Process>, String> {
    raw.into_iter()
        .enumerate()
        .map(|(p, process)| {
            let at = |k: &str| format!("{key}[{p}].{k}");
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
        .collect()
}

/// Converts `gpus[gpu].mig` of a GPU named `parent_name` with `parent_total` bytes of memory.
fn convert_mig(
    gpu: usize,
    parent_name: &CString,
    parent_total: u64,
    raw: RawMig,
) -> Result<Mig, String> {
    let max_devices = raw.max_devices.unwrap_or(DEFAULT_MAX_MIG_DEVICES);
    if !(1..=MAX_MIG_DEVICES).contains(&max_devices) {
        return Err(format!(
            "gpus[{gpu}].mig.max_devices: {max_devices} is not between 1 and {MAX_MIG_DEVICES} \
             (an A100 or H100 has 7)"
        ));
    }
    let mut instances: Vec<MigInstance> = Vec::new();
    for (m, raw) in raw.instances.unwrap_or_default().into_iter().enumerate() {
        let at = |key: &str| format!("gpus[{gpu}].mig.instances[{m}].{key}");
        let position = u32::try_from(m).map_err(|_| at("index") + ": too many instances")?;
        let index = raw.index.unwrap_or(position);
        if index >= max_devices {
            return Err(format!(
                "{}: {index} is not below mig.max_devices ({max_devices}); MIG device indexes \
                 run from 0 to max_devices - 1",
                at("index")
            ));
        }
        if let Some(j) = instances.iter().position(|i| i.index == index) {
            return Err(format!(
                "{}: {index} is also the index of gpus[{gpu}].mig.instances[{j}]",
                at("index")
            ));
        }
        let gpu_instance_id = raw.gpu_instance_id.unwrap_or(position + 1);
        if let Some(j) = instances
            .iter()
            .position(|i| i.gpu_instance_id == gpu_instance_id)
        {
            return Err(format!(
                "{}: {gpu_instance_id} is also the gpu_instance_id of \
                 gpus[{gpu}].mig.instances[{j}]",
                at("gpu_instance_id")
            ));
        }
        let default_name = format!("{} MIG", parent_name.to_string_lossy());
        let name = c_string(&at("name"), raw.name.unwrap_or(default_name))?;
        let uuid = c_string(
            &at("uuid"),
            raw.uuid
                .unwrap_or_else(|| format!("MIG-00000000-0000-0000-{gpu:04}-{m:012}")),
        )?;
        let memory_total_bytes = bytes(
            &at("memory_total_mib"),
            raw.memory_total_mib.unwrap_or(DEFAULT_MIG_MEMORY_TOTAL_MIB),
        )?;
        let memory_used_bytes = bytes(&at("memory_used_mib"), raw.memory_used_mib.unwrap_or(0.0))?;
        if memory_used_bytes > memory_total_bytes {
            return Err(format!(
                "{}: {} MiB used is more than the instance's memory_total_mib",
                at("memory_used_mib"),
                memory_used_bytes as f64 / MIB
            ));
        }
        let allotted: u64 = instances.iter().map(|i| i.memory_total_bytes).sum();
        if allotted + memory_total_bytes > parent_total {
            return Err(format!(
                "{}: the instances' memory ({} MiB up to this one) is more than their GPU's \
                 memory_total_mib ({} MiB)",
                at("memory_total_mib"),
                (allotted + memory_total_bytes) as f64 / MIB,
                parent_total as f64 / MIB
            ));
        }
        let raw_processes = raw.processes.unwrap_or_default();
        if let Some(p) = raw_processes.iter().position(|p| p.sm_util.is_some()) {
            return Err(format!(
                "{}[{p}].sm_util: NVML has no per-process utilization on MIG instances; remove it",
                at("processes")
            ));
        }
        instances.push(MigInstance {
            index,
            gpu_instance_id,
            name,
            uuid,
            memory_total_bytes,
            memory_used_bytes,
            sm_active: non_negative(&at("sm_active"), raw.sm_active.unwrap_or(0.0))?,
            sm_occupancy: non_negative(&at("sm_occupancy"), raw.sm_occupancy.unwrap_or(0.0))?,
            tensor_active: non_negative(&at("tensor_active"), raw.tensor_active.unwrap_or(0.0))?,
            dram_active: non_negative(&at("dram_active"), raw.dram_active.unwrap_or(0.0))?,
            processes: convert_processes(&at("processes"), raw_processes)?,
        });
    }
    Ok(Mig {
        max_devices,
        instances,
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
    fn a_mig_gpu_lists_its_instances_with_their_defaults() {
        let s = parse(
            r#"{"gpus": [{"name": "NVIDIA H100 80GB HBM3", "gpm": true,
                "mig": {"instances": [
                    {"uuid": "MIG-a", "gpu_instance_id": 7, "memory_total_mib": 10240,
                     "memory_used_mib": 4000, "sm_active": 40.5, "sm_occupancy": 20,
                     "tensor_active": 30, "dram_active": 10,
                     "processes": [{"pid": 11, "used_memory_mib": 3500}]},
                    {"index": 4, "memory_used_mib": 1000}]}}]}"#,
        )
        .unwrap();
        let g = &s.gpus[0];
        let mig = g.mig.as_ref().unwrap();
        assert_eq!(
            mig.max_devices, 7,
            "an H100's nvmlDeviceGetMaxMigDeviceCount"
        );
        let [a, b] = &mig.instances[..] else {
            panic!("two instances: {mig:?}")
        };
        assert_eq!((a.index, a.gpu_instance_id), (0, 7));
        assert_eq!(a.uuid.to_str().unwrap(), "MIG-a");
        assert_eq!(a.name.to_str().unwrap(), "NVIDIA H100 80GB HBM3 MIG");
        assert_eq!(a.memory_total_bytes, 10240 << 20);
        assert_eq!(a.memory_used_bytes, 4000 << 20);
        assert_eq!(a.sm_active, 40.5);
        assert_eq!(a.processes[0].pid, 11);
        assert_eq!(a.processes[0].used_memory_bytes, 3500 << 20);
        assert_eq!(a.processes[0].sm_util, None);
        // Sparse: the second instance sits in slot 4; its GPU instance ID is its position + 1.
        assert_eq!((b.index, b.gpu_instance_id), (4, 2));
        assert_eq!(
            b.uuid.to_str().unwrap(),
            "MIG-00000000-0000-0000-0000-000000000001"
        );
        assert_eq!(mig.at_index(4).map(|(p, _)| p), Some(1));
        assert_eq!(mig.at_index(1), None);
        assert_eq!(mig.by_gpu_instance_id(7).map(|(p, _)| p), Some(0));
        // In MIG mode the GPU's used memory defaults to its instances' together.
        assert_eq!(g.memory_used_bytes, 5000 << 20);
        assert!(g.processes.is_empty());
    }

    #[test]
    fn a_gpu_without_mig_has_none_and_an_empty_mig_has_no_instances() {
        let s = parse(r#"{"gpus": [{}, {"mig": {}}, {"mig": null}]}"#).unwrap();
        assert_eq!(s.gpus[0].mig, None);
        let empty = s.gpus[1].mig.as_ref().unwrap();
        assert!(empty.instances.is_empty());
        assert_eq!(s.gpus[2].mig, None);
    }

    #[test]
    fn invalid_mig_scenarios_name_the_offending_key() {
        let cases = [
            (
                r#"{"gpus": [{"processes": [{"pid": 1}], "mig": {}}]}"#,
                "gpus[0].processes: a MIG-enabled GPU",
            ),
            (
                r#"{"gpus": [{"mig": {"max_devices": 0}}]}"#,
                "gpus[0].mig.max_devices",
            ),
            (
                r#"{"gpus": [{"mig": {"max_devices": 2, "instances": [{"index": 2}]}}]}"#,
                "gpus[0].mig.instances[0].index: 2 is not below",
            ),
            (
                r#"{"gpus": [{"mig": {"instances": [{"index": 1}, {"index": 1}]}}]}"#,
                "gpus[0].mig.instances[1].index",
            ),
            (
                r#"{"gpus": [{"mig": {"instances": [{"gpu_instance_id": 2}, {}]}}]}"#,
                "gpus[0].mig.instances[1].gpu_instance_id",
            ),
            (
                r#"{"gpus": [{"mig": {"instances": [{"memory_total_mib": 10, "memory_used_mib": 11}]}}]}"#,
                "gpus[0].mig.instances[0].memory_used_mib",
            ),
            (
                r#"{"gpus": [{"memory_total_mib": 20000, "mig": {"instances": [
                    {"memory_total_mib": 10240}, {"memory_total_mib": 10240}]}}]}"#,
                "gpus[0].mig.instances[1].memory_total_mib",
            ),
            (
                r#"{"gpus": [{"mig": {"instances": [{"processes": [{"pid": 1, "sm_util": 5}]}]}}]}"#,
                "gpus[0].mig.instances[0].processes[0].sm_util",
            ),
            (
                r#"{"gpus": [{}, {"mig": {"instances": [{"sm_active": -1}]}}]}"#,
                "gpus[1].mig.instances[0].sm_active",
            ),
            (
                r#"{"gpus": [{"mig": {"instances": [{"processes": [{"pid": 1, "used_memory_mib": -1}]}]}}]}"#,
                "gpus[0].mig.instances[0].processes[0].used_memory_mib",
            ),
            (
                r#"{"gpus": [{"uuid": "GPU-a"}, {"mig": {"instances": [{"uuid": "GPU-a"}]}}]}"#,
                "gpus[1].mig.instances[0].uuid: \"GPU-a\" is also the uuid of gpus[0]",
            ),
            (
                r#"{"gpus": [{"mig": {"instances": [{"uuid": "MIG-x"}, {"uuid": "MIG-x"}]}}]}"#,
                "gpus[0].mig.instances[1].uuid: \"MIG-x\" is also the uuid of gpus[0].mig.instances[0]",
            ),
            (
                r#"{"gpus": [{"mig": {"instances": [{"name": "a\u0000b"}]}}]}"#,
                "gpus[0].mig.instances[0].name",
            ),
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
