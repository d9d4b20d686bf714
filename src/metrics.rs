//! Every metric the gateway exports. One [`Metrics`] is built per process on an injected
//! `prometheus::Registry` (tests build their own) and handed to the components that record.
//! Names are a contract with dashboards/, alerts and docs/metrics.md: change them together.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// client-go's rest_client_request_duration_seconds buckets.
pub(crate) const API_LATENCY_BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0];
const SIGNAL_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const LOCK_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const CALLS_PER_SIGNAL_BUCKETS: &[f64] = &[0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];
pub(crate) const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
const LINGER_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
];

#[derive(Clone)]
pub struct Metrics {
    pub signals_received: IntCounterVec,
    pub signals_deduplicated: IntCounterVec,
    pub signals_absorbed: IntCounterVec,
    pub crds_created: IntCounterVec,
    pub dedup_decisions: IntCounterVec,
    pub signal_duration: HistogramVec,
    pub signals_in_flight: IntGauge,
    pub body_bytes_buffered: IntGauge,
    pub http_connections: IntGaugeVec,
    pub http_connections_refused: IntCounterVec,
    pub signals_shed: IntCounter,
    pub signals_resent: IntCounter,
    pub http_duration: HistogramVec,
    pub batch_size: Histogram,

    pub auth_requests: IntCounterVec,
    pub auth_cache: IntCounterVec,
    pub signals_rejected: IntCounterVec,
    pub scope_decisions: IntCounterVec,
    pub file_reloads: IntCounterVec,

    pub lock_acquisitions: IntCounterVec,
    pub lock_failures: IntCounterVec,
    pub lock_wait: Histogram,
    pub lock_hold: Histogram,
    pub locks_held: IntGauge,
    pub lock_renewals: IntCounterVec,
    pub lock_releases: IntCounterVec,

    pub api_requests: IntCounterVec,
    pub api_duration: HistogramVec,
    pub api_calls_per_signal: Histogram,

    pub status_conflicts: IntCounter,
    pub write_resolutions: IntCounterVec,
    pub retries: IntCounterVec,
    pub occurrences: IntCounter,
    pub coalesced_batch: Histogram,
    pub hint_lookups: IntCounterVec,
    pub conflict_refreshes: IntCounterVec,
    pub linger: Histogram,

    pub watch_synced: IntGauge,
    pub watch_events: IntCounterVec,
    pub watch_relists: IntCounter,
    pub watch_errors: IntCounter,
    pub watch_cached: IntGauge,

    pub ownership_shards_owned: IntGauge,
    pub ownership_members: IntGauge,
    pub ownership_shards_routed: IntGaugeVec,
    pub ownership_shards_pending: IntGauge,
    pub ownership_rounds: IntCounterVec,
    pub ownership_handovers: IntCounterVec,
    pub forwards: IntCounterVec,
    pub forward_duration: Histogram,
    pub forward_fallbacks: IntCounterVec,
    pub forwarded_received: IntCounterVec,

    pub build_info: IntGaugeVec,

    /// The audit trail's own metrics (src/audit/metrics.rs).
    pub audit: crate::audit::AuditMetrics,
    /// The owner cache's own metrics (src/ownercache.rs).
    pub owner_cache: crate::ownercache::OwnerCacheMetrics,
}

/// A registry that also remembers what was registered (name, type), for the docs check.
pub(crate) struct Reg<'a> {
    registry: &'a Registry,
    catalogue: std::cell::RefCell<Vec<(String, &'static str)>>,
}

impl Reg<'_> {
    fn register<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        c: &C,
        kind: &'static str,
    ) -> prometheus::Result<()> {
        for d in c.desc() {
            self.catalogue.borrow_mut().push((d.fq_name.clone(), kind));
        }
        self.registry.register(Box::new(c.clone()))
    }
}

pub(crate) fn counter_vec(r: &Reg, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(&c, "counter")?;
    Ok(c)
}

pub(crate) fn counter(r: &Reg, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(&c, "counter")?;
    Ok(c)
}

pub(crate) fn histogram(r: &Reg, name: &str, help: &str, buckets: &[f64]) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
    r.register(&h, "histogram")?;
    Ok(h)
}

