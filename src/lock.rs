//! Per-fingerprint creation lock on a `coordination.k8s.io/v1` Lease.
//!
//! Acquire: create the Lease (no GET when uncontended). On AlreadyExists read it: held by us
//! (a leftover of this process's identity) or expired -> take over with a
//! resourceVersion-conditioned update, never a blind write; held by someone else -> report who
//! and for how long. While held, a background task renews it every `duration / 3`. Release
//! deletes it with a resourceVersion precondition, so a lease taken over by another replica is
//! never deleted. A guard dropped without `release()` (panic, cancellation) releases from a
//! spawned task, and [`LeaseLock::release_all`] frees whatever is still held at shutdown — after
//! which nothing renews (a renewal of a deleted Lease would create it again) and nothing creates.
//!
//! **Fencing a create** (ADR 0011): a holder creates an RR only through [`LockGuard::fence`],
//! which records the RR name in the Lease (annotation [`CREATING_ANNOTATION`], a conditional
//! update unless the Lease already names it) and returns the instant by which the create must be
//! sent so that it completes while the Lease is still ours. A replica that takes an expired Lease
//! over inherits that name and creates the same one, so a create still in flight from a paused or
//! partitioned holder meets AlreadyExists instead of opening a second RR — even when the older
//! generation it was named after has been deleted meanwhile.
//!
//! Holder identities carry a per-process part ([`process_identity`]): two processes that share a
//! pod name (a fixed `hostname`, POD_NAME unset) never take each other's live Lease for their own
//! leftover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::{SharedClock, add};
use crate::cluster::{ApiError, Call, Cluster, Result};
use crate::fingerprint::Fingerprint;
use crate::metrics::Metrics;

/// Label on every lock Lease, so the sweep lists only ours.
pub const LEASE_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "signal-gateway");

/// Annotation on a lock Lease: the RR its holder creates (or is about to).
pub const CREATING_ANNOTATION: &str = "signal-gateway.kubernaut.ai/creating";

/// Name of the lock Lease for a fingerprint.
pub fn lease_name(fp: &Fingerprint) -> String {
    format!("gw-lock-{}", fp.short())
}

/// `<pod name>_<8 random hex>`: the Lease holder identity of this process (as client-go's leader
/// election adds a unique part to the hostname).
pub fn process_identity(pod_name: &str) -> String {
    format!("{pod_name}_{:08x}", fastrand::u32(..))
}

#[derive(Clone)]
pub struct LeaseLock {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Arc<dyn Cluster>,
    clock: SharedClock,
    namespace: String,
    holder: String,
    duration: Duration,
    metrics: Metrics,
    /// Leases held now, by name.
    held: Mutex<HashMap<String, Arc<Held>>>,
}

/// One held Lease, shared by its guard and its renewer.
struct Held {
    /// The Lease as we last wrote it (its resourceVersion is the precondition of the next write
    /// and of the release). Every write holds this lock, so renewals and the record of a create
    /// never race each other.
    lease: tokio::sync::Mutex<Lease>,
    /// Until when the Lease is certainly ours: the send time of our last successful write plus
    /// the lease duration (no other replica takes it over before).
    valid_until: Mutex<Instant>,
    /// Lost (taken over or deleted), released or abandoned: never written again, and no create
    /// may be fenced under it.
    over: AtomicBool,
}

impl Held {
    fn new(lease: Lease, written_at: Instant, duration: Duration) -> Self {
        Held {
            lease: tokio::sync::Mutex::new(lease),
            valid_until: Mutex::new(written_at + duration),
            over: AtomicBool::new(false),
        }
    }

    fn is_over(&self) -> bool {
        self.over.load(Ordering::SeqCst)
    }

    fn end(&self) {
        self.over.store(true, Ordering::SeqCst);
    }

    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().expect("lease validity poisoned")
    }

    fn wrote(&self, at: Instant, duration: Duration) {
        *self.valid_until.lock().expect("lease validity poisoned") = at + duration;
    }
}

/// Result of one acquisition attempt.
pub enum Attempt {
    Acquired(LockGuard),
    /// Someone else holds a live lease; it expires in `expires_in` unless renewed.
    Held {
        holder: String,
        expires_in: Duration,
    },
}

