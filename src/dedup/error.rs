//! Why a batch could not be written, and the reasons a 503 names.

use std::time::Duration;

use crate::cluster::ApiError;

/// Why a batch could not be written. Every variant is transient: the sender should retry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DedupError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("creation lock for this fingerprint is held by {holder}")]
    LockTimeout { holder: String, expires_in: Duration },
    #[error("deadline exceeded before the outcome was stored")]
    DeadlineExceeded,
    /// The creation lock was lost or is about to expire before the create could be sent.
    #[error("creation lock lost before the request could be created")]
    LockLost,
    /// A write was sent and no answer came within `backend.apiTimeout` + 1 s: it may be stored.
    #[error("the API server did not answer a write in time; it may be stored")]
    Unanswered,
    /// The owner of the fingerprint's shard answered that the forwarded signal is not stored.
    #[error("the owning replica could not store the signal ({reason})")]
    Owner {
        reason: &'static str,
        retry_after: Duration,
    },
    #[error("{0}")]
    Internal(String),
}

/// Every [`DedupError::reason`] label; anything else an owner answers becomes `owner_failed`.
const REASONS: &[&str] = &[
    "forbidden",
    "throttled",
    "api_timeout",
    "api_error",
    "lock_timeout",
    "deadline_exceeded",
    "lock_lost",
    "unanswered",
    "internal",
];

/// The label of a reason named by a peer (a bounded set, whatever it sends).
pub fn known_reason(reason: &str) -> &'static str {
    REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("owner_failed")
}

impl DedupError {
    /// Metric/log label.
    pub fn reason(&self) -> &'static str {
        match self {
            DedupError::Api(ApiError::Forbidden(_)) => "forbidden",
            DedupError::Api(ApiError::Throttled { .. }) => "throttled",
            DedupError::Api(ApiError::Timeout) => "api_timeout",
            DedupError::Api(_) => "api_error",
            DedupError::LockTimeout { .. } => "lock_timeout",
            DedupError::DeadlineExceeded => "deadline_exceeded",
            DedupError::LockLost => "lock_lost",
            DedupError::Unanswered => "unanswered",
            DedupError::Owner { reason, .. } => reason,
            DedupError::Internal(_) => "internal",
        }
    }

    /// Suggested Retry-After.
    pub fn retry_after(&self) -> Duration {
        match self {
            DedupError::Api(ApiError::Throttled { retry_after: Some(d) }) => *d,
            DedupError::Owner { retry_after, .. } => {
                (*retry_after).clamp(Duration::from_secs(1), Duration::from_secs(30))
            }
            DedupError::LockTimeout { expires_in, .. } => {
                (*expires_in).clamp(Duration::from_secs(1), Duration::from_secs(30))
            }
            _ => Duration::from_secs(2),
        }
    }
}
