//! Deltas of the agent API (revision 3, `Interest.changes_only`; see `NodeSnapshot.delta` in
//! `agent.proto`): what changed between two states of a node ([`Sender::next`], the agent's
//! side) and a delta applied to the state it follows ([`apply`], the collector's side). They
//! live together so that each is the other's inverse, which the tests check.
//!
//! Entries are matched by their keys: a GPU by `uuid`, a (pod, GPU) entry by `pod_uid` and
//! `gpu_uuid`. A state whose keys are not unique (a GPU lost before its UUID was read, a hostile
//! agent) is sent whole, never as a delta. An entry whose only change is its
//! `newest_sample_unix_ns` is not sent (the heartbeat's `taken_unix_ns` shows the node samples),
//! so an applied state keeps that field from the entry's last change.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::agent::{DeviceOpen, GpuSummary, NodeSnapshot, PodKey, PodSummary, WatchRequest};
use crate::series::Wanted;

/// An entry of a node's state, matched across states by its key.
trait Entry: Clone + PartialEq {
    type Key: std::hash::Hash + Eq + Clone;
    fn key(&self) -> Self::Key;
    fn newest(&mut self) -> &mut u64;
    fn newest_ns(&self) -> u64;
}

impl Entry for GpuSummary {
    type Key = String;
    fn key(&self) -> String {
        self.uuid.clone()
    }
    fn newest(&mut self) -> &mut u64 {
        &mut self.newest_sample_unix_ns
    }
    fn newest_ns(&self) -> u64 {
        self.newest_sample_unix_ns
    }
}

impl Entry for PodSummary {
    type Key = (String, String);
    fn key(&self) -> (String, String) {
        (self.pod_uid.clone(), self.gpu_uuid.clone())
    }
    fn newest(&mut self) -> &mut u64 {
        &mut self.newest_sample_unix_ns
    }
    fn newest_ns(&self) -> u64 {
        self.newest_sample_unix_ns
    }
}

/// Whether `new` differs from `old` in more than `newest_sample_unix_ns`.
fn changed<E: Entry>(new: &mut E, old: &E) -> bool {
    let ns = std::mem::replace(new.newest(), old.newest_ns());
    let differs = new != old;
    *new.newest() = ns;
    differs
}

/// Whether every entry's key is distinct (and a GPU's UUID known).
fn keys_unique<E: Entry>(entries: &[E], known: impl Fn(&E) -> bool) -> bool {
    let mut seen = HashSet::with_capacity(entries.len());
    entries.iter().all(|e| known(e) && seen.insert(e.key()))
}

/// The entries last sent, by key.
#[derive(Debug, Default)]
struct SentEntries<E: Entry> {
    by_key: HashMap<E::Key, E>,
}

impl<E: Entry> SentEntries<E> {
    /// Records `now` as sent; returns the entries that changed or appeared, and the keys of
    /// those gone.
    fn diff(&mut self, now: Vec<E>) -> (Vec<E>, Vec<E::Key>) {
        let mut out = Vec::new();
        let mut present = HashSet::with_capacity(now.len());
        for mut e in now {
            let key = e.key();
            let send = match self.by_key.get(&key) {
                Some(old) => changed(&mut e, old),
                None => true,
            };
            if send {
                out.push(e.clone());
                self.by_key.insert(key.clone(), e);
            }
            present.insert(key);
        }
        let mut gone = Vec::new();
        self.by_key.retain(|k, _| {
            let keep = present.contains(k);
            if !keep {
                gone.push(k.clone());
            }
            keep
        });
        (out, gone)
    }

    fn reset(&mut self, now: &[E]) {
        self.by_key = now.iter().map(|e| (e.key(), e.clone())).collect();
    }
}

/// What one stream has sent so far, to send only what changed next.
#[derive(Debug, Default)]
pub struct Sender {
    /// Whether a whole state was sent (the first message is always whole).
    started: bool,
    gpus: SentEntries<GpuSummary>,
    pods: SentEntries<PodSummary>,
    opens: Vec<DeviceOpen>,
}

impl Sender {
    /// A stream that has sent nothing yet.
    pub fn new() -> Sender {
        Sender::default()
    }

