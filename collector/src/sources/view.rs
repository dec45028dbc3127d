//! The collector's in-memory cluster view: the newest snapshot of every agent, with its
//! freshness, indexed by node name and by pod UID. Agent streams write it; KEDA calls and
//! `dump` read it. It never does I/O.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use proto::agent::NodeSnapshot;

/// One agent as the collector sees it.
#[derive(Clone, Debug)]
pub struct NodeState {
    /// The address the collector dials.
    pub address: String,
    /// Whether a stream to the agent is open.
    pub connected: bool,
    /// The newest snapshot, if any.
    pub snapshot: Option<Arc<NodeSnapshot>>,
    /// When the newest snapshot arrived (collector clock).
    pub received: Option<Instant>,
    /// The last connection or stream error.
    pub last_error: String,
    /// Times the stream was re-established.
    pub reconnects: u32,
    /// The agent left the discovered set (its slot is kept, empty, for a later return).
    pub retired: bool,
    /// Why the agent's newest snapshot was refused (see [`crate::sources::validate`]); while
    /// set, its pods read `UNAVAILABLE`. Cleared by the next good snapshot.
    pub refused: Option<String>,
    /// Snapshots refused since the collector started.
    pub refused_total: u64,
}

impl NodeState {
    /// An agent at `address`, not connected yet.
    pub fn new(address: &str) -> NodeState {
        NodeState {
            address: address.to_owned(),
            connected: false,
            snapshot: None,
            received: None,
            last_error: String::new(),
            reconnects: 0,
            retired: false,
            refused: None,
            refused_total: 0,
        }
    }
}

/// Where one pod's use of one GPU is in the view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PodEntry {
    /// Index into [`View::nodes`].
    pub node: usize,
    /// Index into that node snapshot's `pods`.
    pub pod: usize,
}

/// Everything the collector knows about the agents, at one moment.
#[derive(Debug, Default)]
pub struct View {
    /// One per `--agents` address, in that order.
    pub nodes: Vec<NodeState>,
    /// Pod UID → its per-GPU entries.
    pub pod_gpus: HashMap<String, Vec<PodEntry>>,
    /// Node name (as agents report it) → every slot whose newest snapshot names it, the one that
    /// reported last at the end ([`View::node`]). More than one is a conflict (two agents claim
    /// one node): that node's pods read `UNAVAILABLE` until only one does ([`View::conflict`]).
    pub claims: HashMap<String, Vec<usize>>,
}

impl View {
    fn unindex(&mut self, node: usize) {
        let Some(old) = self.nodes[node].snapshot.clone() else {
            return;
        };
        for p in &old.pods {
            if let Some(v) = self.pod_gpus.get_mut(&p.pod_uid) {
                v.retain(|e| e.node != node);
                if v.is_empty() {
                    self.pod_gpus.remove(&p.pod_uid);
                }
            }
        }
        if let Some(c) = self.claims.get_mut(&old.node_name) {
            c.retain(|&n| n != node);
            if c.is_empty() {
                self.claims.remove(&old.node_name);
            }
        }
    }

    /// The slot of the agent that reports node `name` (the one that reported last, if several
    /// claim it).
    pub fn node(&self, name: &str) -> Option<usize> {
        self.claims.get(name)?.last().copied()
    }

    /// The addresses of the agents that claim node `name` when more than one does.
    pub fn conflict(&self, name: &str) -> Option<Vec<&str>> {
        let c = self.claims.get(name).filter(|c| c.len() > 1)?;
        Some(c.iter().map(|&n| self.nodes[n].address.as_str()).collect())
    }

    /// The slot for the agent at `address`: its old slot when it was seen before (retired or
    /// not), else a new one.
    pub fn add_node(&mut self, address: &str) -> usize {
        if let Some(i) = self.nodes.iter().position(|n| n.address == address) {
            self.nodes[i].retired = false;
            return i;
        }
        self.nodes.push(NodeState::new(address));
        self.nodes.len() - 1
    }

