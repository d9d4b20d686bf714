//! The count path: adding a batch's signals to a RemediationRequest's
//! `status.deduplication` with a resourceVersion-conditioned status update, retried on Conflict,
//! and resolving an update whose answer was lost.

use std::time::Duration;

use tokio::time::Instant;

use super::{Budget, Dedup, DedupError, Result, Step, Written, within};
use crate::absorb;
use crate::clock::rfc3339;
use crate::cluster::ApiError;
use crate::crd::{Deduplication, RemediationRequest};
use crate::fingerprint::Fingerprint;
use crate::hints::{Landed, Newer};
use crate::lock::backoff;

/// The signals one write carries, as a count that may change until the write is sent. While a
/// batch is open its coalescer may add a signal that arrived meanwhile (`join`: e.g. while the
/// lock was taken, or after a Conflict) or take back one whose caller has gone (`leave`). The
/// writer seals it before each status update it sends and counts what is in it then; the batch
/// reopens only when that update was not stored and another will follow. A fixed or closed batch
/// never changes.
pub struct Batch {
    state: std::sync::Mutex<Seats>,
}

struct Seats {
    n: u32,
    max: u32,
    state: Door,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Door {
    Open,
    /// A status update carrying `n` is under way.
    Sealed,
    /// For good: the write is over, or the strategy takes no late signals (always-lock).
    Closed,
}

impl Batch {
    /// `n` signals, no more and no fewer.
    pub fn fixed(n: u32) -> Self {
        Self::with(n, n, Door::Closed)
    }

    /// `n` signals for now, open to others up to `max`.
    pub fn open(n: u32, max: u32) -> Self {
        Self::with(n, max.max(n), Door::Open)
    }

    fn with(n: u32, max: u32, state: Door) -> Self {
        Batch {
            state: std::sync::Mutex::new(Seats { n, max, state }),
        }
    }

    fn seats(&self) -> std::sync::MutexGuard<'_, Seats> {
        self.state.lock().expect("batch poisoned")
    }

    pub fn size(&self) -> u32 {
        self.seats().n
    }

    /// Adds one signal, if the batch is open and not full.
    pub fn join(&self) -> bool {
        let mut s = self.seats();
        let room = s.state == Door::Open && s.n < s.max;
        if room {
            s.n += 1;
        }
        room
    }

    /// Takes one signal back, if the batch is open and keeps at least one (a write of nothing
    /// would still cost its requests).
    pub fn leave(&self) -> bool {
        let mut s = self.seats();
        let can = s.state == Door::Open && s.n > 1;
        if can {
            s.n -= 1;
        }
        can
    }

    /// Closes the batch for good, returning what it holds.
    pub fn close(&self) -> u32 {
        let mut s = self.seats();
        s.state = Door::Closed;
        s.n
    }

    /// Before a status update: no signal joins or leaves while it is under way.
    fn seal(&self) -> u32 {
        let mut s = self.seats();
        if s.state == Door::Open {
            s.state = Door::Sealed;
        }
        s.n
    }

    /// The update was not stored and another follows: signals may join it.
    fn reopen(&self) {
        let mut s = self.seats();
        if s.state == Door::Sealed {
            s.state = Door::Open;
        }
    }
}

impl Dedup {
    /// Adds `n` to the RR's count with a resourceVersion-conditioned status update, refreshing
    /// on Conflict. `Gone` when the RR turned terminal or disappeared.
    pub(super) async fn increment(
        &self,
        fp: &Fingerprint,
        rr: RemediationRequest,
        n: &Batch,
        budget: Budget<'_>,
    ) -> Result<Step> {
        Ok(self.increment_counted(fp, rr, n, budget).await?.0)
    }

