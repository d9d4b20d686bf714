//! The buffered trail: the signal path hands events to [`AuditTrail::record`], which only takes a
//! lock and pushes (bounded in events and in bytes; a full buffer refuses the newest event, ADR
//! 0011); one background task takes batches out (when `batchSize` are waiting, or
//! `flushInterval` after the oldest waiting event arrived), sends them one at a time through a
//! [`Deliver`], and retries a batch that got no acceptable answer with jittered exponential
//! backoff. Events in flight still count against the bounds until their batch is done with.
//!
//! On shutdown [`TrailTask::drain`] sends everything still held, without waiting for the flush
//! interval, until the drain deadline; what is left then is counted `dropped_shutdown`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::metrics::{AuditMetrics, Fate};
use super::{AuditEvent, AuditSink, EventType};
use crate::lock::backoff;

/// Longest wait between two retries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A batch stops taking events once it holds this many bytes (it always takes at least one).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How one request with a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx: DataStorage stored the batch.
    Sent,
    /// 4xx (but 408 and 429): the batch will never be accepted as it is.
    Rejected { status: u16, detail: String },
    /// 5xx, 408, 429 or a connection error (`result`: the metric label); worth retrying.
    Retry { result: &'static str, why: String },
}

impl Attempt {
    fn label(&self) -> &'static str {
        match self {
            Attempt::Sent => "sent",
            Attempt::Rejected { .. } => "rejected",
            Attempt::Retry { result, .. } => result,
        }
    }
}

/// Sends one serialized batch (a JSON array of events). The HTTP client implements it; the
/// trail applies the timeout.
#[async_trait]
pub trait Deliver: Send + Sync + 'static {
    async fn deliver(&self, body: Bytes) -> Attempt;
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub buffer_size: usize,
    pub buffer_bytes: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    pub timeout: Duration,
}

impl Settings {
    pub fn from_config(c: &crate::config::Audit) -> Self {
        Settings {
            buffer_size: c.buffer_size,
            buffer_bytes: c.buffer_bytes,
            batch_size: c.batch_size,
            flush_interval: c.flush_interval,
            max_retries: c.max_retries,
            retry_backoff: c.retry_backoff,
            timeout: c.timeout,
        }
    }
}

struct Held {
    event: AuditEvent,
    bytes: usize,
    at: Instant,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Held>,
    /// Events and bytes held: waiting plus the batch in flight.
    events: usize,
    bytes: usize,
    /// Set by `drain`: nothing more is accepted, everything goes out at once.
    closing: bool,
    /// Events refused since the buffer last filled (logged when it has room again).
    refused: u64,
}

struct Shared {
    settings: Settings,
    state: Mutex<State>,
    /// Wakes the sender: the first event arrived, a batch is full, or draining began.
    wake: Notify,
    /// The drain deadline, once draining.
    deadline: watch::Sender<Option<Instant>>,
    metrics: AuditMetrics,
}

/// The handle the pipeline records into (a cheap clone).
#[derive(Clone)]
pub struct AuditTrail {
    shared: Arc<Shared>,
}

/// Owns the sender task; dropping it stops the task, [`TrailTask::drain`] flushes first.
pub struct TrailTask {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for TrailTask {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

impl AuditTrail {
    /// A trail sending through `deliver`, and the task that does it.
    pub fn start(settings: Settings, deliver: Arc<dyn Deliver>, metrics: AuditMetrics) -> (AuditTrail, TrailTask) {
        let (deadline, deadline_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            settings,
            state: Mutex::default(),
            wake: Notify::new(),
            deadline,
            metrics,
        });
        let handle = tokio::spawn(shared.clone().run(deliver, deadline_rx));
        (
            AuditTrail { shared: shared.clone() },
            TrailTask {
                shared,
                handle: Some(handle),
            },
        )
    }

    /// Events held now (waiting and in flight).
    pub fn held(&self) -> usize {
        self.shared.state().events
    }
}

impl AuditSink for AuditTrail {
    fn enabled(&self) -> bool {
        true
    }

