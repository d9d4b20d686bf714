//! One signal end to end: owner resolution, fingerprint, the RR spec, the coalesced dedup write,
//! and the metrics and span that describe it. Knows nothing of HTTP.

use std::sync::Arc;
use std::time::Instant as StdInstant;

use tokio::time::Instant;

use crate::admission::{Freshness, Scope, UNMANAGED_RESOURCE};
use crate::audit::{AuditSink, SignalFacts};
use crate::clock::{SharedClock, rfc3339};
use crate::cluster::{Call, Tally};
use crate::coalesce::{Ack, Coalescer};
use crate::crd::RemediationRequestSpec;
use crate::dedup::DedupError;
use crate::fingerprint::Fingerprint;
use crate::metrics::Metrics;
use crate::ownership::{Forwarded, Forwarder, Ownership, Route};
use crate::signal::{self, Signal, Skip, Source};
use crate::target::OwnerResolver;

/// The outcome of one signal, as the API reports it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Stored {
        fingerprint: Fingerprint,
        ack: Ack,
    },
    Skipped {
        skip: Skip,
        /// The object the signal named (after owner resolution when it got that far).
        target: Option<crate::crd::TargetResource>,
        fingerprint: Option<Fingerprint>,
    },
    Failed {
        fingerprint: Option<Fingerprint>,
        error: DedupError,
    },
}

impl Outcome {
    /// `created`, `duplicate`, `ignored`, `rejected` or `failed` (metric label and response status).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Stored { ack, .. } if ack.created => "created",
            Outcome::Stored { .. } => "duplicate",
            Outcome::Skipped { skip, .. } => skip.status(),
            Outcome::Failed { .. } => "failed",
        }
    }
}

pub struct Pipeline {
    pub latency: LatencyTracker,
    pub resolver: OwnerResolver,
    pub freshness: Freshness,
    pub scope: Scope,
    pub coalescer: Arc<Coalescer>,
    pub clock: SharedClock,
    pub metrics: Metrics,
    pub cluster_id: String,
    /// Where the audit events of each decision go (a no-op while `audit.url` is unset).
    pub audit: Arc<dyn AuditSink>,
    /// Shard ownership and the forwarding client (`ownership.enabled`): a signal whose shard
    /// another replica owns goes to that replica.
    pub ownership: Option<(Ownership, Arc<dyn Forwarder>)>,
}

impl Pipeline {
    /// Records a signal that was parsed but produces no RR (resolved alert, Normal event, ...).
    pub fn skipped(&self, source: Source, severity: &str, skip: Skip) -> Outcome {
        self.skipped_about(source, severity, skip, None, None)
    }

    fn skipped_about(
        &self,
        source: Source,
        severity: &str,
        skip: Skip,
        target: Option<crate::crd::TargetResource>,
        fingerprint: Option<Fingerprint>,
    ) -> Outcome {
        self.metrics
            .signals_received
            .with_label_values(&[source.as_str(), crate::metrics::severity_label(severity)])
            .inc();
        self.metrics.dedup_decisions.with_label_values(&[skip.status()]).inc();
        tracing::info!(
            source = source.as_str(),
            outcome = skip.status(),
            reason = skip.reason(),
            "signal skipped"
        );
        Outcome::Skipped {
            skip,
            target,
            fingerprint,
        }
    }

    /// Records a signal the freshness check rejected.
    fn rejected(&self, signal: &Signal, skip: Skip) -> Outcome {
        self.metrics.signals_rejected.with_label_values(&[skip.reason()]).inc();
        self.skipped_about(signal.source, &signal.severity, skip, Some(signal.target.clone()), None)
    }

