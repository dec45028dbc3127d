//! The demo's story: four simulated GPUs whose load changes phase by phase, written as a
//! fake-NVML scenario (the format: the README's "The fake NVML library" and `tests/fake-nvml`'s
//! crate docs).

use serde_json::{json, Value};

/// One phase of the story.
pub struct Phase {
    /// Seconds from the start of the story.
    pub start_s: u64,
    /// What a viewer should notice.
    pub title: &'static str,
}

/// The story, in order; it repeats after [`STORY_LEN_S`].
pub const PHASES: [Phase; 4] = [
    Phase {
        start_s: 0,
        title: "idle: two vLLM replicas hold their weights in VRAM but serve nothing",
    },
    Phase {
        start_s: 10,
        title: "traffic spike on GPU 0 and GPU 1: sm_active and tensor_active climb",
    },
    Phase {
        start_s: 22,
        title: "small-kernel phase: gpu_util reads ~85 % but sm_active only ~6 % (the 5x overstatement)",
    },
    Phase {
        start_s: 32,
        title: "back to idle: the windows drain, the 5m averages remember",
    },
];

/// Length of one run through the story, seconds.
pub const STORY_LEN_S: u64 = 40;

/// The phase at `t_s` seconds.
pub fn phase_at(t_s: u64) -> usize {
    let t = t_s % STORY_LEN_S;
    PHASES.iter().rposition(|p| p.start_s <= t).unwrap_or(0)
}

struct Load {
    gpu_util: u32,
    mem_util: u32,
    sm_active: f64,
    sm_occupancy: f64,
    tensor_active: f64,
    dram_active: f64,
    power_w: u32,
    temp_c: u32,
}

const IDLE: Load = Load {
    gpu_util: 0,
    mem_util: 0,
    sm_active: 0.0,
    sm_occupancy: 0.0,
    tensor_active: 0.0,
    dram_active: 0.0,
    power_w: 72,
    temp_c: 34,
};

fn load(phase: usize, gpu: usize) -> Load {
    match (phase, gpu) {
        (1, 0 | 1) => Load {
            gpu_util: 97,
            mem_util: 48,
            sm_active: 78.0 + gpu as f64 * 3.0,
            sm_occupancy: 41.0,
            tensor_active: 62.0,
            dram_active: 45.0,
            power_w: 640,
            temp_c: 67,
        },
        (2, 0 | 1) => Load {
            gpu_util: 85,
            mem_util: 4,
            sm_active: 6.0,
            sm_occupancy: 2.5,
            tensor_active: 0.5,
            dram_active: 1.5,
            power_w: 160,
            temp_c: 48,
        },
        // GPU 2 is shared by two small services all the time.
        (_, 2) => Load {
            gpu_util: 40,
            mem_util: 12,
            sm_active: 22.0,
            sm_occupancy: 9.0,
            tensor_active: 10.0,
            dram_active: 8.0,
            power_w: 260,
            temp_c: 51,
        },
        _ => IDLE,
    }
}

/// A simulated pod: its process on a GPU, and its Kubernetes identity.
pub struct DemoPod {
    /// Pod name in namespace `ml`.
    pub name: &'static str,
    /// `app` label.
    pub app: &'static str,
    /// Pod UID.
    pub uid: &'static str,
    /// The (simulated) PID NVML reports.
    pub pid: u32,
}

/// The pods of the story: two vLLM replicas with a GPU each, two embedding services sharing
/// GPU 2.
pub const PODS: [DemoPod; 4] = [
    DemoPod {
        name: "vllm-7d9c5-0",
        app: "vllm",
        uid: "d0000000-0000-4000-8000-000000004100",
        pid: 4100,
    },
    DemoPod {
        name: "vllm-7d9c5-1",
        app: "vllm",
        uid: "d0000000-0000-4000-8000-000000004101",
        pid: 4101,
    },
    DemoPod {
        name: "embed-5f6b8-a",
        app: "embed",
        uid: "d0000000-0000-4000-8000-000000004200",
        pid: 4200,
    },
    DemoPod {
        name: "embed-5f6b8-b",
        app: "embed",
        uid: "d0000000-0000-4000-8000-000000004201",
        pid: 4201,
    },
];

/// The pods as a `kubectl get pods -A -o json` list on node `node`.
pub fn pod_list(node: &str) -> Value {
    let items: Vec<Value> = PODS
        .iter()
        .map(|p| {
            let rs = format!("{}-{}", p.app, &p.name[p.app.len() + 1..p.app.len() + 6]);
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"namespace": "ml", "name": p.name, "uid": p.uid,
                                "labels": {"app": p.app, "pod-template-hash": &rs[p.app.len() + 1..]},
                                "ownerReferences": [{"kind": "ReplicaSet", "name": rs, "controller": true}]},
                   "spec": {"nodeName": node}, "status": {"phase": "Running"}})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The scenario JSON for `phase`.
pub fn scenario(phase: usize) -> Value {
    let gpus: Vec<Value> = (0..4)
        .map(|gpu| {
            let l = load(phase, gpu);
            let processes = match gpu {
                0 | 1 => vec![json!({"pid": 4100 + gpu, "used_memory_mib": 61_440,
                                     "sm_util": l.sm_active.round()})],
                2 => vec![
                    json!({"pid": 4200, "used_memory_mib": 9_000, "sm_util": 15}),
                    json!({"pid": 4201, "used_memory_mib": 5_000, "sm_util": 7}),
                ],
                _ => vec![],
            };
            let used: u64 = 600
                + processes
                    .iter()
                    .map(|p| p["used_memory_mib"].as_u64().unwrap_or(0))
                    .sum::<u64>();
            let (name, gpm) = if gpu == 3 {
                ("NVIDIA A100-SXM4-80GB", false)
            } else {
                ("NVIDIA H100 80GB HBM3", true)
            };
            json!({
                "name": name,
                "uuid": format!("GPU-5ca1ab1e-0000-4000-8000-00000000000{gpu}"),
                "memory_total_mib": 81_559,
                "gpm": gpm,
                "gpu_util": l.gpu_util,
                "mem_util": l.mem_util,
                "sm_active": l.sm_active,
                "sm_occupancy": l.sm_occupancy,
                "tensor_active": l.tensor_active,
                "dram_active": l.dram_active,
                "memory_used_mib": used,
                "power_w": l.power_w,
                "temp_c": l.temp_c,
                "processes": processes,
                "fail": null,
            })
        })
        .collect();
    json!({"driver_version": "580.159.04", "gpus": gpus})
}
