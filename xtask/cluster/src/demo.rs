//! `cargo xtask demo --cluster`: the demo's story on the local cluster, through the real KEDA and
//! the real HPA. A vLLM-like Deployment `demo/vllm` (one GPU per replica, `minReplicaCount: 0`)
//! and an always-on `demo/vllm-small` share the label `part-of=chat`; a ScaledObject
//! (`external-push` on `sm_active`, target 60, `fallback`) scales `vllm` on the GPU activity of
//! every chat pod. The demo plays a total demand, spread over the running chat pods as a load
//! balancer would, through each pod's `gpuscale.dev/simulated-load` annotation, and prints every
//! second the Deployment's replicas, the HPA's current and desired values and what the
//! collector last told KEDA.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::Client;
use serde_json::{json, Value};

use crate::state::ClusterInfo;
use crate::{kube_util, workload};

const NS: &str = "demo";

/// One phase of the story.
struct Phase {
    /// Seconds into the story it starts.
    from: u64,
    title: &'static str,
    /// The load each chat pod gets, from the number of running chat pods.
    load: fn(usize) -> String,
    /// Whether the always-on pod alone carries it (the wake phase).
    small_only: bool,
}

/// Total demand in "GPU-percent" during the spike: 3 GPUs' worth at 80 %.
const SPIKE_DEMAND: f64 = 240.0;

fn idle(_: usize) -> String {
    "sm_active=0,gpu_util=0,vram_used_pct=60".into()
}

fn spike(pods: usize) -> String {
    let each = (SPIKE_DEMAND / pods.max(1) as f64).min(95.0).round();
    format!(
        "sm_active={each},gpu_util={},tensor_active={},vram_used_pct=75",
        (each + 5.0).min(100.0),
        (each * 0.8).round()
    )
}

fn small_kernels(_: usize) -> String {
    "sm_active=6,gpu_util=85,vram_used_pct=75".into()
}

fn wake(_: usize) -> String {
    "sm_active=50,gpu_util=55,vram_used_pct=70".into()
}

const PHASES: &[Phase] = &[
    Phase {
        from: 0,
        title: "idle: the replicas hold their weights and serve nothing",
        load: idle,
        small_only: false,
    },
    Phase {
        from: 15,
        title: "traffic spike: 240 % of GPU demand spread over the chat pods",
        load: spike,
        small_only: false,
    },
    Phase {
        from: 60,
        title: "small-kernel phase: gpu_util reads 85 %, sm_active only 6 %",
        load: small_kernels,
        small_only: false,
    },
    Phase {
        from: 90,
        title: "idle again: after cooldownPeriod (20 s) KEDA scales vllm to zero",
        load: idle,
        small_only: false,
    },
    Phase {
        from: 140,
        title: "wake: vllm-small gets busy; the collector pushes IsActive, KEDA wakes vllm",
        load: wake,
        small_only: true,
    },
];
const STORY_LEN_S: u64 = 180;

fn phase_at(t: u64) -> usize {
    let t = t % STORY_LEN_S;
    PHASES.iter().rposition(|p| p.from <= t).unwrap_or(0)
}

fn deployment(name: &str, replicas: i32) -> Value {
    workload::deployment(NS, name, replicas, 1, &[("part-of", "chat")])
}

fn scaled_object(info: &ClusterInfo) -> Value {
    json!({
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "vllm", "namespace": NS},
        "spec": {
            "scaleTargetRef": {"name": "vllm"},
            "minReplicaCount": 0, "maxReplicaCount": 6,
            "pollingInterval": 5, "cooldownPeriod": 20,
            "fallback": {"failureThreshold": 3, "replicas": 2},
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {"stabilizationWindowSeconds": 10}}}},
            "triggers": [{"type": "external-push", "metadata": {
                "scalerAddress": info.collector,
                "metric": "sm_active", "podSelector": "part-of=chat",
                "targetValue": "60", "window": "10s", "activationThreshold": "5",
                "staleAfter": "10s"}}]
        }
    })
}

async fn running(client: &Client, app: &str) -> Result<Vec<Pod>> {
    Ok(workload::running_pods(client, NS, app).await?)
}

async fn annotate(client: &Client, pod: &Pod, load: &str) -> Result<()> {
    Ok(workload::set_load(client, pod, load).await?)
}