    #[tracing::instrument(name = "signal", skip_all, fields(
        source = signal.source.as_str(), signal_name = %signal.name, fingerprint = tracing::field::Empty,
        outcome = tracing::field::Empty, rr_name = tracing::field::Empty, api_calls = tracing::field::Empty,
        owner = tracing::field::Empty))]
    /// `user`: the sender as authentication knows it (the audit trail's actor).
    pub async fn process(&self, signal: Signal, user: Option<&str>, deadline: Instant) -> Outcome {
        let started = StdInstant::now();
        if let Err(skip) = self.freshness.check(&signal, self.clock.now()) {
            tracing::Span::current().record("outcome", skip.status());
            return self.rejected(&signal, skip);
        }
        let m = &self.metrics;
        m.signals_received
            .with_label_values(&[signal.source.as_str(), crate::metrics::severity_label(&signal.severity)])
            .inc();
        // Decremented however this future ends, including when its caller drops it.
        let _in_flight = InFlight::enter(&m.signals_in_flight);
        let received = self.clock.now();
        // A configured cluster id wins over the one the sender names (Alertmanager commonLabels).
        let cluster_id = if self.cluster_id.is_empty() {
            signal
                .cluster_id
                .clone()
                .map(|c| signal::cut_chars(c, 253))
                .unwrap_or_default()
        } else {
            self.cluster_id.clone()
        };
        // The owner and label reads this signal made (shared reads count for the signal that
        // made them), before the dedup write.
        let reads = Tally::new();
        let resolved = self
            .resolver
            .resolve(signal.target.clone(), Call::counted(&reads))
            .await;
        let target = match resolved {
            Ok(target) => target,
            Err(e) => {
                // The fingerprint depends on the owner: without it, any answer could be wrong.
                tracing::warn!(error = %e, "could not read the target's owner chain; answering 503");
                let outcome = Outcome::Failed {
                    fingerprint: None,
                    error: DedupError::Api(e),
                };
                // Its crd.failed event names the target as the signal did (no owner, no other
                // fingerprint is known).
                let facts = self.audit.enabled().then(|| {
                    let named = signal.target.clone();
                    let fp = Fingerprint::of(&cluster_id, &named);
                    SignalFacts::new(user, &spec_of(signal, &fp, named, cluster_id, received))
                });
                return self.finish(outcome, facts, f64::from(reads.get()), started);
            }
        };
        let fingerprint = Fingerprint::of(&cluster_id, &target);
        let span = tracing::Span::current();
        span.record("fingerprint", fingerprint.as_str());
        let source = signal.source;
        let spec = spec_of(signal, &fingerprint, target, cluster_id, received);
        // The audit events carry the spec's values (built only when the trail is on).
        let facts = self.audit.enabled().then(|| SignalFacts::new(user, &spec));
        if self.scope.enabled() {
            let managed = self
                .scope
                .is_managed(&spec.target_resource, Call::counted(&reads))
                .await;
            let calls = f64::from(reads.get());
            let outcome = match managed {
                Ok(true) => {
                    m.scope_decisions.with_label_values(&["managed"]).inc();
                    None
                }
                Ok(false) => {
                    m.scope_decisions.with_label_values(&["unmanaged"]).inc();
                    m.signals_rejected.with_label_values(&[UNMANAGED_RESOURCE]).inc();
                    Some(Outcome::Skipped {
                        skip: Skip::Rejected(UNMANAGED_RESOURCE.into()),
                        target: Some(spec.target_resource.clone()),
                        fingerprint: Some(fingerprint.clone()),
                    })
                }
                Err(e) => {
                    m.scope_decisions.with_label_values(&["error"]).inc();
                    tracing::warn!(error = %e, "could not read the managed label; answering 503");
                    Some(Outcome::Failed {
                        fingerprint: Some(fingerprint.clone()),
                        error: DedupError::Api(e),
                    })
                }
            };
            if let Some(outcome) = outcome {
                return self.finish(outcome, facts, calls, started);
            }
        }
        let result = self.store(fingerprint.clone(), spec, deadline).await;
        let (outcome, calls) = match result {
            Ok(ack) => {
                let calls = ack.api_calls + f64::from(reads.get());
                span.record("rr_name", ack.name.as_str());
                if !ack.created {
                    m.signals_deduplicated.with_label_values(&[source.as_str()]).inc();
                    m.signals_absorbed.with_label_values(&[ack.absorbed_by.as_str()]).inc();
                }
                (Outcome::Stored { fingerprint, ack }, calls)
            }
            Err(error) => {
                tracing::warn!(error = %error, reason = error.reason(), "signal not stored; answering 503");
                (
                    Outcome::Failed {
                        fingerprint: Some(fingerprint),
                        error,
                    },
                    f64::from(reads.get()),
                )
            }
        };
        self.finish(outcome, facts, calls, started)
    }

    /// Here, or at the owner of the fingerprint's shard; here again when the owner certainly did
    /// not get it (2xx from the owner still means stored).
    async fn store(
        &self,
        fingerprint: Fingerprint,
        spec: RemediationRequestSpec,
        deadline: Instant,
    ) -> Result<Ack, DedupError> {
        let Some((ownership, forwarder)) = &self.ownership else {
            return self.coalescer.submit(fingerprint, spec, deadline).await;
        };
        let Route::Forward(peer) = ownership.route(&fingerprint) else {
            return self.coalescer.submit(fingerprint, spec, deadline).await;
        };
        let m = &self.metrics;
        let started = StdInstant::now();
        let forwarded = forwarder.forward(&peer, &fingerprint, &spec, deadline).await;
        let result = match forwarded {
            Forwarded::Stored(ack) => Ok(ack),
            Forwarded::Failed(e) => Err(e),
            Forwarded::Unanswered => Err(DedupError::Unanswered),
            Forwarded::NotSent(reason) => {
                m.forwards.with_label_values(&["not_sent"]).inc();
                m.forward_fallbacks.with_label_values(&[reason]).inc();
                tracing::debug!(owner = %peer.identity, reason, "owner not reached; processing here");
                return self.coalescer.submit(fingerprint, spec, deadline).await;
            }
        };
        m.forward_duration.observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "stored",
            Err(DedupError::Unanswered) => "unanswered",
            Err(_) => "failed",
        };
        m.forwards.with_label_values(&[label]).inc();
        tracing::Span::current().record("owner", peer.identity.as_str());
        result
    }

    /// Metrics, span fields, audit events and log line of a processed signal.
    fn finish(&self, outcome: Outcome, facts: Option<SignalFacts>, calls: f64, started: StdInstant) -> Outcome {
        if let Some(facts) = facts {
            self.audit(facts, &outcome, started);
        }
        if !matches!(outcome, Outcome::Skipped { .. }) {
            self.latency.observe(started.elapsed());
        }
        if matches!(outcome, Outcome::Stored { .. }) {
            self.latency.stored();
        }
        let m = &self.metrics;
        let span = tracing::Span::current();
        let label = outcome.label();
        span.record("outcome", label);
        span.record("api_calls", calls);
        m.api_calls_per_signal.observe(calls);
        m.dedup_decisions.with_label_values(&[label]).inc();
        m.signal_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        match &outcome {
            Outcome::Skipped { skip, .. } => {
                tracing::info!(outcome = label, reason = skip.reason(), "signal processed")
            }
            _ => tracing::info!(outcome = label, "signal processed"),
        }
        outcome
    }
}

