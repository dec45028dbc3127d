//! The collector's debug API (`gpuscale.collector.v1.Collector`): the whole cluster view, for
//! `gpuscale-collector dump`, and one trigger's evaluation with the replicas it combined, for
//! `gpuscale-collector query`. Read-only; answered from memory.

use std::sync::Arc;
use std::time::Instant;

use proto::collector::collector_server::Collector;
use proto::collector::{
    ClusterView, ClusterViewRequest, EvaluateRequest, EvaluateResponse, GpuValue, NodeView,
    PodView, ReplicaValue, Streamed,
};
use proto::externalscaler::ScaledObjectRef;
use tonic::{Request, Response, Status};

use crate::api::scaler::Scaler;
use crate::model::evaluate::Evaluation;
use crate::model::trigger::Trigger;
use crate::model::Named;
use crate::sources::agents::StreamMode;
use crate::sources::demand::Ask;
use crate::sources::pods::PodSource;
use crate::sources::view::Cluster;

/// The debug service.
pub struct Debug {
    /// The view.
    pub cluster: Arc<Cluster>,
    /// Pod metadata.
    pub pods: Arc<dyn PodSource>,
    /// What answers KEDA, for `Evaluate`, and the series in use.
    pub scaler: Arc<Scaler>,
    /// What the agents are asked for (`--agent-stream`).
    pub agent_stream: StreamMode,
}

/// `Evaluate`'s answer for one outcome of [`Scaler::value`].
pub fn evaluation(answer: Result<(Arc<Trigger>, Evaluation), Status>) -> EvaluateResponse {
    let (t, e) = match answer {
        Ok(v) => v,
        Err(s) => {
            return EvaluateResponse {
                error: format!("{:?}: {}", s.code(), s.message()),
                ..Default::default()
            }
        }
    };
    let name = |p: &crate::sources::pods::PodMeta| format!("{}/{}", p.namespace, p.name);
    EvaluateResponse {
        value: Some(e.value),
        error: String::new(),
        aggregation: t.aggregation.name().to_owned(),
        gpu_aggregation: t.gpu_aggregation.name().to_owned(),
        replica_label: t.replica_label.clone().unwrap_or_default(),
        running_pods: e.running_pods as u32,
        replicas: e
            .replicas
            .iter()
            .map(|r| ReplicaValue {
                replica: r.key.clone(),
                pods: r.pods.iter().map(|p| name(p)).collect(),
                value: r.value,
                gpus: r
                    .gpus
                    .iter()
                    .map(|g| GpuValue {
                        pod: name(&g.pod),
                        node: g.node.to_string(),
                        gpu_uuid: g.gpu_uuid.to_string(),
                        value: g.value,
                        shared: g.shared,
                        fell_back: g.fell_back,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// What the agent streams carry, as `dump` shows it.
pub fn streamed(ask: &Ask) -> Streamed {
    Streamed {
        series: ask
            .wanted
            .series()
            .iter()
            .filter_map(|s| {
                let metric = proto::agent::Metric::try_from(s.metric).ok()?.vocab()?;
                Some(match s.window_s {
                    0 => format!("{} last", metric.name()),
                    w => format!("{} {}", metric.name(), vocab::Window::from_secs(w)?.name()),
                })
            })
            .collect(),
        heartbeat_ms: ask.heartbeat.as_millis() as u32,
        every_sample: ask.every_tick,
    }
}

/// Assembles the cluster view as `dump` shows it.
pub fn cluster_view(cluster: &Cluster, pods: &dyn PodSource) -> ClusterView {
    let index = pods.index();
    let now = Instant::now();
    cluster.read(|v| {
        let nodes = v
            .nodes
            .iter()
            .filter(|n| !n.retired)
            .map(|n| NodeView {
                address: n.address.clone(),
                node_name: n
                    .snapshot
                    .as_ref()
                    .map(|s| s.node_name.clone())
                    .unwrap_or_default(),
                connected: n.connected,
                age_ms: n
                    .received
                    .map(|r| now.saturating_duration_since(r).as_secs_f64() * 1e3),
                last_error: n.last_error.clone(),
                gpus: n
                    .snapshot
                    .as_ref()
                    .map(|s| s.gpus.clone())
                    .unwrap_or_default(),
                reconnects: n.reconnects,
            })
            .collect();
        let mut pod_views = Vec::new();
        let mut unknown = Vec::new();
        let mut uids: Vec<&String> = v.pod_gpus.keys().collect();
        uids.sort();
        for uid in uids {
            let gpus = v.pod_gpus[uid]
                .iter()
                .filter_map(|e| {
                    let snap = v.nodes[e.node].snapshot.as_ref()?;
                    snap.pods.get(e.pod).cloned()
                })
                .collect();
            match index.by_uid.get(uid) {
                Some(m) => pod_views.push(PodView {
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                    uid: m.uid.clone(),
                    node: m.node.clone(),
                    phase: m.phase.clone(),
                    labels: m.labels.clone().into_iter().collect(),
                    owner: m.owner.clone(),
                    gpus,
                }),
                None => unknown.push(uid.clone()),
            }
        }
        ClusterView {
            taken_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            pod_source: pods.describe(),
            nodes,
            pods: pod_views,
            unknown_pod_uids: unknown,
            streamed: None,
        }
    })
}

#[tonic::async_trait]
impl Collector for Debug {
    async fn get_cluster_view(
        &self,
        _: Request<ClusterViewRequest>,
    ) -> Result<Response<ClusterView>, Status> {
        let mut view = cluster_view(&self.cluster, &*self.pods);
        if self.agent_stream == StreamMode::Changes {
            view.streamed = Some(streamed(&self.scaler.demand().current()));
        }
        Ok(Response::new(view))
    }

    async fn evaluate(
        &self,
        request: Request<EvaluateRequest>,
    ) -> Result<Response<EvaluateResponse>, Status> {
        let r = request.into_inner();
        let so = ScaledObjectRef {
            namespace: r.namespace,
            name: r.name,
            scaler_metadata: r.scaler_metadata,
        };
        Ok(Response::new(evaluation(
            self.scaler
                .value_settled(&so, crate::model::evaluate::Detail::Full)
                .await,
        )))
    }
}