    /// [`Self::increment`], also returning how many conflicts it met.
    #[tracing::instrument(name = "dedup.status_update", skip_all, fields(rr_name = rr.metadata.name.as_deref().unwrap_or_default(), attempts = tracing::field::Empty))]
    pub(super) async fn increment_counted(
        &self,
        fp: &Fingerprint,
        mut rr: RemediationRequest,
        batch: &Batch,
        budget: Budget<'_>,
    ) -> Result<(Step, u32)> {
        let name = rr.metadata.name.clone().unwrap_or_default();
        let mut conflicts = 0;
        for attempt in 1.. {
            tracing::Span::current().record("attempts", attempt);
            if rr.spec.signal_fingerprint != fp.as_str() {
                return Err(DedupError::Internal(format!(
                    "RemediationRequest {name} belongs to another fingerprint"
                )));
            }
            let Some(why) = absorb::absorbs(&rr, self.clock.now()) else {
                return Ok((Step::Gone, conflicts));
            };
            let Some(rv) = rr.metadata.resource_version.clone().filter(|rv| !rv.is_empty()) else {
                return Err(DedupError::Internal(format!(
                    "RemediationRequest {name} read without a resourceVersion"
                )));
            };
            let n = batch.seal();
            let current = rr
                .status
                .as_ref()
                .and_then(|s| s.deduplication.clone())
                .unwrap_or_default();
            let before = current.occurrence_count;
            let now = rfc3339(self.clock.now());
            let Some(count) = i32::try_from(i64::from(before) + i64::from(n)).ok() else {
                return Err(DedupError::Internal(format!(
                    "occurrenceCount of {name} would pass the int32 the CRD stores"
                )));
            };
            let next = Deduplication {
                first_seen_at: if current.first_seen_at.is_empty() {
                    now.clone()
                } else {
                    current.first_seen_at.clone()
                },
                last_seen_at: now,
                occurrence_count: count,
            };
            let sent_at = Instant::now();
            let namespace = rr
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| self.settings.namespace.clone());
            let outcome = self
                .write(budget, budget.deadline, |call| {
                    self.cluster.update_deduplication(call, &namespace, &name, &rv, &next)
                })
                .await;
            if outcome.is_ok() {
                self.record_write_latency(sent_at.elapsed());
            }
            let outcome = match outcome {
                // Boxed: a rare path, kept out of the (large) state of every count's future.
                Err(e) if ambiguous(&e) => {
                    match Box::pin(self.resolve_write(fp, &namespace, &name, &rv, &next, budget)).await {
                        Resolved::Stored(rr) => Ok(rr),
                        Resolved::NotStored(current) => {
                            // Never applied: count again from the version that is there now.
                            rr = current;
                            batch.reopen();
                            continue;
                        }
                        Resolved::Unknown => Err(e),
                    }
                }
                other => other,
            };
            match outcome {
                Ok(updated) => {
                    self.metrics.occurrences.inc_by(u64::from(n));
                    self.hints.observe(&updated);
                    let written = Written {
                        rr: updated,
                        before: i64::from(before),
                        absorbed_by: why,
                        n,
                        conflicts,
                        created: false,
                    };
                    return Ok((Step::Done(Box::new(written)), conflicts));
                }
                Err(DedupError::Api(ApiError::Conflict(_))) => {
                    batch.reopen();
                    conflicts += 1;
                    self.metrics.status_conflicts.inc();
                    self.metrics.retries.with_label_values(&["conflict"]).inc();
                    if attempt > 1 {
                        // Several replicas keep writing this RR: spread the retries (before the
                        // refresh, so the retry starts from the newest version there is). At
                        // first by up to one write's latency — replicas that lost to the same
                        // write then rarely collide again, and a longer wait would only let
                        // more writes in first; exponentially only if it goes on and on.
                        let pause = if attempt <= 8 {
                            let write = self.write_latency().unwrap_or(self.settings.backoff_initial);
                            write.min(Duration::from_millis(50)).mul_f64(fastrand::f64())
                        } else {
                            backoff(attempt - 8, self.settings.backoff_initial, self.settings.backoff_max)
                        };
                        tokio::time::sleep(pause).await;
                    }
                    match self.refresh(fp, &name, &rv, budget).await? {
                        Some(fresh) => rr = fresh,
                        None => return Ok((Step::Gone, conflicts)),
                    }
                }
                Err(DedupError::Api(ApiError::NotFound)) => {
                    // Another path (a new generation) writes next.
                    batch.reopen();
                    return Ok((Step::Gone, conflicts));
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the retry loop only ends by returning")
    }

    /// The version of RR `name` that beat ours (at `sent`): from the watch when it delivers one
    /// within `watch_wait`, else read from the API server. `None`: it no longer absorbs, or is gone.
    async fn refresh(
        &self,
        fp: &Fingerprint,
        name: &str,
        sent: &str,
        budget: Budget<'_>,
    ) -> Result<Option<RemediationRequest>> {
        if !self.settings.watch_wait.is_zero() {
            let until = (Instant::now() + self.settings.watch_wait).min(budget.deadline);
            match self.hints.newer_than(fp, name, sent, until).await {
                Some(Newer::Active(fresh)) => {
                    self.metrics.conflict_refreshes.with_label_values(&["watch"]).inc();
                    return Ok(Some(*fresh));
                }
                Some(Newer::Closed) => {
                    self.metrics.conflict_refreshes.with_label_values(&["watch"]).inc();
                    return Ok(None);
                }
                None => {}
            }
        }
        self.metrics.conflict_refreshes.with_label_values(&["get"]).inc();
        match within(
            budget.deadline,
            self.cluster.get_request(budget.call, &self.settings.namespace, name),
        )
        .await
        {
            Ok(fresh) => {
                self.hints.observe(&fresh);
                Ok(Some(fresh))
            }
            Err(DedupError::Api(ApiError::NotFound)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a sent status write of `next` on RR `name` (conditioned on `rv`), whose answer was
    /// lost, is stored. First the identical write again: exactly one of the two can apply (both
    /// carry the same precondition), so if the repeat is stored the original never will be.
    /// On Conflict the RR moved on: it is ours when the version after `rv` carries our
    /// `deduplication` — read back, or seen by the watch, whose history of versions after the last
    /// list is complete.
    async fn resolve_write(
        &self,
        fp: &Fingerprint,
        namespace: &str,
        name: &str,
        rv: &str,
        next: &Deduplication,
        budget: Budget<'_>,
    ) -> Resolved {
        // Each step gets one write's grace from now (the deadline may have passed while the
        // original went unanswered): the caller waits up to four graces past the deadline.
        let until = Instant::now().max(budget.deadline) + self.settings.write_grace;
        let again = self
            .write(budget, until, |call| {
                self.cluster.update_deduplication(call, namespace, name, rv, next)
            })
            .await;
        match again {
            Ok(updated) => {
                self.metrics.write_resolutions.with_label_values(&["resent"]).inc();
                return Resolved::Stored(updated);
            }
            Err(DedupError::Api(ApiError::Conflict(_))) => {}
            Err(e) => {
                tracing::warn!(rr_name = name, error = %e, "unanswered write could not be resolved");
                self.metrics.write_resolutions.with_label_values(&["unknown"]).inc();
                return Resolved::Unknown;
            }
        }
        let current = match within(
            Instant::now() + self.settings.write_grace,
            self.cluster.get_request(budget.call, namespace, name),
        )
        .await
        {
            Ok(current) => current,
            Err(_) => {
                self.metrics.write_resolutions.with_label_values(&["unknown"]).inc();
                return Resolved::Unknown;
            }
        };
        self.hints.observe(&current);
        let ours = current.status.as_ref().and_then(|s| s.deduplication.as_ref()) == Some(next);
        let current_rv = current.metadata.resource_version.clone().unwrap_or_default();
        let verdict = if ours {
            Landed::Yes
        } else {
            let marker = (next.last_seen_at.as_str(), next.occurrence_count);
            let wait = Instant::now() + self.settings.watch_wait.max(Duration::from_millis(100));
            self.hints.landed(fp, name, rv, marker, &current_rv, wait).await
        };
        match verdict {
            Landed::Yes => {
                self.metrics.write_resolutions.with_label_values(&["stored"]).inc();
                Resolved::Stored(current)
            }
            Landed::No => {
                self.metrics.write_resolutions.with_label_values(&["not_stored"]).inc();
                Resolved::NotStored(current)
            }
            Landed::Unknown => {
                self.metrics.write_resolutions.with_label_values(&["unknown"]).inc();
                Resolved::Unknown
            }
        }
    }
}

/// What became of a status write whose answer was lost.
enum Resolved {
    /// It (or its identical repeat) is stored; the RR as read after it.
    Stored(RemediationRequest),
    /// It is not, and cannot be any more; the RR's current version.
    NotStored(RemediationRequest),
    /// Cannot tell: answer 503 (the sender's retry may count it twice).
    Unknown,
}

/// Errors after which a sent write may or may not be stored.
pub(super) fn ambiguous(e: &DedupError) -> bool {
    matches!(
        e,
        DedupError::Unanswered | DedupError::Api(ApiError::Timeout | ApiError::Unavailable(_))
    )
}