pub(crate) fn histogram_vec(
    r: &Reg,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
    r.register(&h, "histogram")?;
    Ok(h)
}

pub(crate) fn gauge_vec(r: &Reg, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(&g, "gauge")?;
    Ok(g)
}

pub(crate) fn gauge(r: &Reg, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(&g, "gauge")?;
    Ok(g)
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Self::register_with_catalogue(registry).map(|(m, _)| m)
    }

    /// Registers every metric and returns (name, type) of each gateway metric registered.
    pub fn register_with_catalogue(registry: &Registry) -> prometheus::Result<(Self, Vec<(String, &'static str)>)> {
        let r = &Reg {
            registry,
            catalogue: Default::default(),
        };
        let m = Metrics {
            signals_received: counter_vec(
                r,
                "gateway_signals_received_total",
                "Signals received, by source and severity.",
                &["source", "severity"],
            )?,
            signals_deduplicated: counter_vec(
                r,
                "gateway_signals_deduplicated_total",
                "Signals counted into an existing RemediationRequest instead of opening one.",
                &["source"],
            )?,
            signals_absorbed: counter_vec(
                r,
                "gateway_signals_absorbed_total",
                "Signals counted into an existing RemediationRequest, by the Kubernaut rule that made it absorb them: active, manual_review or cooldown.",
                &["rule"],
            )?,
            crds_created: counter_vec(
                r,
                "gateway_crds_created_total",
                "RemediationRequests created.",
                &["source"],
            )?,
            dedup_decisions: counter_vec(
                r,
                "gateway_dedup_decisions_total",
                "Outcome of every signal: created, duplicate, ignored, rejected or failed.",
                &["decision"],
            )?,
            signal_duration: histogram_vec(
                r,
                "gateway_signal_processing_duration_seconds",
                "Time from parsed signal to durable outcome, by outcome.",
                &["outcome"],
                SIGNAL_LATENCY_BUCKETS,
            )?,
            signals_in_flight: gauge(r, "gateway_signals_in_flight", "Signals being processed now.")?,
            http_connections: gauge_vec(
                r,
                "gateway_http_connections",
                "Open client connections by port (signals, admin), against server.maxConnections.",
                &["port"],
            )?,
            http_connections_refused: counter_vec(
                r,
                "gateway_http_connections_refused_total",
                "Connections closed as soon as accepted because the port had server.maxConnections open.",
                &["port"],
            )?,
            body_bytes_buffered: gauge(
                r,
                "gateway_http_body_bytes_buffered",
                "Bytes of request bodies held in memory now, as counted against server.maxBufferedBodyBytes.",
            )?,
            signals_shed: counter(
                r,
                "gateway_signals_shed_total",
                "Signals refused with 503 because the in-flight cap was reached or the gateway is shutting down.",
            )?,
            signals_resent: counter(
                r,
                "gateway_signals_resent_total",
                "Alerts of a resent notification (same body within 5 minutes of a 503 answer) that this replica had already stored: answered from memory, not counted again.",
            )?,
            http_duration: histogram_vec(
                r,
                "gateway_http_request_duration_seconds",
                "HTTP request latency by endpoint, method and status code.",
                &["endpoint", "method", "code"],
                SIGNAL_LATENCY_BUCKETS,
            )?,
            batch_size: histogram(
                r,
                "gateway_alertmanager_batch_size",
                "Alerts per Alertmanager webhook request.",
                SIZE_BUCKETS,
            )?,

            auth_requests: counter_vec(
                r,
                "gateway_auth_requests_total",
                "Signals API requests by authentication mode and result: allowed, unauthenticated (401), forbidden (403), error (503, the review API failed), limited (503, the review budget for unknown tokens is used up).",
                &["mode", "result"],
            )?,
            auth_cache: counter_vec(
                r,
                "gateway_auth_cache_lookups_total",
                "TokenReview/SubjectAccessReview cache lookups: hit (no API call) or miss.",
                &["result"],
            )?,
            signals_rejected: counter_vec(
                r,
                "gateway_signals_rejected_total",
                "Signals answered rejected by the admission checks, by reason: future_timestamp, stale_signal, invalid_timestamp, unmanaged_resource.",
                &["reason"],
            )?,
            scope_decisions: counter_vec(
                r,
                "gateway_scope_decisions_total",
                "Scope checks (scope.requireManagedLabel): managed, unmanaged, error (label read failed; answered 503).",
                &["result"],
            )?,
            file_reloads: counter_vec(
                r,
                "gateway_file_reloads_total",
                "Re-reads of changed files (tls_certificate, auth_tokens, audit_ca) by result: ok, error (tls_certificate, audit_ca: the previous one stays in use; auth_tokens: no static token is accepted until the file holds tokens again).",
                &["file", "result"],
            )?,

            lock_acquisitions: counter_vec(
                r,
                "gateway_lock_acquisitions_total",
                "Lease lock attempts by outcome: acquired, contended, takeover, error.",
                &["outcome"],
            )?,
            lock_failures: counter_vec(
                r,
                "gateway_lock_acquisition_failures_total",
                "Signals that could not obtain the creation lock, by reason.",
                &["reason"],
            )?,
            lock_wait: histogram(
                r,
                "gateway_lock_wait_duration_seconds",
                "Time from the first lock attempt to acquisition or giving up.",
                LOCK_BUCKETS,
            )?,
            lock_hold: histogram(
                r,
                "gateway_lock_hold_duration_seconds",
                "Time a lease lock was held.",
                LOCK_BUCKETS,
            )?,
            locks_held: gauge(r, "gateway_locks_held", "Lease locks held by this replica now.")?,
            lock_renewals: counter_vec(
                r,
                "gateway_lock_renewals_total",
                "Lease renewals while holding a lock, by result: renewed, lost, error.",
                &["result"],
            )?,
            lock_releases: counter_vec(
                r,
                "gateway_lock_releases_total",
                "Lease releases by result: released, gone, lost, error.",
                &["result"],
            )?,

            api_requests: counter_vec(
                r,
                "gateway_k8s_api_requests_total",
                "Kubernetes API requests (every store call on the embedded backend), by verb, resource and response code.",
                &["verb", "resource", "code"],
            )?,
            api_duration: histogram_vec(
                r,
                "gateway_k8s_api_request_duration_seconds",
                "Kubernetes API request latency by verb and resource.",
                &["verb", "resource"],
                API_LATENCY_BUCKETS,
            )?,
            api_calls_per_signal: histogram(
                r,
                "gateway_k8s_api_calls_per_signal",
                "Kubernetes API requests spent per signal (shared requests are divided among the signals of a coalesced batch).",
                CALLS_PER_SIGNAL_BUCKETS,
            )?,

            status_conflicts: counter(
                r,
                "gateway_dedup_status_update_conflicts_total",
                "Conditional status updates rejected with 409 Conflict (then retried).",
            )?,
            write_resolutions: counter_vec(
                r,
                "gateway_dedup_unanswered_writes_total",
                "Status writes sent whose answer was lost, by what reading back found: resent (the identical repeat was stored), stored, not_stored (counted again), unknown (answered 503).",
                &["result"],
            )?,
            retries: counter_vec(
                r,
                "gateway_dedup_retries_total",
                "Retried deduplication steps: conflict (409 on the status update), already_exists (create lost a race), gone (RR turned terminal or vanished mid-decision), lock_contended (lease held by another replica).",
                &["reason"],
            )?,
            occurrences: counter(
                r,
                "gateway_dedup_occurrences_total",
                "Occurrences added to RemediationRequests (sum of all count increments).",
            )?,
            coalesced_batch: histogram(
                r,
                "gateway_dedup_coalesced_batch_size",
                "Signals for one fingerprint served by one deduplication write.",
                SIZE_BUCKETS,
            )?,
            hint_lookups: counter_vec(
                r,
                "gateway_dedup_hint_lookups_total",
                "How each optimistic batch found its RemediationRequest: hit (hint written without conflict), conflict (hint outdated, refreshed and written), stale (hinted RR terminal or gone), miss (no hint, fresh list), absent (the synced watch knows none: straight to the lock).",
                &["result"],
            )?,
            conflict_refreshes: counter_vec(
                r,
                "gateway_dedup_conflict_refreshes_total",
                "Status-update conflicts by how the newer version was obtained: watch (delivered by the RemediationRequest watch within dedup.watchWait) or get (read from the API server).",
                &["via"],
            )?,
            linger: histogram(
                r,
                "gateway_dedup_linger_duration_seconds",
                "Time a coalesced batch waited to gather more signals before its write (dedup.linger, dedup.countLinger).",
                LINGER_BUCKETS,
            )?,

            watch_synced: gauge(
                r,
                "gateway_rr_watch_synced",
                "1 while the RemediationRequest watch has a complete list and is running, else 0.",
            )?,
            watch_events: counter_vec(
                r,
                "gateway_rr_watch_events_total",
                "RemediationRequests received by the watch: listed (in a (re)list), applied (created or modified), deleted.",
                &["type"],
            )?,
            watch_relists: counter(
                r,
                "gateway_rr_watch_relists_total",
                "Lists the RemediationRequest watch started (the first, and one after every failure).",
            )?,
            watch_errors: counter(
                r,
                "gateway_rr_watch_errors_total",
                "RemediationRequest watch failures (each is followed by a backoff and a relist).",
            )?,
            watch_cached: gauge(
                r,
                "gateway_rr_watch_cached_requests",
                "Active RemediationRequests held as hints (from the watch and this replica's own writes).",
            )?,

            ownership_shards_owned: gauge(
                r,
                "gateway_ownership_shards_owned",
                "Fingerprint shards this replica owns now (effective claims while its member Lease is valid; ownership.enabled).",
            )?,
            ownership_members: gauge(
                r,
                "gateway_ownership_members",
                "Live members (replicas with a current member Lease, this one included) as this replica sees them.",
            )?,
            ownership_shards_routed: gauge_vec(
                r,
                "gateway_ownership_shards_routed",
                "Shards by where this replica sends their signals: self (it owns them), peer (exactly one other live member claims them: forwarded), none (no or two claims, a handover under way: the Lease-guarded path here).",
                &["to"],
            )?,
            ownership_shards_pending: gauge(
                r,
                "gateway_ownership_shards_pending",
                "Shards this replica is about to claim, release, or waits to see uncontested (0 when its ownership has settled).",
            )?,
            ownership_rounds: counter_vec(
                r,
                "gateway_ownership_rounds_total",
                "Membership rounds (renew the member Lease with the claims, list the members) by result: ok, error (the claims lapse unless a round succeeds within the lease duration).",
                &["result"],
            )?,
            ownership_handovers: counter_vec(
                r,
                "gateway_ownership_handovers_total",
                "Shards this replica took over (acquired) or gave up (released).",
                &["direction"],
            )?,
            forwards: counter_vec(
                r,
                "gateway_forwards_total",
                "Signals forwarded to the owner of their shard, by result: stored (owner answered 2xx), failed (owner answered not stored), unanswered (sent, no answer in time: answered 503), not_sent (fell back to the local path).",
                &["result"],
            )?,
            forward_duration: histogram(
                r,
                "gateway_forward_duration_seconds",
                "Time from sending a forwarded signal to the owner's answer.",
                SIGNAL_LATENCY_BUCKETS,
            )?,
            forward_fallbacks: counter_vec(
                r,
                "gateway_forward_fallbacks_total",
                "Signals of a shard another replica owns, processed here on the Lease-guarded path instead, by reason: unreachable (no connection), saturated (forward slots full), refused (owner refused the forward), untrusted (a TLS peer whose certificate is not the one its member Lease publishes).",
                &["reason"],
            )?,
            forwarded_received: counter_vec(
                r,
                "gateway_forwarded_signals_received_total",
                "Forwarded signals this replica received from peers, by result: stored, failed, refused (bad key or body).",
                &["result"],
            )?,

            build_info: gauge_vec(
                r,
                "gateway_build_info",
                "Build and runtime information; value is always 1.",
                &["version", "backend", "strategy"],
            )?,
            audit: crate::audit::AuditMetrics::register(r)?,
            owner_cache: crate::ownercache::OwnerCacheMetrics::register(r)?,
        };
        m.initialise_known_series();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok((m, r.catalogue.take()))
    }

    /// Exports every series with a closed label set at zero from the start, so rates, ratios and
    /// alerts see "0" rather than "no data" before the first event of a kind.
    fn initialise_known_series(&self) {
        let closed: [(&IntCounterVec, &[&str]); 19] = [
            (&self.signals_absorbed, &["active", "manual_review", "cooldown"]),
            (
                &self.dedup_decisions,
                &["created", "duplicate", "ignored", "rejected", "failed"],
            ),
            (&self.lock_acquisitions, &["acquired", "contended", "takeover", "error"]),
            (&self.lock_failures, &["timeout", "api_error"]),
            (&self.lock_renewals, &["renewed", "lost", "error"]),
            (
                &self.lock_releases,
                &["released", "gone", "lost", "error", "swept", "abandoned", "cleaned"],
            ),
            (&self.write_resolutions, &["resent", "stored", "not_stored", "unknown"]),
            (&self.hint_lookups, &["hit", "conflict", "stale", "miss", "absent"]),
            (&self.conflict_refreshes, &["watch", "get"]),
            (&self.watch_events, &["listed", "applied", "deleted"]),
            (
                &self.retries,
                &["conflict", "already_exists", "gone", "lock_contended", "lock_lost"],
            ),
            (&self.auth_cache, &["hit", "miss"]),
            (
                &self.signals_rejected,
                &[
                    "future_timestamp",
                    "stale_signal",
                    "invalid_timestamp",
                    "unmanaged_resource",
                ],
            ),
            (&self.scope_decisions, &["managed", "unmanaged", "error"]),
            (&self.ownership_handovers, &["acquired", "released"]),
            (&self.ownership_rounds, &["ok", "error"]),
            (&self.forwards, &["stored", "failed", "unanswered", "not_sent"]),
            (
                &self.forward_fallbacks,
                &["unreachable", "saturated", "refused", "untrusted"],
            ),
            (&self.forwarded_received, &["stored", "failed", "refused"]),
        ];
        for (vec, values) in closed {
            for v in values {
                vec.with_label_values(&[v]);
            }
        }
        for file in ["tls_certificate", "auth_tokens", "audit_ca"] {
            for result in ["ok", "error"] {
                self.file_reloads.with_label_values(&[file, result]);
            }
        }
        for port in ["signals", "admin"] {
            self.http_connections.with_label_values(&[port]);
            self.http_connections_refused.with_label_values(&[port]);
        }
        for source in ["prometheus", "kubernetes-event"] {
            self.signals_deduplicated.with_label_values(&[source]);
            self.crds_created.with_label_values(&[source]);
        }
    }

    /// Prometheus text exposition of `registry`.
    pub fn render(registry: &Registry) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// Severities that are label values of `gateway_signals_received_total` as they are (after
/// lowercasing); every other value counts as `other`. A sender chooses the severity label freely,
/// so passing it through would let one sender create any number of series.
const KNOWN_SEVERITIES: &[&str] = &[
    "critical", "error", "warning", "info", "page", "high", "medium", "low", "none",
];

/// The `severity` label value for a signal's severity: a bounded set.
pub fn severity_label(severity: &str) -> &'static str {
    KNOWN_SEVERITIES
        .iter()
        .find(|known| known.eq_ignore_ascii_case(severity.trim()))
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod severity_tests {
    use super::severity_label;

    #[test]
    fn severity_labels_are_a_bounded_set() {
        assert_eq!(severity_label("critical"), "critical");
        assert_eq!(severity_label(" Warning "), "warning");
        assert_eq!(severity_label(""), "other");
        assert_eq!(severity_label("sev-1234-attacker-chosen"), "other");
        // However many distinct unknown values senders use, they all come out as one label value.
        let distinct: std::collections::BTreeSet<&str> =
            (0..10_000).map(|i| severity_label(&format!("s{i}"))).collect();
        assert_eq!(distinct.len(), 1);
    }
}
