//! A bounded cache of API reads with a TTL, shared by owner resolution and the scope check: a
//! fresh answer is served from memory, and concurrent callers asking for a key that is not cached
//! share one read ([`SingleFlight`], also used by the token reviews: if the caller doing it is
//! cancelled, a waiter takes it over; if none waits, nothing of the read is left behind). Successful answers are cached in a [`BoundedMap`]
//! (bounded in entries and bytes, least recently used evicted: keys are sender-chosen); errors
//! are not cached, so the next caller reads again.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::bounded::{BoundedMap, HeapSize, Limits};
use crate::cluster::ApiError;

pub struct ReadCache<K, V> {
    ttl: Duration,
    entries: Mutex<BoundedMap<K, V>>,
    reading: SingleFlight<K, Result<V, ApiError>>,
}

impl<K: Eq + Hash + Clone + HeapSize, V: Clone + HeapSize> ReadCache<K, V> {
    pub fn new(ttl: Duration, limits: Limits) -> Self {
        ReadCache {
            ttl,
            entries: Mutex::new(BoundedMap::new(limits)),
            reading: SingleFlight::default(),
        }
    }

    /// The cached answer for `key` if younger than the TTL, else the answer of `read` (one read
    /// per key at a time).
    pub async fn get_or_read<F, Fut>(&self, key: &K, read: F) -> Result<V, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, ApiError>>,
    {
        if let Some(value) = self.entries().get(key, Instant::now()) {
            return Ok(value.clone());
        }
        self.reading
            .run(key, || async {
                let result = read().await;
                if let Ok(value) = &result {
                    let cost = key.heap_size() + value.heap_size();
                    self.entries()
                        .insert(key.clone(), value.clone(), cost, Instant::now() + self.ttl);
                }
                result
            })
            .await
            .0
    }

    /// Forgets the answer for `key` (it is known to be outdated).
    pub fn forget(&self, key: &K) {
        self.entries().remove(key);
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BoundedMap<K, V>> {
        self.entries.lock().expect("read cache poisoned")
    }

    /// Reads in progress (for tests: none is left behind).
    pub fn reads_in_flight(&self) -> usize {
        self.reading.len()
    }

    /// Answers cached.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// Bytes the cached answers hold, as counted against the limit.
    pub fn bytes(&self) -> usize {
        self.entries().bytes()
    }
}

type Flight<V> = Arc<OnceCell<V>>;

/// One computation per key at a time: concurrent callers with one key share the first caller's
/// answer. If the caller computing it is dropped, a waiting caller takes over; when none waits,
/// nothing of the key is left behind. Holds only keys being computed (bounded by the callers).
pub struct SingleFlight<K, V> {
    flights: Mutex<HashMap<K, Flight<V>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            flights: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// The answer of `compute` for `key`, computed once for all concurrent callers; the bool is
    /// true for the caller whose `compute` ran.
    pub async fn run<F, Fut>(&self, key: &K, compute: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self
            .flights
            .lock()
            .expect("flights poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
        // Forgets the flight however this caller ends (answered, or dropped mid-way).
        let _forget = Forget {
            flights: &self.flights,
            key,
            cell: &cell,
        };
        let mut ran = false;
        let value = cell
            .get_or_init(|| {
                ran = true;
                compute()
            })
            .await
            .clone();
        (value, ran)
    }

    /// Keys being computed now.
    pub fn len(&self) -> usize {
        self.flights.lock().expect("flights poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drop guard of one caller of [`SingleFlight::run`]: forgets the key's flight once it has an
/// answer, or when no other caller waits on it (it was abandoned).
struct Forget<'a, K: Eq + Hash, V> {
    flights: &'a Mutex<HashMap<K, Flight<V>>>,
    key: &'a K,
    cell: &'a Flight<V>,
}

impl<K: Eq + Hash, V> Drop for Forget<'_, K, V> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().expect("flights poisoned");
        if let Some(current) = flights.get(self.key)
            && Arc::ptr_eq(current, self.cell)
            // Held by the map and this caller only: nobody else will finish or clean it up.
            && (self.cell.initialized() || Arc::strong_count(self.cell) <= 2)
        {
            flights.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits(entries: usize) -> Limits {
        Limits {
            entries,
            bytes: usize::MAX,
        }
    }

    #[tokio::test]
    async fn a_cancelled_reader_leaves_nothing_behind() {
        let cache: ReadCache<String, u32> = ReadCache::new(Duration::from_secs(30), limits(1000));
        for i in 0..100 {
            let key = format!("pod-{i}");
            let read = cache.get_or_read(&key, futures::future::pending);
            // The caller gives up (its request was cancelled, its deadline passed).
            assert!(tokio::time::timeout(Duration::from_millis(1), read).await.is_err());
        }
        assert_eq!(cache.reads_in_flight(), 0, "abandoned reads are forgotten");
    }

    #[tokio::test]
    async fn a_full_cache_evicts_its_oldest_entries_not_the_ones_in_use() {
        let cache: ReadCache<String, u32> = ReadCache::new(Duration::from_secs(30), limits(100));
        let reads = AtomicUsize::new(0);
        let read = |v| {
            reads.fetch_add(1, Ordering::SeqCst);
            async move { Ok(v) }
        };
        let hot = "hot".to_owned();
        cache.get_or_read(&hot, || read(0)).await.unwrap();
        // Sender-chosen keys, many more than the cache holds; the hot key is asked in between.
        for i in 0..10_000u32 {
            cache.get_or_read(&format!("random-{i}"), || read(i)).await.unwrap();
            if i % 50 == 0 {
                cache.get_or_read(&hot, || read(0)).await.unwrap();
            }
        }
        assert_eq!(reads.load(Ordering::SeqCst), 10_001, "the hot key was read once");
    }

    #[tokio::test]
    async fn long_sender_chosen_keys_are_bounded_in_bytes() {
        let limit = 64 * 1024;
        let cache: ReadCache<String, String> = ReadCache::new(
            Duration::from_secs(30),
            Limits {
                entries: 100_000,
                bytes: limit,
            },
        );
        for i in 0..10_000 {
            let key = format!("{i}-{}", "x".repeat(250));
            cache.get_or_read(&key, || async { Ok("y".repeat(250)) }).await.unwrap();
            assert!(cache.bytes() <= limit);
        }
        assert!(cache.len() > 10, "entries that fit are kept: {}", cache.len());
    }
}