    /// The message that brings the reader from what this stream sent last to `now`, the node's
    /// whole state, and records it as sent: `now` itself first (or whenever its keys are not
    /// unique), then a delta. Call it only for a message that will be sent: a skipped one would
    /// leave the reader behind.
    pub fn next(&mut self, mut now: NodeSnapshot) -> NodeSnapshot {
        let unique =
            keys_unique(&now.gpus, |g| !g.uuid.is_empty()) && keys_unique(&now.pods, |_| true);
        if !self.started || !unique {
            self.started = unique;
            self.gpus.reset(&now.gpus);
            self.pods.reset(&now.pods);
            self.opens.clone_from(&now.opens);
            return now;
        }
        let (gpus, removed_gpus) = self.gpus.diff(std::mem::take(&mut now.gpus));
        let (pods, removed_pods) = self.pods.diff(std::mem::take(&mut now.pods));
        let opens = std::mem::take(&mut now.opens);
        let opens_changed = opens != self.opens;
        NodeSnapshot {
            delta: true,
            gpus,
            pods,
            removed_gpus,
            removed_pods: removed_pods
                .into_iter()
                .map(|(pod_uid, gpu_uuid)| PodKey { pod_uid, gpu_uuid })
                .collect(),
            opens: if opens_changed {
                self.opens.clone_from(&opens);
                opens
            } else {
                Vec::new()
            },
            opens_changed,
            ..now
        }
    }
}

/// Whether `m` carries no entries and no removals: a heartbeat.
pub fn is_heartbeat(m: &NodeSnapshot) -> bool {
    m.delta
        && m.gpus.is_empty()
        && m.pods.is_empty()
        && m.removed_gpus.is_empty()
        && m.removed_pods.is_empty()
        && !m.opens_changed
}

/// What a `WatchRequest` asks of its stream, as an agent (or the scale simulator) serves it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamTerms {
    /// The series to send (every one without `Interest`, or when it names none).
    pub wanted: Wanted,
    /// Send only what changed after the first message (`Interest.changes_only`).
    pub changes_only: bool,
    /// The least time between two heartbeats (`Interest.heartbeat_ms`, revision 4; zero: every
    /// interval).
    pub heartbeat: Duration,
    /// The least time between two messages (`WatchRequest.min_interval_ms`; zero: every
    /// interval).
    pub every: Duration,
}

impl StreamTerms {
    /// The terms `request` asks for.
    pub fn of(request: &WatchRequest) -> StreamTerms {
        let interest = request.interest.as_ref();
        StreamTerms {
            wanted: interest.map_or_else(Wanted::every, Wanted::of),
            changes_only: interest.is_some_and(|i| i.changes_only),
            heartbeat: Duration::from_millis(u64::from(interest.map_or(0, |i| i.heartbeat_ms))),
            every: Duration::from_millis(u64::from(request.min_interval_ms)),
        }
    }

    /// Whether a message goes out now, `since` after the stream's last one (`None`: none sent
    /// yet): anything but a heartbeat (`heartbeat` says which) always; a heartbeat once the
    /// pace passed (on the sampling grid: a 250 ms pace at 100 ms samples sends every third),
    /// or at every turn of a stream whose `min_interval_ms` is no shorter than the pace (its
    /// turns are that far apart already: measured again on the data's own clock, a turn could
    /// fall a hair short and skip the heartbeat to the turn after).
    pub fn due(&self, heartbeat: bool, since: Option<Duration>) -> bool {
        !heartbeat || self.every >= self.heartbeat || since.is_none_or(|s| s >= self.heartbeat)
    }
}

/// Whether applying `delta` to `base` adds or removes entries or renames the node (so whatever
/// indexes `base`'s entries by position or by node must index it again).
pub fn reshapes(base: &NodeSnapshot, delta: &NodeSnapshot) -> bool {
    base.node_name != delta.node_name
        || !delta.removed_gpus.is_empty()
        || !delta.removed_pods.is_empty()
        || delta
            .gpus
            .iter()
            .any(|g| !base.gpus.iter().any(|b| b.uuid == g.uuid))
        || delta.pods.iter().any(|p| {
            !base
                .pods
                .iter()
                .any(|b| b.pod_uid == p.pod_uid && b.gpu_uuid == p.gpu_uuid)
        })
}

/// Replaces the entry of `entries` with `e`'s key by `e`, or adds `e`.
fn upsert<E: Entry>(entries: &mut Vec<E>, e: E, same: impl Fn(&E, &E) -> bool) {
    match entries.iter_mut().find(|x| same(x, &e)) {
        Some(x) => *x = e,
        None => entries.push(e),
    }
}

