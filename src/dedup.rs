//! The deduplication decision: count a signal into the active RemediationRequest for its
//! fingerprint, or create one under the per-fingerprint lease lock.
//!
//! `optimistic` (default): duplicates never take the lock. The replica's last known RR for the
//! fingerprint (a hint) or a fresh field-selected list finds the active RR; a status update
//! conditioned on its resourceVersion adds the count, re-reading and retrying on Conflict. Only
//! when no active RR exists does the lease lock guard creation: re-check under the lock, create
//! with a deterministic name (so a second creator gets AlreadyExists and counts instead), then set
//! the initial count. While another replica holds the lock we poll for the RR it creates and count
//! into it, so a contended signal is never dropped.
//!
//! `always-lock`: the original Kubernaut order (lock, look up, update or create, release) for
//! every signal; kept to measure the difference.
//!
//! Every API call is bounded by the batch deadline; on expiry the caller answers 503.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use tokio::time::Instant;

use crate::clock::{SharedClock, rfc3339};
use crate::cluster::{ApiError, Cluster};
use crate::crd::{Deduplication, RemediationRequest, RemediationRequestSpec, phase_is_active};
use crate::fingerprint::Fingerprint;
use crate::lock::{Attempt, LeaseLock, LockGuard, backoff};
use crate::metrics::Metrics;
use crate::signal::Source;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
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
    #[error("{0}")]
    Internal(String),
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
            DedupError::Internal(_) => "internal",
        }
    }

    /// Suggested Retry-After.
    pub fn retry_after(&self) -> Duration {
        match self {
            DedupError::Api(ApiError::Throttled { retry_after: Some(d) }) => *d,
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
    /// This batch created the RR.
    pub created: bool,
}

enum Step {
    Done(Box<Written>),
    /// The RR we aimed at is terminal or gone: decide again from a fresh read.
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
}

pub struct Dedup {
    cluster: Arc<dyn Cluster>,
    lock: LeaseLock,
    clock: SharedClock,
    metrics: Metrics,
    settings: Settings,
    /// Last RR written per fingerprint: a hint, always verified by a conditional write.
    hints: Mutex<HashMap<Fingerprint, RemediationRequest>>,
}

const HINTS_MAX: usize = 20_000;

impl Dedup {
    pub fn new(
        cluster: Arc<dyn Cluster>,
        lock: LeaseLock,
        clock: SharedClock,
        metrics: Metrics,
        settings: Settings,
    ) -> Self {
        Dedup {
            cluster,
            lock,
            clock,
            metrics,
            settings,
            hints: Mutex::default(),
        }
    }

    pub fn strategy(&self) -> Strategy {
        self.settings.strategy
    }

    /// Adds `n` occurrences of `fp` (creating the RR from `spec` if none is active), answering
    /// only once the write is stored.
    #[tracing::instrument(name = "dedup", skip_all, fields(fingerprint = %fp, n, strategy = self.settings.strategy.as_str()))]
    pub async fn process(
        &self,
        fp: &Fingerprint,
        n: u32,
        spec: &RemediationRequestSpec,
        deadline: Instant,
    ) -> Result<Written> {
        match self.settings.strategy {
            Strategy::Optimistic => self.optimistic(fp, n, spec, deadline).await,
            Strategy::AlwaysLock => self.always_lock(fp, n, spec, deadline).await,
        }
    }

    async fn optimistic(
        &self,
        fp: &Fingerprint,
        n: u32,
        spec: &RemediationRequestSpec,
        deadline: Instant,
    ) -> Result<Written> {
        let hint = self.hints.lock().expect("hints poisoned").get(fp).cloned();
        if let Some(rr) = hint {
            match self.increment(fp, rr, n, deadline).await? {
                Step::Done(w) => {
                    self.metrics.hint_lookups.with_label_values(&["hit"]).inc();
                    return Ok(*w);
                }
                Step::Gone => {
                    self.metrics.hint_lookups.with_label_values(&["stale"]).inc();
                    self.hints.lock().expect("hints poisoned").remove(fp);
                }
            }
        } else {
            self.metrics.hint_lookups.with_label_values(&["miss"]).inc();
        }
        loop {
            let existing = self.lookup(fp, deadline).await?;
            if let Some(active) = pick_active(&existing) {
                if let Step::Done(w) = self.increment(fp, active, n, deadline).await? {
                    return Ok(*w);
                }
                self.metrics.retries.with_label_values(&["gone"]).inc();
                continue;
            }
            if let Step::Done(w) = self.create_locked(fp, n, spec, deadline, true).await? {
                return Ok(*w);
            }
            self.metrics.retries.with_label_values(&["gone"]).inc();
        }
    }

    async fn always_lock(
        &self,
        fp: &Fingerprint,
        n: u32,
        spec: &RemediationRequestSpec,
        deadline: Instant,
    ) -> Result<Written> {
        loop {
            if let Step::Done(w) = self.create_locked(fp, n, spec, deadline, false).await? {
                return Ok(*w);
            }
            self.metrics.retries.with_label_values(&["gone"]).inc();
        }
    }

    /// Fresh, server-side field-selected list of every RR with this fingerprint.
    #[tracing::instrument(name = "dedup.lookup", skip_all)]
    async fn lookup(&self, fp: &Fingerprint, deadline: Instant) -> Result<Vec<RemediationRequest>> {
        within(
            deadline,
            self.cluster.list_requests(&self.settings.namespace, fp.as_str()),
        )
        .await
    }

    /// Takes the lock (waiting while another replica holds it), then decides again under it.
    /// With `watch_for_rr`, a waiter polls for the RR the holder creates and counts into it.
    async fn create_locked(
        &self,
        fp: &Fingerprint,
        n: u32,
        spec: &RemediationRequestSpec,
        deadline: Instant,
        watch_for_rr: bool,
    ) -> Result<Step> {
        let started = Instant::now();
        let mut attempt = 0;
        let guard = loop {
            let tried = within(deadline, self.lock.try_acquire(fp)).await;
            match tried {
                Ok(Attempt::Acquired(guard)) => break guard,
                Ok(Attempt::Held { holder, expires_in }) => {
                    let pause = backoff(attempt, self.settings.backoff_initial, self.settings.backoff_max);
                    attempt += 1;
                    self.metrics.retries.with_label_values(&["lock_contended"]).inc();
                    if Instant::now() + pause >= deadline {
                        self.lock_failed(started, "timeout");
                        return Err(DedupError::LockTimeout { holder, expires_in });
                    }
                    tokio::time::sleep(pause).await;
                    if watch_for_rr {
                        let existing = self
                            .lookup(fp, deadline)
                            .await
                            .inspect_err(|_| self.lock_failed(started, "api_error"))?;
                        if let Some(active) = pick_active(&existing) {
                            self.metrics.lock_wait.observe(started.elapsed().as_secs_f64());
                            return self.increment(fp, active, n, deadline).await;
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
        let result = self.create_under_lock(fp, n, spec, deadline, &guard).await;
        guard.release().await;
        result
    }

    fn lock_failed(&self, started: Instant, reason: &str) {
        self.metrics.lock_wait.observe(started.elapsed().as_secs_f64());
        self.metrics.lock_failures.with_label_values(&[reason]).inc();
    }

    #[tracing::instrument(name = "dedup.create", skip_all, fields(rr_name = tracing::field::Empty))]
    async fn create_under_lock(
        &self,
        fp: &Fingerprint,
        n: u32,
        spec: &RemediationRequestSpec,
        deadline: Instant,
        _held: &LockGuard,
    ) -> Result<Step> {
        let existing = self.lookup(fp, deadline).await?;
        if let Some(active) = pick_active(&existing) {
            return self.increment(fp, active, n, deadline).await;
        }
        let name = next_name(fp, &existing);
        tracing::Span::current().record("rr_name", name.as_str());
        let rr = RemediationRequest {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                labels: Some([("app.kubernetes.io/managed-by".to_owned(), "signal-gateway".to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: spec.clone(),
            status: None,
        };
        let created = match self.write(deadline, self.cluster.create_request(&rr)).await {
            Ok(created) => {
                // Labelled by ingestion source like the other signal metrics ("prometheus", not the
                // spec's "prometheus-alert").
                let source =
                    Source::from_signal_type(&spec.signal_type).map_or(spec.signal_type.as_str(), |s| s.as_str());
                self.metrics.crds_created.with_label_values(&[source]).inc();
                created
            }
            // Someone created it first (e.g. our lease expired under a paused process): count into it.
            Err(DedupError::Api(ApiError::AlreadyExists)) => {
                self.metrics.retries.with_label_values(&["already_exists"]).inc();
                match within(deadline, self.cluster.get_request(&self.settings.namespace, &name)).await {
                    Ok(theirs) => return self.increment(fp, theirs, n, deadline).await,
                    Err(DedupError::Api(ApiError::NotFound)) => return Ok(Step::Gone),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        Ok(match self.increment(fp, created, n, deadline).await? {
            Step::Done(mut w) => {
                // This batch created the RR, even if a waiting replica's count landed first.
                w.created = true;
                Step::Done(w)
            }
            Step::Gone => Step::Gone,
        })
    }

    /// Adds `n` to the RR's count with a resourceVersion-conditioned status update, re-reading
    /// on Conflict. `Gone` when the RR turned terminal or disappeared.
    #[tracing::instrument(name = "dedup.status_update", skip_all, fields(rr_name = rr.metadata.name.as_deref().unwrap_or_default(), attempts = tracing::field::Empty))]
    async fn increment(&self, fp: &Fingerprint, mut rr: RemediationRequest, n: u32, deadline: Instant) -> Result<Step> {
        let name = rr.metadata.name.clone().unwrap_or_default();
        for attempt in 1.. {
            tracing::Span::current().record("attempts", attempt);
            if rr.spec.signal_fingerprint != fp.as_str() {
                return Err(DedupError::Internal(format!(
                    "RemediationRequest {name} belongs to another fingerprint"
                )));
            }
            let status = rr.status.clone().unwrap_or_default();
            if !phase_is_active(&status.overall_phase) {
                return Ok(Step::Gone);
            }
            let before = status.deduplication.as_ref().map_or(0, |d| d.occurrence_count);
            let now = rfc3339(self.clock.now());
            let mut next = rr.clone();
            next.status.get_or_insert_with(Default::default).deduplication = Some(Deduplication {
                first_seen_at: status
                    .deduplication
                    .as_ref()
                    .map_or_else(|| now.clone(), |d| d.first_seen_at.clone()),
                last_seen_at: now,
                occurrence_count: before + i64::from(n),
            });
            match self.write(deadline, self.cluster.update_request_status(&next)).await {
                Ok(updated) => {
                    self.metrics.occurrences.inc_by(u64::from(n));
                    let mut hints = self.hints.lock().expect("hints poisoned");
                    if hints.len() >= HINTS_MAX {
                        hints.clear();
                    }
                    hints.insert(fp.clone(), updated.clone());
                    return Ok(Step::Done(Box::new(Written {
                        rr: updated,
                        before,
                        created: false,
                    })));
                }
                Err(DedupError::Api(ApiError::Conflict(_))) => {
                    self.metrics.status_conflicts.inc();
                    self.metrics.retries.with_label_values(&["conflict"]).inc();
                    rr = match within(deadline, self.cluster.get_request(&self.settings.namespace, &name)).await {
                        Ok(fresh) => fresh,
                        Err(DedupError::Api(ApiError::NotFound)) => return Ok(Step::Gone),
                        Err(e) => return Err(e),
                    };
                    if attempt > 3 {
                        // Heavy contention on one RR: spread the retries out a little.
                        tokio::time::sleep(backoff(
                            attempt - 3,
                            self.settings.backoff_initial,
                            self.settings.backoff_max,
                        ))
                        .await;
                    }
                }
                Err(DedupError::Api(ApiError::NotFound)) => return Ok(Step::Gone),
                Err(e) => return Err(e),
            }
        }
        unreachable!("the retry loop only ends by returning")
    }
}

impl Dedup {
    /// Upper bound on how long past its deadline a batch may take (see `Settings::write_grace`).
    pub fn write_grace(&self) -> Duration {
        self.settings.write_grace
    }

    /// Sends a write only while the deadline has not passed, then waits for its outcome up to
    /// `write_grace` beyond the deadline instead of abandoning it mid-flight.
    async fn write<T>(&self, deadline: Instant, fut: impl Future<Output = Result<T, ApiError>>) -> Result<T> {
        if Instant::now() >= deadline {
            return Err(DedupError::DeadlineExceeded);
        }
        within(deadline + self.settings.write_grace, fut).await
    }
}

/// Runs an API call, failing with DeadlineExceeded when the batch deadline passes first.
async fn within<T>(deadline: Instant, fut: impl Future<Output = Result<T, ApiError>>) -> Result<T> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r.map_err(DedupError::Api),
        Err(_) => Err(DedupError::DeadlineExceeded),
    }
}

/// The oldest active RR (there should be at most one).
fn pick_active(rrs: &[RemediationRequest]) -> Option<RemediationRequest> {
    let mut active: Vec<&RemediationRequest> = rrs
        .iter()
        .filter(|rr| phase_is_active(rr.status.as_ref().map_or("", |s| s.overall_phase.as_str())))
        .collect();
    if active.len() > 1 {
        tracing::error!(
            count = active.len(),
            "more than one active RemediationRequest for one fingerprint"
        );
    }
    active.sort_by(|a, b| {
        (a.metadata.creation_timestamp.as_ref().map(|t| t.0), &a.metadata.name)
            .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), &b.metadata.name))
    });
    active.first().map(|rr| (*rr).clone())
}

/// Deterministic name of the next RR for `fp`: `rr-<fp[:16]>-<generation>`, one past the highest
/// generation listed. Two creators that saw the same list pick the same name.
pub fn next_name(fp: &Fingerprint, existing: &[RemediationRequest]) -> String {
    let prefix = format!("rr-{}-", fp.short());
    let highest = existing
        .iter()
        .filter_map(|rr| rr.metadata.name.as_deref()?.strip_prefix(&prefix)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("{prefix}{}", highest + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::backend::faults::{Fault, Faulty, Op};
    use crate::clock::SystemClock;
    use crate::crd::{RemediationRequestStatus, TargetResource};

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
        RemediationRequestSpec {
            signal_fingerprint: fp().to_string(),
            signal_name: "A".into(),
            ..Default::default()
        }
    }

    fn replica(cluster: Arc<dyn Cluster>, holder: &str) -> (Dedup, Metrics) {
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
        };
        (Dedup::new(cluster, lock, clock, metrics.clone(), settings), metrics)
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    async fn seed(store: &EmbeddedStore, name: &str, phase: &str, count: i64) {
        let rr = RemediationRequest {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: spec(),
            status: None,
        };
        let mut created = store.create_request(&rr).await.unwrap();
        created.status = Some(RemediationRequestStatus {
            deduplication: Some(Deduplication {
                first_seen_at: "t".into(),
                last_seen_at: "t".into(),
                occurrence_count: count,
            }),
            overall_phase: phase.into(),
        });
        store.update_request_status(&created).await.unwrap();
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
