//! A bounded cache of API reads with a TTL, shared by owner resolution and the scope check: a
//! fresh answer is served from memory, and concurrent callers asking for a key that is not cached
//! share one read (if the caller doing it is cancelled, a waiter takes it over). Successful
//! answers are cached; errors are not, so the next caller reads again.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::cluster::ApiError;

type Read<V> = Arc<OnceCell<Result<V, ApiError>>>;

pub struct ReadCache<K, V> {
    ttl: Duration,
    /// Beyond this many entries the cache is emptied (bounded memory; the next reads refill it).
    max_entries: usize,
    entries: Mutex<HashMap<K, (Instant, V)>>,
    reading: Mutex<HashMap<K, Read<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> ReadCache<K, V> {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        ReadCache {
            ttl,
            max_entries,
            entries: Mutex::default(),
            reading: Mutex::default(),
        }
    }

    /// The cached answer for `key` if younger than the TTL, else the answer of `read` (one read
    /// per key at a time).
    pub async fn get_or_read<F, Fut>(&self, key: &K, read: F) -> Result<V, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, ApiError>>,
    {
        if let Some((at, value)) = self.entries.lock().expect("read cache poisoned").get(key)
            && at.elapsed() < self.ttl
        {
            return Ok(value.clone());
        }
        let cell = self
            .reading
            .lock()
            .expect("reads poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
        let result = cell
            .get_or_init(|| async {
                let result = read().await;
                if let Ok(value) = &result {
                    let mut entries = self.entries.lock().expect("read cache poisoned");
                    if entries.len() >= self.max_entries {
                        entries.clear();
                    }
                    entries.insert(key.clone(), (Instant::now(), value.clone()));
                }
                result
            })
            .await
            .clone();
        let mut reading = self.reading.lock().expect("reads poisoned");
        if reading.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            reading.remove(key);
        }
        result
    }

    /// Reads in progress (for tests: none is left behind).
    pub fn reads_in_flight(&self) -> usize {
        self.reading.lock().expect("reads poisoned").len()
    }
}
