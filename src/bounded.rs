//! The one bounded-cache policy of the gateway: [`BoundedMap`], a map bounded both in entries and
//! in (estimated) bytes, whose entries carry an expiry time. When an insert would exceed either
//! bound, the least recently used entries are evicted one by one until it fits; nothing is ever
//! cleared wholesale, so a flood of new keys costs the oldest entries, never the fresh ones all at
//! once. Expired entries are invisible to [`BoundedMap::get`] and removed when met.
//!
//! Callers say what an entry costs (`cost`: the heap bytes its key and value hold beyond their
//! inline size, [`HeapSize`]); the map adds the inline size of key and value, as its table holds
//! them (with room to spare), and its own bookkeeping per entry, so a bound in bytes holds for
//! the map's memory, not only for the payload.
//!
//! Not synchronised: wrap it in a `Mutex` (every operation is O(log n), short).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use tokio::time::Instant;

/// Both bounds of a [`BoundedMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries held.
    pub entries: usize,
    /// Most bytes held (inline key and value, their declared heap cost and the map's overhead).
    pub bytes: usize,
}

/// Bookkeeping per entry beyond the slots: the hash map's control byte, the recency index's
/// node share, rounded up generously.
const ENTRY_OVERHEAD: usize = 48;

struct Entry<V> {
    value: V,
    bytes: usize,
    expires: Instant,
    /// Position in `recency` (higher: more recently used).
    tick: u64,
}

/// A map bounded in entries and bytes that evicts least recently used entries (see the module
/// documentation).
pub struct BoundedMap<K, V> {
    limits: Limits,
    entries: HashMap<K, Entry<V>>,
    /// tick -> key, oldest first.
    recency: BTreeMap<u64, K>,
    next_tick: u64,
    bytes: usize,
    evictions: u64,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    pub fn new(limits: Limits) -> Self {
        BoundedMap {
            limits,
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            next_tick: 0,
            bytes: 0,
            evictions: 0,
        }
    }

    /// What one entry with `cost` heap bytes counts against [`Limits::bytes`]: its hash map slot
    /// twice (a table is at most 7/8 full and grows by doubling, so up to half its slots are
    /// empty), the key again in the recency index, the bookkeeping, and the heap bytes.
    pub fn entry_bytes(cost: usize) -> usize {
        2 * (std::mem::size_of::<K>() + std::mem::size_of::<Entry<V>>())
            + std::mem::size_of::<K>()
            + ENTRY_OVERHEAD
            + cost
    }