/// Why a create may not be sent under a guard.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum FenceError {
    #[error("the creation lock was lost (taken over, deleted, or released at shutdown)")]
    Lost,
    #[error("the creation lock expires before a create could complete")]
    Expiring,
    #[error(transparent)]
    Api(#[from] ApiError),
}

fn creating_of(lease: &Lease) -> Option<String> {
    lease.metadata.annotations.as_ref()?.get(CREATING_ANNOTATION).cloned()
}

/// An error after which the write may or may not have been applied.
fn ambiguous(e: &ApiError) -> bool {
    matches!(e, ApiError::Timeout | ApiError::Unavailable(_))
}

impl LeaseLock {
    pub fn new(
        cluster: Arc<dyn Cluster>,
        clock: SharedClock,
        namespace: String,
        holder: String,
        duration: Duration,
        metrics: Metrics,
    ) -> Self {
        LeaseLock {
            inner: Arc::new(Inner {
                cluster,
                clock,
                namespace,
                holder,
                duration,
                metrics,
                held: Mutex::default(),
            }),
        }
    }

    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    fn lease_duration_secs(&self) -> i32 {
        i32::try_from(self.inner.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    fn spec(&self, now: jiff::Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.inner.holder.clone()),
            lease_duration_seconds: Some(self.lease_duration_secs()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take the lock for `fp`; waiting and retrying is the caller's policy.
    /// `creating`: the RR name the caller expects to create, recorded with the Lease so that the
    /// fence before the create usually needs no extra write.
    #[tracing::instrument(name = "lock.acquire", skip_all, fields(lease = tracing::field::Empty, outcome = tracing::field::Empty))]
    pub async fn try_acquire(&self, fp: &Fingerprint, creating: Option<&str>, call: Call<'_>) -> Result<Attempt> {
        let span = tracing::Span::current();
        let name = lease_name(fp);
        span.record("lease", name.as_str());
        let result = self.attempt(&name, creating, call).await;
        let outcome = match &result {
            Ok(Attempt::Acquired(g)) => g.how,
            Ok(Attempt::Held { .. }) => "contended",
            Err(_) => "error",
        };
        span.record("outcome", outcome);
        self.inner.metrics.lock_acquisitions.with_label_values(&[outcome]).inc();
        result
    }

    async fn attempt(&self, name: &str, creating: Option<&str>, call: Call<'_>) -> Result<Attempt> {
        let c = &self.inner.cluster;
        let ns = &self.inner.namespace;
        for _ in 0..3 {
            let now = self.inner.clock.now();
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(ns.clone()),
                    labels: Some([(LEASE_LABEL.0.to_owned(), LEASE_LABEL.1.to_owned())].into()),
                    annotations: creating.map(|n| [(CREATING_ANNOTATION.to_owned(), n.to_owned())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, 0)),
            };
            let sent = Instant::now();
            match c.create_lease(call, &lease).await {
                Ok(created) => return Ok(Attempt::Acquired(self.hold(name, created, sent, None, "acquired"))),
                Err(ApiError::AlreadyExists) => {}
                Err(e) => {
                    if ambiguous(&e) {
                        // It may have been stored: a Lease of ours nobody holds would block this
                        // fingerprint for a whole lease duration on every replica.
                        self.clean_up_if_ours(name);
                    }
                    return Err(e);
                }
            }
            let current = match c.get_lease(call, ns, name).await {
                Ok(l) => l,
                Err(ApiError::NotFound) => continue, // released in between: try to create again
                Err(e) => return Err(e),
            };
            let spec = current.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let expires_at = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| {
                add(
                    t.0,
                    Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
                )
            });
            let now = self.inner.clock.now();
            let live = expires_at.is_some_and(|e| e > now);
            if live && !holder.is_empty() && holder != self.inner.holder {
                let expires_in = expires_at
                    .map(|e| e.duration_since(now).unsigned_abs())
                    .unwrap_or_default();
                return Ok(Attempt::Held { holder, expires_in });
            }
            // Expired, released-but-not-deleted, or a leftover of this process: take it over,
            // conditioned on the resourceVersion we read. The name its holder was creating stays
            // recorded: whoever creates next creates that one.
            let inherited = creating_of(&current);
            let mut metadata = current.metadata.clone();
            if inherited.is_none()
                && let Some(n) = creating
            {
                metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(CREATING_ANNOTATION.to_owned(), n.to_owned());
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != self.inner.holder);
            let takeover = Lease {
                metadata,
                spec: Some(self.spec(now, transitions)),
            };
            let sent = Instant::now();
            match c.update_lease(call, &takeover).await {
                Ok(updated) => {
                    tracing::info!(lease = name, previous_holder = %holder, creating = inherited.as_deref().unwrap_or_default(), "took over expired lease");
                    return Ok(Attempt::Acquired(self.hold(name, updated, sent, inherited, "takeover")));
                }
                Err(ApiError::Conflict(_) | ApiError::NotFound) => continue, // someone else moved first
                Err(e) => {
                    if ambiguous(&e) {
                        self.clean_up_if_ours(name);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Attempt::Held {
            holder: String::from("<racing>"),
            expires_in: Duration::ZERO,
        })
    }

    /// After a Lease write whose answer was lost: in the background, read the Lease and delete it
    /// (conditioned on the version read) if it names this process as holder and no guard of ours
    /// holds it.
    fn clean_up_if_ours(&self, name: &str) {
        let lock = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let c = &lock.inner.cluster;
            let ns = &lock.inner.namespace;
            let Ok(lease) = c.get_lease(Call::UNCOUNTED, ns, &name).await else {
                return;
            };
            let ours = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(lock.holder());
            let guarded = lock.inner.held.lock().expect("held locks poisoned").contains_key(&name);
            if ours && !guarded {
                let rv = lease.metadata.resource_version.clone().unwrap_or_default();
                if c.delete_lease(Call::UNCOUNTED, ns, &name, &rv).await.is_ok() {
                    lock.inner.metrics.lock_releases.with_label_values(&["cleaned"]).inc();
                    tracing::info!(lease = %name, "deleted the lease an unanswered acquire left behind");
                }
            }
        });
    }

    fn hold(
        &self,
        name: &str,
        lease: Lease,
        written_at: Instant,
        inherited: Option<String>,
        how: &'static str,
    ) -> LockGuard {
        let held = Arc::new(Held::new(lease, written_at, self.inner.duration));
        self.inner
            .held
            .lock()
            .expect("held locks poisoned")
            .insert(name.to_owned(), held.clone());
        self.inner.metrics.locks_held.inc();
        let (stop, stopped) = oneshot::channel();
        let renewer = tokio::spawn(self.clone().renew_loop(name.to_owned(), held.clone(), stopped));
        LockGuard {
            lock: self.clone(),
            name: name.to_owned(),
            held,
            inherited,
            acquired_at: Instant::now(),
            how,
            renewer: Some((stop, renewer)),
        }
    }

    /// Renews every third of the lease duration until stopped, released or the lease is lost.
    async fn renew_loop(self, name: String, held: Arc<Held>, mut stop: oneshot::Receiver<()>) {
        let period = self.inner.duration / 3;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(period) => {}
            }
            let mut lease = held.lease.lock().await;
            if held.is_over() {
                // Released (e.g. at shutdown) or lost: a renewal now would create the Lease again.
                return;
            }
            let mut renewed = lease.clone();
            if let Some(spec) = renewed.spec.as_mut() {
                spec.renew_time = Some(MicroTime(self.inner.clock.now()));
            }
            let sent = Instant::now();
            match self.inner.cluster.update_lease(Call::UNCOUNTED, &renewed).await {
                Ok(l) => {
                    *lease = l;
                    held.wrote(sent, self.inner.duration);
                    self.inner.metrics.lock_renewals.with_label_values(&["renewed"]).inc();
                }
                Err(ApiError::Conflict(_) | ApiError::NotFound) => {
                    held.end();
                    self.inner.metrics.lock_renewals.with_label_values(&["lost"]).inc();
                    tracing::warn!(lease = %name, "lease lost while held (taken over or deleted)");
                    return;
                }
                Err(e) => {
                    self.inner.metrics.lock_renewals.with_label_values(&["error"]).inc();
                    tracing::warn!(lease = %name, error = %e, "lease renewal failed; retrying");
                }
            }
        }
    }

