//! Cgroup ids to paths: the cgroup v2 mount (found by [`crate::cgroup::cgroup2_mount_in`]), and an index of the tree
//! under it by inode number, re-walked on a miss at most once per [`REWALK_EVERY`].

use super::*;
use crate::cgroup::cgroup2_mount_in;

/// The mount point of the first `cgroup2` file system in a `/proc/<pid>/mounts` file.
pub fn find_cgroup2_mount(mounts: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(mounts)
        .map_err(|e| ebpf_err(format!("cannot read {}: {e}", mounts.display())))?;
    cgroup2_mount_in(&text).ok_or_else(|| {
        ebpf_err(format!(
            "no cgroup2 file system is mounted (per {}); mount it or pass --cgroup-root",
            mounts.display()
        ))
    })
}

/// What [`CgroupIndex::resolve`] found.
pub(super) enum Resolution {
    /// The cgroup's path.
    Found(String),
    /// No such cgroup, for good.
    Gone,
    /// Not indexed, and the index was walked too recently to walk again.
    Later,
}

/// Cgroup v2 id (directory inode) → path below the root, from walks of the tree.
pub(super) struct CgroupIndex {
    pub(super) root: PathBuf,
    pub(super) by_id: HashMap<u64, String>,
    pub(super) last_walk: Option<Instant>,
}

impl CgroupIndex {
    pub(super) fn new(root: PathBuf) -> Self {
        CgroupIndex {
            root,
            by_id: HashMap::new(),
            last_walk: None,
        }
    }

    /// The path of cgroup `id` now, or `None` (see [`CgroupIndex::resolve`]).
    pub(super) fn lookup(&mut self, id: u64) -> Option<String> {
        match self.resolve(id) {
            Resolution::Found(path) => Some(path),
            Resolution::Gone | Resolution::Later => None,
        }
    }

    /// A checked index hit; or, on a miss, a re-walk (at most once per [`REWALK_EVERY`]) and a
    /// second look. A miss after a walk that started after the cgroup was seen in use means it
    /// is gone for good (ids are never reused).
    pub(super) fn resolve(&mut self, id: u64) -> Resolution {
        if let Some(path) = self.by_id.get(&id) {
            if self.inode_of(path) == Some(id) {
                return Resolution::Found(path.clone());
            }
            self.by_id.remove(&id);
        }
        if !self.may_walk() {
            return Resolution::Later;
        }
        self.walk();
        match self.by_id.get(&id) {
            Some(path) => Resolution::Found(path.clone()),
            None => Resolution::Gone,
        }
    }

    pub(super) fn may_walk(&self) -> bool {
        self.last_walk.is_none_or(|at| at.elapsed() >= REWALK_EVERY)
    }

    /// How long until [`CgroupIndex::may_walk`] (zero when it may now).
    pub(super) fn next_walk_in(&self) -> Duration {
        self.last_walk.map_or(Duration::ZERO, |at| {
            REWALK_EVERY.saturating_sub(at.elapsed())
        })
    }

    pub(super) fn inode_of(&self, path: &str) -> Option<u64> {
        let full = self.root.join(path.trim_start_matches('/'));
        std::fs::metadata(full).ok().map(|m| m.ino())
    }

    /// Re-reads the whole tree (directory entries only: `d_ino` and `d_type`, no `stat` per
    /// cgroup).
    pub(super) fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        self.by_id.clear();
        if let Ok(meta) = std::fs::metadata(&self.root) {
            self.by_id.insert(meta.ino(), "/".to_owned());
        }
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue; // removed meanwhile
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    continue; // kubelet never makes non-UTF-8 names; never guess
                };
                let path = format!("{rel}/{name}");
                self.by_id.insert(entry.ino(), path.clone());
                stack.push((entry.path(), path));
            }
        }
    }
}
