//! The collector's in-memory cluster view: the newest snapshot of every agent, with its
//! freshness, indexed by node name and by pod UID. Agent streams write it; KEDA calls and
//! `dump` read it. It never does I/O.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use proto::agent::NodeSnapshot;
use proto::series::Wanted;

use crate::sources::validate;

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
    /// Increases whenever what the node's pods evaluate to may have changed (a snapshot, a
    /// delta with entries, a refusal, retirement); not on a heartbeat. `StreamIsActive` looks
    /// again only when a node of its pods moved.
    pub generation: u64,
    /// The series the stored snapshot carries: every one (a stream of whole snapshots, an agent
    /// before revision 3), or what its stream asked for ([`crate::sources::demand`]).
    pub carries: Wanted,
    /// The names in the newest snapshot (empty before one).
    pub names: Names,
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
            generation: 0,
            carries: Wanted::every(),
            names: Names::default(),
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
    /// Index of the pod's GPU in that node's [`Names::gpus`]: below the snapshot's `gpus.len()`
    /// it is also that GPU's index in `gpus`; past it, the pod names a GPU its agent did not
    /// report.
    pub gpu: usize,
}

/// A node's name and its GPUs' UUIDs as its newest snapshot reports them, made once when the
/// snapshot's shape changes, so that evaluations share them instead of copying strings.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// The node name.
    pub node: Arc<str>,
    /// The snapshot's GPUs in its order, then any GPU only its pods name.
    pub gpus: Vec<Arc<str>>,
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
    /// Increases whenever the indexes change (a node's pods or node name, an agent claiming or
    /// leaving a node): which node a pod is on may have changed.
    pub structure: u64,
}

impl View {
    fn unindex(&mut self, node: usize) {
        let Some(old) = self.nodes[node].snapshot.clone() else {
            return;
        };
        self.structure += 1;
        self.nodes[node].names = Names::default();
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
        self.claimants(name).last().copied()
    }

