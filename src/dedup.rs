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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use tokio::time::Instant;

use crate::absorb::{self, Absorbs};
use crate::clock::{SharedClock, rfc3339};
use crate::cluster::{ApiError, Call, Cluster, Tally};
use crate::crd::{Deduplication, RemediationRequest, RemediationRequestSpec};
use crate::fingerprint::Fingerprint;
use crate::hints::{HintCache, Landed, Newer, WatchTask};
use crate::lock::{Attempt, FenceError, LeaseLock, LockGuard, backoff};
use crate::metrics::Metrics;
use crate::ownership::{OwnerFence, Ownership};
use crate::signal::Source;

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

/// What covers a create: the fingerprint's Lease, or this replica's ownership of its shard.
enum CreateFence<'a> {
    Lock(&'a LockGuard),
    Owner(OwnerFence),
}

impl CreateFence<'_> {
    async fn fence(&self, name: &str, needed: Duration, call: Call<'_>) -> std::result::Result<Instant, FenceError> {
        match self {
            CreateFence::Lock(guard) => guard.fence(name, needed, call).await,
            CreateFence::Owner(owner) => owner.send_by(),
        }
    }

    /// The name a previous holder of the Lease was creating (ownership hands no name over: an
    /// owner's predecessor stopped creating before the shard could move).
    fn inherited(&self) -> Option<&str> {
        match self {
            CreateFence::Lock(guard) => guard.inherited(),
            CreateFence::Owner(_) => None,
        }
    }
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

    /// Takes the lock (waiting while another replica holds it), then decides again under it.
    /// With `watch_for_rr`, a waiter polls for the RR the holder creates and counts into it.
    /// `guess`: the RR name this replica expects to create (recorded with the Lease).
    async fn create_locked(
        &self,
        fp: &Fingerprint,
        n: &Batch,
        spec: &RemediationRequestSpec,
        budget: Budget<'_>,
        watch_for_rr: bool,
        guess: &str,
    ) -> Result<Step> {
        let started = Instant::now();
        let mut attempt = 0;
        let guard = loop {
            let tried = within(budget.deadline, self.lock.try_acquire(fp, Some(guess), budget.call)).await;
            match tried {
                Ok(Attempt::Acquired(guard)) => break guard,
                Ok(Attempt::Held { holder, expires_in }) => {
                    let pause = backoff(attempt, self.settings.backoff_initial, self.settings.backoff_max);
                    attempt += 1;
                    self.metrics.retries.with_label_values(&["lock_contended"]).inc();
                    if Instant::now() + pause >= budget.deadline {
                        self.lock_failed(started, "timeout");
                        return Err(DedupError::LockTimeout { holder, expires_in });
                    }
                    if watch_for_rr && self.hints.is_synced() {
                        // The holder's RR arrives through the watch: count into it as soon as
                        // it does (a hint, verified by the conditional update).
                        if let Some(active) = self.hints.wait_active(fp, Instant::now() + pause).await {
                            self.metrics.lock_wait.observe(started.elapsed().as_secs_f64());
                            return self.increment(fp, active, n, budget).await;
                        }
                        continue;
                    }
                    tokio::time::sleep(pause).await;
                    if watch_for_rr {
                        let existing = self
                            .lookup(fp, budget)
                            .await
                            .inspect_err(|_| self.lock_failed(started, "api_error"))?;
                        if let Some(active) = self.pick(&existing) {
                            self.metrics.lock_wait.observe(started.elapsed().as_secs_f64());
                            return self.increment(fp, active, n, budget).await;
                        }
                    }
                }
                Err(e) => {
                    self.lock_failed(
                        started,
                        if matches!(e, DedupError::DeadlineExceeded) {
                            "timeout"
                        } else {
                            "api_error"
                        },
                    );
                    return Err(e);
                }
            }
        };
        self.metrics.lock_wait.observe(started.elapsed().as_secs_f64());
        match Box::pin(self.create_under_lock(fp, n, spec, budget, &CreateFence::Lock(&guard))).await {
            // A create whose outcome is unknown: the Lease (naming it) stays until it expires, so
            // whoever creates next creates the same name, never a second RR (ADR 0011).
            Err(Unresolved(e)) => {
                guard.abandon().await;
                Err(e)
            }
            Ok(result) => {
                guard.release(budget.call).await;
                result
            }
        }
    }

    fn lock_failed(&self, started: Instant, reason: &str) {
        self.metrics.lock_wait.observe(started.elapsed().as_secs_f64());
        self.metrics.lock_failures.with_label_values(&[reason]).inc();
    }

    /// Under the lock: a fresh list decides; then the create, fenced by the Lease. `Err` only for
    /// a create whose outcome is unknown (the Lease must then be left to expire).
    #[tracing::instrument(name = "dedup.create", skip_all, fields(rr_name = tracing::field::Empty))]
    async fn create_under_lock(
        &self,
        fp: &Fingerprint,
        n: &Batch,
        spec: &RemediationRequestSpec,
        budget: Budget<'_>,
        guard: &CreateFence<'_>,
    ) -> std::result::Result<Result<Step>, Unresolved> {
        let existing = match self.lookup(fp, budget).await {
            Ok(existing) => existing,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(active) = self.pick(&existing) {
            return Ok(self.increment(fp, active, n, budget).await);
        }
        // One past the highest generation listed — or the name a previous holder of this Lease
        // was creating, if that is higher: its create may still land (ADR 0011).
        let name = name_to_create(fp, &existing, guard.inherited());
        tracing::Span::current().record("rr_name", name.as_str());
        let rr = RemediationRequest {
            metadata: creation_metadata(&name, &self.settings.namespace, self.clock.now()),
            spec: spec.clone(),
            status: None,
        };
        // The create is sent only while the Lease covers it; when no API request slot frees up
        // in time, the fence renews the Lease and the create waits again, up to the deadline.
        let sent = loop {
            let send_by = match guard.fence(&name, self.settings.write_grace, budget.call).await {
                Ok(send_by) => send_by,
                Err(FenceError::Api(e)) => return Ok(Err(DedupError::Api(e))),
                // Another replica took the Lease over and creates (the name we would have): decide
                // again, counting into what it creates.
                Err(FenceError::Lost) => {
                    self.metrics.retries.with_label_values(&["lock_lost"]).inc();
                    return Ok(Ok(Step::Gone));
                }
                // Ownership about to lapse: the Lease-guarded path decides instead.
                Err(FenceError::Expiring) if matches!(guard, CreateFence::Owner(_)) => return Ok(Ok(Step::Gone)),
                // The renewal itself took too long (a saturated API server): try again while the
                // deadline allows.
                Err(FenceError::Expiring) if Instant::now() < budget.deadline => continue,
                Err(FenceError::Expiring) => return Ok(Err(DedupError::LockLost)),
            };
            match self
                .write(budget, budget.deadline.min(send_by), |call| {
                    self.cluster.create_request(call, &rr)
                })
                .await
            {
                Err(DedupError::DeadlineExceeded) if Instant::now() < budget.deadline => continue,
                other => break other,
            }
        };
        let created = match sent {
            Ok(created) => {
                self.hints.observe(&created);
                // Labelled by ingestion source like the other signal metrics.
                let source = Source::from_spec(spec).map_or("other", |s| s.as_str());
                self.metrics.crds_created.with_label_values(&[source]).inc();
                created
            }
            // Someone created it first (a previous holder of the Lease): count into it.
            Err(DedupError::Api(ApiError::AlreadyExists)) => {
                self.metrics.retries.with_label_values(&["already_exists"]).inc();
                return Ok(self.count_into_named(fp, &name, n, budget).await);
            }
            // Sent, answer lost: whether it was stored decides everything. Read it back.
            Err(e) if ambiguous(&e) => {
                tracing::warn!(rr_name = %name, error = %e, "create unanswered; reading it back");
                return match within(
                    budget.deadline + self.settings.write_grace,
                    self.cluster.get_request(budget.call, &self.settings.namespace, &name),
                )
                .await
                {
                    Ok(stored) => {
                        self.hints.observe(&stored);
                        Ok(self.increment(fp, stored, n, budget).await.map(|step| match step {
                            // Our create landed (or an identical name's): the first count is ours.
                            Step::Done(mut w) => {
                                w.created = w.before == 0;
                                Step::Done(w)
                            }
                            gone => gone,
                        }))
                    }
                    // Not there (yet): it may still land; leave the Lease naming it.
                    Err(_) => Err(Unresolved(e)),
                };
            }
            // Not sent, or refused: certainly not stored.
            Err(e) => return Ok(Err(e)),
        };
        Ok(match self.increment(fp, created, n, budget).await {
            Ok(Step::Done(mut w)) => {
                // This batch created the RR, even if a waiting replica's count landed first.
                w.created = true;
                Ok(Step::Done(w))
            }
            other => other,
        })
    }

    /// Counts into RR `name`, read fresh (it exists: our create met AlreadyExists).
    async fn count_into_named(&self, fp: &Fingerprint, name: &str, n: &Batch, budget: Budget<'_>) -> Result<Step> {
        match within(
            budget.deadline,
            self.cluster.get_request(budget.call, &self.settings.namespace, name),
        )
        .await
        {
            Ok(theirs) => {
                self.hints.observe(&theirs);
                self.increment(fp, theirs, n, budget).await
            }
            Err(DedupError::Api(ApiError::NotFound)) => Ok(Step::Gone),
            Err(e) => Err(e),
        }
    }

    /// Adds `n` to the RR's count with a resourceVersion-conditioned status update, refreshing
    /// on Conflict. `Gone` when the RR turned terminal or disappeared.
    async fn increment(&self, fp: &Fingerprint, rr: RemediationRequest, n: &Batch, budget: Budget<'_>) -> Result<Step> {
        Ok(self.increment_counted(fp, rr, n, budget).await?.0)
    }

    /// [`Self::increment`], also returning how many conflicts it met.
    #[tracing::instrument(name = "dedup.status_update", skip_all, fields(rr_name = rr.metadata.name.as_deref().unwrap_or_default(), attempts = tracing::field::Empty))]
    async fn increment_counted(
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
}

impl Dedup {
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
fn ambiguous(e: &DedupError) -> bool {
    matches!(
        e,
        DedupError::Unanswered | DedupError::Api(ApiError::Timeout | ApiError::Unavailable(_))
    )
}

/// Runs an API call, failing with DeadlineExceeded when the batch deadline passes first.
async fn within<T>(deadline: Instant, fut: impl Future<Output = Result<T, ApiError>>) -> Result<T> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r.map_err(DedupError::Api),
        Err(_) => Err(DedupError::DeadlineExceeded),
    }
}

