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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::pipeline::Outcome;

/// How long the stored alerts of a notification answered 503 are remembered.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Most notifications remembered (beyond it the oldest half is forgotten).
const MAX_ENTRIES: usize = 10_000;

/// Per alert of a remembered notification: its stored outcome, or `None` when it still needs
/// processing (it failed, or was not stored).
type Remembered = Vec<Option<Outcome>>;

#[derive(Default)]
pub struct ResendMemory {
    entries: Mutex<HashMap<[u8; 32], (Instant, Remembered)>>,
}

/// The key of a notification: SHA-256 of its body.
pub fn key_of(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

impl ResendMemory {
    /// Takes what is remembered of this notification (if it has `alerts` alerts and was
    /// answered 503 within the window).
    pub fn take(&self, key: &[u8; 32], alerts: usize) -> Option<Remembered> {
        let mut entries = self.entries.lock().expect("resend memory poisoned");
        let (at, remembered) = entries.remove(key)?;
        (at.elapsed() < WINDOW && remembered.len() == alerts).then_some(remembered)
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
        let mut entries = self.entries.lock().expect("resend memory poisoned");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < WINDOW);
        }
        if entries.len() >= MAX_ENTRIES {
            let mut ages: Vec<Instant> = entries.values().map(|(at, _)| *at).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            entries.retain(|_, (at, _)| *at > cutoff);
        }
        entries.insert(key, (Instant::now(), remembered));
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
        for i in 0..(MAX_ENTRIES + 10) {
            m.remember(key_of(&i.to_le_bytes()), &[stored(1), failed()]);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(m.entries.lock().unwrap().len() <= MAX_ENTRIES);
        let newest = key_of(&(MAX_ENTRIES + 9).to_le_bytes());
        assert!(m.take(&newest, 2).is_some(), "the newest are kept");
    }
}