    /// Deletes `name` if it is still ours. Never deletes a lease another holder took over.
    async fn release_lease(&self, name: &str, rv: &str, call: Call<'_>) -> &'static str {
        let c = &self.inner.cluster;
        let ns = &self.inner.namespace;
        let result = match c.delete_lease(call, ns, name, rv).await {
            Ok(()) => "released",
            Err(ApiError::NotFound) => "gone",
            // Our last renewal may have landed after we read `rv`: delete if the holder is still us.
            Err(ApiError::Conflict(_)) => match c.get_lease(call, ns, name).await {
                Ok(l)
                    if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                        == Some(self.inner.holder.as_str()) =>
                {
                    match c
                        .delete_lease(
                            call,
                            ns,
                            name,
                            l.metadata.resource_version.as_deref().unwrap_or_default(),
                        )
                        .await
                    {
                        Ok(()) => "released",
                        Err(ApiError::NotFound) => "gone",
                        Err(_) => "error",
                    }
                }
                Ok(_) => "lost",
                Err(ApiError::NotFound) => "gone",
                Err(_) => "error",
            },
            Err(e) => {
                tracing::warn!(lease = name, error = %e, "lease release failed; it will expire");
                "error"
            }
        };
        self.inner.metrics.lock_releases.with_label_values(&[result]).inc();
        result
    }

    fn forget(&self, name: &str) -> bool {
        let removed = self
            .inner
            .held
            .lock()
            .expect("held locks poisoned")
            .remove(name)
            .is_some();
        if removed {
            self.inner.metrics.locks_held.dec();
        }
        removed
    }

    /// Ends `held` (no more renewals, no more creates under it) and deletes its Lease if still ours.
    async fn end_and_release(&self, name: &str, held: &Held, call: Call<'_>) -> &'static str {
        let lease = held.lease.lock().await;
        held.end();
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        drop(lease);
        self.release_lease(name, &rv, call).await
    }

    /// Releases every lease still held (shutdown after the drain deadline): each is ended first,
    /// so its renewer never writes it again and no create is fenced under it, then deleted.
    pub async fn release_all(&self) -> usize {
        let held: Vec<(String, Arc<Held>)> = self.inner.held.lock().expect("held locks poisoned").drain().collect();
        for (name, h) in &held {
            self.inner.metrics.locks_held.dec();
            self.end_and_release(name, h, Call::UNCOUNTED).await;
        }
        held.len()
    }

    /// Deletes lock Leases that expired more than one lease duration ago and that this replica
    /// does not hold: the locks of a replica that crashed after creating its RR, which no signal
    /// would ever need to take over. Each delete is conditioned on the resourceVersion read, so a
    /// lease renewed or taken over in between is left alone. Returns how many were deleted.
    pub async fn sweep_expired(&self) -> Result<usize> {
        let c = &self.inner.cluster;
        let ns = &self.inner.namespace;
        let now = self.inner.clock.now();
        let mut swept = 0;
        for lease in c.list_leases(Call::UNCOUNTED, ns, LEASE_LABEL).await? {
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            if self.inner.held.lock().expect("held locks poisoned").contains_key(&name) {
                continue;
            }
            let spec = lease.spec.clone().unwrap_or_default();
            let Some(last) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
                continue;
            };
            let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            if add(last.0, duration + self.inner.duration) > now {
                continue;
            }
            let rv = lease.metadata.resource_version.clone().unwrap_or_default();
            match c.delete_lease(Call::UNCOUNTED, ns, &name, &rv).await {
                Ok(()) => {
                    swept += 1;
                    self.inner.metrics.lock_releases.with_label_values(&["swept"]).inc();
                    tracing::info!(lease = %name, holder = spec.holder_identity.as_deref().unwrap_or_default(), "deleted orphaned lease");
                }
                Err(ApiError::NotFound | ApiError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(swept)
    }

    /// Runs [`Self::sweep_expired`] every lease duration (first run after a random part of one,
    /// so replicas spread out) until `stop` turns true.
    pub async fn sweep_loop(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let period = self.inner.duration.max(Duration::from_secs(1));
        let mut next = period.mul_f64(fastrand::f64());
        loop {
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.sweep_expired().await {
                tracing::warn!(error = %e, "sweep of orphaned leases failed; retrying next period");
            }
            next = period;
        }
    }

    /// Number of leases this replica holds now.
    pub fn held_count(&self) -> usize {
        self.inner.held.lock().expect("held locks poisoned").len()
    }
}

/// Proof of holding a lease. Call [`LockGuard::release`]; dropping it releases in the background.
pub struct LockGuard {
    lock: LeaseLock,
    name: String,
    held: Arc<Held>,
    /// The RR name the previous holder was creating, when this guard took an expired Lease over.
    inherited: Option<String>,
    acquired_at: Instant,
    /// `acquired` or `takeover`.
    pub how: &'static str,
    renewer: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl LockGuard {
    /// The RR name a previous holder of this Lease was creating (its create may still land).
    pub fn inherited(&self) -> Option<&str> {
        self.inherited.as_deref()
    }

    /// Clears the way for creating RR `name` under this lock: records `name` in the Lease (one
    /// conditional update, unless the Lease already names it and has `needed` left) and returns
    /// the instant by which the create must be sent — `needed` before the Lease could be taken
    /// over. Lost or released: no create may be sent; `Expiring` only when even a renewed Lease
    /// would not last `needed` (a configuration the gateway refuses at startup).
    #[tracing::instrument(name = "lock.fence", skip_all, fields(lease = %self.name, rr_name = name))]
    pub async fn fence(
        &self,
        name: &str,
        needed: Duration,
        call: Call<'_>,
    ) -> std::result::Result<Instant, FenceError> {
        let mut lease = self.held.lease.lock().await;
        if self.held.is_over() {
            return Err(FenceError::Lost);
        }
        // Write when the Lease does not name `name` yet, or when what is left of it would not
        // cover the create (the write renews it too).
        let short = self.held.valid_until() < Instant::now() + needed;
        if short || creating_of(&lease).as_deref() != Some(name) {
            let mut next = lease.clone();
            next.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(CREATING_ANNOTATION.to_owned(), name.to_owned());
            if let Some(spec) = next.spec.as_mut() {
                spec.renew_time = Some(MicroTime(self.lock.inner.clock.now()));
            }
            let sent = Instant::now();
            match self.lock.inner.cluster.update_lease(call, &next).await {
                Ok(l) => {
                    *lease = l;
                    self.held.wrote(sent, self.lock.inner.duration);
                }
                Err(ApiError::Conflict(_) | ApiError::NotFound) => {
                    self.held.end();
                    return Err(FenceError::Lost);
                }
                Err(e) => return Err(FenceError::Api(e)),
            }
        }
        let send_by = self.held.valid_until().checked_sub(needed).unwrap_or_else(Instant::now);
        if send_by <= Instant::now() {
            return Err(FenceError::Expiring);
        }
        Ok(send_by)
    }

    fn stop_renewing(&mut self) -> Option<JoinHandle<()>> {
        let (stop, renewer) = self.renewer.take()?;
        let _ = stop.send(());
        Some(renewer)
    }

    #[tracing::instrument(name = "lock.release", skip_all, fields(lease = %self.name, result = tracing::field::Empty))]
    pub async fn release(mut self, call: Call<'_>) {
        if let Some(renewer) = self.stop_renewing() {
            let _ = renewer.await; // a renewal in flight finishes and records its resourceVersion
        }
        self.lock
            .inner
            .metrics
            .lock_hold
            .observe(self.acquired_at.elapsed().as_secs_f64());
        if self.lock.forget(&self.name) {
            let result = self.lock.end_and_release(&self.name, &self.held, call).await;
            tracing::Span::current().record("result", result);
        }
    }

    /// Gives the lock up without deleting the Lease: after a create whose outcome is unknown, the
    /// Lease (naming that RR) must stay until it expires, so whoever takes it over creates the
    /// same name. Nothing renews it any more.
    pub async fn abandon(mut self) {
        if let Some(renewer) = self.stop_renewing() {
            let _ = renewer.await;
        }
        self.held.end();
        self.lock
            .inner
            .metrics
            .lock_hold
            .observe(self.acquired_at.elapsed().as_secs_f64());
        if self.lock.forget(&self.name) {
            self.lock
                .inner
                .metrics
                .lock_releases
                .with_label_values(&["abandoned"])
                .inc();
            tracing::warn!(lease = %self.name, "left the lease to expire: a create under it may still land");
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Some(renewer) = self.stop_renewing() else {
            return;
        };
        // Dropped without release(): stop renewing and release from a task of our own.
        let lock = self.lock.clone();
        let name = std::mem::take(&mut self.name);
        let held = self.held.clone();
        let acquired_at = self.acquired_at;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = renewer.await;
                lock.inner
                    .metrics
                    .lock_hold
                    .observe(acquired_at.elapsed().as_secs_f64());
                if lock.forget(&name) {
                    lock.end_and_release(&name, &held, Call::UNCOUNTED).await;
                }
            });
        }
    }
}

/// Full-jitter exponential backoff bounded by `max`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let ceiling = initial.saturating_mul(1u32 << attempt.min(16)).min(max);
    let nanos = ceiling.as_nanos().max(1) as u64;
    Duration::from_nanos(nanos / 2 + fastrand::u64(0..=nanos / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::clock::TokioClock;
    use crate::crd::TargetResource;

    const LEASE: Duration = Duration::from_secs(30);

    fn fp() -> Fingerprint {
        let t = TargetResource {
            kind: "Pod".into(),
            name: "p".into(),
            namespace: "n".into(),
            api_version: String::new(),
        };
        Fingerprint::of("", &t)
    }

    struct World {
        store: Arc<EmbeddedStore>,
        clock: SharedClock,
    }

    impl World {
        fn new() -> Self {
            let clock: SharedClock = Arc::new(TokioClock::new());
            World {
                store: Arc::new(EmbeddedStore::new(clock.clone())),
                clock,
            }
        }
        fn replica(&self, holder: &str) -> LeaseLock {
            let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
            LeaseLock::new(
                self.store.clone(),
                self.clock.clone(),
                "ns".into(),
                holder.into(),
                LEASE,
                metrics,
            )
        }
        async fn lease(&self) -> Lease {
            self.store
                .get_lease(Call::UNCOUNTED, "ns", &lease_name(&fp()))
                .await
                .unwrap()
        }
    }

    fn holder_of(lease: &Lease) -> String {
        lease.spec.as_ref().unwrap().holder_identity.clone().unwrap()
    }

    async fn acquire(lock: &LeaseLock) -> LockGuard {
        match lock.try_acquire(&fp(), None, Call::UNCOUNTED).await.unwrap() {
            Attempt::Acquired(g) => g,
            Attempt::Held { holder, .. } => panic!("held by {holder}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_uncontended_lock_is_one_create_and_release_deletes_it() {
        let w = World::new();
        let a = w.replica("a");
        let guard = acquire(&a).await;
        assert_eq!(guard.how, "acquired");
        assert_eq!(holder_of(&w.lease().await), "a");
        guard.release(Call::UNCOUNTED).await;
        assert!(w.store.all_leases().is_empty());
        assert_eq!(a.held_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_lease_of_another_holder_is_reported_with_its_expiry() {
        let w = World::new();
        let _held = acquire(&w.replica("a")).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        match w.replica("b").try_acquire(&fp(), None, Call::UNCOUNTED).await.unwrap() {
            Attempt::Held { holder, expires_in } => {
                assert_eq!(holder, "a");
                assert!(
                    expires_in <= Duration::from_secs(25) && expires_in > Duration::from_secs(20),
                    "{expires_in:?}"
                );
            }
            Attempt::Acquired(_) => panic!("b must not get a's live lock"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_deletes_only_our_leases_expired_for_over_a_lease_duration() {
        let w = World::new();
        let now = w.clock.now();
        let orphan = |name: &str, labelled: bool| Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: labelled.then(|| [(LEASE_LABEL.0.to_owned(), LEASE_LABEL.1.to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("crashed".into()),
                lease_duration_seconds: Some(30),
                renew_time: Some(MicroTime(now)),
                ..LeaseSpec::default()
            }),
        };
        w.store
            .create_lease(Call::UNCOUNTED, &orphan("gw-lock-orphan", true))
            .await
            .unwrap();
        w.store
            .create_lease(Call::UNCOUNTED, &orphan("someone-elses", false))
            .await
            .unwrap();
        let live = acquire(&w.replica("b")).await;
        let sweeper = w.replica("c");
        let names = || {
            let mut n: Vec<String> = w
                .store
                .all_leases()
                .into_iter()
                .filter_map(|l| l.metadata.name)
                .collect();
            n.sort();
            n
        };

        // Expired, but not yet for a whole lease duration: a slow holder may still be finishing.
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        assert_eq!(sweeper.sweep_expired().await.unwrap(), 0);
        tokio::time::advance(LEASE).await;
        assert_eq!(sweeper.sweep_expired().await.unwrap(), 1);
        // The live (renewed) lease and the lease without our label stay.
        assert_eq!(names(), [lease_name(&fp()), "someone-elses".to_owned()]);
        live.release(Call::UNCOUNTED).await;
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_a_held_lease_alive_past_its_duration() {
        let w = World::new();
        let guard = acquire(&w.replica("a")).await;
        // Three lease durations pass while "a" works; its renewer keeps the lease fresh.
        tokio::time::sleep(LEASE * 3).await;
        let lease = w.lease().await;
        let renewed = lease.spec.as_ref().unwrap().renew_time.as_ref().unwrap().0;
        assert!(w.clock.now().duration_since(renewed).unsigned_abs() <= LEASE / 3 + Duration::from_secs(1));
        assert!(matches!(
            w.replica("b").try_acquire(&fp(), None, Call::UNCOUNTED).await.unwrap(),
            Attempt::Held { .. }
        ));
        guard.release(Call::UNCOUNTED).await;
        assert!(w.store.all_leases().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_is_taken_over_with_a_conditional_update() {
        let w = World::new();
        let a = w.replica("a");
        let guard = acquire(&a).await;
        // "a" stalls: its renewer stops (as in a crashed process) and the lease runs out.
        let (stop, renewer) = {
            let mut guard = guard;
            let r = guard.renewer.take().unwrap();
            std::mem::forget(guard);
            r
        };
        let _ = stop.send(());
        let _ = renewer.await;
        let before = w.lease().await;
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        let b = w.replica("b");
        let taken = acquire(&b).await;
        assert_eq!(taken.how, "takeover");
        let after = w.lease().await;
        assert_eq!(holder_of(&after), "b");
        assert_eq!(after.spec.as_ref().unwrap().lease_transitions, Some(1));
        assert_eq!(
            after.metadata.uid, before.metadata.uid,
            "updated in place, not deleted and recreated"
        );
        taken.release(Call::UNCOUNTED).await;
        assert!(w.store.all_leases().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn two_contenders_racing_for_an_expired_lease_exactly_one_wins() {
        for _ in 0..20 {
            let w = World::new();
            let ghost = w.replica("ghost");
            std::mem::forget(acquire(&ghost).await);
            tokio::time::advance(LEASE * 2).await;
            let (b, c) = (w.replica("b"), w.replica("c"));
            let f = fp();
            let (rb, rc) = tokio::join!(
                b.try_acquire(&f, None, Call::UNCOUNTED),
                c.try_acquire(&f, None, Call::UNCOUNTED)
            );
            let won: Vec<bool> = [rb.unwrap(), rc.unwrap()]
                .into_iter()
                .map(|r| matches!(r, Attempt::Acquired(_)))
                .collect();
            assert_eq!(
                won.iter().filter(|w| **w).count(),
                1,
                "exactly one contender holds the lock: {won:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn release_never_deletes_a_lease_another_holder_took_over() {
        let w = World::new();
        let a = w.replica("a");
        let mut stale = acquire(&a).await;
        let (stop, renewer) = stale.renewer.take().unwrap();
        let _ = stop.send(());
        let _ = renewer.await;
        tokio::time::advance(LEASE * 2).await;
        let taken = acquire(&w.replica("b")).await;
        stale.release(Call::UNCOUNTED).await; // "a" wakes up and releases what it thinks it holds
        assert_eq!(holder_of(&w.lease().await), "b", "b's lease survives a's late release");
        taken.release(Call::UNCOUNTED).await;
        assert!(w.store.all_leases().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_guard_releases_in_the_background() {
        let w = World::new();
        let a = w.replica("a");
        drop(acquire(&a).await);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !w.store.all_leases().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "dropped guard never released");
            tokio::task::yield_now().await;
        }
        assert_eq!(a.held_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn our_own_leftover_lease_is_reclaimed_after_a_restart() {
        let w = World::new();
        std::mem::forget(acquire(&w.replica("a")).await);
        let restarted = w.replica("a");
        let guard = acquire(&restarted).await;
        assert_eq!(guard.how, "takeover");
        guard.release(Call::UNCOUNTED).await;
        assert!(w.store.all_leases().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn after_release_all_nothing_renews_or_creates_under_a_lock_a_worker_still_holds() {
        // Issue 13, path 5: release_all deleted the Lease but left the worker's renewer running;
        // its next renewal (a PUT, which creates a missing Lease) brought the lock back for good.
        let w = World::new();
        let a = w.replica("a");
        let guard = acquire(&a).await;
        assert_eq!(a.release_all().await, 1);
        assert!(w.store.all_leases().is_empty());
        tokio::time::sleep(LEASE * 2).await; // several renewal periods
        assert!(w.store.all_leases().is_empty(), "nothing renewed the released lease");
        assert_eq!(
            guard.fence("rr-x-1", Duration::from_secs(1), Call::UNCOUNTED).await,
            Err(FenceError::Lost),
            "the worker may not create after shutdown released its lock"
        );
        guard.release(Call::UNCOUNTED).await;
        assert!(w.store.all_leases().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn two_processes_sharing_a_pod_name_never_take_each_others_live_lock() {
        // Issue 13, path 6: with one identity, each took the other's live Lease for its own
        // leftover and took it over — the lock excluded nobody.
        let (first, second) = (process_identity("gw"), process_identity("gw"));
        assert_ne!(first, second);
        assert!(first.starts_with("gw_") && second.starts_with("gw_"));
        let w = World::new();
        let _held = acquire(&w.replica(&first)).await;
        assert!(matches!(
            w.replica(&second)
                .try_acquire(&fp(), None, Call::UNCOUNTED)
                .await
                .unwrap(),
            Attempt::Held { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_create_is_fenced_by_the_lease_and_a_takeover_inherits_the_name_in_flight() {
        let w = World::new();
        let a = w.replica("a");
        let guard = match a.try_acquire(&fp(), Some("rr-x-1"), Call::UNCOUNTED).await.unwrap() {
            Attempt::Acquired(g) => g,
            Attempt::Held { .. } => panic!("uncontended"),
        };
        let rv = w.lease().await.metadata.resource_version;
        // The Lease already names rr-x-1: no write; the create must be sent before it could expire.
        let send_by = guard
            .fence("rr-x-1", Duration::from_secs(5), Call::UNCOUNTED)
            .await
            .unwrap();
        assert_eq!(w.lease().await.metadata.resource_version, rv, "no extra write");
        assert!(send_by <= Instant::now() + LEASE - Duration::from_secs(5));
        // Another name: recorded with a conditional update.
        guard
            .fence("rr-x-2", Duration::from_secs(5), Call::UNCOUNTED)
            .await
            .unwrap();
        assert_eq!(creating_of(&w.lease().await).as_deref(), Some("rr-x-2"));
        // "a" stalls with that create in flight; its Lease runs out and "b" takes it over.
        let (stop, renewer) = {
            let mut guard = guard;
            let r = guard.renewer.take().unwrap();
            std::mem::forget(guard);
            r
        };
        let _ = stop.send(());
        let _ = renewer.await;
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        let taken = match w
            .replica("b")
            .try_acquire(&fp(), Some("rr-x-1"), Call::UNCOUNTED)
            .await
            .unwrap()
        {
            Attempt::Acquired(g) => g,
            Attempt::Held { .. } => panic!("expired"),
        };
        assert_eq!(
            taken.inherited(),
            Some("rr-x-2"),
            "b creates what a may still be creating"
        );
        // A fence too close to expiry refuses.
        assert_eq!(
            taken.fence("rr-x-2", LEASE * 2, Call::UNCOUNTED).await,
            Err(FenceError::Expiring)
        );
        taken.release(Call::UNCOUNTED).await;
    }

    #[tokio::test]
    async fn errors_other_than_not_found_propagate() {
        let w = World::new();
        w.store.set_unavailable(true);
        assert!(matches!(
            w.replica("a").try_acquire(&fp(), None, Call::UNCOUNTED).await,
            Err(ApiError::Unavailable(_))
        ));
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_bounded() {
        let (i, m) = (Duration::from_millis(20), Duration::from_millis(500));
        for attempt in 0..40 {
            let d = backoff(attempt, i, m);
            assert!(d <= m, "{d:?}");
            assert!(d >= i.saturating_mul(1 << attempt.min(16)).min(m) / 2);
        }
    }
}
