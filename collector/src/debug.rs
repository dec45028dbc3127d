//! The collector's debug API (`gpuscale.collector.v1.Collector`): the whole cluster view, for
//! `gpuscale-collector dump`. Read-only; answered from memory.

use std::sync::Arc;
use std::time::Instant;

use proto::collector::collector_server::Collector;
use proto::collector::{ClusterView, ClusterViewRequest, NodeView, PodView};
use tonic::{Request, Response, Status};

use crate::pods::PodSource;
use crate::view::Cluster;

/// The debug service.
pub struct Debug {
    /// The view.
    pub cluster: Arc<Cluster>,
    /// Pod metadata.
    pub pods: Arc<dyn PodSource>,
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
        }
    })
}

#[tonic::async_trait]
impl Collector for Debug {
    async fn get_cluster_view(
        &self,
        _: Request<ClusterViewRequest>,
    ) -> Result<Response<ClusterView>, Status> {
        Ok(Response::new(cluster_view(&self.cluster, &*self.pods)))
    }
}
