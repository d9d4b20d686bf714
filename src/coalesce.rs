//! Group commit per fingerprint inside one replica. Concurrent signals for one fingerprint join a
//! queue; a single worker task per fingerprint takes everything queued and stores it with one
//! deduplication write (`occurrenceCount += n`), then answers each waiter with its own count.
//! A signal that arrives while that write is under way joins it until its status update is sent
//! (the writer seals the batch for the update, and reopens it after a Conflict).
//! A storm of identical alerts thus costs a handful of API calls, and every acknowledged signal
//! is in the stored count.
//!
//! The worker is a spawned task, so a caller that disconnects does not cancel a write others wait
//! on; waiters whose deadline has passed are answered DeadlineExceeded before any write is sent,
//! and waiters whose caller has gone are dropped before it (their retry would count them again).
//!
//! Linger (`dedup.linger`, ADR 0007): when the fingerprint is *hot* — its RR was written, by any
//! replica, within the last two of its lingers — the worker lets a batch gather signals until the
//! linger has passed since the batch's first signal arrived, so a storm costs far fewer writes
//! per signal. A fast API server lingers as long as a slow one: each write costs it the same, and
//! at a high rate writes sent back to back would carry a few signals each. A slow one lingers
//! longer, as long as this replica's writes take on average (up to four lingers): its signals
//! already wait that long for a write, and the API server is then the bottleneck. While this
//! fingerprint's writes keep meeting Conflicts (other replicas write the same RR), its linger
//! doubles, up to four times, and shrinks back once writes go through: fewer, larger writes
//! instead of a pile-up of retries. It stops early when the batch is full, and never keeps a
//! signal waiting more than half of the time its deadline leaves it.
//! A lone signal (cold fingerprint) is written at once.
//!
//! Count linger (`dedup.countLinger`, ADR 0016): a batch that only counts into an RR this replica
//! knows to be active (no create, nothing for the orchestrator to start) may wait longer, up to
//! the count linger, for more signals of its incident — unless its sender looks like one that
//! waits for each answer before it sends the next: the batch's first signal arrived within one
//! count linger after the incident's last answer, and no two of its signals were unanswered at
//! once within the last [`TOGETHER_MEMORY`]. Such a sender's next signal only comes once it is
//! answered, so waiting for company would only slow it down; one that sends again sooner than a
//! count linger is never held, and one that takes longer is held at most once per signal, so it
//! is slowed by half at worst. Signals from several senders (or one sender's parallel requests)
//! overlap, and come at random times after an answer. Such a batch waits at least the hot linger, and
//! after that only until it holds `dedup.flushAt` signals: a storm's batches, full by then, are
//! written as they were, and only batches of a few signals wait for more.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::bounded::{BoundedMap, Limits};
use crate::cluster::Tally;
use crate::crd::RemediationRequestSpec;
use crate::dedup::{Batch, Budget, Dedup, DedupError, Written};
use crate::fingerprint::Fingerprint;
use crate::metrics::Metrics;

/// What one signal was answered.
/// Also the body of a forwarded signal's 200 answer (src/http/forward.rs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    pub name: String,
    pub namespace: String,
    pub created: bool,
    pub occurrence_count: i64,
    /// `status.deduplication` times of the request after the write (RFC 3339).
    pub first_seen_at: String,
    pub last_seen_at: String,
    /// The rule under which the request took the count.
    pub absorbed_by: crate::absorb::Absorbs,
    /// API requests of the write, divided among the signals of the batch.
    pub api_calls: f64,
}

struct Waiter {
    /// Tells this signal apart in a batch it may leave (see [`Seat`]).
    id: u64,
    spec: RemediationRequestSpec,
    /// The signal's span: the batch span is its child (first waiter) or linked to it.
    span: tracing::Span,
    arrived: Instant,
    deadline: Instant,
    tx: oneshot::Sender<Result<Ack, DedupError>>,
}

#[derive(Default)]
struct Queue {
    waiters: Vec<Waiter>,
    /// Wakes a lingering worker once `flush_at`, and again once `max_batch`, signals are queued.
    full: Arc<Notify>,
    /// The batch being written, which signals join on arrival while it is open.
    writing: Option<Writing>,
}

/// A batch under way: its count (shared with the writer) and its signals, changed together
/// under the queues lock so that they always agree.
struct Writing {
    batch: Arc<Batch>,
    waiters: Vec<Waiter>,
    span: tracing::Span,
    /// The batch's deadline (its first signals' earliest): a signal joins only if its own is
    /// no earlier, so the write's bound is never past a deadline it answers.
    join_by: Instant,
}

/// How long batches wait for company (module docs; `dedup` in src/config.rs).
#[derive(Debug, Clone, Copy)]
pub struct Lingers {
    /// A hot fingerprint's linger (`dedup.linger`); zero turns lingering off.
    pub linger: Duration,
    /// A batch that only counts into a known active RR, of an incident whose signals overlap
    /// (`dedup.countLinger`); zero: such a batch lingers like any other.
    pub count_linger: Duration,
    /// A batch in its count linger is written once it holds this many signals and `linger` has
    /// passed (`dedup.flushAt`).
    pub flush_at: usize,
}

impl Lingers {
    /// No lingering at all (a batch is whatever queued during the previous write).
    pub const NONE: Lingers = Lingers {
        linger: Duration::ZERO,
        count_linger: Duration::ZERO,
        flush_at: usize::MAX,
    };
}