/// Applies `delta` (a message with `delta` set) to `base`, the state it follows: the header is
/// replaced, entries are replaced, added and removed by key, and the opens replaced when they
/// changed. A message without `delta` replaces `base` whole.
pub fn apply(base: &mut NodeSnapshot, mut delta: NodeSnapshot) {
    if !delta.delta {
        *base = delta;
        return;
    }
    let gpus = std::mem::take(&mut delta.gpus);
    let pods = std::mem::take(&mut delta.pods);
    let removed_gpus = std::mem::take(&mut delta.removed_gpus);
    let removed_pods = std::mem::take(&mut delta.removed_pods);
    delta.gpus = std::mem::take(&mut base.gpus);
    delta.pods = std::mem::take(&mut base.pods);
    if !delta.opens_changed {
        delta.opens = std::mem::take(&mut base.opens);
    }
    delta.delta = false;
    delta.opens_changed = false;
    *base = delta;
    if !removed_gpus.is_empty() {
        base.gpus.retain(|g| !removed_gpus.contains(&g.uuid));
    }
    if !removed_pods.is_empty() {
        base.pods.retain(|p| {
            !removed_pods
                .iter()
                .any(|k| k.pod_uid == p.pod_uid && k.gpu_uuid == p.gpu_uuid)
        });
    }
    for g in gpus {
        upsert(&mut base.gpus, g, |a, b| a.uuid == b.uuid);
    }
    for p in pods {
        upsert(&mut base.pods, p, |a, b| {
            a.pod_uid == b.pod_uid && a.gpu_uuid == b.gpu_uuid
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{MetricSummary, WindowStats};

    fn pod(uid: &str, gpu: &str, v: f64, newest: u64) -> PodSummary {
        PodSummary {
            pod_uid: uid.into(),
            gpu_uuid: gpu.into(),
            newest_sample_unix_ns: newest,
            metrics: vec![MetricSummary {
                metric: crate::agent::Metric::SmActive as i32,
                last: Some(v),
                windows: vec![WindowStats {
                    window_s: 30,
                    avg: v,
                    ..WindowStats::default()
                }],
            }],
            ..PodSummary::default()
        }
    }

    fn gpu(uuid: &str, newest: u64) -> GpuSummary {
        GpuSummary {
            uuid: uuid.into(),
            newest_sample_unix_ns: newest,
            ..GpuSummary::default()
        }
    }

    fn node(t: u64, gpus: Vec<GpuSummary>, pods: Vec<PodSummary>) -> NodeSnapshot {
        NodeSnapshot {
            api_version: 3,
            node_name: "n".into(),
            taken_unix_ns: t,
            seq: t,
            gpus,
            pods,
            ..NodeSnapshot::default()
        }
    }

    /// `s` with every entry's newest sample time cleared (deltas do not carry it alone).
    fn without_times(mut s: NodeSnapshot) -> NodeSnapshot {
        s.gpus.iter_mut().for_each(|g| g.newest_sample_unix_ns = 0);
        s.pods.iter_mut().for_each(|p| p.newest_sample_unix_ns = 0);
        s
    }

    fn sorted(mut s: NodeSnapshot) -> NodeSnapshot {
        s.gpus.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        s.pods
            .sort_by(|a, b| (&a.pod_uid, &a.gpu_uuid).cmp(&(&b.pod_uid, &b.gpu_uuid)));
        s
    }

    #[test]
    fn heartbeats_keep_their_pace_and_changes_go_out_at_once() {
        let heartbeat = NodeSnapshot {
            delta: true,
            ..NodeSnapshot::default()
        };
        let change = NodeSnapshot {
            delta: true,
            pods: vec![PodSummary::default()],
            ..NodeSnapshot::default()
        };
        let whole = NodeSnapshot::default();
        let pace = Duration::from_millis(250);
        let request = |heartbeat_ms| WatchRequest {
            min_interval_ms: 0,
            interest: Some(crate::agent::Interest {
                series: Vec::new(),
                changes_only: true,
                heartbeat_ms,
            }),
        };
        let terms = StreamTerms::of(&request(250));
        assert_eq!((terms.heartbeat, terms.changes_only), (pace, true));
        let due = |m: &NodeSnapshot, pace, since| {
            StreamTerms {
                heartbeat: pace,
                ..terms
            }
            .due(is_heartbeat(m), since)
        };
        let ms = |n| Some(Duration::from_millis(n));
        assert!(due(&heartbeat, pace, None), "the first message");
        assert!(!due(&heartbeat, pace, ms(100)));
        assert!(!due(&heartbeat, pace, ms(200)));
        assert!(due(&heartbeat, pace, ms(300)));
        assert!(due(&change, pace, ms(1)), "a change waits for no pace");
        assert!(due(&whole, pace, ms(1)));
        assert!(due(&heartbeat, Duration::ZERO, ms(0)), "0: every interval");
        // A stream paced by min_interval_ms sends a heartbeat at each of its turns.
        let paced = StreamTerms {
            every: pace,
            ..terms
        };
        assert!(paced.due(true, ms(249)));
        assert!(!StreamTerms {
            every: Duration::from_millis(100),
            ..terms
        }
        .due(true, ms(249)));
        // No interest: every series, whole, every interval (revision 2's stream).
        let plain = StreamTerms::of(&WatchRequest::default());
        assert_eq!(
            (
                plain.wanted,
                plain.changes_only,
                plain.heartbeat,
                plain.every
            ),
            (Wanted::every(), false, Duration::ZERO, Duration::ZERO)
        );
    }

    #[test]
    fn applied_deltas_rebuild_every_state_the_sender_saw() {
        let states = [
            node(
                1,
                vec![gpu("G0", 1), gpu("G1", 1)],
                vec![pod("a", "G0", 10.0, 1)],
            ),
            // Only the sample times moved: a heartbeat.
            node(
                2,
                vec![gpu("G0", 2), gpu("G1", 2)],
                vec![pod("a", "G0", 10.0, 2)],
            ),
            // A value moved, a pod appeared.
            node(
                3,
                vec![gpu("G0", 3), gpu("G1", 3)],
                vec![pod("a", "G0", 20.0, 3), pod("b", "G1", 5.0, 3)],
            ),
            // A pod and a GPU left, the opens changed.
            NodeSnapshot {
                opens: vec![DeviceOpen {
                    pid: 7,
                    ..DeviceOpen::default()
                }],
                ..node(4, vec![gpu("G1", 4)], vec![pod("b", "G1", 5.0, 4)])
            },
            // The opens emptied: an empty list that changed, not "unchanged".
            node(5, vec![gpu("G1", 5)], vec![pod("b", "G1", 6.0, 5)]),
        ];
        let mut sender = Sender::new();
        let mut reader = NodeSnapshot::default();
        let mut heartbeats = 0;
        for (i, s) in states.iter().enumerate() {
            let m = sender.next(s.clone());
            assert_eq!(m.delta, i > 0, "the first message is whole");
            heartbeats += usize::from(is_heartbeat(&m));
            apply(&mut reader, m);
            assert_eq!(
                sorted(without_times(reader.clone())),
                sorted(without_times(s.clone())),
                "state {i}"
            );
            assert_eq!(reader.taken_unix_ns, s.taken_unix_ns, "the header is whole");
        }
        assert_eq!(heartbeats, 1, "state 1 changed nothing but times");
    }

    #[test]
    fn a_delta_carries_only_what_changed() {
        let mut sender = Sender::new();
        sender.next(node(
            1,
            vec![gpu("G0", 1)],
            vec![pod("a", "G0", 1.0, 1), pod("b", "G0", 1.0, 1)],
        ));
        let m = sender.next(node(2, vec![gpu("G0", 2)], vec![pod("a", "G0", 2.0, 2)]));
        assert!(m.delta && m.gpus.is_empty() && !m.opens_changed);
        assert_eq!(m.pods.len(), 1);
        assert_eq!(m.pods[0].pod_uid, "a");
        assert_eq!(
            m.removed_pods,
            vec![PodKey {
                pod_uid: "b".into(),
                gpu_uuid: "G0".into()
            }]
        );
        let base = node(1, vec![gpu("G0", 1)], vec![pod("a", "G0", 1.0, 1)]);
        assert!(reshapes(&base, &m), "a removal reshapes");
        let heartbeat = sender.next(node(3, vec![gpu("G0", 3)], vec![pod("a", "G0", 2.0, 3)]));
        assert!(is_heartbeat(&heartbeat) && !reshapes(&base, &heartbeat));
    }

    #[test]
    fn a_state_whose_keys_are_not_unique_is_sent_whole() {
        let mut sender = Sender::new();
        sender.next(node(1, vec![gpu("G0", 1)], vec![]));
        // A GPU lost before its UUID was read.
        let m = sender.next(node(2, vec![gpu("G0", 2), gpu("", 2)], vec![]));
        assert!(!m.delta && m.gpus.len() == 2);
        // Back to unique keys: whole once more, then deltas.
        let m = sender.next(node(3, vec![gpu("G0", 3)], vec![]));
        assert!(!m.delta);
        assert!(sender.next(node(4, vec![gpu("G0", 4)], vec![])).delta);
        let twice = node(
            5,
            vec![gpu("G0", 5)],
            vec![pod("a", "G0", 1.0, 5), pod("a", "G0", 2.0, 5)],
        );
        assert!(!sender.next(twice).delta);
    }
}
