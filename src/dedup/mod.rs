//! The deduplication decision: count a signal into the active RemediationRequest for its
//! fingerprint, or create one under the per-fingerprint lease lock.
//!
//! `optimistic` (default): duplicates never take the lock. The newest active RR this replica knows
//! for the fingerprint (a hint fed by a watch of the namespace and by our own writes, see
//! [`crate::hints`]) or a fresh field-selected list finds the active RR; a status update
//! conditioned on its resourceVersion adds the count. On Conflict the newer version comes from the
//! watch when it arrives within `watch_wait`, else from a GET, and the update is retried. Only
//! when no active RR exists does the lease lock guard creation: re-check with a fresh list under
//! the lock, create with a deterministic name (so a second creator gets AlreadyExists and counts
//! instead), then set the initial count. When the synced watch knows no active RR, the list
//! before the lock is skipped (the one under the lock decides). While another replica holds the
//! lock we wait for the RR it creates (from the watch, or polling lists without it) and count
//! into it, so a contended signal is never dropped.
//!
//! `always-lock`: the original Kubernaut order (lock, look up, update or create, release) for
//! every signal; kept to measure the difference.
//!
//! Every API call is bounded by the batch deadline; on expiry the caller answers 503.
//!
//! This file holds the decision (which strategy, which RR, count or create); `create.rs` the
//! create path under the Lease or shard ownership, `count.rs` the count path (the batch, the
//! conditional status update, resolving an unanswered one), `naming.rs` the RR names and
//! `error.rs` the errors. None of them speaks kube or HTTP: the port ([`crate::cluster`]) does.

mod count;
mod create;
mod error;
mod naming;
#[cfg(test)]
mod tests;

pub use count::Batch;
pub use error::{DedupError, known_reason};
pub use naming::{generation_name, generation_of, next_name};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::absorb::{self, Absorbs};
use crate::clock::SharedClock;
use crate::cluster::{ApiError, Call, Cluster, Tally};
use crate::crd::{RemediationRequest, RemediationRequestSpec};
use crate::fingerprint::Fingerprint;
use crate::hints::{HintCache, WatchTask};
use crate::lock::LeaseLock;
use crate::metrics::Metrics;
use crate::ownership::Ownership;
use create::{CreateFence, Unresolved};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Optimistic,
    AlwaysLock,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Optimistic => "optimistic",
            Strategy::AlwaysLock => "always-lock",
        }
    }
}

pub type Result<T, E = DedupError> = std::result::Result<T, E>;

/// The stored outcome of one batch of `n` signals.
#[derive(Debug, Clone)]
pub struct Written {
    pub rr: RemediationRequest,
    /// occurrenceCount before this batch was added.
    pub before: i64,
    /// The rule under which the RR took the count (`Active` for the one this batch created).
    pub absorbed_by: Absorbs,
    /// Signals this write counted (the batch may have grown while it was being written).
    pub n: u32,
    /// Status updates of this write rejected with Conflict before it succeeded.
    pub conflicts: u32,
    /// This batch created the RR.
    pub created: bool,
}

/// What one write may spend: its deadline (every API request is bounded by it; a write is sent
/// only before it), and the call its requests carry across the port (counted into the batch's
/// tally).
#[derive(Clone, Copy)]
pub struct Budget<'a> {
    pub deadline: Instant,
    call: Call<'a>,
}

impl<'a> Budget<'a> {
    /// Requests counted into `tally`.
    pub fn counted(deadline: Instant, tally: &'a Tally) -> Self {
        Budget {
            deadline,
            call: Call::counted(tally),
        }
    }

    /// Requests counted nowhere.
    pub fn uncounted(deadline: Instant) -> Budget<'static> {
        Budget {
            deadline,
            call: Call::UNCOUNTED,
        }
    }
}

enum Step {
    Done(Box<Written>),
    /// The RR we aimed at no longer absorbs (finished, cooldown over) or is gone: decide again
    /// from a fresh read.
    Gone,
}

pub struct Settings {
    pub namespace: String,
    pub strategy: Strategy,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a create or status update already sent may run past the signal's deadline.
    /// Abandoning a write in flight would answer 503 for a signal that may still be stored (and
    /// then counted again when the sender retries); waiting for its real outcome, bounded by
    /// the API request timeout, keeps "2xx if and only if stored" true.
    pub write_grace: Duration,
    /// Watch the namespace's RemediationRequests to keep hints fresh (optimistic only).
    pub watch: bool,
    /// After a Conflict, how long to wait for the watch to deliver the newer version before a GET.
    pub watch_wait: Duration,
}

pub struct Dedup {
    cluster: Arc<dyn Cluster>,
    lock: LeaseLock,
    clock: SharedClock,
    metrics: Metrics,
    settings: Settings,
    /// Newest active RR known per fingerprint: a hint, always verified by a conditional write.
    hints: Arc<HintCache>,
    /// The watch feeding `hints` (stopped when the Dedup is dropped).
    _watch: Option<WatchTask>,
    /// Moving average of status-update latency in nanoseconds (`u64::MAX`: none measured yet).
    write_nanos: AtomicU64,
    /// Shard ownership (ADR 0014): while this replica owns a fingerprint's shard it creates
    /// without the per-fingerprint Lease.
    ownership: Option<Ownership>,
}