    /// The slots of the agents whose newest snapshot names node `name` (none, one, or more
    /// in a conflict), the one that reported last at the end.
    pub fn claimants(&self, name: &str) -> &[usize] {
        self.claims.get(name).map_or(&[], |c| c.as_slice())
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
            generation: n.generation + 1,
            ..NodeState::new(&n.address)
        };
    }

    /// Indexes node `node`'s snapshot: its pods and its node name. `was_conflict`: whether its
    /// node name was claimed by more than one agent before (a new conflict is logged).
    fn index(&mut self, node: usize, was_conflict: bool) {
        let Some(snap) = self.nodes[node].snapshot.clone() else {
            return;
        };
        self.structure += 1;
        let mut gpus: Vec<Arc<str>> = snap
            .gpus
            .iter()
            .map(|g| Arc::from(g.uuid.as_str()))
            .collect();
        for (i, p) in snap.pods.iter().enumerate() {
            let gpu = match gpus.iter().position(|g| **g == *p.gpu_uuid) {
                Some(g) => g,
                None => {
                    gpus.push(Arc::from(p.gpu_uuid.as_str()));
                    gpus.len() - 1
                }
            };
            self.pod_gpus
                .entry(p.pod_uid.clone())
                .or_default()
                .push(PodEntry { node, pod: i, gpu });
        }
        self.nodes[node].names = Names {
            node: Arc::from(snap.node_name.as_str()),
            gpus,
        };
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
    }

    fn conflicted(&self, node_name: &str) -> bool {
        self.claims.get(node_name).is_some_and(|c| c.len() > 1)
    }

    /// Stores `snap` as node `node`'s snapshot and indexes it; the indexes hold the node name,
    /// each pod's position and its GPU's, so they are rebuilt only when one of these changed.
    fn store(&mut self, node: usize, snap: NodeSnapshot) {
        let same_shape = self.nodes[node].snapshot.as_ref().is_some_and(|old| {
            old.node_name == snap.node_name
                && old.pods.len() == snap.pods.len()
                && old
                    .pods
                    .iter()
                    .zip(&snap.pods)
                    .all(|(a, b)| a.pod_uid == b.pod_uid && a.gpu_uuid == b.gpu_uuid)
                && old.gpus.len() == snap.gpus.len()
                && old
                    .gpus
                    .iter()
                    .zip(&snap.gpus)
                    .all(|(a, b)| a.uuid == b.uuid)
        });
        let was_conflict = self.conflicted(&snap.node_name);
        if !same_shape {
            self.unindex(node);
        }
        self.nodes[node].snapshot = Some(Arc::new(snap));
        if !same_shape {
            self.index(node, was_conflict);
        }
    }

    /// Replaces node `node`'s snapshot, received at `at`, with every series.
    pub fn update(&mut self, node: usize, snap: NodeSnapshot, at: Instant) {
        self.update_carrying(node, snap, at, Wanted::every());
    }

    /// Replaces node `node`'s snapshot, received at `at`, which carries the series `carries`.
    pub fn update_carrying(
        &mut self,
        node: usize,
        snap: NodeSnapshot,
        at: Instant,
        carries: Wanted,
    ) {
        if self.nodes[node].retired {
            // A stream that outlived its agent's removal by a moment.
            return;
        }
        self.store(node, snap);
        let n = &mut self.nodes[node];
        n.received = Some(at);
        n.generation += 1;
        n.carries = carries;
        if n.refused.take().is_some() {
            n.last_error.clear();
        }
    }

    /// Takes node `node`'s whole snapshot `snap` although it was refused for `why`, on a stream
    /// of changes: the agent's next deltas follow it, so it must be their base (applied to the
    /// snapshot before it they would build a state the agent never had). The node reads
    /// `UNAVAILABLE` until a delta mends it; its freshness is not renewed.
    pub fn take_refused(&mut self, node: usize, snap: NodeSnapshot, why: String, carries: Wanted) {
        if self.nodes[node].retired {
            return;
        }
        self.store(node, snap);
        self.nodes[node].carries = carries;
        self.refuse(node, why);
    }

    /// Applies `delta` (what changed since the agent's previous message on the stream, see
    /// [`proto::delta`]) to node `node`'s snapshot, received at `at`, and checks the result as
    /// a whole snapshot is checked ([`validate`]). A delta is applied even when the result is
    /// refused: the agent's next delta follows it, not the last good state; the node then reads
    /// `UNAVAILABLE` until a delta or a whole snapshot makes its state good again. A heartbeat
    /// (nothing changed) only renews the node's freshness. The snapshot is changed in place:
    /// no copy of the node's state per message. Returns whether a reader could see a change
    /// beyond freshness (a value, an entry, a refusal), so a heartbeat wakes no watcher.
    pub fn apply_delta(&mut self, node: usize, delta: NodeSnapshot, at: Instant) -> bool {
        if self.nodes[node].retired {
            return false;
        }
        let Some(base) = &self.nodes[node].snapshot else {
            self.refuse(
                node,
                "a delta came before any whole snapshot on its stream (an agent bug: the first \
                 message of a stream is whole)"
                    .into(),
            );
            return true;
        };
        let heartbeat = proto::delta::is_heartbeat(&delta);
        let reshape = proto::delta::reshapes(base, &delta);
        let was_conflict = reshape && self.conflicted(&delta.node_name);
        if reshape {
            self.unindex(node);
        }
        let n = &mut self.nodes[node];
        let Some(snap) = n.snapshot.as_mut() else {
            return false;
        };
        let was_refused = n.refused.is_some();
        let snap = Arc::make_mut(snap);
        proto::delta::apply(snap, delta);
        let checked = if heartbeat && n.refused.is_none() {
            validate::header(snap)
        } else {
            validate::check(snap)
        };
        match checked {
            Ok(()) => {
                n.received = Some(at);
                if n.refused.take().is_some() {
                    n.last_error.clear();
                }
            }
            Err(validate::Refused(why)) => self.refuse(node, why),
        }
        if reshape {
            self.index(node, was_conflict);
        }
        let changed = !heartbeat || was_refused != self.nodes[node].refused.is_some();
        if changed {
            self.nodes[node].generation += 1;
        }
        changed
    }

    /// Node `node`'s agent sent a snapshot the collector refused, for `why`. What it reported
    /// before stays indexed (so its pods are still found on it) but reads `UNAVAILABLE` with
    /// `why` until a good snapshot replaces it; its freshness is not renewed. Logged once per
    /// change of reason: a bad agent must not flood the log.
    pub fn refuse(&mut self, node: usize, why: String) {
        let n = &mut self.nodes[node];
        n.refused_total += 1;
        n.generation += 1;
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
        self.write_then(|v| {
            f(v);
            true
        });
    }

    /// Changes the view, and wakes watchers when `f` says a reader could see the change (an
    /// agent's heartbeat only renews a node's freshness: watchers that care about time passing
    /// look again on their own).
    pub fn write_then(&self, f: impl FnOnce(&mut View) -> bool) {
        let changed = f(&mut self.view.write().unwrap_or_else(|e| e.into_inner()));
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
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

    /// A snapshot of node `node` at `t` with pods on GPU `G0`, each at `sm_active` `v`.
    fn valid(node: &str, t: u64, pods: &[(&str, f64)]) -> NodeSnapshot {
        use proto::agent::{GpuSummary, MetricSummary};
        NodeSnapshot {
            node_name: node.into(),
            taken_unix_ns: t,
            gpus: vec![GpuSummary {
                uuid: "G0".into(),
                ..Default::default()
            }],
            pods: pods
                .iter()
                .map(|(uid, v)| PodSummary {
                    pod_uid: (*uid).into(),
                    gpu_uuid: "G0".into(),
                    metrics: vec![MetricSummary {
                        metric: proto::agent::Metric::SmActive as i32,
                        last: Some(*v),
                        windows: vec![],
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn sm_active(v: &View, uid: &str) -> Option<f64> {
        let e = v.pod_gpus.get(uid)?[0];
        v.nodes[e.node].snapshot.as_ref()?.pods[e.pod].metrics[0].last
    }

    #[test]
    fn deltas_patch_the_snapshot_in_place_and_keep_the_pod_index_right() {
        let c = Cluster::new(&["a:1".into()]);
        let t0 = Instant::now();
        let mut sender = proto::delta::Sender::new();
        // Whether watchers were woken.
        let mut send = |snap: NodeSnapshot, at: Instant| {
            let m = sender.next(snap);
            let before = *c.subscribe().borrow();
            c.write_then(|v| {
                if m.delta {
                    v.apply_delta(0, m, at)
                } else {
                    v.update(0, m, at);
                    true
                }
            });
            *c.subscribe().borrow() != before
        };
        assert!(send(valid("n0", 1, &[("p1", 10.0), ("p2", 20.0)]), t0));
        // A heartbeat: only freshness moves, and no watcher wakes.
        let t1 = t0 + std::time::Duration::from_millis(100);
        assert!(!send(valid("n0", 2, &[("p1", 10.0), ("p2", 20.0)]), t1));
        c.read(|v| {
            assert_eq!(v.nodes[0].received, Some(t1));
            assert_eq!(v.nodes[0].snapshot.as_ref().unwrap().taken_unix_ns, 2);
        });
        // p1 changes, p2 leaves, p3 arrives: the index follows.
        assert!(send(valid("n0", 3, &[("p1", 11.0), ("p3", 30.0)]), t1));
        c.read(|v| {
            assert_eq!(sm_active(v, "p1"), Some(11.0));
            assert_eq!(sm_active(v, "p3"), Some(30.0));
            assert!(!v.pod_gpus.contains_key("p2"));
            assert_eq!(v.node("n0"), Some(0));
            assert!(v.nodes[0].refused.is_none());
        });
        // A delta that makes the state bad is applied and refused; freshness is not renewed.
        let t2 = t1 + std::time::Duration::from_millis(100);
        send(valid("n0", 4, &[("p1", f64::NAN), ("p3", 30.0)]), t2);
        c.read(|v| {
            let why = v.nodes[0].refused.as_deref().unwrap();
            assert!(why.contains("not a finite number"), "{why}");
            assert_eq!(v.nodes[0].received, Some(t1));
        });
        // A heartbeat does not make it good; the delta that mends it does.
        send(valid("n0", 5, &[("p1", f64::NAN), ("p3", 30.0)]), t2);
        c.read(|v| assert!(v.nodes[0].refused.is_some()));
        send(valid("n0", 6, &[("p1", 12.0), ("p3", 30.0)]), t2);
        c.read(|v| {
            assert!(v.nodes[0].refused.is_none());
            assert_eq!(v.nodes[0].received, Some(t2));
            assert_eq!(sm_active(v, "p1"), Some(12.0));
        });
    }

    #[test]
    fn a_refused_whole_snapshot_on_a_stream_of_changes_is_the_base_of_the_next_delta() {
        let c = Cluster::new(&["a:1".into()]);
        let t0 = Instant::now();
        c.write(|v| v.update(0, valid("n0", 1, &[("p1", 1.0)]), t0));
        // A new stream (the agent restarted) starts with a bad whole snapshot of other pods.
        let mut sender = proto::delta::Sender::new();
        let bad = sender.next(valid("n0", 2, &[("p2", f64::INFINITY), ("p3", 3.0)]));
        c.write(|v| v.take_refused(0, bad, "p2 is infinite".into(), Wanted::every()));
        c.read(|v| {
            assert!(
                !v.pod_gpus.contains_key("p1"),
                "the old stream's pods are gone"
            );
            assert_eq!(v.nodes[0].received, Some(t0));
        });
        // Its next delta mends p2 only: applied to the refused snapshot, p3 is still there.
        let t1 = t0 + std::time::Duration::from_millis(100);
        let fix = sender.next(valid("n0", 3, &[("p2", 2.0), ("p3", 3.0)]));
        assert!(fix.delta && fix.pods.len() == 1);
        c.write(|v| assert!(v.apply_delta(0, fix, t1), "a mended node is a change"));
        c.read(|v| {
            assert!(v.nodes[0].refused.is_none());
            assert_eq!(
                (sm_active(v, "p2"), sm_active(v, "p3")),
                (Some(2.0), Some(3.0))
            );
            assert!(!v.pod_gpus.contains_key("p1"));
        });
    }

    #[test]
    fn a_delta_before_any_whole_snapshot_is_refused() {
        let c = Cluster::new(&["a:1".into()]);
        let delta = NodeSnapshot {
            delta: true,
            ..valid("n0", 1, &[("p1", 1.0)])
        };
        c.write(|v| assert!(v.apply_delta(0, delta, Instant::now())));
        c.read(|v| {
            assert!(v.nodes[0].snapshot.is_none() && v.pod_gpus.is_empty());
            assert!(v.nodes[0]
                .refused
                .as_deref()
                .unwrap()
                .contains("before any whole"));
        });
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
            let at = |e: &PodEntry| (e.node, e.pod);
            assert_eq!(
                v.pod_gpus["p2"].iter().map(at).collect::<Vec<_>>(),
                [(1, 0)]
            );
            assert_eq!(
                v.pod_gpus["p3"].iter().map(at).collect::<Vec<_>>(),
                [(0, 0)]
            );
        });
    }
}
