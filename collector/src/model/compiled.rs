//! Compiled triggers: each distinct trigger metadata (KEDA's `scalerMetadata`) parsed once into
//! a shared [`Trigger`] (its `podSelector` parsed with it), kept in a small cache bounded by
//! count with least-recently-used eviction.
//!
//! KEDA sends the whole metadata map on every `GetMetrics`, `IsActive` and `GetMetricSpec` call;
//! without this module the collector would validate and parse it, selector included, every
//! time. The cache is keyed by the metadata itself (compared whole, so two ScaledObjects with
//! the same trigger share one entry), so a changed trigger is simply a new key and an old one
//! ages out. A parse error is never stored: bad metadata is parsed again on every call and gets
//! the same [`MetadataError`] each time.
//!
//! It must never do I/O or decide gRPC status codes; it owns no per-ScaledObject state.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::model::trigger::{MetadataError, Trigger};

/// The most compiled triggers kept. One per distinct trigger metadata in the cluster: a
/// thousand ScaledObjects with distinct triggers all stay cached, and an entry costs a copy of
/// its metadata plus the parsed trigger (well under 2 KiB for any real trigger). Beyond it, the
/// least recently used entry is dropped and is parsed again if it returns.
pub const MAX_COMPILED_TRIGGERS: usize = 1024;

/// Metadata larger than this (keys and values, bytes) is parsed but never cached, so the cache
/// stays under `MAX_COMPILED_TRIGGERS` × 8 KiB of metadata (8 MiB) whatever KEDA, or anything
/// else that reaches the port, sends. Real triggers are a few hundred bytes.
pub const MAX_CACHED_METADATA_BYTES: usize = 8 * 1024;

/// One cached trigger.
struct Entry {
    meta: HashMap<String, String>,
    trigger: Arc<Trigger>,
    /// The `tick` of its last use.
    used: u64,
}

#[derive(Default)]
struct State {
    /// Fingerprint of the metadata → the entries with it (more than one only on a collision).
    entries: HashMap<u64, Vec<Entry>>,
    len: usize,
    /// Counts lookups; orders entries by last use.
    tick: u64,
}

/// Parsed triggers by metadata, at most `capacity` of them.
pub struct CompiledTriggers {
    capacity: usize,
    hasher: RandomState,
    state: Mutex<State>,
    /// Times [`Trigger::parse`] ran (hits do not count).
    parses: AtomicU64,
}

impl Default for CompiledTriggers {
    fn default() -> Self {
        Self::new(MAX_COMPILED_TRIGGERS)
    }
}

impl CompiledTriggers {
    /// An empty cache of at most `capacity` (at least 1) triggers.
    pub fn new(capacity: usize) -> CompiledTriggers {
        CompiledTriggers {
            capacity: capacity.max(1),
            hasher: RandomState::new(),
            state: Mutex::new(State::default()),
            parses: AtomicU64::new(0),
        }
    }

    /// The trigger `meta` describes: from the cache, or parsed (and cached when valid).
    pub fn get(&self, meta: &HashMap<String, String>) -> Result<Arc<Trigger>, MetadataError> {
        let key = self.fingerprint(meta);
        {
            let mut state = gpuscale_health::ops::lock(&self.state);
            state.tick += 1;
            let tick = state.tick;
            if let Some(e) = state
                .entries
                .get_mut(&key)
                .and_then(|v| v.iter_mut().find(|e| e.meta == *meta))
            {
                e.used = tick;
                return Ok(e.trigger.clone());
            }
        }
        // Parsed outside the lock: a slow parse never holds up other calls. Two callers that
        // miss at once both parse; the second insert finds the first and keeps it.
        // Relaxed: a statistic, ordered with nothing.
        self.parses.fetch_add(1, Ordering::Relaxed);
        let trigger = Arc::new(Trigger::parse(meta)?);
        let bytes: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_CACHED_METADATA_BYTES {
            return Ok(trigger);
        }
        let mut state = gpuscale_health::ops::lock(&self.state);
        if let Some(e) = state
            .entries
            .get(&key)
            .and_then(|v| v.iter().find(|e| e.meta == *meta))
        {
            return Ok(e.trigger.clone());
        }
        if state.len >= self.capacity {
            evict_least_recently_used(&mut state);
        }
        let used = state.tick;
        state.entries.entry(key).or_default().push(Entry {
            meta: meta.clone(),
            trigger: trigger.clone(),
            used,
        });
        state.len += 1;
        Ok(trigger)
    }