pub struct Coalescer {
    dedup: Arc<Dedup>,
    metrics: Metrics,
    max_batch: usize,
    linger: Duration,
    count_linger: Duration,
    flush_at: usize,
    queues: Mutex<HashMap<Fingerprint, Queue>>,
    /// Numbers the waiters.
    next_id: AtomicU64,
    /// Linger factors (percent, above 100) of fingerprints whose writes conflicted; the least
    /// recently raised are forgotten first (one bounded-cache policy: [`crate::bounded`]).
    raised: Mutex<BoundedMap<Fingerprint, u32>>,
    /// Moving average (1/8 weight per write) of how long this replica's successful
    /// deduplication writes took, lock, list, retries and status update included.
    write_time: Mutex<Option<Duration>>,
    /// Fingerprints whose signals overlapped recently (one arrived while another was
    /// unanswered), until when that is remembered; least recently seen forgotten first.
    together: Mutex<BoundedMap<Fingerprint, ()>>,
    /// Fingerprints answered within the last count linger (expiring at its end).
    answered: Mutex<BoundedMap<Fingerprint, ()>>,
}

/// How many fingerprints each per-fingerprint memory (raised lingers, overlaps, recent
/// answers) keeps (about 1.5 MiB each at most).
const FINGERPRINT_MEMORY: Limits = Limits {
    entries: 10_000,
    bytes: 2 * 1024 * 1024,
};

/// An incident's signals count as overlapping for this long after two of them were last
/// unanswered at once: whether several senders report an incident is a trait of the incident,
/// and a lukewarm one (a signal every few seconds) overlaps only now and then.
const TOGETHER_MEMORY: Duration = Duration::from_secs(30);

/// Least time a write needs; a waiter with less left is answered 503 instead of starting one.
const MIN_BUDGET: Duration = Duration::from_millis(5);

/// A fingerprint is hot when its RR was written within this many lingers.
const HOT_LINGERS: u32 = 2;
/// The linger of a fingerprint whose writes conflict grows up to this many times its base.
const MAX_LINGERS: u32 = 4;
/// Lingers shorter than this are skipped: they gather next to nothing and cost a timer wake-up
/// (a fingerprint whose writes conflict still lingers: its factor raises it past this).
const MIN_LINGER: Duration = Duration::from_millis(2);

impl Coalescer {
    pub fn new(dedup: Arc<Dedup>, metrics: Metrics, max_batch: usize, lingers: Lingers) -> Arc<Self> {
        let max_batch = max_batch.max(1);
        Arc::new(Coalescer {
            dedup,
            metrics,
            max_batch,
            linger: lingers.linger,
            count_linger: lingers.count_linger,
            flush_at: lingers.flush_at.clamp(1, max_batch),
            together: Mutex::new(BoundedMap::new(FINGERPRINT_MEMORY)),
            answered: Mutex::new(BoundedMap::new(FINGERPRINT_MEMORY)),
            queues: Mutex::default(),
            next_id: AtomicU64::new(0),
            raised: Mutex::new(BoundedMap::new(FINGERPRINT_MEMORY)),
            write_time: Mutex::new(None),
        })
    }

    /// Signals of `fp` not answered yet: queued, or in the batch being written.
    pub fn waiting(&self, fp: &Fingerprint) -> usize {
        self.queues.lock().expect("queues poisoned").get(fp).map_or(0, |q| {
            q.waiters.len() + q.writing.as_ref().map_or(0, |w| w.waiters.len())
        })
    }