    /// Forgets what agent `node` reported (its pods and node name leave the indexes) and marks
    /// its slot retired.
    pub fn retire_node(&mut self, node: usize) {
        self.unindex(node);
        let n = &mut self.nodes[node];
        *n = NodeState {
            retired: true,
            reconnects: n.reconnects,
            refused_total: n.refused_total,
            ..NodeState::new(&n.address)
        };
    }

    /// Replaces node `node`'s snapshot, received at `at`.
    pub fn update(&mut self, node: usize, snap: NodeSnapshot, at: Instant) {
        if self.nodes[node].retired {
            // A stream that outlived its agent's removal by a moment.
            return;
        }
        let was_conflict = self
            .claims
            .get(&snap.node_name)
            .is_some_and(|c| c.len() > 1);
        self.unindex(node);
        for (i, p) in snap.pods.iter().enumerate() {
            self.pod_gpus
                .entry(p.pod_uid.clone())
                .or_default()
                .push(PodEntry { node, pod: i });
        }
        let claims = self.claims.entry(snap.node_name.clone()).or_default();
        claims.push(node);
        if claims.len() > 1 && !was_conflict {
            let other = claims[0];
            tracing::warn!(
                node = %snap.node_name,
                a = %self.nodes[other].address,
                b = %self.nodes[node].address,
                "two agents claim the same node; its pods read UNAVAILABLE until one stops"
            );
        }
        let n = &mut self.nodes[node];
        n.snapshot = Some(Arc::new(snap));
        n.received = Some(at);
        if n.refused.take().is_some() {
            n.last_error.clear();
        }
    }

    /// Node `node`'s agent sent a snapshot the collector refused, for `why`. What it reported
    /// before stays indexed (so its pods are still found on it) but reads `UNAVAILABLE` with
    /// `why` until a good snapshot replaces it; its freshness is not renewed. Logged once per
    /// change of reason: a bad agent must not flood the log.
    pub fn refuse(&mut self, node: usize, why: String) {
        let n = &mut self.nodes[node];
        n.refused_total += 1;
        if n.refused.as_ref() != Some(&why) {
            tracing::warn!(
                address = %n.address,
                "snapshot refused: {why}; the node's pods read UNAVAILABLE until a good \
                 snapshot arrives"
            );
            n.last_error = format!("snapshot refused: {why}");
            n.refused = Some(why);
        }
    }
}

/// The shared view plus a change signal for `StreamIsActive`.
pub struct Cluster {
    view: RwLock<View>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Cluster {
    /// A view of the agents at `addresses`, none connected yet.
    pub fn new(addresses: &[String]) -> Cluster {
        Cluster {
            view: RwLock::new(View {
                nodes: addresses.iter().map(|a| NodeState::new(a)).collect(),
                ..View::default()
            }),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// Reads the view.
    pub fn read<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        f(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes the view and wakes watchers.
    pub fn write(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.write().unwrap_or_else(|e| e.into_inner()));
        self.changed.send_modify(|n| *n += 1);
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::PodSummary;

    fn snap(node: &str, pods: &[&str]) -> NodeSnapshot {
        NodeSnapshot {
            node_name: node.into(),
            pods: pods
                .iter()
                .map(|p| PodSummary {
                    pod_uid: (*p).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_snapshot_replaces_the_nodes_pod_entries() {
        let c = Cluster::new(&["a:1".into(), "b:1".into()]);
        let now = Instant::now();
        c.write(|v| v.update(0, snap("n0", &["p1", "p2"]), now));
        c.write(|v| v.update(1, snap("n1", &["p2"]), now));
        c.read(|v| {
            assert_eq!(v.pod_gpus["p2"].len(), 2);
            assert_eq!(v.node("n1"), Some(1));
        });
        c.write(|v| v.update(0, snap("n0", &["p3"]), now));
        c.read(|v| {
            assert!(!v.pod_gpus.contains_key("p1"));
            assert_eq!(v.pod_gpus["p2"], vec![PodEntry { node: 1, pod: 0 }]);
            assert_eq!(v.pod_gpus["p3"], vec![PodEntry { node: 0, pod: 0 }]);
        });
    }
}