    /// How many triggers are cached.
    pub fn len(&self) -> usize {
        gpuscale_health::ops::lock(&self.state).len
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many times metadata was parsed (cache misses, failed parses included).
    pub fn parses(&self) -> u64 {
        self.parses.load(Ordering::Relaxed)
    }

    /// The same for every order of the map's entries: a sum of the entries' hashes.
    fn fingerprint(&self, meta: &HashMap<String, String>) -> u64 {
        meta.iter()
            .map(|entry| self.hasher.hash_one(entry))
            .fold(0u64, u64::wrapping_add)
    }
}

/// Drops the entry used longest ago (a scan: it runs only on a miss into a full cache).
fn evict_least_recently_used(state: &mut State) {
    let oldest = state
        .entries
        .iter()
        .flat_map(|(k, v)| v.iter().enumerate().map(move |(i, e)| (e.used, *k, i)))
        .min();
    if let Some((_, key, i)) = oldest {
        if let Some(v) = state.entries.get_mut(&key) {
            v.swap_remove(i);
            if v.is_empty() {
                state.entries.remove(&key);
            }
            state.len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(app: &str) -> HashMap<String, String> {
        [
            ("metric", "sm_active"),
            ("targetValue", "80"),
            ("podSelector", app),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    #[test]
    fn the_same_metadata_is_parsed_once_and_shared() {
        let cache = CompiledTriggers::default();
        let first = cache.get(&meta("app=vllm")).unwrap();
        for _ in 0..100 {
            // A map built again (another order of insertion) is the same key.
            let again = cache.get(&meta("app=vllm")).unwrap();
            assert!(Arc::ptr_eq(&first, &again));
        }
        assert_eq!(cache.parses(), 1);
        assert_eq!(cache.len(), 1);
        assert_eq!(first.pod_selector.as_ref().unwrap().to_string(), "app=vllm");
        cache.get(&meta("app=other")).unwrap();
        assert_eq!((cache.parses(), cache.len()), (2, 2));
    }

    #[test]
    fn bad_metadata_is_never_cached_and_gets_the_same_error_each_time() {
        let cache = CompiledTriggers::default();
        let mut bad = meta("app=vllm");
        bad.insert("targetValue".into(), "abc".into());
        let e1 = cache.get(&bad).unwrap_err();
        let e2 = cache.get(&bad).unwrap_err();
        assert_eq!(e1, e2);
        assert_eq!(e1, Trigger::parse(&bad).unwrap_err());
        assert!(cache.is_empty());
        assert_eq!(cache.parses(), 2, "a failed parse is parsed again");
    }

    #[test]
    fn oversized_metadata_is_answered_but_never_kept() {
        let cache = CompiledTriggers::default();
        let mut big = meta("app=vllm");
        // scalerAddress is KEDA's own key: accepted and ignored, whatever its length.
        big.insert(
            "scalerAddress".into(),
            "x".repeat(MAX_CACHED_METADATA_BYTES),
        );
        for _ in 0..3 {
            assert!(cache.get(&big).is_ok());
        }
        assert!(cache.is_empty());
        assert_eq!(cache.parses(), 3);
    }

    #[test]
    fn the_cache_never_exceeds_its_bound_and_drops_the_least_recently_used() {
        let cache = CompiledTriggers::new(3);
        for app in ["a", "b", "c"] {
            cache.get(&meta(app)).unwrap();
        }
        // `a` used again: `b` is now the least recently used.
        cache.get(&meta("a")).unwrap();
        cache.get(&meta("d")).unwrap();
        assert_eq!(cache.len(), 3);
        let parses = cache.parses();
        for app in ["a", "c", "d"] {
            cache.get(&meta(app)).unwrap();
        }
        assert_eq!(cache.parses(), parses, "a, c and d stayed cached");
        cache.get(&meta("b")).unwrap();
        assert_eq!(cache.parses(), parses + 1, "b was evicted and parsed again");
        for i in 0..50 {
            cache.get(&meta(&format!("app=x{i}"))).unwrap();
            assert!(cache.len() <= 3);
        }
        assert_eq!(MAX_COMPILED_TRIGGERS, CompiledTriggers::default().capacity);
    }
}