    /// The value of `key` unless absent or expired at `now`; marks it recently used.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<&V> {
        let expired = self.entries.get(key)?.expires <= now;
        if expired {
            self.remove(key);
            return None;
        }
        let tick = self.bump();
        let entry = self.entries.get_mut(key).expect("present");
        let old = std::mem::replace(&mut entry.tick, tick);
        let k = self.recency.remove(&old).expect("indexed");
        self.recency.insert(tick, k);
        Some(&self.entries[key].value)
    }

    /// Whether `key` is held and not expired at `now` (does not count as a use).
    pub fn contains(&self, key: &K, now: Instant) -> bool {
        self.entries.get(key).is_some_and(|e| e.expires > now)
    }

    /// Stores `value` under `key` until `expires`, evicting least recently used entries to stay
    /// within both bounds. Returns false (and stores nothing) when the entry alone exceeds them.
    pub fn insert(&mut self, key: K, value: V, cost: usize, expires: Instant) -> bool {
        self.insert_evicting(key, value, cost, expires, |_, _| {})
    }

    /// [`BoundedMap::insert`], handing each entry evicted to make room to `evicted` (for owners
    /// that count what the map holds by some property of the entries).
    pub fn insert_evicting(
        &mut self,
        key: K,
        value: V,
        cost: usize,
        expires: Instant,
        mut evicted: impl FnMut(K, V),
    ) -> bool {
        self.remove(&key);
        let bytes = Self::entry_bytes(cost);
        if bytes > self.limits.bytes || self.limits.entries == 0 {
            return false;
        }
        while self.entries.len() >= self.limits.entries || self.bytes + bytes > self.limits.bytes {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.bytes;
                self.evictions += 1;
                evicted(oldest, e.value);
            }
        }
        let tick = self.bump();
        self.recency.insert(tick, key.clone());
        self.entries.insert(
            key,
            Entry {
                value,
                bytes,
                expires,
                tick,
            },
        );
        self.bytes += bytes;
        true
    }

    /// Removes `key`, returning its value even if expired.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let e = self.entries.remove(key)?;
        self.recency.remove(&e.tick);
        self.bytes -= e.bytes;
        Some(e.value)
    }

    /// Removes every entry for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let gone: Vec<K> = self
            .entries
            .iter()
            .filter(|(k, e)| !keep(k, &e.value))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Entries held (expired ones not yet met included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held, as counted against [`Limits::bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries evicted to make room since the map was made.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    fn bump(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }
}

/// Heap bytes a value holds beyond its inline size: what an entry costs a [`BoundedMap`]
/// besides the inline sizes the map counts itself.
pub trait HeapSize {
    fn heap_size(&self) -> usize;
}

impl HeapSize for String {
    /// The allocation as the allocator hands it out: a header, rounded up to 16 bytes, 32 at least.
    fn heap_size(&self) -> usize {
        match self.capacity() {
            0 => 0,
            n => (n + 8).next_multiple_of(16).max(32),
        }
    }
}

impl<T: HeapSize> HeapSize for Option<T> {
    fn heap_size(&self) -> usize {
        self.as_ref().map_or(0, HeapSize::heap_size)
    }
}

impl<A: HeapSize, B: HeapSize, C: HeapSize> HeapSize for (A, B, C) {
    fn heap_size(&self) -> usize {
        self.0.heap_size() + self.1.heap_size() + self.2.heap_size()
    }
}

macro_rules! no_heap {
    ($($t:ty),*) => {$(impl HeapSize for $t { fn heap_size(&self) -> usize { 0 } })*};
}
no_heap!(bool, u8, u32, u64, usize, [u8; 32], &'static str);

impl HeapSize for crate::cluster::ObjectRef {
    fn heap_size(&self) -> usize {
        self.api_version.heap_size() + self.kind.heap_size() + self.namespace.heap_size() + self.name.heap_size()
    }
}

impl HeapSize for crate::crd::TargetResource {
    fn heap_size(&self) -> usize {
        self.api_version.heap_size() + self.kind.heap_size() + self.namespace.heap_size() + self.name.heap_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn map(entries: usize, bytes: usize) -> BoundedMap<u32, String> {
        BoundedMap::new(Limits { entries, bytes })
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_full_map_evicts_the_least_recently_used_entry_not_everything() {
        let mut m = map(3, usize::MAX);
        for k in 0..3 {
            assert!(m.insert(k, format!("v{k}"), 0, later()));
        }
        assert!(m.get(&0, Instant::now()).is_some(), "0 is now the most recently used");
        m.insert(3, "v3".into(), 0, later());
        assert_eq!(m.len(), 3);
        assert!(!m.contains(&1, Instant::now()), "the least recently used went");
        for k in [0, 2, 3] {
            assert!(m.contains(&k, Instant::now()), "{k} stays");
        }
        assert_eq!(m.evictions(), 1);
    }

    #[test]
    fn the_byte_bound_holds_for_any_mix_of_entry_sizes() {
        let one = BoundedMap::<u32, String>::entry_bytes(0);
        let limit = 10 * one + 10_000;
        let mut m = map(usize::MAX, limit);
        for k in 0..10_000u32 {
            let cost = (k as usize * 7919) % 3000;
            m.insert(k, String::new(), cost, later());
            assert!(m.bytes() <= limit, "{} > {limit} after {k}", m.bytes());
        }
        assert!(m.len() >= 4, "small entries are kept while they fit: {}", m.len());
        assert!(!m.insert(u32::MAX, String::new(), limit, later()), "too big alone");
        assert!(m.bytes() <= limit);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_invisible_and_removed_when_met() {
        let mut m = map(10, usize::MAX);
        m.insert(1, "short".into(), 0, Instant::now() + Duration::from_secs(1));
        m.insert(2, "long".into(), 0, Instant::now() + Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(m.get(&1, Instant::now()).is_none());
        assert_eq!(m.len(), 1, "met and removed");
        assert_eq!(m.get(&2, Instant::now()).map(String::as_str), Some("long"));
        assert_eq!(m.remove(&2).as_deref(), Some("long"));
        assert!(m.is_empty());
        assert_eq!(m.bytes(), 0, "removal returns the bytes");
    }

    #[test]
    fn evicted_entries_are_handed_over_and_retain_returns_their_bytes() {
        let mut m = map(2, usize::MAX);
        let mut evicted = Vec::new();
        for k in 0..4 {
            m.insert_evicting(k, format!("v{k}"), 0, later(), |k, v| evicted.push((k, v)));
        }
        assert_eq!(evicted, [(0, "v0".to_owned()), (1, "v1".to_owned())]);
        m.retain(|k, _| *k != 2);
        assert_eq!(m.len(), 1);
        assert!(m.contains(&3, Instant::now()));
        assert_eq!(m.bytes(), BoundedMap::<u32, String>::entry_bytes(0));
        m.insert(5, "v5".into(), 0, later());
        assert_eq!(m.len(), 2, "the recency index let go of the removed entries too");
    }

    #[test]
    fn replacing_a_key_counts_it_once() {
        let mut m = map(2, usize::MAX);
        m.insert(1, "a".into(), 100, later());
        m.insert(1, "b".into(), 10, later());
        assert_eq!(m.len(), 1);
        assert_eq!(m.bytes(), BoundedMap::<u32, String>::entry_bytes(10));
        assert_eq!(m.evictions(), 0);
    }
}
