//! Races, leaks and holes a line-by-line review found (issue 13), each held as the promise it
//! breaks — no second active RR, exact counts for acknowledged signals, no leaked lease, errors
//! are not absence — on the embedded backend with injected faults. (Paths that need the real API
//! server are in tests/testenv_races.rs.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gateway, count_of, pod_alert, test_config, webhook};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use reqwest::StatusCode;
use signal_gateway::Deps;
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::{OffsetClock, SystemClock};
use signal_gateway::cluster::{ApiError, Cluster, ObjectRef};
use signal_gateway::config::Config;
use tokio::sync::Semaphore;

fn controlled_by(kind: &str, name: &str, api_version: &str) -> ObjectMeta {
    ObjectMeta {
        owner_references: Some(vec![OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: name.into(),
            controller: Some(true),
            uid: "00000000-0000-4000-8000-0000000000aa".into(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_failed_owner_read_answers_503_and_never_opens_a_request_under_the_pods_fingerprint() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let object = |kind: &str, name: &str, v: &str| ObjectRef {
        api_version: v.into(),
        kind: kind.into(),
        resource: String::new(),
        namespace: "shop".into(),
        name: name.into(),
    };
    store.put_object(
        object("Pod", "api-7d9f-x1", "v1"),
        controlled_by("ReplicaSet", "api-7d9f", "apps/v1"),
    );
    store.put_object(
        object("ReplicaSet", "api-7d9f", "apps/v1"),
        controlled_by("Deployment", "api", "apps/v1"),
    );
    store.put_object(object("Deployment", "api", "apps/v1"), ObjectMeta::default());
    // The ReplicaSet read is throttled once (the pod's read works).
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = reads.clone();
    let throttled = Arc::new(Faulty::new(store.clone(), move |op| match op {
        Op::GetMetadata if r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 => {
            Fault::Fail(ApiError::Throttled { retry_after: None })
        }
        _ => Fault::Pass,
    }));
    // The ReplicaSet is read here: a synced owner cache would answer it without a read (its
    // misses and unsynced reads keep this rule: src/target.rs tests, tests/testenv_owner.rs).
    let mut config = test_config();
    config.owner_resolution.metadata_cache.enabled = false;
    let gw = Gateway::on(throttled, Some(store.clone()), config).await;
    let body = webhook(vec![pod_alert("shop", "api-7d9f-x1")]);
    let (s, h, b) = gw.alerts(&body).await;
    // On today's main: 201 for an RR about the Pod (a second fingerprint for the Deployment's incident).
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert!(h.contains_key("retry-after"));
    assert!(store.all_requests().is_empty(), "nothing created on a guess");
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let rr = store.all_requests().remove(0);
    assert_eq!(
        (
            rr.spec.target_resource.kind.as_str(),
            rr.spec.target_resource.name.as_str()
        ),
        ("Deployment", "api"),
        "the retry resolves the whole chain"
    );
    gw.stop().await.unwrap();
}

/// Gateways sharing one embedded store and a clock the test moves forward.
struct Pair {
    store: Arc<EmbeddedStore>,
    clock: Arc<OffsetClock>,
}

impl Pair {
    fn new() -> Self {
        let clock = Arc::new(OffsetClock::default());
        Pair {
            store: Arc::new(EmbeddedStore::new(clock.clone())),
            clock,
        }
    }

    async fn gateway(&self, cluster: Arc<dyn Cluster>, pod: &str, config: &Config) -> Gateway {
        let mut c = config.clone();
        c.identity.pod_name = pod.into();
        Gateway::start(Deps::on(cluster, Some(self.store.clone()), self.clock.clone()), c).await
    }
}

fn patient() -> Config {
    let mut c = test_config();
    c.server.request_timeout = Duration::from_secs(30);
    // Renewals every 20 s: none happens during the test, so expiry is the clock's alone.
    c.lock.lease_duration = Duration::from_secs(60);
    c
}

/// A hook that holds the first `op` at `gate` once armed.
fn held_at(op: Op, gate: Arc<Semaphore>, armed: Arc<AtomicBool>) -> impl Fn(Op) -> Fault + Send + Sync + 'static {
    move |o| {
        if o == op && armed.swap(false, Ordering::SeqCst) {
            Fault::Gate(gate.clone())
        } else {
            Fault::Pass
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_lost_its_lease_with_a_create_in_flight_never_makes_a_second_active_request() {
    // Issue 13, path 1: rr-<fp>-1 Completed; A holds the lock, lists, creates -2 but stalls before
    // it lands; its Lease expires; retention deletes -1; B takes the Lease over, lists nothing and
    // created -1 (active) — then A's -2 landed: two active RRs. Now B inherits the name A was
    // creating from the Lease, so both create -2 and the second meets AlreadyExists.
    let pair = Pair::new();
    let (gate, armed) = (Arc::new(Semaphore::new(0)), Arc::new(AtomicBool::new(false)));
    let a_cluster = Arc::new(Faulty::new(
        pair.store.clone(),
        held_at(Op::CreateRequest, gate.clone(), armed.clone()),
    ));
    let a = pair.gateway(a_cluster, "gw-a", &patient()).await;
    let b = pair.gateway(pair.store.clone(), "gw-b", &patient()).await;
    let body = webhook(vec![pod_alert("shop", "api-0")]);
    let (s, _, first) = b.alerts(&body).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    let gen1 = first["remediationRequestName"].as_str().unwrap().to_owned();
    pair.store.set_phase("signals", &gen1, "Completed").unwrap();

    armed.store(true, Ordering::SeqCst);
    let stalled = tokio::spawn(async move {
        let answer = a.alerts(&body).await;
        (a, answer)
    });
    common::eventually(Duration::from_secs(10), "A's create waits at the gate", || async {
        (!armed.load(Ordering::SeqCst)).then_some(())
    })
    .await;
    pair.clock.advance(Duration::from_secs(61)); // A's Lease runs out
    pair.store.delete_request("signals", &gen1).unwrap(); // retention
    let (s, _, theirs) = b.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(s, StatusCode::CREATED, "{theirs}");
    gate.add_permits(1);
    let (a, (s, _, ours)) = stalled.await.unwrap();
    assert!(s.is_success(), "A's signal is counted, not lost: {ours}");

    let rrs = pair.store.all_requests();
    assert_eq!(
        rrs.len(),
        1,
        "one RR, not two active ones: {:?}",
        rrs.iter().map(|r| &r.metadata.name).collect::<Vec<_>>()
    );
    assert_eq!(theirs["remediationRequestName"], ours["remediationRequestName"]);
    assert_eq!(count_of(&rrs[0]), 2, "both acknowledged signals counted once");
    common::eventually(Duration::from_secs(10), "no Lease left", || async {
        pair.store.all_leases().is_empty().then_some(())
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_stored_by_an_unanswered_acquire_does_not_block_the_incident() {
    // Issue 13, path 3: the Lease create was stored but its answer lost: A answered 503 and the
    // Lease, held by A with no guard, made every replica answer that fingerprint 503 for a whole
    // lease duration. Now A deletes it (conditionally, if still its own) right away.
    let pair = Pair::new();
    let lost_answer = Arc::new(AtomicBool::new(true));
    let l = lost_answer.clone();
    let a_cluster = Arc::new(Faulty::new(pair.store.clone(), move |op| {
        if op == Op::CreateLease && l.swap(false, Ordering::SeqCst) {
            Fault::StoreThenFail(ApiError::Timeout)
        } else {
            Fault::Pass
        }
    }));
    let mut quick = test_config();
    quick.server.request_timeout = Duration::from_secs(3);
    let a = pair.gateway(a_cluster, "gw-a", &quick).await;
    let b = pair.gateway(pair.store.clone(), "gw-b", &quick).await;
    let body = webhook(vec![pod_alert("shop", "api-0")]);
    let (s, h, b1) = a.alerts(&body).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b1}");
    assert!(h.contains_key("retry-after"));
    common::eventually(Duration::from_secs(10), "the stored Lease is cleaned up", || async {
        pair.store.all_leases().is_empty().then_some(())
    })
    .await;
    let (s, _, b2) = b.alerts(&body).await;
    assert_eq!(s, StatusCode::CREATED, "B is not blocked by A's leftover: {b2}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A gateway whose `nth` count write (1-based) suffers `fault`.
async fn with_nth_write(pair: &Pair, nth: usize, fault: Fault) -> Gateway {
    let writes = Arc::new(AtomicUsize::new(0));
    let cluster = Arc::new(Faulty::new(pair.store.clone(), move |op| {
        if op == Op::UpdateDeduplication && writes.fetch_add(1, Ordering::SeqCst) + 1 == nth {
            fault.clone()
        } else {
            Fault::Pass
        }
    }));
    let mut c = test_config();
    c.backend.api_timeout = Duration::from_millis(300); // a hung write is given up soon
    pair.gateway(cluster, "gw-a", &c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_stored_whose_answer_was_lost_is_acknowledged_and_counted_once() {
    // Issue 13, path 4(b, c): the write landed, the answer did not (timeout, 5xx after storing,
    // a hung connection): the signal was answered 503 and its retry counted a second time.
    for fault in [
        Fault::StoreThenFail(ApiError::Timeout),
        Fault::StoreThenFail(ApiError::Unavailable("502 Bad Gateway".into())),
        Fault::StoreThenHang,
        Fault::Fail(ApiError::Timeout), // not stored: the repeat stores it
    ] {
        let pair = Pair::new();
        let gw = with_nth_write(&pair, 2, fault.clone()).await;
        let body = webhook(vec![pod_alert("shop", "api-0")]);
        let mut acknowledged = 0;
        for _ in 0..3 {
            let (s, _, b) = gw.alerts(&body).await;
            if s.is_success() {
                acknowledged += 1;
            } else {
                // What Alertmanager does with a 503: send it again.
                let (s, _, b) = gw.alerts(&body).await;
                assert!(s.is_success(), "{fault:?}: {b}");
                acknowledged += 1;
            }
            let _ = b;
        }
        let rrs = pair.store.all_requests();
        assert_eq!(rrs.len(), 1);
        assert_eq!(
            count_of(&rrs[0]),
            acknowledged,
            "{fault:?}: stored count == acknowledged signals"
        );
        assert_eq!(acknowledged, 3, "{fault:?}: resolved, not answered 503");
        gw.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_stored_whose_answer_was_lost_opens_one_request_and_counts_the_signal() {
    let pair = Pair::new();
    let once = Arc::new(AtomicBool::new(true));
    let o = once.clone();
    let cluster = Arc::new(Faulty::new(pair.store.clone(), move |op| {
        if op == Op::CreateRequest && o.swap(false, Ordering::SeqCst) {
            Fault::StoreThenFail(ApiError::Unavailable("connection reset".into()))
        } else {
            Fault::Pass
        }
    }));
    let gw = pair.gateway(cluster, "gw-a", &test_config()).await;
    let body = webhook(vec![pod_alert("shop", "api-0")]);
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::CREATED, "read back and counted: {b}");
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let rrs = pair.store.all_requests();
    assert_eq!(rrs.len(), 1);
    assert_eq!(count_of(&rrs[0]), 2);
    assert!(pair.store.all_leases().is_empty());
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_in_flight_returns_to_zero_when_a_caller_hangs_up_mid_signal() {
    // Issue 13, path 8(g): the gauge was incremented without a drop guard; a handler dropped
    // before it finished (the caller hung up) left it counted in flight for good.
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let held = Arc::new(Faulty::new(store.clone(), move |op| {
        if op == Op::CreateLease {
            Fault::Gate(g.clone())
        } else {
            Fault::Pass
        }
    }));
    let gw = Gateway::on(held, Some(store), test_config()).await;
    let (client, url) = (common::client(), format!("{}/api/v1/signals/prometheus", gw.base));
    let pending = tokio::spawn(async move {
        let body = webhook(vec![pod_alert("shop", "api-0")]).to_string();
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
    });
    common::eventually(Duration::from_secs(10), "the signal is in flight", || async {
        (gw.metric("gateway_signals_in_flight", &[]).await == 1.0).then_some(())
    })
    .await;
    pending.abort(); // the caller hangs up: its connection closes
    common::eventually(
        Duration::from_secs(10),
        "the abandoned signal is no longer in flight",
        || async { (gw.metric("gateway_signals_in_flight", &[]).await == 0.0).then_some(()) },
    )
    .await;
    gate.add_permits(100);
    gw.stop().await.unwrap();
}