impl Pipeline {
    /// The audit events of one decision (KUBERNAUT.md): a new incident is received + created, a
    /// duplicate is deduplicated with its own count, a signal answered 503 because its outcome
    /// could not be stored is crd.failed. Skipped signals make no decision and no event.
    fn audit(&self, facts: SignalFacts, outcome: &Outcome, started: StdInstant) {
        let at = rfc3339(self.clock.now());
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match outcome {
            Outcome::Stored { ack, .. } if ack.created => {
                for e in facts.created(&ack.namespace, &ack.name, &at, ms) {
                    self.audit.record(e);
                }
            }
            Outcome::Stored { ack, .. } => {
                self.audit
                    .record(facts.deduplicated(&ack.namespace, &ack.name, ack.occurrence_count, &at, ms));
            }
            Outcome::Failed { error, .. } => {
                self.audit
                    .record(facts.failed(error.reason(), &error.to_string(), &at, ms));
            }
            Outcome::Skipped { .. } => {}
        }
    }
}

/// The RR spec of a signal, with Kubernaut's values and bounds (KUBERNAUT.md, "Spec").
fn spec_of(
    signal: Signal,
    fingerprint: &Fingerprint,
    target: crate::crd::TargetResource,
    cluster_id: String,
    received: jiff::Timestamp,
) -> RemediationRequestSpec {
    // The sender's start time, in the form the CRD's date-time admits; the receive time when the
    // sender gave none (or one that does not parse; the freshness check has judged it already).
    let firing_time = signal
        .firing_time
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .unwrap_or(received);
    let labels = signal::cut_values(signal.labels, signal::LABEL_VALUE_MAX);
    let provider_data = serde_json::json!({"namespace": target.namespace, "labels": labels}).to_string();
    let severity = if signal.severity.trim().is_empty() {
        "unknown".to_owned()
    } else {
        signal::cut_chars(signal.severity, signal::SEVERITY_MAX)
    };
    RemediationRequestSpec {
        signal_fingerprint: fingerprint.to_string(),
        signal_name: signal.name,
        severity,
        signal_type: signal::SIGNAL_TYPE.into(),
        signal_source: signal.source.signal_source().into(),
        target_type: "kubernetes".into(),
        target_resource: target,
        cluster_id,
        firing_time: rfc3339(firing_time),
        received_time: rfc3339(received),
        signal_labels: labels,
        signal_annotations: signal::cut_values(signal.annotations, signal::ANNOTATION_VALUE_MAX),
        provider_data,
        original_payload: signal.payload,
    }
}