impl Dedup {
    /// With `settings.watch` on the optimistic strategy, starts the RemediationRequest watch
    /// (needs a Tokio runtime).
    pub fn new(
        cluster: Arc<dyn Cluster>,
        lock: LeaseLock,
        clock: SharedClock,
        metrics: Metrics,
        settings: Settings,
    ) -> Self {
        let hints = HintCache::new(metrics.clone(), clock.clone());
        let watch = (settings.watch && settings.strategy == Strategy::Optimistic)
            .then(|| hints.spawn_watch(cluster.clone(), settings.namespace.clone()));
        Dedup {
            cluster,
            lock,
            clock,
            metrics,
            settings,
            hints,
            _watch: watch,
            write_nanos: AtomicU64::new(u64::MAX),
            ownership: None,
        }
    }

    /// Creates of fingerprints whose shard this replica owns skip the per-fingerprint Lease.
    pub fn with_ownership(mut self, ownership: Ownership) -> Self {
        self.ownership = Some(ownership);
        self
    }

    /// Recent latency of successful status updates (moving average, 1/8 weight per write, each
    /// sample capped at twice the average); `None` before the first.
    pub fn write_latency(&self) -> Option<Duration> {
        let nanos = self.write_nanos.load(Ordering::Relaxed);
        (nanos != u64::MAX).then(|| Duration::from_nanos(nanos))
    }

