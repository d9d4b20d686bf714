//! The audit trail Kubernaut's DataStorage keeps of every signal decision (KUBERNAUT.md, "Audit
//! events to DataStorage"; docs/audit.md; ADR 0012).
//!
//! The pipeline knows only [`AuditSink`]: it builds the events of a decision ([`SignalFacts`])
//! and hands them over, which never blocks and never fails the signal. [`AuditTrail`] is the
//! buffered sink (bounded in events and bytes, batches, retries); [`client`] is its HTTP side.
//! With `audit.url` unset the sink is [`Disabled`] and the pipeline builds nothing.

pub mod client;
mod event;
mod metrics;
pub mod trail;

use std::sync::Arc;

pub use event::{AuditEvent, CORRELATION_ID_MAX, ErrorDetails, EventData, EventType, Payload, SignalFacts};
pub use metrics::{ATTEMPT_RESULTS, AuditMetrics, Fate};
pub use trail::{AuditTrail, TrailTask};

/// Where the pipeline puts audit events.
pub trait AuditSink: Send + Sync + 'static {
    /// Whether events are wanted at all (the pipeline skips building them when not).
    fn enabled(&self) -> bool;
    /// Hands over one event. Never blocks; a full buffer drops (and counts) instead.
    fn record(&self, event: AuditEvent);
}

/// No audit trail (`audit.url` unset).
pub struct Disabled;

impl AuditSink for Disabled {
    fn enabled(&self) -> bool {
        false
    }
    fn record(&self, _: AuditEvent) {}
}

/// DataStorage's readiness, for `/readyz` (only when `audit.healthURL` is set).
#[derive(Clone)]
pub struct Health {
    delivery: Arc<client::HttpDelivery>,
    url: http::Uri,
    timeout: std::time::Duration,
}

impl Health {
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.delivery.check(&self.url)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "DataStorage readiness {} did not answer within {:?}",
                self.url, self.timeout
            )),
        }
    }
}

/// What `serve` wires in: the sink, the task to drain at shutdown, the readiness check.
pub struct Started {
    pub sink: Arc<dyn AuditSink>,
    pub task: Option<TrailTask>,
    pub health: Option<Health>,
}

/// The trail `config` asks for (disabled while `audit.url` is empty).
pub fn start(config: &crate::config::Audit, metrics: &crate::metrics::Metrics) -> anyhow::Result<Started> {
    if config.url.is_empty() {
        return Ok(Started {
            sink: Arc::new(Disabled),
            task: None,
            health: None,
        });
    }
    let delivery = Arc::new(client::HttpDelivery::new(config, metrics.file_reloads.clone())?);
    let health = if config.health_url.is_empty() {
        None
    } else {
        Some(Health {
            delivery: delivery.clone(),
            url: config
                .health_url
                .parse()
                .map_err(|e| anyhow::anyhow!("audit.healthURL {:?}: {e}", config.health_url))?,
            timeout: config.timeout.min(std::time::Duration::from_secs(2)),
        })
    };
    let (trail, task) = AuditTrail::start(trail::Settings::from_config(config), delivery, metrics.audit.clone());
    tracing::info!(
        url = %config.url, buffer = config.buffer_size, batch = config.batch_size,
        readiness = health.is_some(), "audit trail to DataStorage on"
    );
    Ok(Started {
        sink: Arc::new(trail),
        task: Some(task),
        health,
    })
}
