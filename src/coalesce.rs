//! Group commit per fingerprint inside one replica. Concurrent signals for one fingerprint join a
//! queue; a single worker task per fingerprint takes everything queued and stores it with one
//! deduplication write (`occurrenceCount += n`), then answers each waiter with its own count.
//! A storm of identical alerts thus costs a handful of API calls, and every acknowledged signal
//! is in the stored count.
//!
//! The worker is a spawned task, so a caller that disconnects does not cancel a write others wait
//! on; waiters whose deadline has passed are answered DeadlineExceeded before any write is sent.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::metered::tallied;
use crate::crd::RemediationRequestSpec;
use crate::dedup::{Dedup, DedupError, Written};
use crate::fingerprint::Fingerprint;
use crate::metrics::Metrics;

/// What one signal was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub name: String,
    pub namespace: String,
    pub created: bool,
    pub occurrence_count: i64,
    /// API requests of the write, divided among the signals of the batch.
    pub api_calls: f64,
}

struct Waiter {
    spec: RemediationRequestSpec,
    /// The signal's span: the batch span is its child (first waiter) or linked to it.
    span: tracing::Span,
    deadline: Instant,
    tx: oneshot::Sender<Result<Ack, DedupError>>,
}

pub struct Coalescer {
    dedup: Arc<Dedup>,
    metrics: Metrics,
    max_batch: usize,
    queues: Mutex<HashMap<Fingerprint, Vec<Waiter>>>,
}

/// Least time a write needs; a waiter with less left is answered 503 instead of starting one.
const MIN_BUDGET: Duration = Duration::from_millis(5);

impl Coalescer {
    pub fn new(dedup: Arc<Dedup>, metrics: Metrics, max_batch: usize) -> Arc<Self> {
        Arc::new(Coalescer {
            dedup,
            metrics,
            max_batch: max_batch.max(1),
            queues: Mutex::default(),
        })
    }

    /// Signals waiting for a write of `fp` (not counting the batch being written).
    pub fn queued(&self, fp: &Fingerprint) -> usize {
        self.queues.lock().expect("queues poisoned").get(fp).map_or(0, Vec::len)
    }

    /// Queues one signal and waits for the write that includes it.
    pub async fn submit(
        self: &Arc<Self>,
        fp: Fingerprint,
        spec: RemediationRequestSpec,
        deadline: Instant,
    ) -> Result<Ack, DedupError> {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            spec,
            span: tracing::Span::current(),
            deadline,
            tx,
        };
        let start_worker = match self.queues.lock().expect("queues poisoned").entry(fp.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().push(waiter);
                false
            }
            Entry::Vacant(e) => {
                e.insert(vec![waiter]);
                true
            }
        };
        if start_worker {
            let this = self.clone();
            tokio::spawn(async move { this.drain(fp).await });
        }
        // The worker always answers: by the deadline, plus the grace of a write in flight, plus
        // the lease release after a create (a delete, and a get + delete when our last renewal
        // raced it, each bounded by the same API timeout). Giving up earlier would answer 503
        // for a signal that is stored; this bound only guards against a stuck worker.
        let margin = self.dedup.write_grace() * 4 + Duration::from_secs(1);
        match tokio::time::timeout_at(deadline + margin, rx).await {
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
            let batch: Vec<Waiter> = {
                let mut queues = self.queues.lock().expect("queues poisoned");
                let queue = queues.get_mut(&fp).expect("a worker's queue exists while it runs");
                if queue.is_empty() {
                    queues.remove(&fp);
                    cleanup.armed = false;
                    return;
                }
                let take = queue.len().min(self.max_batch);
                queue.drain(..take).collect()
            };
            let now = Instant::now();
            let (live, late): (Vec<Waiter>, Vec<Waiter>) =
                batch.into_iter().partition(|w| w.deadline > now + MIN_BUDGET);
            for w in late {
                let _ = w.tx.send(Err(DedupError::DeadlineExceeded));
            }
            let Some(first) = live.first() else { continue };
            let deadline = live.iter().map(|w| w.deadline).min().unwrap_or(first.deadline);
            let n = live.len();
            self.metrics.coalesced_batch.observe(n as f64);
            let batch_span = tracing::info_span!(parent: &first.span, "dedup.batch", size = n);
            for w in &live[1..] {
                batch_span.follows_from(&w.span);
            }
            let write = self.dedup.process(&fp, n as u32, &first.spec, deadline);
            let (result, calls) = tallied(tracing::Instrument::instrument(write, batch_span)).await;
            let per_signal = f64::from(calls) / n as f64;
            match result {
                Ok(written) => {
                    for (i, w) in live.into_iter().enumerate() {
                        let _ = w.tx.send(Ok(ack_for(&written, i, per_signal)));
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
}

/// The i-th signal of a batch: the first of a batch that created the RR is "created"; each
/// other signal is a duplicate with its own position in the count.
fn ack_for(w: &Written, i: usize, api_calls: f64) -> Ack {
    Ack {
        name: w.rr.metadata.name.clone().unwrap_or_default(),
        namespace: w.rr.metadata.namespace.clone().unwrap_or_default(),
        created: w.created && i == 0,
        occurrence_count: w.before + i as i64 + 1,
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
            && let Some(waiters) = queues.remove(self.fp)
        {
            for w in waiters {
                let _ =
                    w.tx.send(Err(DedupError::Internal("deduplication worker failed".into())));
            }
        }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signals_arriving_during_a_write_share_the_next_write_and_each_gets_its_own_count() {
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
            Op::UpdateRequestStatus => {
                w.fetch_add(1, Ordering::SeqCst);
                Fault::Pass
            }
            _ => Fault::Pass,
        }));
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
        };
        let dedup = Arc::new(Dedup::new(cluster, lock, clock, metrics.clone(), settings));
        let coalescer = Coalescer::new(dedup, metrics, 1000);
        let target = crate::crd::TargetResource {
            kind: "Pod".into(),
            name: "p".into(),
            namespace: "n".into(),
            api_version: String::new(),
        };
        let fp = Fingerprint::of("", &target);
        let spec = RemediationRequestSpec {
            signal_fingerprint: fp.to_string(),
            signal_name: "A".into(),
            target_resource: target,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(20);

        let submit = |c: &Arc<Coalescer>| {
            let (c, fp, spec) = (c.clone(), fp.clone(), spec.clone());
            tokio::spawn(async move { c.submit(fp, spec, deadline).await })
        };
        let first = submit(&coalescer);
        // Wait until the first signal's write is blocked creating the lock, then queue 99 more.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while at_gate.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < until, "first write never started");
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (0..99).map(|_| submit(&coalescer)).collect();
        while coalescer.queued(&fp) < 99 {
            assert!(std::time::Instant::now() < until, "signals never queued");
            tokio::task::yield_now().await;
        }
        gate.add_permits(1000);

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
            writes.load(Ordering::SeqCst),
            2,
            "one write for the first signal, one for the 99 queued"
        );
        assert_eq!(store.all_requests().len(), 1);
        let stored = store.all_requests().remove(0);
        assert_eq!(stored.status.unwrap().deduplication.unwrap().occurrence_count, 100);
    }
}
