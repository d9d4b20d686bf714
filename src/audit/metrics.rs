//! The audit trail's metrics: what happened to each event, how its batches fared, and what the
//! buffer holds. Registered with the gateway's other metrics (so docs/metrics.md lists them and
//! `/metrics` serves them at zero while the trail is off).

use prometheus::{Histogram, HistogramVec, IntCounterVec, IntGauge};

use super::EventType;
use crate::metrics::{API_LATENCY_BUCKETS, Reg, SIZE_BUCKETS, counter_vec, gauge, histogram, histogram_vec};

/// What became of an event (`result` of `gateway_audit_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Enqueued,
    Sent,
    /// The buffer was full (events or bytes): the newest event is refused.
    DroppedBufferFull,
    /// DataStorage answered 4xx: the batch can never be accepted as it is.
    DroppedRejected,
    /// 5xx, timeouts or connection errors through every retry.
    DroppedRetriesExhausted,
    /// Still held when the drain deadline passed.
    DroppedShutdown,
}

impl Fate {
    pub const ALL: [Fate; 6] = [
        Fate::Enqueued,
        Fate::Sent,
        Fate::DroppedBufferFull,
        Fate::DroppedRejected,
        Fate::DroppedRetriesExhausted,
        Fate::DroppedShutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fate::Enqueued => "enqueued",
            Fate::Sent => "sent",
            Fate::DroppedBufferFull => "dropped_buffer_full",
            Fate::DroppedRejected => "dropped_rejected",
            Fate::DroppedRetriesExhausted => "dropped_retries_exhausted",
            Fate::DroppedShutdown => "dropped_shutdown",
        }
    }
}

/// How one batch request ended (`result` of `gateway_audit_batch_duration_seconds`).
pub const ATTEMPT_RESULTS: [&str; 5] = ["sent", "rejected", "server_error", "timeout", "connection_error"];

#[derive(Clone)]
pub struct AuditMetrics {
    pub events: IntCounterVec,
    pub batch_duration: HistogramVec,
    pub batch_size: Histogram,
    pub buffer_events: IntGauge,
    pub buffer_bytes: IntGauge,
}

impl AuditMetrics {
    pub(crate) fn register(r: &Reg) -> prometheus::Result<Self> {
        let m = AuditMetrics {
            events: counter_vec(
                r,
                "gateway_audit_events_total",
                "Audit events by type and result: enqueued, sent (DataStorage answered 2xx), dropped_buffer_full, dropped_rejected (4xx), dropped_retries_exhausted, dropped_shutdown.",
                &["type", "result"],
            )?,
            batch_duration: histogram_vec(
                r,
                "gateway_audit_batch_duration_seconds",
                "Audit batch requests to DataStorage by result: sent, rejected (4xx), server_error (5xx, 408, 429), timeout, connection_error.",
                &["result"],
                API_LATENCY_BUCKETS,
            )?,
            batch_size: histogram(
                r,
                "gateway_audit_batch_size",
                "Events per audit batch (observed once per batch, not per retry).",
                SIZE_BUCKETS,
            )?,
            buffer_events: gauge(
                r,
                "gateway_audit_buffer_events",
                "Audit events held now (waiting and in flight).",
            )?,
            buffer_bytes: gauge(
                r,
                "gateway_audit_buffer_bytes",
                "Bytes of audit event text held now (waiting and in flight); bounded by audit.bufferBytes.",
            )?,
        };
        for t in EventType::ALL {
            for f in Fate::ALL {
                m.events.with_label_values(&[t.as_str(), f.as_str()]);
            }
        }
        for result in ATTEMPT_RESULTS {
            m.batch_duration.with_label_values(&[result]);
        }
        Ok(m)
    }

    pub fn count(&self, t: EventType, fate: Fate, n: u64) {
        self.events.with_label_values(&[t.as_str(), fate.as_str()]).inc_by(n);
    }
}
