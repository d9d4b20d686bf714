//! Resent notifications. A multi-alert notification with one retryable failure is answered 503
//! (the contract), although its other alerts were stored; Alertmanager then resends the same
//! notification, byte for byte. This replica remembers, for a short while, which alerts of such a
//! notification it stored (keyed by the body's SHA-256), and answers them from memory when the
//! same body comes again instead of counting them a second time. Alertmanager reuses its
//! keep-alive connection for the retry, so the resend usually reaches the same replica; one that
//! lands elsewhere is counted again, as before.
//!
//! A different notification is never affected: the key is the whole body. An identical body also
//! comes when Alertmanager repeats a notification (`repeat_interval`, usually hours): only within
//! [`WINDOW`] after a 503 would such a repeat be taken for a resend.

use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::bounded::{BoundedMap, HeapSize, Limits};
use crate::pipeline::Outcome;

/// How long the stored alerts of a notification answered 503 are remembered.
pub const WINDOW: Duration = Duration::from_secs(300);
/// What is remembered at most: notifications, and bytes (a notification of 1 000 alerts holds
/// 1 000 outcomes). Beyond either, the least recently remembered are forgotten first.
pub const LIMITS: Limits = Limits {
    entries: 10_000,
    bytes: 16 * 1024 * 1024,
};

/// Per alert of a remembered notification: its stored outcome, or `None` when it still needs
/// processing (it failed, or was not stored).
type Remembered = Vec<Option<Outcome>>;

pub struct ResendMemory {
    entries: Mutex<BoundedMap<[u8; 32], Remembered>>,
}

impl Default for ResendMemory {
    fn default() -> Self {
        ResendMemory::new(LIMITS)
    }
}

/// The key of a notification: SHA-256 of its body.
pub fn key_of(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// Heap bytes of a remembered notification: the outcome slots and the strings of stored ones.
fn heap_size(remembered: &Remembered) -> usize {
    let strings: usize = remembered
        .iter()
        .flatten()
        .map(|o| match o {
            Outcome::Stored { fingerprint, ack } => {
                // A fingerprint is 64 characters on the heap.
                (fingerprint.as_str().len() + 8).next_multiple_of(16) + ack.name.heap_size() + ack.namespace.heap_size()
            }
            _ => 0,
        })
        .sum();
    remembered.capacity() * std::mem::size_of::<Option<Outcome>>() + strings
}

impl ResendMemory {
    pub fn new(limits: Limits) -> Self {
        ResendMemory {
            entries: Mutex::new(BoundedMap::new(limits)),
        }
    }

    /// Takes what is remembered of this notification (if it has `alerts` alerts and was
    /// answered 503 within the window).
    pub fn take(&self, key: &[u8; 32], alerts: usize) -> Option<Remembered> {
        let mut entries = self.entries.lock().expect("resend memory poisoned");
        if !entries.contains(key, Instant::now()) {
            return None;
        }
        entries.remove(key).filter(|r| r.len() == alerts)
    }

    /// Remembers the stored alerts of a notification that is answered 503.
    pub fn remember(&self, key: [u8; 32], outcomes: &[Outcome]) {
        let remembered: Remembered = outcomes
            .iter()
            .map(|o| matches!(o, Outcome::Stored { .. }).then(|| o.clone()))
            .collect();
        if remembered.iter().all(Option::is_none) {
            return;
        }
        let cost = heap_size(&remembered);
        self.entries
            .lock()
            .expect("resend memory poisoned")
            .insert(key, remembered, cost, Instant::now() + WINDOW);
    }

    /// Bytes held, as counted against [`LIMITS`].
    pub fn bytes(&self) -> usize {
        self.entries.lock().expect("resend memory poisoned").bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coalesce::Ack;
    use crate::dedup::DedupError;
    use crate::fingerprint::Fingerprint;

    fn stored(n: i64) -> Outcome {
        Outcome::Stored {
            fingerprint: Fingerprint::parse(&format!("{n:064x}")).unwrap(),
            ack: Ack {
                name: format!("rr-{n}"),
                namespace: "ns".into(),
                created: false,
                occurrence_count: n,
                first_seen_at: String::new(),
                last_seen_at: String::new(),
                absorbed_by: crate::absorb::Absorbs::Active,
                api_calls: 1.0,
            },
        }
    }

    fn failed() -> Outcome {
        Outcome::Failed {
            fingerprint: None,
            error: DedupError::DeadlineExceeded,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stored_alerts_are_remembered_once_within_the_window() {
        let m = ResendMemory::default();
        let k = key_of(b"notification");
        m.remember(k, &[stored(1), failed(), stored(3)]);
        assert!(m.take(&key_of(b"another"), 3).is_none());
        assert!(
            m.take(&k, 2).is_none(),
            "a body with another number of alerts is not this one"
        );
        m.remember(k, &[stored(1), failed(), stored(3)]);
        let r = m.take(&k, 3).expect("remembered");
        assert!(matches!(r[0], Some(Outcome::Stored { .. })));
        assert!(r[1].is_none());
        assert!(m.take(&k, 3).is_none(), "taken once");

        m.remember(k, &[stored(1), failed()]);
        tokio::time::advance(WINDOW).await;
        assert!(m.take(&k, 2).is_none(), "forgotten after the window");
        m.remember(k, &[failed(), failed()]);
        assert!(m.take(&k, 2).is_none(), "nothing stored, nothing to remember");
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let m = ResendMemory::default();
        for i in 0..(LIMITS.entries + 10) {
            m.remember(key_of(&i.to_le_bytes()), &[stored(1), failed()]);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(m.entries.lock().unwrap().len() <= LIMITS.entries);
        let newest = key_of(&(LIMITS.entries + 9).to_le_bytes());
        assert!(m.take(&newest, 2).is_some(), "the newest are kept");
    }

    #[tokio::test]
    async fn notifications_of_a_thousand_alerts_are_remembered_within_the_byte_bound() {
        let m = ResendMemory::default();
        let mut alerts: Vec<Outcome> = (0..999).map(stored).collect();
        alerts.push(failed());
        // 200 different notifications of 1 000 alerts: about 40 MiB if all were kept.
        for i in 0..200u32 {
            m.remember(key_of(&i.to_le_bytes()), &alerts);
            assert!(m.bytes() <= LIMITS.bytes, "{} > {}", m.bytes(), LIMITS.bytes);
        }
        assert!(
            m.take(&key_of(&199u32.to_le_bytes()), 1000).is_some(),
            "the latest is remembered"
        );
        assert!(m.take(&key_of(&0u32.to_le_bytes()), 1000).is_none(), "the oldest went");
    }
}