/// Counts a signal in flight for as long as the guard lives.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A smoothed time-to-outcome of recent signals, for load shedding: when signals take most of
/// their deadline to be stored (or to fail), admitting more only makes every one of them wait
/// out its deadline. Observations older than [`LatencyTracker::STALE`] are not trusted (with
/// nothing completing, the gateway admits again to find out).
/// It also remembers when a signal was last stored (readiness evidence).
pub struct LatencyTracker {
    state: std::sync::Mutex<(f64, Option<Instant>)>,
    last_stored: std::sync::Mutex<Option<Instant>>,
}

impl Default for LatencyTracker {
    fn default() -> Self {
        LatencyTracker {
            state: std::sync::Mutex::new((0.0, None)),
            last_stored: std::sync::Mutex::new(None),
        }
    }
}

impl LatencyTracker {
    /// Weight of the newest observation: about eight slow outcomes in a row move it from 0 to 80 %.
    const ALPHA: f64 = 0.2;
    pub const STALE: std::time::Duration = std::time::Duration::from_secs(2);

    pub fn observe(&self, took: std::time::Duration) {
        let mut st = self.state.lock().expect("latency tracker poisoned");
        st.0 += Self::ALPHA * (took.as_secs_f64() - st.0);
        st.1 = Some(Instant::now());
    }

    pub fn stored(&self) {
        *self.last_stored.lock().expect("latency tracker poisoned") = Some(Instant::now());
    }

    /// Whether a signal was stored within `window`.
    pub fn stored_within(&self, window: std::time::Duration) -> bool {
        self.last_stored
            .lock()
            .expect("latency tracker poisoned")
            .is_some_and(|at| at.elapsed() < window)
    }

    /// The smoothed latency when it is recent and above `limit`.
    pub fn above(&self, limit: std::time::Duration) -> Option<f64> {
        let st = self.state.lock().expect("latency tracker poisoned");
        let recent = st.1.is_some_and(|at| at.elapsed() < Self::STALE);
        (recent && st.0 > limit.as_secs_f64()).then_some(st.0)
    }
}

#[cfg(test)]
mod tests {
    use super::LatencyTracker;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn sheds_only_on_sustained_recent_slowness() {
        let t = LatencyTracker::default();
        let limit = Duration::from_secs(4);
        assert_eq!(t.above(limit), None, "no observation: admit");
        t.observe(Duration::from_secs(5));
        t.observe(Duration::from_secs(5));
        assert_eq!(t.above(limit), None, "two slow signals are not an overload");
        for _ in 0..10 {
            t.observe(Duration::from_secs(5));
        }
        assert!(t.above(limit).is_some(), "a run of signals at the deadline is");
        tokio::time::advance(LatencyTracker::STALE).await;
        assert_eq!(t.above(limit), None, "nothing completed lately: admit to find out");
        for _ in 0..10 {
            t.observe(Duration::from_millis(20));
        }
        assert_eq!(t.above(limit), None, "fast again");
    }
}