    fn record(&self, event: AuditEvent) {
        self.shared.record(event);
    }
}

impl TrailTask {
    /// Sends everything held until `deadline`, then stops; what is left is `dropped_shutdown`.
    pub async fn drain(mut self, deadline: Instant) {
        self.shared.state().closing = true;
        let _ = self.shared.deadline.send(Some(deadline));
        self.shared.wake.notify_one();
        if let Some(handle) = self.handle.take() {
            // The task ends by itself at the deadline; the grace covers its last bookkeeping.
            let abort = handle.abort_handle();
            if tokio::time::timeout_at(deadline + Duration::from_secs(1), handle)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.shared.drop_all(Fate::DroppedShutdown);
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("audit trail poisoned")
    }

    fn gauges(&self, st: &State) {
        self.metrics.buffer_events.set(st.events as i64);
        self.metrics.buffer_bytes.set(st.bytes as i64);
    }

    fn record(&self, event: AuditEvent) {
        let kind = event.event_type;
        let bytes = event.held_bytes();
        let s = &self.settings;
        let mut st = self.state();
        if st.closing {
            drop(st);
            self.metrics.count(kind, Fate::DroppedShutdown, 1);
            return;
        }
        if st.events >= s.buffer_size || st.bytes + bytes > s.buffer_bytes {
            if st.refused == 0 {
                tracing::warn!(
                    held = st.events,
                    held_bytes = st.bytes,
                    "audit buffer full: refusing new audit events until DataStorage catches up"
                );
            }
            st.refused += 1;
            drop(st);
            self.metrics.count(kind, Fate::DroppedBufferFull, 1);
            return;
        }
        st.waiting.push_back(Held {
            event,
            bytes,
            at: Instant::now(),
        });
        st.events += 1;
        st.bytes += bytes;
        let waiting = st.waiting.len();
        self.gauges(&st);
        drop(st);
        self.metrics.count(kind, Fate::Enqueued, 1);
        if waiting == 1 || waiting == s.batch_size {
            self.wake.notify_one();
        }
    }

    async fn run(self: Arc<Self>, deliver: Arc<dyn Deliver>, mut deadline: watch::Receiver<Option<Instant>>) {
        while let Some(batch) = self.next_batch(&deadline).await {
            self.send(&*deliver, batch, &mut deadline).await;
        }
    }

    /// Waits for the next batch: `batchSize` events, or the oldest waiting for `flushInterval`,
    /// or anything at all while draining. `None` once draining has nothing left or its deadline
    /// passed.
    async fn next_batch(&self, deadline: &watch::Receiver<Option<Instant>>) -> Option<Vec<Held>> {
        loop {
            let due = {
                let mut st = self.state();
                let drain_by = *deadline.borrow();
                if drain_by.is_some_and(|d| Instant::now() >= d) {
                    return None;
                }
                let due = st.waiting.front().map(|h| h.at + self.settings.flush_interval);
                let ready = st.waiting.len() >= self.settings.batch_size
                    || due.is_some_and(|due| st.closing || due <= Instant::now());
                if ready {
                    return Some(self.take(&mut st));
                }
                if st.closing && st.waiting.is_empty() {
                    return None;
                }
                due
            };
            match due {
                Some(due) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    fn take(&self, st: &mut State) -> Vec<Held> {
        let mut batch = Vec::with_capacity(self.settings.batch_size.min(st.waiting.len()));
        let mut bytes = 0;
        while batch.len() < self.settings.batch_size
            && let Some(front) = st.waiting.front()
        {
            if !batch.is_empty() && bytes + front.bytes > MAX_BATCH_BYTES {
                break;
            }
            bytes += front.bytes;
            batch.push(st.waiting.pop_front().expect("front exists"));
        }
        batch
    }

    /// Releases `held` from the bounds; logs the end of an overflow once half the room is back.
    fn release(&self, st: &mut State, held: &[Held]) {
        for h in held {
            st.events -= 1;
            st.bytes -= h.bytes;
        }
        if st.refused > 0 && st.events <= self.settings.buffer_size / 2 && st.bytes <= self.settings.buffer_bytes / 2 {
            tracing::warn!(
                refused = st.refused,
                "audit buffer has room again; events were refused meanwhile"
            );
            st.refused = 0;
        }
        self.gauges(st);
    }

    /// Sends one batch until it is accepted, rejected, out of retries or out of drain time.
    async fn send(&self, deliver: &dyn Deliver, batch: Vec<Held>, deadline: &mut watch::Receiver<Option<Instant>>) {
        let events: Vec<&AuditEvent> = batch.iter().map(|h| &h.event).collect();
        let body = match serde_json::to_vec(&events) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                // Cannot happen for these types; never let it stop the trail.
                tracing::error!(error = %e, "could not serialize an audit batch; dropping it");
                return self.finish(batch, Fate::DroppedRejected);
            }
        };
        drop(events);
        self.metrics.batch_size.observe(batch.len() as f64);
        let s = &self.settings;
        let mut retries = 0;
        loop {
            let drain_by = *deadline.borrow();
            let limit = match drain_by {
                Some(d) => s.timeout.min(d.saturating_duration_since(Instant::now())),
                None => s.timeout,
            };
            if limit.is_zero() {
                return self.finish(batch, Fate::DroppedShutdown);
            }
            let started = Instant::now();
            let attempt = match tokio::time::timeout(limit, deliver.deliver(body.clone())).await {
                Ok(a) => a,
                Err(_) => Attempt::Retry {
                    result: "timeout",
                    why: format!("no answer within {limit:?}"),
                },
            };
            self.metrics
                .batch_duration
                .with_label_values(&[attempt.label()])
                .observe(started.elapsed().as_secs_f64());
            match attempt {
                Attempt::Sent => {
                    if retries > 0 {
                        tracing::info!(retries, events = batch.len(), "audit batch accepted after retries");
                    }
                    return self.finish(batch, Fate::Sent);
                }
                Attempt::Rejected { status, detail } => {
                    tracing::error!(
                        status, detail = %detail, events = batch.len(),
                        "DataStorage rejected an audit batch; dropping it (a 4xx is not retried)"
                    );
                    return self.finish(batch, Fate::DroppedRejected);
                }
                Attempt::Retry { result, why } => {
                    if retries >= s.max_retries {
                        tracing::error!(
                            result, why = %why, retries, events = batch.len(),
                            "audit batch dropped: DataStorage did not accept it through every retry"
                        );
                        return self.finish(batch, Fate::DroppedRetriesExhausted);
                    }
                    let wait = backoff(retries, s.retry_backoff, MAX_BACKOFF);
                    tracing::warn!(result, why = %why, retry_in = ?wait, events = batch.len(), "audit batch not accepted; retrying");
                    retries += 1;
                    let mut until = Instant::now() + wait;
                    loop {
                        if let Some(d) = *deadline.borrow_and_update() {
                            until = until.min(d);
                        }
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => break,
                            changed = deadline.changed() => if changed.is_err() { break },
                        }
                    }
                }
            }
        }
    }

    /// The batch is done with: count it and release its share of the bounds.
    fn finish(&self, batch: Vec<Held>, fate: Fate) {
        let mut st = self.state();
        self.release(&mut st, &batch);
        drop(st);
        self.count(batch.iter().map(|h| h.event.event_type), fate);
    }

    /// Counts everything still waiting as `fate` (the drain ran out of time).
    fn drop_all(&self, fate: Fate) {
        let mut st = self.state();
        let left: Vec<Held> = st.waiting.drain(..).collect();
        self.release(&mut st, &left);
        drop(st);
        if !left.is_empty() {
            tracing::error!(
                events = left.len(),
                "audit events still held at the drain deadline are lost"
            );
        }
        self.count(left.iter().map(|h| h.event.event_type), fate);
    }

    fn count(&self, types: impl Iterator<Item = EventType>, fate: Fate) {
        let mut per = [0u64; 4];
        for t in types {
            per[EventType::ALL.iter().position(|k| *k == t).expect("known type")] += 1;
        }
        for (t, n) in EventType::ALL.iter().zip(per) {
            if n > 0 {
                self.metrics.count(*t, fate, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::SignalFacts;
    use crate::crd::TargetResource;
    use crate::fingerprint::Fingerprint;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn event(i: usize, payload_bytes: usize) -> AuditEvent {
        let target = TargetResource {
            kind: "Pod".into(),
            name: format!("p-{i}"),
            namespace: "shop".into(),
            api_version: "v1".into(),
        };
        let spec = crate::crd::RemediationRequestSpec {
            signal_fingerprint: Fingerprint::of("", &target).to_string(),
            signal_name: "A".into(),
            target_resource: target,
            original_payload: "x".repeat(payload_bytes).into(),
            ..Default::default()
        };
        SignalFacts::new(None, &spec).deduplicated("ns", "rr", i as i64 + 2, "2026-11-24T10:00:00Z", 1)
    }

    /// Answers from a script (then `Sent`), and keeps every body it was given.
    #[derive(Default)]
    struct Script {
        answers: Mutex<VecDeque<Option<Attempt>>>,
        bodies: Mutex<Vec<Bytes>>,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl Deliver for Script {
        async fn deliver(&self, body: Bytes) -> Attempt {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.bodies.lock().unwrap().push(body);
            let next = self.answers.lock().unwrap().pop_front();
            match next {
                Some(Some(a)) => a,
                // `Some(None)`: never answer (the trail's timeout must end it).
                Some(None) => futures::future::pending().await,
                None => Attempt::Sent,
            }
        }
    }

    fn settings() -> Settings {
        Settings {
            buffer_size: 100,
            buffer_bytes: 1024 * 1024,
            batch_size: 10,
            flush_interval: Duration::from_secs(1),
            max_retries: 3,
            retry_backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
        }
    }

    fn metrics() -> AuditMetrics {
        crate::metrics::Metrics::register(&prometheus::Registry::new())
            .unwrap()
            .audit
    }

    fn counted(m: &AuditMetrics, fate: Fate) -> u64 {
        EventType::ALL
            .iter()
            .map(|t| m.events.with_label_values(&[t.as_str(), fate.as_str()]).get())
            .sum()
    }

    fn server_error() -> Option<Attempt> {
        Some(Attempt::Retry {
            result: "server_error",
            why: "500".into(),
        })
    }

    async fn settle(cond: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition never held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once_and_a_partial_one_after_the_flush_interval() {
        let script = Arc::new(Script::default());
        let m = metrics();
        let (trail, _task) = AuditTrail::start(settings(), script.clone(), m.clone());
        for i in 0..13 {
            trail.record(event(i, 10));
        }
        settle(|| script.calls.load(Ordering::SeqCst) == 1).await;
        let started = Instant::now();
        settle(|| script.calls.load(Ordering::SeqCst) == 2).await;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "the partial batch waited for the interval"
        );
        let bodies = script.bodies.lock().unwrap().clone();
        let sizes: Vec<usize> = bodies
            .iter()
            .map(|b| serde_json::from_slice::<Vec<serde_json::Value>>(b).unwrap().len())
            .collect();
        assert_eq!(sizes, vec![10, 3]);
        settle(|| trail.held() == 0).await;
        assert_eq!(counted(&m, Fate::Sent), 13);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_batch_is_retried_with_the_same_body_then_dropped_after_max_retries() {
        let script = Arc::new(Script::default());
        script
            .answers
            .lock()
            .unwrap()
            .extend([server_error(), None, server_error(), server_error()]);
        let m = metrics();
        let (trail, _task) = AuditTrail::start(settings(), script.clone(), m.clone());
        for i in 0..10 {
            trail.record(event(i, 10));
        }
        settle(|| counted(&m, Fate::DroppedRetriesExhausted) == 10).await;
        let bodies = script.bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 4, "one attempt and max_retries retries");
        assert!(
            bodies.iter().all(|b| *b == bodies[0]),
            "every retry sends the same batch"
        );
        assert_eq!(
            m.batch_duration.with_label_values(&["timeout"]).get_sample_count(),
            1,
            "the unanswered attempt ended at the timeout"
        );
        // The trail goes on with the next batch.
        trail.record(event(99, 10));
        settle(|| counted(&m, Fate::Sent) == 1).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_batch_is_dropped_without_retry() {
        let script = Arc::new(Script::default());
        script.answers.lock().unwrap().push_back(Some(Attempt::Rejected {
            status: 400,
            detail: "bad".into(),
        }));
        let m = metrics();
        let (trail, _task) = AuditTrail::start(settings(), script.clone(), m.clone());
        for i in 0..10 {
            trail.record(event(i, 10));
        }
        settle(|| counted(&m, Fate::DroppedRejected) == 10).await;
        assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_buffer_refuses_the_newest_events_beyond_its_event_and_byte_bounds() {
        // The first batch never gets an answer: everything recorded stays held.
        let hanging = || {
            let script = Arc::new(Script::default());
            script.answers.lock().unwrap().push_back(None);
            script
        };
        let s = Settings {
            timeout: Duration::from_secs(3600),
            ..settings()
        };
        let m = metrics();
        let (trail, _task) = AuditTrail::start(s.clone(), hanging(), m.clone());
        // Small events: the event bound holds.
        for i in 0..250 {
            trail.record(event(i, 10));
        }
        assert_eq!(trail.held(), s.buffer_size);
        assert_eq!(counted(&m, Fate::DroppedBufferFull), 150);
        assert_eq!(m.buffer_events.get(), s.buffer_size as i64);
        // Large events: the byte bound holds.
        let s = Settings {
            buffer_bytes: 64 * 1024,
            ..s
        };
        let m = metrics();
        let (trail, _task) = AuditTrail::start(s.clone(), hanging(), m.clone());
        for i in 0..50 {
            trail.record(event(i, 8 * 1024));
        }
        assert!(trail.shared.state().bytes <= s.buffer_bytes);
        assert!(m.buffer_bytes.get() <= s.buffer_bytes as i64);
        assert!(trail.held() < 10, "{} events of 8 KiB in 64 KiB", trail.held());
        assert_eq!(counted(&m, Fate::DroppedBufferFull), 50 - trail.held() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_sends_what_is_held_at_once_and_counts_what_the_deadline_cuts_off() {
        let script = Arc::new(Script::default());
        let m = metrics();
        let (trail, task) = AuditTrail::start(settings(), script.clone(), m.clone());
        for i in 0..15 {
            trail.record(event(i, 10));
        }
        let started = Instant::now();
        task.drain(Instant::now() + Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "no flush interval while draining"
        );
        assert_eq!(counted(&m, Fate::Sent), 15);
        trail.record(event(20, 10));
        assert_eq!(
            counted(&m, Fate::DroppedShutdown),
            1,
            "nothing is accepted after the drain"
        );

        let hanging = Arc::new(Script::default());
        hanging.answers.lock().unwrap().extend([None, None, None]);
        let m = metrics();
        let s = Settings {
            timeout: Duration::from_secs(60),
            ..settings()
        };
        let (trail, task) = AuditTrail::start(s, hanging, m.clone());
        for i in 0..15 {
            trail.record(event(i, 10));
        }
        let started = Instant::now();
        task.drain(Instant::now() + Duration::from_secs(5)).await;
        assert!(started.elapsed() <= Duration::from_secs(6), "the drain deadline holds");
        assert_eq!(counted(&m, Fate::DroppedShutdown), 15);
        assert_eq!(m.buffer_events.get(), 0);
    }
}