    fn record_write_latency(&self, took: Duration) {
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX - 1);
        let old = self.write_nanos.load(Ordering::Relaxed);
        // A sample counts at most twice the average: a write that took long because this process
        // was not scheduled (a busy machine) moves the average up gradually, not in one jump.
        let new = if old == u64::MAX {
            sample
        } else {
            old - old / 8 + sample.min(old.saturating_mul(2).max(1)) / 8
        };
        self.write_nanos.store(new, Ordering::Relaxed);
    }

    /// The hints (tests observe whether the watch has caught up).
    pub fn hints(&self) -> &HintCache {
        &self.hints
    }

    /// Whether an RR of `fp` was written (by any replica, as far as we saw) within `window`.
    pub fn written_within(&self, fp: &Fingerprint, window: Duration) -> bool {
        self.hints.changed_within(fp, window)
    }

    pub fn strategy(&self) -> Strategy {
        self.settings.strategy
    }

    /// Adds `n` occurrences of `fp` (creating the RR from `spec` if none is active), answering
    /// only once the write is stored. Its API requests are counted nowhere (the coalescer, which
    /// reports them per signal, calls [`Self::process_batch`] with its batch's tally).
    pub async fn process(
        &self,
        fp: &Fingerprint,
        n: u32,
        spec: &RemediationRequestSpec,
        deadline: Instant,
    ) -> Result<Written> {
        self.process_batch(fp, &Batch::fixed(n), spec, Budget::uncounted(deadline))
            .await
    }

    /// [`Self::process`] for a batch that may change until its write is sent (optimistic strategy
    /// only; `always-lock` closes it, keeping the original per-batch behaviour it is measured as).
    #[tracing::instrument(name = "dedup", skip_all, fields(fingerprint = %fp, n = n.size(), strategy = self.settings.strategy.as_str()))]
    pub async fn process_batch(
        &self,
        fp: &Fingerprint,
        n: &Batch,
        spec: &RemediationRequestSpec,
        budget: Budget<'_>,
    ) -> Result<Written> {
        match self.settings.strategy {
            Strategy::Optimistic => self.optimistic(fp, n, spec, budget).await,
            Strategy::AlwaysLock => {
                n.close();
                self.always_lock(fp, n, spec, budget).await
            }
        }
    }

    async fn optimistic(
        &self,
        fp: &Fingerprint,
        n: &Batch,
        spec: &RemediationRequestSpec,
        budget: Budget<'_>,
    ) -> Result<Written> {
        let lookups = &self.metrics.hint_lookups;
        if let Some(rr) = self.hints.active(fp) {
            let (step, conflicts) = self.increment_counted(fp, rr, n, budget).await?;
            match step {
                Step::Done(w) => {
                    lookups
                        .with_label_values(&[if conflicts == 0 { "hit" } else { "conflict" }])
                        .inc();
                    return Ok(*w);
                }
                Step::Gone => lookups.with_label_values(&["stale"]).inc(),
            }
        } else if self.hints.knows_none_active(fp) {
            lookups.with_label_values(&["absent"]).inc();
        } else {
            lookups.with_label_values(&["miss"]).inc();
        }
        // The owner of the fingerprint's shard creates without the Lease (once: if that does not
        // settle it, the Lease-guarded path below does).
        if let Some(fence) = self.ownership.as_ref().and_then(|o| o.fence(fp)) {
            match Box::pin(self.create_under_lock(fp, n, spec, budget, &CreateFence::Owner(fence))).await {
                Ok(Ok(Step::Done(w))) => return Ok(*w),
                Ok(Ok(Step::Gone)) => self.metrics.retries.with_label_values(&["gone"]).inc(),
                Ok(Err(e)) | Err(Unresolved(e)) => return Err(e),
            }
        }
        loop {
            // The synced watch knowing no active RR saves the list before the lock; the list
            // under the lock decides whether to create.
            let mut guess = None;
            if !self.hints.knows_none_active(fp) {
                let existing = self.lookup(fp, budget).await?;
                if let Some(active) = self.pick(&existing) {
                    if let Step::Done(w) = self.increment(fp, active, n, budget).await? {
                        return Ok(*w);
                    }
                    self.metrics.retries.with_label_values(&["gone"]).inc();
                    continue;
                }
                guess = Some(next_name(fp, &existing));
            }
            let guess = guess.unwrap_or_else(|| self.guess_name(fp));
            if let Step::Done(w) = self.create_locked(fp, n, spec, budget, true, &guess).await? {
                return Ok(*w);
            }
            self.metrics.retries.with_label_values(&["gone"]).inc();
        }
    }

    async fn always_lock(
        &self,
        fp: &Fingerprint,
        n: &Batch,
        spec: &RemediationRequestSpec,
        budget: Budget<'_>,
    ) -> Result<Written> {
        loop {
            let guess = self.guess_name(fp);
            if let Step::Done(w) = self.create_locked(fp, n, spec, budget, false, &guess).await? {
                return Ok(*w);
            }
            self.metrics.retries.with_label_values(&["gone"]).inc();
        }
    }

    /// The RR of a fresh list that absorbs a signal now (Kubernaut's rules, [`crate::absorb`]).
    fn pick(&self, rrs: &[RemediationRequest]) -> Option<RemediationRequest> {
        let now = self.clock.now();
        let active = rrs
            .iter()
            .filter(|rr| absorb::absorbs(rr, now) == Some(Absorbs::Active))
            .count();
        if active > 1 {
            tracing::error!(
                count = active,
                "more than one active RemediationRequest for one fingerprint"
            );
        }
        absorb::pick(rrs, now).cloned()
    }

    /// Fresh, server-side field-selected list of every RR with this fingerprint.
    #[tracing::instrument(name = "dedup.lookup", skip_all)]
    async fn lookup(&self, fp: &Fingerprint, budget: Budget<'_>) -> Result<Vec<RemediationRequest>> {
        let listed = within(
            budget.deadline,
            self.cluster
                .list_requests(budget.call, &self.settings.namespace, fp.as_str()),
        )
        .await?;
        for rr in &listed {
            self.hints.observe(rr);
        }
        Ok(listed)
    }

    /// The name the next RR of `fp` will most likely get, from what the hints know (recorded with
    /// the Lease, so the fence before the create usually costs no write).
    fn guess_name(&self, fp: &Fingerprint) -> String {
        generation_name(fp, self.hints.highest_generation(fp).unwrap_or(0) + 1)
    }
    /// Upper bound on how long past its deadline a batch may take (see `Settings::write_grace`).
    pub fn write_grace(&self) -> Duration {
        self.settings.write_grace
    }

    /// Sends a write only while the deadline has not passed, then waits for its outcome up to
    /// `write_grace` beyond the deadline instead of abandoning it mid-flight.
    /// Waiting for an API request slot counts against the deadline (a write that gets none is
    /// not sent); once sent, the client's own timeout (`backend.apiTimeout`, below the grace)
    /// ends it first, so a write is not abandoned in flight by this bound.
    /// The two outcomes of a write are "not sent" (`DeadlineExceeded`) and "sent and answered";
    /// a sent write that got no answer within the grace is `Unanswered` (it may be stored: the
    /// caller resolves it before answering).
    async fn write<'c, T, F>(&self, budget: Budget<'c>, by: Instant, send: impl FnOnce(Call<'c>) -> F) -> Result<T>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        if Instant::now() >= by {
            return Err(DedupError::DeadlineExceeded);
        }
        let sent = send(budget.call.send_by(by));
        match tokio::time::timeout_at(by + self.settings.write_grace, sent).await {
            Ok(Err(ApiError::NotSent)) => Err(DedupError::DeadlineExceeded),
            Ok(answer) => answer.map_err(DedupError::Api),
            Err(_) => Err(DedupError::Unanswered),
        }
    }
}

/// Runs an API call, failing with DeadlineExceeded when the batch deadline passes first.
async fn within<T>(deadline: Instant, fut: impl Future<Output = Result<T, ApiError>>) -> Result<T> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r.map_err(DedupError::Api),
        Err(_) => Err(DedupError::DeadlineExceeded),
    }
}
