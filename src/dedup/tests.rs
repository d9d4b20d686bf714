use super::*;
use crate::backend::embedded::EmbeddedStore;
use crate::backend::faults::{Fault, Faulty, Op};
use crate::crd::Deduplication;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::SystemClock;
use crate::crd::TargetResource;

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
    RemediationRequestSpec::example(fp().as_str())
}

fn replica(cluster: Arc<dyn Cluster>, holder: &str) -> (Dedup, Metrics) {
    replica_with(cluster, holder, false)
}

/// A replica; with `watch`, its hints are fed by a watch of the store.
fn replica_with(cluster: Arc<dyn Cluster>, holder: &str, watch: bool) -> (Dedup, Metrics) {
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
        watch,
        watch_wait: Duration::from_millis(20),
    };
    (Dedup::new(cluster, lock, clock, metrics.clone(), settings), metrics)
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

async fn seed(store: &EmbeddedStore, name: &str, phase: &str, count: i32) {
    seed_status(
        store,
        name,
        serde_json::json!({"overallPhase": (!phase.is_empty()).then_some(phase)}),
        count,
    )
    .await;
}

/// An RR `name` whose orchestrator-owned status is `status`, counted `count` times.
async fn seed_status(store: &EmbeddedStore, name: &str, status: serde_json::Value, count: i32) {
    let rr = RemediationRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            ..Default::default()
        },
        spec: spec(),
        status: None,
    };
    let created = store.create_request(Call::UNCOUNTED, &rr).await.unwrap();
    let dedup = Deduplication {
        first_seen_at: "2026-11-24T10:00:00Z".into(),
        last_seen_at: "2026-11-24T10:00:00Z".into(),
        occurrence_count: count,
    };
    let rv = created.metadata.resource_version.unwrap();
    store
        .update_deduplication(Call::UNCOUNTED, "ns", name, &rv, &dedup)
        .await
        .unwrap();
    store.patch_status("ns", name, &status).unwrap();
}

fn count_of(rr: &RemediationRequest) -> i32 {
    rr.occurrence_count()
}

/// Polls (with a deadline, never a fixed sleep) until `d`'s hints satisfy `ready`.
async fn until_hints(d: &Dedup, what: &str, ready: impl Fn(&HintCache) -> bool) {
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while !ready(d.hints()) {
        assert!(std::time::Instant::now() < give_up, "hints never {what}");
        tokio::task::yield_now().await;
    }
}

/// Calls per operation (by its Debug name).
type Calls = Arc<Mutex<HashMap<String, usize>>>;

/// Counts the calls of each operation that pass through.
fn counting(
    store: Arc<EmbeddedStore>,
    hook: impl Fn(Op) -> Fault + Send + Sync + 'static,
) -> (Arc<dyn Cluster>, Calls) {
    let calls: Calls = Arc::default();
    let c = calls.clone();
    let cluster = Arc::new(Faulty::new(store, move |op| {
        *c.lock().unwrap().entry(format!("{op:?}")).or_default() += 1;
        hook(op)
    }));
    (cluster, calls)
}

