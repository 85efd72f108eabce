//! Small list responses (the `userName eq "…"` lookups every IdP sends before each write, and
//! again on every sync cycle) kept as their serialized bodies until the next resource write.
//!
//! An entry is tagged with the store's resource generation read *before* the data was read
//! ([`store::Resources::resource_generation`]), and is served only while the generation read again
//! for the request is still the same, so an answer from the cache is never older than the last
//! write committed before the request — by this process or, on PostgreSQL, by any replica (the
//! generation is a row every resource write transaction moves on). A store that gives no
//! generation gets no caching.
//!
//! A key is admitted on its second sight: the first time a lookup is asked, nothing is read for
//! the cache (on PostgreSQL reading the generation is a round trip of its own), and the answer is
//! not kept — the lookup every IdP makes before creating a user names someone who exists nowhere
//! and is asked once. From the second time on, the generation is read and the answer kept.
//!
//! The cache is bounded by size ([`MAX_BYTES`]); when a new entry would exceed it, entries are
//! evicted in the map's (effectively random) iteration order until it fits, so a working set
//! larger than the cache still gets a proportional share of hits. A newer generation empties
//! it at the first insert.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Bytes;

/// Most bytes (keys and bodies) the cache holds by default: about 16,000 single-user lookups.
pub const DEFAULT_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Only responses with at most this many resources are cached.
pub(crate) const MAX_RESOURCES: usize = 4;

/// The response cache.
#[derive(Debug)]
pub struct ResponseCache {
    inner: Mutex<Entries>,
    max_bytes: usize,
}

impl Default for ResponseCache {
    fn default() -> Self {
        ResponseCache::with_capacity(DEFAULT_MAX_BYTES)
    }
}

/// Keys seen once are remembered (as hashes) up to this many, then forgotten all at once.
const SEEN_LIMIT: usize = 65_536;

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<String, Bytes>,
    /// Hashes of keys asked for once and not cached (yet).
    seen: std::collections::HashSet<u64>,
    bytes: usize,
    /// The generation every entry was read at.
    generation: u64,
}

impl ResponseCache {
    /// A cache of at most `max_bytes` (0: nothing is cached).
    pub fn with_capacity(max_bytes: usize) -> Self {
        ResponseCache {
            inner: Mutex::default(),
            max_bytes,
        }
    }

    /// Whether anything can be cached at all (capacity above zero).
    pub(crate) fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// Whether a lookup of `key` should use the cache (read the generation, look, keep the
    /// answer): it is cached already, or it was asked for before.
    pub(crate) fn admits(&self, key: &str) -> bool {
        if !self.enabled() {
            return false;
        }
        let mut e = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if e.map.contains_key(key) {
            return true;
        }
        let h = {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
        };
        if e.seen.remove(&h) {
            return true;
        }
        if e.seen.len() >= SEEN_LIMIT {
            e.seen.clear();
        }
        e.seen.insert(h);
        false
    }

    /// The body cached for `key` at `generation`.
    pub(crate) fn get(&self, key: &str, generation: u64) -> Option<Bytes> {
        let e = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if e.generation != generation {
            return None;
        }
        e.map.get(key).cloned()
    }

    /// Caches `body` for `key`, read at `generation`.
    pub(crate) fn insert(&self, key: String, generation: u64, body: Bytes) {
        let size = key.len() + body.len();
        if size > self.max_bytes {
            return;
        }
        let mut e = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if generation < e.generation {
            return;
        }
        if generation > e.generation {
            e.map.clear();
            e.bytes = 0;
            e.generation = generation;
        }
        if let Some(old) = e.map.remove(&key) {
            e.bytes -= key.len() + old.len();
        }
        while e.bytes + size > self.max_bytes {
            let Some(victim) = e.map.keys().next().cloned() else {
                break;
            };
            if let Some(old) = e.map.remove(&victim) {
                e.bytes -= victim.len() + old.len();
            }
        }
        e.bytes += size;
        e.map.insert(key, body);
    }

    /// Number of entries (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_admitted_on_its_second_sight_and_while_cached() {
        let c = ResponseCache::default();
        assert!(
            !c.admits("once"),
            "first sight: not worth a generation read"
        );
        assert!(c.admits("once"), "asked again: cached from now on");
        c.insert("once".into(), 1, Bytes::from_static(b"A"));
        assert!(
            c.admits("once") && c.admits("once"),
            "cached: always admitted"
        );
        assert!(!c.admits("other"));
        assert!(!ResponseCache::with_capacity(0).admits("x"));
        assert!(
            !ResponseCache::with_capacity(0).admits("x"),
            "a cache of 0 admits nothing"
        );
    }

    #[test]
    fn entries_live_only_at_their_generation_and_within_the_bound() {
        let c = ResponseCache::default();
        c.insert("a".into(), 1, Bytes::from_static(b"A"));
        assert_eq!(c.get("a", 1).as_deref(), Some(&b"A"[..]));
        assert_eq!(c.get("a", 2), None, "a write happened since");
        c.insert("b".into(), 2, Bytes::from_static(b"B"));
        assert_eq!(c.len(), 1, "the newer generation emptied the cache");
        c.insert("late".into(), 1, Bytes::from_static(b"old"));
        assert_eq!(
            c.get("late", 1),
            None,
            "a read from before the write is not kept"
        );
        // Fill past the bound: the size never exceeds it and the newest entry is kept.
        let body = Bytes::from(vec![b'x'; 1024 * 1024]);
        for i in 0..40 {
            c.insert(format!("k{i}"), 2, body.clone());
            let e = c.inner.lock().unwrap();
            assert!(e.bytes <= DEFAULT_MAX_BYTES);
        }
        assert!(c.get("k39", 2).is_some());
        assert!(c.len() < 40);
        c.insert(
            "huge".into(),
            2,
            Bytes::from(vec![0; DEFAULT_MAX_BYTES + 1]),
        );
        assert_eq!(c.get("huge", 2), None);
        let off = ResponseCache::with_capacity(0);
        off.insert("a".into(), 1, Bytes::from_static(b"A"));
        assert_eq!(off.get("a", 1), None, "capacity 0 caches nothing");
    }
}
