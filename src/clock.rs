//! Wall-clock time behind a trait, so lease expiry can be tested without sleeping.
//!
//! Waiting (backoff, renewal intervals) uses `tokio::time`, which tests pause and advance; lease
//! timestamps are wall-clock values shared with other replicas, so they come from a [`Clock`].
//! [`TokioClock`] ties the two together for tests: its wall time moves with tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

pub type SharedClock = Arc<dyn Clock>;

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Wall time that advances exactly as `tokio::time::Instant` does (including under
/// `tokio::time::pause()`), starting from the wall time at construction.
#[derive(Debug, Clone)]
pub struct TokioClock {
    wall_at_start: Timestamp,
    instant_at_start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        TokioClock {
            wall_at_start: Timestamp::now(),
            instant_at_start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed = self.instant_at_start.elapsed();
        add(self.wall_at_start, elapsed)
    }
}

/// The system clock plus an offset that can be moved forward: wall time passes as usual, and a
/// test can jump past a cooldown or a lease expiry without waiting for it.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_micros: std::sync::atomic::AtomicU64,
}

impl OffsetClock {
    pub fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.offset_micros
            .fetch_add(micros, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let micros = self.offset_micros.load(std::sync::atomic::Ordering::SeqCst);
        add(Timestamp::now(), Duration::from_micros(micros))
    }
}

/// `t + d`, saturating at the maximum timestamp.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    let span = jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX);
    t.checked_add(span).unwrap_or(Timestamp::MAX)
}

/// RFC 3339 with microseconds, the precision Kubernetes keeps for `MicroTime`.
pub fn rfc3339(t: Timestamp) -> String {
    format!("{t:.6}")
}