/// What KEDA was last told for `demo/vllm`: the collector's `gpuscale_collector_scaledobject_value`.
fn told(info: &ClusterInfo) -> String {
    let Ok((_, body)) = crate::up::http_get(&format!("http://{}/metrics", info.collector_http))
    else {
        return "?".into();
    };
    body.lines()
        .find(|l| {
            l.starts_with("gpuscale_collector_scaledobject_value{")
                && l.contains("namespace=\"demo\"")
                && l.contains("scaledobject=\"vllm\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| format!("{v:.1}"))
        .unwrap_or_else(|| "- (no answer yet, or an error)".into())
}

fn hpa_line(h: Option<HorizontalPodAutoscaler>) -> String {
    let Some(h) = h else {
        return "no HPA yet".into();
    };
    let status = h.status.unwrap_or_default();
    let current = status
        .current_metrics
        .as_ref()
        .and_then(|m| m.first())
        .and_then(|m| m.external.as_ref())
        .map(|e| {
            e.current
                .average_value
                .as_ref()
                .or(e.current.value.as_ref())
                .map(|q| q.0.clone())
                .unwrap_or_else(|| "-".into())
        })
        .unwrap_or_else(|| "-".into());
    let active = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "ScalingActive")
        .map(|c| {
            format!(
                "ScalingActive {} ({})",
                c.status,
                c.reason.unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!(
        "current {current} per replica (target 60) · desired {} · {active}",
        status.desired_replicas
    )
}

/// Plays the story until `duration` (or Ctrl-C).
pub async fn run(info: &ClusterInfo, duration: Option<Duration>, no_clear: bool) -> Result<()> {
    let client = kube_util::client(&info.kubeconfig).await?;
    kube_util::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await?;
    kube_util::apply(&client, &deployment("vllm", 2)).await?;
    kube_util::apply(&client, &deployment("vllm-small", 1)).await?;
    kube_util::apply(&client, &scaled_object(info))
        .await
        .context("applying the demo's ScaledObject")?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), NS);
    let clear = !no_clear && std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut tick = 0u64;
    loop {
        let t = start.elapsed();
        if duration.is_some_and(|d| t >= d) {
            break;
        }
        let phase = &PHASES[phase_at(t.as_secs())];
        let big = running(&client, "vllm").await?;
        let small = running(&client, "vllm-small").await?;
        let pods = big.len() + small.len();
        for p in &small {
            annotate(
                &client,
                p,
                &(phase.load)(if phase.small_only { 1 } else { pods }),
            )
            .await?;
        }
        for p in &big {
            let load = if phase.small_only {
                idle(pods)
            } else {
                (phase.load)(pods)
            };
            annotate(&client, p, &load).await?;
        }
        let d = deployments.get("vllm").await?;
        let spec = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let hpa = hpas.get_opt("keda-hpa-vllm").await.ok().flatten();
        let mut screen = String::new();
        if clear {
            screen.push_str("\x1b[2J\x1b[H");
        }
        screen.push_str(&format!(
            "gpuscale demo on the local cluster · t={:>3}s · {}\nCtrl-C to stop{}\n\n",
            t.as_secs(),
            phase.title,
            duration.map_or(String::new(), |d| format!(" · ends at {}s", d.as_secs()))
        ));
        screen.push_str(&format!(
            "Deployment demo/vllm     spec.replicas {spec} · ready {ready} · chat pods running {pods} (vllm {}, vllm-small {})\n",
            big.len(),
            small.len()
        ));
        screen.push_str(&format!("HPA keda-hpa-vllm        {}\n", hpa_line(hpa)));
        screen.push_str(&format!(
            "KEDA was told            {} (sum of sm_active over the chat pods, 10 s average)\n",
            told(info)
        ));
        if let Some(p) = big.first().or(small.first()) {
            screen.push_str(&format!(
                "a pod's load             {}\n",
                p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(crate::load::ANNOTATION))
                    .map(String::as_str)
                    .unwrap_or("-")
            ));
        }
        print!("{screen}");
        tick += 1;
        let next = start + Duration::from_secs(tick);
        tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
    }
    eprintln!(
        "\ndemo finished; the cluster is still up (KUBECONFIG={}); `cargo xtask cluster down` \
         stops it",
        info.kubeconfig.display()
    );
    Ok(())
}