/// Labels and annotations of a request the gateway creates, as Kubernaut's gateway sets them.
pub fn creation_metadata(name: &str, namespace: &str, now: jiff::Timestamp) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(
            [
                ("app.kubernetes.io/managed-by".to_owned(), "gateway-service".to_owned()),
                ("app.kubernetes.io/component".to_owned(), "remediation".to_owned()),
            ]
            .into(),
        ),
        annotations: Some([("kubernaut.ai/created-at".to_owned(), rfc3339(now))].into()),
        ..ObjectMeta::default()
    }
}

/// A create whose outcome is unknown (sent, answer lost, not found on reading it back).
struct Unresolved(DedupError);

/// `rr-<fp[:16]>-<generation>`.
pub fn generation_name(fp: &Fingerprint, generation: u64) -> String {
    format!("rr-{}-{generation}", fp.short())
}

/// The generation of RR `name` of `fp`, if it is named by the rule above.
pub fn generation_of(fp: &Fingerprint, name: &str) -> Option<u64> {
    name.strip_prefix("rr-")?
        .strip_prefix(fp.short())?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// Deterministic name of the next RR for `fp`: one past the highest generation listed. Two
/// creators that saw the same list pick the same name.
pub fn next_name(fp: &Fingerprint, existing: &[RemediationRequest]) -> String {
    let highest = existing
        .iter()
        .filter_map(|rr| generation_of(fp, rr.metadata.name.as_deref()?))
        .max()
        .unwrap_or(0);
    generation_name(fp, highest + 1)
}

/// The name to create under the lock: [`next_name`], unless the previous holder of the Lease was
/// creating a later generation (not listed yet: its create may still land), then that one.
fn name_to_create(fp: &Fingerprint, existing: &[RemediationRequest], inherited: Option<&str>) -> String {
    let next = next_name(fp, existing);
    match inherited {
        Some(name) if generation_of(fp, name) >= generation_of(fp, &next) => name.to_owned(),
        _ => next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::backend::faults::{Fault, Faulty, Op};
    use std::collections::HashMap;
    use std::sync::Mutex;

    use crate::clock::SystemClock;
    use crate::crd::TargetResource;

    fn fp() -> Fingerprint {
        Fingerprint::of(
            "",
            &TargetResource {
                kind: "Pod".into(),
                name: "p".into(),
                namespace: "n".into(),
                api_version: String::new(),
            },
        )
    }

    fn spec() -> RemediationRequestSpec {
        RemediationRequestSpec::example(fp().as_str())
    }

    fn replica(cluster: Arc<dyn Cluster>, holder: &str) -> (Dedup, Metrics) {
        replica_with(cluster, holder, false)
    }

    /// A replica; with `watch`, its hints are fed by a watch of the store.
    fn replica_with(cluster: Arc<dyn Cluster>, holder: &str, watch: bool) -> (Dedup, Metrics) {
        let clock: SharedClock = Arc::new(SystemClock);
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let lock = LeaseLock::new(
            cluster.clone(),
            clock.clone(),
            "ns".into(),
            holder.into(),
            Duration::from_secs(30),
            metrics.clone(),
        );
        let settings = Settings {
            namespace: "ns".into(),
            strategy: Strategy::Optimistic,
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(10),
            write_grace: Duration::from_millis(100),
            watch,
            watch_wait: Duration::from_millis(20),
        };
        (Dedup::new(cluster, lock, clock, metrics.clone(), settings), metrics)
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    async fn seed(store: &EmbeddedStore, name: &str, phase: &str, count: i32) {
        seed_status(
            store,
            name,
            serde_json::json!({"overallPhase": (!phase.is_empty()).then_some(phase)}),
            count,
        )
        .await;
    }

    /// An RR `name` whose orchestrator-owned status is `status`, counted `count` times.
    async fn seed_status(store: &EmbeddedStore, name: &str, status: serde_json::Value, count: i32) {
        let rr = RemediationRequest {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: spec(),
            status: None,
        };
        let created = store.create_request(Call::UNCOUNTED, &rr).await.unwrap();
        let dedup = Deduplication {
            first_seen_at: "2026-11-24T10:00:00Z".into(),
            last_seen_at: "2026-11-24T10:00:00Z".into(),
            occurrence_count: count,
        };
        let rv = created.metadata.resource_version.unwrap();
        store
            .update_deduplication(Call::UNCOUNTED, "ns", name, &rv, &dedup)
            .await
            .unwrap();
        store.patch_status("ns", name, &status).unwrap();
    }

    fn count_of(rr: &RemediationRequest) -> i32 {
        rr.occurrence_count()
    }

    /// Polls (with a deadline, never a fixed sleep) until `d`'s hints satisfy `ready`.
    async fn until_hints(d: &Dedup, what: &str, ready: impl Fn(&HintCache) -> bool) {
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while !ready(d.hints()) {
            assert!(std::time::Instant::now() < give_up, "hints never {what}");
            tokio::task::yield_now().await;
        }
    }

    /// Calls per operation (by its Debug name).
    type Calls = Arc<Mutex<HashMap<String, usize>>>;

    /// Counts the calls of each operation that pass through.
    fn counting(
        store: Arc<EmbeddedStore>,
        hook: impl Fn(Op) -> Fault + Send + Sync + 'static,
    ) -> (Arc<dyn Cluster>, Calls) {
        let calls: Calls = Arc::default();
        let c = calls.clone();
        let cluster = Arc::new(Faulty::new(store, move |op| {
            *c.lock().unwrap().entry(format!("{op:?}")).or_default() += 1;
            hook(op)
        }));
        (cluster, calls)
    }

    fn calls_of(calls: &Mutex<HashMap<String, usize>>, op: Op) -> usize {
        calls.lock().unwrap().get(&format!("{op:?}")).copied().unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hint_kept_fresh_by_another_writers_change_avoids_the_conflict() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        let (a, am) = replica_with(store.clone(), "a", true);
        let (b, _) = replica_with(store.clone(), "b", true);
        a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        for _ in 0..5 {
            b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        }
        let newest = store.all_requests()[0].metadata.resource_version.clone();
        until_hints(&a, "caught up with b's writes", |h| {
            h.active(&fp()).and_then(|rr| rr.metadata.resource_version) == newest
        })
        .await;
        let w = a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert_eq!(w.before, 6);
        assert_eq!(am.status_conflicts.get(), 0, "the watch delivered b's writes first");
        assert_eq!(count_of(&store.all_requests()[0]), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unsynced_watch_falls_back_to_fresh_reads_and_a_synced_one_skips_the_list_before_the_lock() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        // Without a synced watch (it never lists): exactly the behaviour without one.
        let (blind, calls) = counting(store.clone(), |op| match op {
            Op::WatchRequests => Fault::Hang,
            _ => Fault::Pass,
        });
        let (a, _) = replica_with(blind.clone(), "a", true);
        let (b, _) = replica_with(blind, "b", true);
        a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert_eq!(
            calls_of(&calls, Op::ListRequests),
            2,
            "create: a list before and one under the lock"
        );
        b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert_eq!(
            calls_of(&calls, Op::ListRequests),
            3,
            "a duplicate on a fresh replica lists"
        );
        b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert_eq!(calls_of(&calls, Op::ListRequests), 3, "then its own write is the hint");
        a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert_eq!(
            calls_of(&calls, Op::GetRequest),
            1,
            "a's outdated hint: 409, then a GET"
        );
        assert_eq!(count_of(&store.all_requests()[0]), 4);

        // With a synced watch that knows of no active RR: only the list under the lock.
        let other = Fingerprint::parse(&"e".repeat(64)).unwrap();
        let other_spec = RemediationRequestSpec {
            signal_fingerprint: other.to_string(),
            ..spec()
        };
        let (seeing, calls) = counting(store.clone(), |_| Fault::Pass);
        let (c, cm) = replica_with(seeing, "c", true);
        until_hints(&c, "synced", HintCache::is_synced).await;
        let w = c.process(&other, 1, &other_spec, deadline()).await.unwrap();
        assert!(w.created);
        assert_eq!(calls_of(&calls, Op::ListRequests), 1, "only the list under the lock");
        assert_eq!(cm.hint_lookups.with_label_values(&["absent"]).get(), 1);
        assert_eq!(store.all_requests().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_watch_never_creates_a_duplicate_or_loses_a_count() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        // a's watch stalls after its first list (a lagging watch): everything it believes is old.
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (f, g) = (frozen.clone(), gate.clone());
        let stalled = Arc::new(Faulty::new(store.clone(), move |op| {
            if op == Op::WatchEvent && f.load(std::sync::atomic::Ordering::SeqCst) {
                Fault::Gate(g.clone())
            } else {
                Fault::Pass
            }
        }));
        let (a, am) = replica_with(stalled, "a", true);
        let (b, _) = replica_with(store.clone(), "b", true);
        until_hints(&a, "synced", HintCache::is_synced).await;
        frozen.store(true, std::sync::atomic::Ordering::SeqCst);

        // The watch says "no RR" but b created one: the list under the lock finds it.
        assert!(b.process(&fp(), 1, &spec(), deadline()).await.unwrap().created);
        assert!(a.hints().knows_none_active(&fp()), "a's watch missed b's create");
        let w = a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert!(!w.created, "counted into b's RR, not a second one");
        assert_eq!(store.all_requests().len(), 1);

        // b writes on; a's hint (its own write) is outdated and the watch delivers nothing:
        // 409, a bounded wait, a GET, and the retry counts exactly.
        for _ in 0..3 {
            b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        }
        let w = a.process(&fp(), 2, &spec(), deadline()).await.unwrap();
        assert_eq!(w.before, 5);
        assert_eq!(am.conflict_refreshes.with_label_values(&["get"]).get(), 1);

        // The RR is closed behind a's back: a never counts into it and opens generation 2.
        let first = store.all_requests()[0].metadata.name.clone().unwrap();
        store.set_phase("ns", &first, "Completed").unwrap();
        let w = a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert!(w.created);
        assert_eq!(w.rr.metadata.name.unwrap(), format!("rr-{}-2", fp().short()));
        let rrs = store.all_requests();
        assert_eq!(rrs.len(), 2);
        assert_eq!(count_of(&rrs[0]), 7, "the closed RR kept every count it acknowledged");
        assert_eq!(count_of(&rrs[1]), 1);
        assert!(store.all_leases().is_empty());
        gate.close();
    }

    #[tokio::test]
    async fn a_creator_that_missed_an_existing_request_counts_into_it_via_already_exists() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        seed(&store, &format!("rr-{}-1", fp().short()), "", 3).await;
        // Lists come back empty (as from a stale cache): only the deterministic name saves us.
        let blind = Arc::new(Faulty::new(store.clone(), |op| {
            if op == Op::ListRequests {
                Fault::HideResults
            } else {
                Fault::Pass
            }
        }));
        let (d, _) = replica(blind, "a");
        let w = d.process(&fp(), 2, &spec(), deadline()).await.unwrap();
        assert!(!w.created);
        assert_eq!(w.before, 3);
        assert_eq!(store.all_requests().len(), 1);
        assert_eq!(
            store.all_requests()[0]
                .status
                .as_ref()
                .unwrap()
                .deduplication
                .as_ref()
                .unwrap()
                .occurrence_count,
            5
        );
        assert!(store.all_leases().is_empty());
    }

    #[tokio::test]
    async fn terminal_requests_are_never_counted_into_and_the_next_generation_is_created() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        for (i, phase) in crate::crd::TERMINAL_PHASES.iter().enumerate() {
            seed(&store, &format!("rr-{}-{}", fp().short(), i + 1), phase, 7).await;
        }
        let (d, _) = replica(store.clone(), "a");
        let w = d.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert!(w.created);
        assert_eq!(w.rr.metadata.name.unwrap(), format!("rr-{}-6", fp().short()));
        assert_eq!(store.all_requests().len(), 6);
    }

    #[tokio::test]
    async fn a_stale_hint_costs_a_conflict_and_a_reread_never_a_lost_count() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        let (a, am) = replica(store.clone(), "a");
        let (b, _) = replica(store.clone(), "b");
        a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        for _ in 0..5 {
            b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        }
        let w = a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
        assert_eq!(w.before, 6);
        assert_eq!(am.status_conflicts.get(), 1);
        assert_eq!(
            store.all_requests()[0]
                .status
                .as_ref()
                .unwrap()
                .deduplication
                .as_ref()
                .unwrap()
                .occurrence_count,
            7
        );
    }

    #[tokio::test]
    async fn errors_other_than_not_found_are_errors_not_absence() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        let forbidden = Arc::new(Faulty::new(store.clone(), |op| match op {
            Op::ListRequests => Fault::Fail(ApiError::Forbidden("no list".into())),
            _ => Fault::Pass,
        }));
        let (d, _) = replica(forbidden, "a");
        let err = d.process(&fp(), 1, &spec(), deadline()).await.unwrap_err();
        assert!(matches!(err, DedupError::Api(ApiError::Forbidden(_))), "{err:?}");
        assert!(
            store.all_requests().is_empty(),
            "a failed lookup never leads to a create"
        );
    }

    #[tokio::test]
    async fn a_hung_api_call_ends_at_the_deadline() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        let hung = Arc::new(Faulty::new(store.clone(), |_| Fault::Hang));
        let (d, _) = replica(hung, "a");
        let err = d
            .process(&fp(), 1, &spec(), Instant::now() + Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, DedupError::DeadlineExceeded), "{err:?}");
    }

    #[test]
    fn next_name_is_one_past_the_highest_generation() {
        let named = |n: &str| RemediationRequest {
            metadata: ObjectMeta {
                name: Some(n.into()),
                ..Default::default()
            },
            spec: spec(),
            status: None,
        };
        let p = fp().short().to_owned();
        assert_eq!(next_name(&fp(), &[]), format!("rr-{p}-1"));
        assert_eq!(
            next_name(
                &fp(),
                &[named(&format!("rr-{p}-2")), named(&format!("rr-{p}-9")), named("other")]
            ),
            format!("rr-{p}-10")
        );
    }
}