fn calls_of(calls: &Mutex<HashMap<String, usize>>, op: Op) -> usize {
    calls.lock().unwrap().get(&format!("{op:?}")).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_kept_fresh_by_another_writers_change_avoids_the_conflict() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let (a, am) = replica_with(store.clone(), "a", true);
    let (b, _) = replica_with(store.clone(), "b", true);
    a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    for _ in 0..5 {
        b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    }
    let newest = store.all_requests()[0].metadata.resource_version.clone();
    until_hints(&a, "caught up with b's writes", |h| {
        h.active(&fp()).and_then(|rr| rr.metadata.resource_version) == newest
    })
    .await;
    let w = a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    assert_eq!(w.before, 6);
    assert_eq!(am.status_conflicts.get(), 0, "the watch delivered b's writes first");
    assert_eq!(count_of(&store.all_requests()[0]), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_watch_falls_back_to_fresh_reads_and_a_synced_one_skips_the_list_before_the_lock() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    // Without a synced watch (it never lists): exactly the behaviour without one.
    let (blind, calls) = counting(store.clone(), |op| match op {
        Op::WatchRequests => Fault::Hang,
        _ => Fault::Pass,
    });
    let (a, _) = replica_with(blind.clone(), "a", true);
    let (b, _) = replica_with(blind, "b", true);
    a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    assert_eq!(
        calls_of(&calls, Op::ListRequests),
        2,
        "create: a list before and one under the lock"
    );
    b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    assert_eq!(
        calls_of(&calls, Op::ListRequests),
        3,
        "a duplicate on a fresh replica lists"
    );
    b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    assert_eq!(calls_of(&calls, Op::ListRequests), 3, "then its own write is the hint");
    a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    assert_eq!(
        calls_of(&calls, Op::GetRequest),
        1,
        "a's outdated hint: 409, then a GET"
    );
    assert_eq!(count_of(&store.all_requests()[0]), 4);

    // With a synced watch that knows of no active RR: only the list under the lock.
    let other = Fingerprint::parse(&"e".repeat(64)).unwrap();
    let other_spec = RemediationRequestSpec {
        signal_fingerprint: other.to_string(),
        ..spec()
    };
    let (seeing, calls) = counting(store.clone(), |_| Fault::Pass);
    let (c, cm) = replica_with(seeing, "c", true);
    until_hints(&c, "synced", HintCache::is_synced).await;
    let w = c.process(&other, 1, &other_spec, deadline()).await.unwrap();
    assert!(w.created);
    assert_eq!(calls_of(&calls, Op::ListRequests), 1, "only the list under the lock");
    assert_eq!(cm.hint_lookups.with_label_values(&["absent"]).get(), 1);
    assert_eq!(store.all_requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_watch_never_creates_a_duplicate_or_loses_a_count() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    // a's watch stalls after its first list (a lagging watch): everything it believes is old.
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (f, g) = (frozen.clone(), gate.clone());
    let stalled = Arc::new(Faulty::new(store.clone(), move |op| {
        if op == Op::WatchEvent && f.load(std::sync::atomic::Ordering::SeqCst) {
            Fault::Gate(g.clone())
        } else {
            Fault::Pass
        }
    }));
    let (a, am) = replica_with(stalled, "a", true);
    let (b, _) = replica_with(store.clone(), "b", true);
    until_hints(&a, "synced", HintCache::is_synced).await;
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);

    // The watch says "no RR" but b created one: the list under the lock finds it.
    assert!(b.process(&fp(), 1, &spec(), deadline()).await.unwrap().created);
    assert!(a.hints().knows_none_active(&fp()), "a's watch missed b's create");
    let w = a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    assert!(!w.created, "counted into b's RR, not a second one");
    assert_eq!(store.all_requests().len(), 1);

    // b writes on; a's hint (its own write) is outdated and the watch delivers nothing:
    // 409, a bounded wait, a GET, and the retry counts exactly.
    for _ in 0..3 {
        b.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    }
    let w = a.process(&fp(), 2, &spec(), deadline()).await.unwrap();
    assert_eq!(w.before, 5);
    assert_eq!(am.conflict_refreshes.with_label_values(&["get"]).get(), 1);

    // The RR is closed behind a's back: a never counts into it and opens generation 2.
    let first = store.all_requests()[0].metadata.name.clone().unwrap();
    store.set_phase("ns", &first, "Completed").unwrap();
    let w = a.process(&fp(), 1, &spec(), deadline()).await.unwrap();
    assert!(w.created);
    assert_eq!(w.rr.metadata.name.unwrap(), format!("rr-{}-2", fp().short()));
    let rrs = store.all_requests();
    assert_eq!(rrs.len(), 2);
    assert_eq!(count_of(&rrs[0]), 7, "the closed RR kept every count it acknowledged");
    assert_eq!(count_of(&rrs[1]), 1);
    assert!(store.all_leases().is_empty());
    gate.close();
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
    assert_eq!(store.all_requests()[0].occurrence_count(), 5);
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
    assert_eq!(store.all_requests()[0].occurrence_count(), 7);
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