    /// Queues one signal (or adds it to the batch being written, while that is open) and waits
    /// for the write that includes it.
    pub async fn submit(
        self: &Arc<Self>,
        fp: Fingerprint,
        spec: RemediationRequestSpec,
        deadline: Instant,
    ) -> Result<Ack, DedupError> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waiter = Waiter {
            id,
            spec,
            span: tracing::Span::current(),
            arrived: Instant::now(),
            deadline,
            tx,
        };
        let mut seat = Seat {
            coalescer: self,
            fp: &fp,
            id,
            answered: false,
        };
        let mut overlapped = false;
        let start_worker = match self.queues.lock().expect("queues poisoned").entry(fp.clone()) {
            Entry::Occupied(mut e) => {
                let q = e.get_mut();
                // Another signal of this incident is still unanswered (queued, or in the batch
                // being written; a worker that answered its last batch has none of either).
                overlapped = !q.waiters.is_empty() || q.writing.is_some();
                match &mut q.writing {
                    Some(w) if waiter.deadline >= w.join_by && w.batch.join() => {
                        w.span.follows_from(&waiter.span);
                        w.waiters.push(waiter);
                    }
                    _ => {
                        q.waiters.push(waiter);
                        let queued = q.waiters.len();
                        if queued == self.flush_at || queued >= self.max_batch {
                            q.full.notify_one();
                        }
                    }
                }
                false
            }
            Entry::Vacant(e) => {
                e.insert(Queue {
                    waiters: vec![waiter],
                    ..Queue::default()
                });
                true
            }
        };
        if overlapped && !self.count_linger.is_zero() {
            let now = Instant::now();
            self.together.lock().expect("overlaps poisoned").insert(
                fp.clone(),
                (),
                fp.as_str().len(),
                now + TOGETHER_MEMORY,
            );
        }
        if start_worker {
            let (this, fp) = (self.clone(), fp.clone());
            tokio::spawn(async move { this.drain(fp).await });
        }
        // The worker always answers: by the deadline, plus the grace of a write in flight, plus
        // the lease release after a create (a delete, and a get + delete when our last renewal
        // raced it, each bounded by the same API timeout). Giving up earlier would answer 503
        // for a signal that is stored; this bound only guards against a stuck worker.
        let margin = self.dedup.write_grace() * 4 + Duration::from_secs(1);
        let answer = tokio::time::timeout_at(deadline + margin, rx).await;
        seat.answered = true;
        match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(DedupError::Internal("deduplication worker stopped".into())),
            Err(_) => Err(DedupError::DeadlineExceeded),
        }
    }

    async fn drain(self: Arc<Self>, fp: Fingerprint) {
        let mut cleanup = Cleanup {
            coalescer: &self,
            fp: &fp,
            armed: true,
        };
        loop {
            self.linger(&fp).await;
            let batch: Vec<Waiter> = {
                let mut queues = self.queues.lock().expect("queues poisoned");
                let queue = queues.get_mut(&fp).expect("a worker's queue exists while it runs");
                if queue.waiters.is_empty() {
                    queues.remove(&fp);
                    cleanup.armed = false;
                    return;
                }
                let take = queue.waiters.len().min(self.max_batch);
                queue.waiters.drain(..take).collect()
            };
            let now = Instant::now();
            // A waiter whose caller has gone (client disconnected, handler dropped at the drain
            // deadline) is not written: nobody would be told, and the sender's retry would count
            // it a second time.
            let (live, late): (Vec<Waiter>, Vec<Waiter>) = batch
                .into_iter()
                .filter(|w| !w.tx.is_closed())
                .partition(|w| w.deadline > now + MIN_BUDGET);
            for w in late {
                let _ = w.tx.send(Err(DedupError::DeadlineExceeded));
            }
            let Some(first) = live.first() else { continue };
            let deadline = live.iter().map(|w| w.deadline).min().unwrap_or(first.deadline);
            let spec = first.spec.clone();
            let batch_span = tracing::info_span!(parent: &first.span, "dedup.batch", size = live.len());
            for w in &live[1..] {
                batch_span.follows_from(&w.span);
            }
            let batch = Arc::new(Batch::open(live.len() as u32, self.max_batch as u32));
            {
                let mut queues = self.queues.lock().expect("queues poisoned");
                let queue = queues.get_mut(&fp).expect("a worker's queue exists while it runs");
                queue.writing = Some(Writing {
                    batch: batch.clone(),
                    waiters: live,
                    span: batch_span.clone(),
                    join_by: deadline,
                });
            }
            // Signals that arrive while this write is under way (lock, list, a Conflict) join it
            // until its status update is sent.
            let tally = Tally::new();
            let write_started = Instant::now();
            let write = self
                .dedup
                .process_batch(&fp, &batch, &spec, Budget::counted(deadline, &tally));
            let result = tracing::Instrument::instrument(write, batch_span.clone()).await;
            let calls = tally.get();
            let live = {
                let mut queues = self.queues.lock().expect("queues poisoned");
                let queue = queues.get_mut(&fp).expect("a worker's queue exists while it runs");
                batch.close();
                queue.writing.take().expect("the batch being written").waiters
            };
            batch_span.record("size", live.len());
            self.metrics.coalesced_batch.observe(live.len() as f64);
            let per_signal = f64::from(calls) / live.len() as f64;
            if let Ok(written) = &result {
                self.adapt_linger(&fp, written.conflicts > 0);
                self.record_write_time(write_started.elapsed());
            }
            match result {
                Ok(written) if written.n as usize == live.len() => {
                    for (i, w) in live.into_iter().enumerate() {
                        let _ = w.tx.send(Ok(ack_for(&written, i, per_signal)));
                    }
                    self.note_answered(&fp);
                }
                Ok(written) => {
                    // Cannot happen: every signal moved into the batch is in its write.
                    tracing::error!(counted = written.n, batch = live.len(), "batch and write disagree");
                    let e = DedupError::Internal("batch and write disagree".into());
                    for w in live {
                        let _ = w.tx.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for w in live {
                        let _ = w.tx.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// This fingerprint's linger factor: doubles after a write that met a Conflict (up to
    /// `MAX_LINGERS`), shrinks by a quarter after one that did not.
    fn adapt_linger(&self, fp: &Fingerprint, conflicted: bool) {
        if self.linger.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut raised = self.raised.lock().expect("lingers poisoned");
        let current = raised.get(fp, now).copied().unwrap_or(100);
        let next = if conflicted {
            (current * 2).min(100 * MAX_LINGERS)
        } else {
            current * 3 / 4
        };
        if next > 100 {
            // A raise not renewed for a minute is stale: the replicas stopped colliding there.
            raised.insert(fp.clone(), next, fp.as_str().len(), now + Duration::from_secs(60));
        } else {
            raised.remove(fp);
        }
    }

    fn record_write_time(&self, took: Duration) {
        let mut average = self.write_time.lock().expect("write time poisoned");
        *average = Some(match *average {
            None => took,
            Some(was) => (was * 7 + took) / 8,
        });
    }

    /// The linger for `fp` now: `dedup.linger` times the fingerprint's conflict factor, and at
    /// least as long as this replica's writes take on average (an API server that answers
    /// slowly is the bottleneck: a signal already waits that long for its write, and lingering
    /// as long at most doubles that wait while it halves the writes), both at most
    /// `MAX_LINGERS` lingers.
    fn linger_for(&self, fp: &Fingerprint) -> Duration {
        let slow = self
            .write_time
            .lock()
            .expect("write time poisoned")
            .unwrap_or_default()
            .min(self.linger * MAX_LINGERS);
        let factor = self
            .raised
            .lock()
            .expect("lingers poisoned")
            .get(fp, Instant::now())
            .copied()
            .unwrap_or(100);
        (self.linger * factor / 100).max(slow)
    }

    /// Remembers that `fp`'s signals were just answered, for one count linger.
    fn note_answered(&self, fp: &Fingerprint) {
        if self.count_linger.is_zero() {
            return;
        }
        let now = Instant::now();
        self.answered.lock().expect("answers poisoned").insert(
            fp.clone(),
            (),
            fp.as_str().len(),
            now + self.count_linger,
        );
    }

    /// Whether `fp`'s next batch, led by a signal that arrived at `first_arrived`, may wait the
    /// count linger: it would only count into an RR known to be active, and its sender is not one
    /// that waits for each answer — the signal came more than a count linger after the
    /// fingerprint's last answer (the answer's entry expires a count linger after it), or the
    /// incident's signals overlapped recently (more than one sender, or one sending in parallel).
    fn counts_together(&self, fp: &Fingerprint, first_arrived: Instant) -> bool {
        if self.count_linger.is_zero() {
            return false;
        }
        let prompt = self
            .answered
            .lock()
            .expect("answers poisoned")
            .contains(fp, first_arrived);
        (!prompt
            || self
                .together
                .lock()
                .expect("overlaps poisoned")
                .contains(fp, Instant::now()))
            && self.dedup.hints().knows_active(fp)
    }

    /// Lets the next batch of a hot fingerprint, or of one whose signals overlap and only count,
    /// gather signals (see the module docs).
    async fn linger(&self, fp: &Fingerprint) {
        if self.dedup.strategy() != crate::dedup::Strategy::Optimistic {
            return; // always-lock is kept as the original design it is measured as
        }
        let first_arrived = {
            let queues = self.queues.lock().expect("queues poisoned");
            match queues.get(fp).and_then(|q| q.waiters.first()) {
                Some(first) => first.arrived,
                None => return,
            }
        };
        let hot = self.linger_for(fp);
        // At least `at_least` after the first signal; then as soon as `flush_at` signals are in,
        // and at the latest `at_most` after it.
        let (at_least, at_most) = if self.counts_together(fp, first_arrived) {
            (hot.min(self.count_linger), hot.max(self.count_linger))
        } else if hot >= MIN_LINGER && self.dedup.written_within(fp, hot * HOT_LINGERS) {
            (hot, hot)
        } else {
            return;
        };
        let started = Instant::now();
        loop {
            let (wake, full) = {
                let queues = self.queues.lock().expect("queues poisoned");
                let Some(queue) = queues.get(fp) else { break };
                let Some(first) = queue.waiters.first() else { break };
                let queued = queue.waiters.len();
                if queued >= self.max_batch {
                    break;
                }
                // Never more than half of what any waiter's deadline left it when the linger began.
                let now = Instant::now();
                let until = queue
                    .waiters
                    .iter()
                    .map(|w| started + w.deadline.saturating_duration_since(started) / 2)
                    .fold(first.arrived + at_most, Instant::min);
                let enough_from = first.arrived + at_least;
                if now >= until || (queued >= self.flush_at && now >= enough_from) {
                    break;
                }
                let wake = if queued >= self.flush_at {
                    enough_from.min(until)
                } else {
                    until
                };
                (wake, queue.full.clone())
            };
            // Woken when `flush_at` or `max_batch` signals are queued (or by a wake-up left over
            // from an earlier batch): look again.
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = full.notified() => {}
            }
        }
        let waited = started.elapsed();
        if !waited.is_zero() {
            self.metrics.linger.observe(waited.as_secs_f64());
        }
    }
}

/// The i-th signal of a batch: the first of a batch that created the RR is "created"; each
/// other signal is a duplicate with its own position in the count.
fn ack_for(w: &Written, i: usize, api_calls: f64) -> Ack {
    let dedup = w.rr.status.as_ref().and_then(|s| s.deduplication.as_ref());
    Ack {
        name: w.rr.metadata.name.clone().unwrap_or_default(),
        namespace: w.rr.metadata.namespace.clone().unwrap_or_default(),
        created: w.created && i == 0,
        occurrence_count: w.before + i as i64 + 1,
        first_seen_at: dedup.map(|d| d.first_seen_at.clone()).unwrap_or_default(),
        last_seen_at: dedup.map(|d| d.last_seen_at.clone()).unwrap_or_default(),
        absorbed_by: w.absorbed_by,
        api_calls,
    }
}

/// If a worker panics, its queue must not strand later signals: fail them and remove the queue.
struct Cleanup<'a> {
    coalescer: &'a Coalescer,
    fp: &'a Fingerprint,
    armed: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut queues) = self.coalescer.queues.lock()
            && let Some(queue) = queues.remove(self.fp)
        {
            let writing = queue.writing.into_iter().flat_map(|w| w.waiters);
            for w in queue.waiters.into_iter().chain(writing) {
                let _ =
                    w.tx.send(Err(DedupError::Internal("deduplication worker failed".into())));
            }
        }
    }
}

/// One signal's place while its `submit` waits. Dropped unanswered (the caller has gone), it
/// takes the signal back out of a batch whose update has not been sent yet: nobody would be told
/// of that count, and the sender's retry would count it a second time.
struct Seat<'a> {
    coalescer: &'a Coalescer,
    fp: &'a Fingerprint,
    id: u64,
    answered: bool,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let Ok(mut queues) = self.coalescer.queues.lock() else {
            return;
        };
        let Some(writing) = queues.get_mut(self.fp).and_then(|q| q.writing.as_mut()) else {
            return;
        };
        if let Some(at) = writing.waiters.iter().position(|w| w.id == self.id)
            && writing.batch.leave()
        {
            writing.waiters.remove(at);
        }
        // Still queued, it is dropped when its batch is taken (`drain`).
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Semaphore;

    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::backend::faults::{Fault, Faulty, Op};
    use crate::clock::{SharedClock, SystemClock};
    use crate::dedup::{Settings, Strategy};
    use crate::lock::LeaseLock;

    /// The optimistic Dedup the coalescer tests write through (no watch, short backoffs).
    fn optimistic_dedup(cluster: Arc<dyn crate::cluster::Cluster>, clock: SharedClock) -> (Arc<Dedup>, Metrics) {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let lock = LeaseLock::new(
            cluster.clone(),
            clock.clone(),
            "ns".into(),
            "a".into(),
            Duration::from_secs(30),
            metrics.clone(),
        );
        let settings = Settings {
            namespace: "ns".into(),
            strategy: Strategy::Optimistic,
            backoff_initial: Duration::from_millis(5),
            backoff_max: Duration::from_millis(50),
            write_grace: Duration::from_millis(100),
            watch: false,
            watch_wait: Duration::ZERO,
        };
        (
            Arc::new(Dedup::new(cluster, lock, clock, metrics.clone(), settings)),
            metrics,
        )
    }

    /// The fingerprint and RR spec of a signal about Pod `n/<pod>`.
    fn pod_signal(pod: &str) -> (Fingerprint, RemediationRequestSpec) {
        let target = crate::crd::TargetResource {
            kind: "Pod".into(),
            name: pod.into(),
            namespace: "n".into(),
            api_version: String::new(),
        };
        let fp = Fingerprint::of("", &target);
        let spec = RemediationRequestSpec {
            target_resource: target,
            ..RemediationRequestSpec::example(fp.as_str())
        };
        (fp, spec)
    }

    /// A coalescer over an embedded store whose first creation lock waits at a gate: the first
    /// signal submitted is held while its write is under way, and everything submitted after it
    /// queues behind.
    struct Held {
        store: Arc<EmbeddedStore>,
        coalescer: Arc<Coalescer>,
        gate: Arc<Semaphore>,
        at_gate: Arc<AtomicUsize>,
        writes: Arc<AtomicUsize>,
        fp: Fingerprint,
        spec: RemediationRequestSpec,
        deadline: Instant,
    }

    impl Held {
        fn new() -> Self {
            let clock: SharedClock = Arc::new(SystemClock);
            let store = Arc::new(EmbeddedStore::new(clock.clone()));
            let gate = Arc::new(Semaphore::new(0));
            let writes = Arc::new(AtomicUsize::new(0));
            let at_gate = Arc::new(AtomicUsize::new(0));
            let (g, w, a) = (gate.clone(), writes.clone(), at_gate.clone());
            let cluster: Arc<dyn crate::cluster::Cluster> = Arc::new(Faulty::new(store.clone(), move |op| match op {
                Op::CreateLease => {
                    a.fetch_add(1, Ordering::SeqCst);
                    Fault::Gate(g.clone())
                }
                Op::UpdateDeduplication => {
                    w.fetch_add(1, Ordering::SeqCst);
                    Fault::Pass
                }
                _ => Fault::Pass,
            }));
            let (dedup, metrics) = optimistic_dedup(cluster, clock);
            let (fp, spec) = pod_signal("p");
            Held {
                store,
                coalescer: Coalescer::new(dedup, metrics, 1000, Lingers::NONE),
                gate,
                at_gate,
                writes,
                spec,
                fp,
                deadline: Instant::now() + Duration::from_secs(20),
            }
        }

        fn submit(&self) -> tokio::task::JoinHandle<Result<Ack, DedupError>> {
            let (c, fp, spec, deadline) = (
                self.coalescer.clone(),
                self.fp.clone(),
                self.spec.clone(),
                self.deadline,
            );
            tokio::spawn(async move { c.submit(fp, spec, deadline).await })
        }

        /// Submits the first signal and waits until its write is held at the gate, then submits
        /// `n` more and waits until they are queued behind it.
        async fn first_held_then(
            &self,
            n: usize,
        ) -> (
            tokio::task::JoinHandle<Result<Ack, DedupError>>,
            Vec<tokio::task::JoinHandle<Result<Ack, DedupError>>>,
        ) {
            let first = self.submit();
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while self.at_gate.load(Ordering::SeqCst) == 0 {
                assert!(std::time::Instant::now() < until, "first write never started");
                tokio::task::yield_now().await;
            }
            let rest: Vec<_> = (0..n).map(|_| self.submit()).collect();
            while self.coalescer.waiting(&self.fp) < n + 1 {
                assert!(std::time::Instant::now() < until, "signals never queued");
                tokio::task::yield_now().await;
            }
            (first, rest)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signals_arriving_during_a_write_join_it_and_each_gets_its_own_count() {
        let held = Held::new();
        // The first signal's write is blocked creating the lock; 99 more queue behind it.
        let (first, rest) = held.first_held_then(99).await;
        held.gate.add_permits(1000);

        let first = first.await.unwrap().unwrap();
        assert!(first.created);
        assert_eq!(first.occurrence_count, 1);
        let mut counts = Vec::new();
        for r in rest {
            let ack = r.await.unwrap().unwrap();
            assert!(!ack.created);
            counts.push(ack.occurrence_count);
        }
        counts.sort();
        assert_eq!(counts, (2..=100).collect::<Vec<_>>());
        assert_eq!(
            held.writes.load(Ordering::SeqCst),
            1,
            "the 99 that queued while the first signal's RR was being created join its count update"
        );
        assert_eq!(held.store.all_requests().len(), 1);
        let stored = held.store.all_requests().remove(0);
        assert_eq!(stored.status.unwrap().deduplication.unwrap().occurrence_count, 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_whose_caller_has_gone_is_not_written() {
        // Issue 13, path 4(a): before, it was counted — and its sender's retry counted again.
        let held = Held::new();
        let (first, queued) = held.first_held_then(10).await;
        for task in &queued[..4] {
            task.abort();
            while !task.is_finished() {
                tokio::task::yield_now().await;
            }
        }
        held.gate.add_permits(1000);
        assert_eq!(first.await.unwrap().unwrap().occurrence_count, 1);
        let mut counts = Vec::new();
        for task in queued.into_iter().skip(4) {
            counts.push(task.await.unwrap().unwrap().occurrence_count);
        }
        counts.sort();
        assert_eq!(counts, (2..=7).collect::<Vec<_>>());
        let stored = held.store.all_requests().remove(0);
        assert_eq!(
            stored.occurrence_count(),
            7,
            "the 4 whose callers had gone were not counted"
        );
    }

    /// Waits (polling, with a deadline) until `ready` holds.
    async fn until(what: &str, ready: impl Fn() -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !ready() {
            assert!(std::time::Instant::now() < until, "{what}: never happened");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_signal_joins_a_write_until_its_update_is_sent_and_again_while_a_conflict_is_retried() {
        let clock: SharedClock = Arc::new(SystemClock);
        let store = Arc::new(EmbeddedStore::new(clock.clone()));
        let (update_gate, read_gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
        let (updates, reads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (ug, rg, u, r) = (update_gate.clone(), read_gate.clone(), updates.clone(), reads.clone());
        // Every status update but the first (the new RR's count) and every read waits at its gate.
        let cluster: Arc<dyn crate::cluster::Cluster> = Arc::new(Faulty::new(store.clone(), move |op| match op {
            Op::UpdateDeduplication if u.fetch_add(1, Ordering::SeqCst) > 0 => Fault::Gate(ug.clone()),
            Op::GetRequest => {
                r.fetch_add(1, Ordering::SeqCst);
                Fault::Gate(rg.clone())
            }
            _ => Fault::Pass,
        }));
        let (dedup, metrics) = optimistic_dedup(cluster, clock);
        let (fp, spec) = pod_signal("p");
        let coalescer = Coalescer::new(dedup, metrics, 1000, Lingers::NONE);
        let deadline = Instant::now() + Duration::from_secs(20);
        let submit = || {
            let (c, fp, spec) = (coalescer.clone(), fp.clone(), spec.clone());
            tokio::spawn(async move { c.submit(fp, spec, deadline).await.unwrap().occurrence_count })
        };
        assert_eq!(submit().await.unwrap(), 1);
        let name = store.all_requests()[0].metadata.name.clone().unwrap();

        // A's update is on its way; B arrives meanwhile.
        let a = submit();
        until("A's update sent", || updates.load(Ordering::SeqCst) == 2).await;
        let b = submit();
        until("B waiting", || coalescer.waiting(&fp) == 2).await;
        // Another replica counts first: A's update meets a Conflict, and A reads the RR again.
        let theirs = serde_json::json!({"deduplication": {"occurrenceCount": 2}});
        store.patch_status("ns", &name, &theirs).unwrap();
        update_gate.add_permits(1);
        until("A's conflict re-read", || reads.load(Ordering::SeqCst) == 1).await;
        // C arrives while A's write is retried.
        let c = submit();
        until("C waiting", || coalescer.waiting(&fp) == 3).await;
        update_gate.add_permits(100);
        read_gate.add_permits(100);

        assert_eq!(a.await.unwrap(), 3);
        assert_eq!(c.await.unwrap(), 4, "C rode on A's retried update");
        assert_eq!(
            b.await.unwrap(),
            5,
            "B, which arrived once A's update was sent, got the next one"
        );
        assert_eq!(store.all_requests()[0].occurrence_count(), 5);
        assert_eq!(
            updates.load(Ordering::SeqCst),
            4,
            "the new RR's count, A's update that conflicted, A + C, B"
        );
    }

    /// A coalescer on an embedded store (paused-clock friendly: TokioClock) counting status writes.
    struct Lingering {
        coalescer: Arc<Coalescer>,
        writes: Arc<AtomicUsize>,
        fp: Fingerprint,
        spec: RemediationRequestSpec,
    }

    /// `status_update(i)` decides the fault of the i-th status update (1-based).
    fn lingering(
        linger: Duration,
        max_batch: usize,
        status_update: impl Fn(usize) -> Fault + Send + Sync + 'static,
    ) -> Lingering {
        let lingers = Lingers {
            linger,
            count_linger: Duration::ZERO,
            flush_at: max_batch,
        };
        lingering_with(lingers, max_batch, status_update)
    }

    fn lingering_with(
        lingers: Lingers,
        max_batch: usize,
        status_update: impl Fn(usize) -> Fault + Send + Sync + 'static,
    ) -> Lingering {
        let clock: SharedClock = Arc::new(crate::clock::TokioClock::new());
        let store = Arc::new(EmbeddedStore::new(clock.clone()));
        let writes = Arc::new(AtomicUsize::new(0));
        let w = writes.clone();
        let cluster: Arc<dyn crate::cluster::Cluster> = Arc::new(Faulty::new(store, move |op| {
            if op == Op::UpdateDeduplication {
                return status_update(w.fetch_add(1, Ordering::SeqCst) + 1);
            }
            Fault::Pass
        }));
        let (dedup, metrics) = optimistic_dedup(cluster, clock);
        let (fp, spec) = pod_signal("hot");
        Lingering {
            coalescer: Coalescer::new(dedup, metrics, max_batch, lingers),
            writes,
            fp,
            spec,
        }
    }

    impl Lingering {
        /// Submits one signal with `budget` to its deadline; resolves to (ack, answered at).
        fn submit(&self, budget: Duration) -> tokio::task::JoinHandle<(Result<Ack, DedupError>, Instant)> {
            let (c, fp, spec) = (self.coalescer.clone(), self.fp.clone(), self.spec.clone());
            tokio::spawn(async move {
                let r = c.submit(fp, spec, Instant::now() + budget).await;
                (r, Instant::now())
            })
        }

        /// Makes the fingerprint hot with one signal, then sends `n` more one at a time and
        /// returns how long each waited for its answer (ms).
        async fn waits_of_lone_signals(&self, n: usize) -> Vec<u128> {
            self.submit(BUDGET).await.unwrap().0.unwrap();
            let mut waited = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let (ack, at) = self.submit(BUDGET).await.unwrap();
                ack.unwrap();
                waited.push((at - t).as_millis());
            }
            waited
        }
    }

    const BUDGET: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn a_hot_fingerprint_lingers_at_most_the_linger_and_writes_what_gathered_once() {
        let linger = Duration::from_millis(50);
        // Status updates take 25 ms: the linger may be up to two of them, i.e. all 50 ms.
        let write = Duration::from_millis(25);
        let l = lingering(linger, 1000, move |_| Fault::Delay(write));
        // The first signal of a cold fingerprint is written at once.
        let t0 = Instant::now();
        let (first, at) = l.submit(BUDGET).await.unwrap();
        assert!(first.unwrap().created);
        assert_eq!(at, t0 + write, "a lone signal is not delayed");
        // Now it is hot: the next batch waits for company, up to the linger after its first signal.
        let t1 = Instant::now();
        let lead = l.submit(BUDGET);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest: Vec<_> = (0..9).map(|_| l.submit(BUDGET)).collect();
        let (ack, at) = lead.await.unwrap();
        let mut counts = vec![ack.unwrap().occurrence_count];
        assert_eq!(at, t1 + linger + write, "lingered exactly the linger, then wrote");
        for r in rest {
            let (ack, at) = r.await.unwrap();
            assert_eq!(at, t1 + linger + write);
            counts.push(ack.unwrap().occurrence_count);
        }
        counts.sort();
        assert_eq!(counts, (2..=11).collect::<Vec<_>>());
        assert_eq!(
            l.writes.load(Ordering::SeqCst),
            2,
            "one write for the first, one for the ten"
        );
        // Quiet for longer than the hot window: a lone signal is written at once again.
        tokio::time::sleep(linger * (HOT_LINGERS + 1)).await;
        let t2 = Instant::now();
        let (ack, at) = l.submit(BUDGET).await.unwrap();
        assert_eq!(ack.unwrap().occurrence_count, 12);
        assert_eq!(at, t2 + write);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_backend_lingers_the_whole_linger_so_a_steady_stream_costs_one_write() {
        // Writes take 3 ms; signals arrive every 5 ms. Writing as soon as one write's worth of
        // time had passed would cost a write per one or two signals: each costs the API server
        // the same however fast it answers.
        let write = Duration::from_millis(3);
        let l = lingering(Duration::from_millis(50), 1000, move |_| Fault::Delay(write));
        l.submit(BUDGET).await.unwrap().0.unwrap();
        let t = Instant::now();
        let mut stream = Vec::new();
        for _ in 0..10 {
            stream.push(l.submit(BUDGET));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for r in stream {
            let (ack, at) = r.await.unwrap();
            ack.unwrap();
            assert_eq!(at, t + Duration::from_millis(50) + write);
        }
        assert_eq!(
            l.writes.load(Ordering::SeqCst),
            2,
            "the first signal's, then one for the ten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_never_takes_more_than_half_of_what_a_deadline_leaves() {
        let l = lingering(Duration::from_secs(1), 1000, |_| Fault::Pass);
        l.submit(BUDGET).await.unwrap().0.unwrap();
        let t = Instant::now();
        let (ack, at) = l.submit(Duration::from_millis(100)).await.unwrap();
        assert_eq!(ack.unwrap().occurrence_count, 2, "stored, not 503");
        assert!(at <= t + Duration::from_millis(50), "waited {:?}", at - t);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_written_without_waiting_out_the_linger() {
        let l = lingering(Duration::from_secs(1), 5, |_| Fault::Pass);
        l.submit(BUDGET).await.unwrap().0.unwrap();
        let t = Instant::now();
        let five: Vec<_> = (0..5).map(|_| l.submit(BUDGET)).collect();
        for r in five {
            let (ack, at) = r.await.unwrap();
            ack.unwrap();
            assert!(at < t + Duration::from_secs(1), "waited {:?}", at - t);
        }
        assert_eq!(l.writes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_linger_of_a_fingerprint_whose_writes_conflict_doubles_up_to_four_lingers() {
        let linger = Duration::from_millis(20);
        let write = Duration::from_millis(10);
        // Every second status update is answered 409 (as if another replica wrote first).
        let l = lingering(linger, 1000, move |i| {
            if i % 2 == 0 {
                Fault::Fail(crate::cluster::ApiError::Conflict("written elsewhere".into()))
            } else {
                Fault::Delay(write)
            }
        });
        let waited = l.waits_of_lone_signals(5).await;
        // Each batch met one Conflict (then a successful 10 ms write), so the next one lingers
        // twice as long, up to 4 x 20 ms.
        assert_eq!(waited, [30, 50, 90, 90, 90]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_api_server_raises_the_linger_to_its_write_time_up_to_four_lingers() {
        let linger = Duration::from_millis(20);
        // The first three status updates take 60 ms, the rest 200 ms.
        let l = lingering(linger, 1000, |i| {
            Fault::Delay(Duration::from_millis(if i <= 3 { 60 } else { 200 }))
        });
        let waited = l.waits_of_lone_signals(5).await;
        // Lingers as long as writes take on average (60 ms, then 60 + (200 - 60) / 8 = 77.5 ms),
        // never more than 4 x 20 ms; each write then takes its own time (timers fire on whole
        // milliseconds: 277.5 is 278).
        assert_eq!(waited, [120, 120, 260, 278, 280]);
        assert_eq!(
            l.writes.load(Ordering::SeqCst),
            6,
            "one write per signal: each came alone"
        );
    }

    /// The count linger's coalescer: 25 ms hot linger, 200 ms count linger, flush at 8, 10 ms writes.
    fn counting() -> Lingering {
        let lingers = Lingers {
            linger: Duration::from_millis(25),
            count_linger: Duration::from_millis(200),
            flush_at: 8,
        };
        lingering_with(lingers, 1000, |_| Fault::Delay(Duration::from_millis(10)))
    }

    impl Lingering {
        /// Creates the RR, then sends two signals at once (the second arrives while the first is
        /// unanswered: the incident's signals overlap); returns the status writes so far.
        async fn created_and_overlapped(&self) -> usize {
            self.submit(BUDGET).await.unwrap().0.unwrap();
            let pair = [self.submit(BUDGET), self.submit(BUDGET)];
            for r in pair {
                r.await.unwrap().0.unwrap();
            }
            self.writes.load(Ordering::SeqCst)
        }

        /// Sends `n` signals `gap` apart without waiting for their answers.
        async fn paced(
            &self,
            n: usize,
            gap: Duration,
        ) -> Vec<tokio::task::JoinHandle<(Result<Ack, DedupError>, Instant)>> {
            let mut sent = Vec::new();
            for _ in 0..n {
                sent.push(self.submit(BUDGET));
                tokio::time::sleep(gap).await;
            }
            sent
        }
    }

    /// Every signal of `sent` was stored and answered at `at`.
    async fn all_answered_at(
        sent: Vec<tokio::task::JoinHandle<(Result<Ack, DedupError>, Instant)>>,
        at: Instant,
        why: &str,
    ) {
        for r in sent {
            let (ack, answered) = r.await.unwrap();
            ack.unwrap();
            assert_eq!(answered, at, "{why}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_signals_that_only_count_wait_the_count_linger_and_share_one_write() {
        let l = counting();
        let writes = l.created_and_overlapped().await;
        // Quiet for longer than the hot window, then a trickle: one signal every 40 ms.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let trickle = l.paced(4, Duration::from_millis(40)).await;
        all_answered_at(
            trickle,
            t + Duration::from_millis(200 + 10),
            "the count linger, then the write",
        )
        .await;
        assert_eq!(
            l.writes.load(Ordering::SeqCst),
            writes + 1,
            "the trickle took one write"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_counting_batch_is_written_once_it_holds_flush_at_signals() {
        let l = counting();
        l.created_and_overlapped().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let burst = l.paced(8, Duration::from_millis(5)).await;
        all_answered_at(
            burst,
            t + Duration::from_millis(35 + 10),
            "the eighth signal ends the wait",
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_counting_batch_that_fills_at_once_still_waits_the_hot_linger_and_no_longer() {
        let l = counting();
        let writes = l.created_and_overlapped().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A storm: twenty signals at once, more than flushAt before the hot linger is over.
        let t = Instant::now();
        let storm: Vec<_> = (0..20).map(|_| l.submit(BUDGET)).collect();
        all_answered_at(
            storm,
            t + Duration::from_millis(25 + 10),
            "the hot linger, then the write",
        )
        .await;
        assert_eq!(l.writes.load(Ordering::SeqCst), writes + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_that_comes_well_after_the_last_answer_waits_for_company_before_any_overlap() {
        let l = counting();
        l.submit(BUDGET).await.unwrap().0.unwrap();
        let writes = l.writes.load(Ordering::SeqCst);
        // Nothing has overlapped yet; A comes 300 ms after the last answer (more than a count
        // linger: not a sender waiting on us), B 100 ms after A from another sender.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        let pair = l.paced(2, Duration::from_millis(100)).await;
        all_answered_at(
            pair,
            t + Duration::from_millis(200 + 10),
            "A's count linger, then one write",
        )
        .await;
        assert_eq!(l.writes.load(Ordering::SeqCst), writes + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_sender_posting_one_signal_after_another_never_waits_the_count_linger() {
        let l = counting();
        // Signals one after another, each sent 60 ms after the previous was answered (longer than
        // the hot window, shorter than a count linger): they never overlap and each comes soon
        // after an answer, so none waits for company.
        l.submit(BUDGET).await.unwrap().0.unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let t = Instant::now();
            let (ack, at) = l.submit(BUDGET).await.unwrap();
            ack.unwrap();
            assert_eq!(at, t + Duration::from_millis(10), "written at once");
        }
        assert_eq!(l.writes.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_signals_of_a_new_incident_are_not_held_back_by_the_count_linger() {
        let l = counting();
        // The incident has no RR: its first batch creates, and is not delayed however many
        // signals arrive together.
        let t = Instant::now();
        let first: Vec<_> = (0..3).map(|_| l.submit(BUDGET)).collect();
        for r in first {
            let (ack, at) = r.await.unwrap();
            ack.unwrap();
            assert!(at < t + Duration::from_millis(100), "waited {:?}", at - t);
        }
    }
}
