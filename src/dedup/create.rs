//! The create path: a new RemediationRequest under the fingerprint's Lease (or this replica's
//! shard ownership), decided again from a fresh list under it, with a deterministic name.

use std::time::Duration;

use tokio::time::Instant;

use super::count::ambiguous;
use super::naming::name_to_create;
use super::{Batch, Budget, Dedup, DedupError, Result, Step, within};
use crate::cluster::{ApiError, Call};
use crate::crd::{RemediationRequest, RemediationRequestSpec, creation_metadata};
use crate::fingerprint::Fingerprint;
use crate::lock::{Attempt, FenceError, LockGuard, backoff};
use crate::ownership::OwnerFence;
use crate::signal::Source;

/// What covers a create: the fingerprint's Lease, or this replica's ownership of its shard.
pub(super) enum CreateFence<'a> {
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
    /// Takes the lock (waiting while another replica holds it), then decides again under it.
    /// With `watch_for_rr`, a waiter polls for the RR the holder creates and counts into it.
    /// `guess`: the RR name this replica expects to create (recorded with the Lease).
    pub(super) async fn create_locked(
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
    pub(super) async fn create_under_lock(
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
}

/// A create whose outcome is unknown (sent, answer lost, not found on reading it back).
pub(super) struct Unresolved(pub(super) DedupError);
