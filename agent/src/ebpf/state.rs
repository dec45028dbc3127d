//! The tracker's state machine: live processes by tgid from open and exit events, the last
//! [`RECENT_CAP`] openers, and the opens waiting for a cgroup walk. Pure: no I/O, no locks (the
//! caller holds [`Shared::state`]).

use super::*;

#[derive(Default)]
pub(super) struct State {
    /// Live processes by tgid.
    pub(super) procs: HashMap<u32, OpenInfo>,
    /// The last [`RECENT_CAP`] processes that opened, oldest first.
    pub(super) recent: VecDeque<OpenInfo>,
    /// Opens whose cgroup was not in the index and could not be re-walked yet (rate limit):
    /// resolved by the reader thread at the next walk. Only the reader thread touches it.
    pub(super) pending: Vec<Pending>,
}

/// An open waiting for the next cgroup walk to find its path.
#[derive(Clone, Copy)]
pub(super) struct Pending {
    pub(super) tgid: u32,
    pub(super) cgroup_id: u64,
}

/// Upper bound on [`State::pending`] (opens beyond it in one burst stay without a path).
pub(super) const PENDING_CAP: usize = 4096;

impl State {
    pub(super) fn open(&mut self, ev: &Event, path: Option<String>, at_ns: u64) {
        let comm = text(&ev.comm);
        let device = text(&ev.device);
        if let Some(p) = self.procs.get_mut(&ev.tgid) {
            p.last_open_unix_ns = at_ns;
            p.device.clone_from(&device);
            p.comm.clone_from(&comm);
            if p.cgroup_id != ev.cgroup_id || p.cgroup_path.is_none() {
                p.cgroup_id = ev.cgroup_id;
                p.pod = path.as_deref().and_then(parse_cgroup_path);
                p.cgroup_path = path;
            }
            let updated = p.clone();
            if let Some(r) = self
                .recent
                .iter_mut()
                .rev()
                .find(|r| r.tgid == ev.tgid && !r.exited)
            {
                *r = updated;
            }
            return;
        }
        let info = OpenInfo {
            tgid: ev.tgid,
            comm,
            cgroup_id: ev.cgroup_id,
            pod: path.as_deref().and_then(parse_cgroup_path),
            cgroup_path: path,
            device,
            first_open_unix_ns: at_ns,
            last_open_unix_ns: at_ns,
            exited: false,
        };
        if self.procs.len() >= common::OPENS_ENTRIES as usize {
            // The kernel's LRU map forgets the least recently opened process too; its exit
            // would never come.
            if let Some(oldest) = self
                .procs
                .values()
                .min_by_key(|p| p.last_open_unix_ns)
                .map(|p| p.tgid)
            {
                self.procs.remove(&oldest);
            }
        }
        self.procs.insert(ev.tgid, info.clone());
        if self.recent.len() >= RECENT_CAP {
            self.recent.pop_front();
        }
        self.recent.push_back(info);
    }

    pub(super) fn exit(&mut self, tgid: u32) {
        self.procs.remove(&tgid);
        for r in self.recent.iter_mut().filter(|r| r.tgid == tgid) {
            r.exited = true;
        }
    }
}
