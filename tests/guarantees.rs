//! The hard promises of DESIGN.md on the embedded backend: no duplicate RRs, exact counts under
//! concurrency (both strategies), completed RRs open a new one, lease takeover and contention,
//! 503 instead of loss, and no lease outlives a request or a shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, count_of, eventually, fp_of_pod, pod_alert, test_config, webhook};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use reqwest::StatusCode;
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::{Call, Cluster};
use signal_gateway::config::Config;
use signal_gateway::crd::{Deduplication, RemediationRequest};
use signal_gateway::dedup::Strategy;

fn config(strategy: Strategy) -> Config {
    let mut c = test_config();
    c.dedup.strategy = strategy;
    c.server.request_timeout = Duration::from_secs(20);
    c
}

async fn storm(gw: &Gateway, pods: &[String], per_pod: usize) -> Vec<(StatusCode, serde_json::Value)> {
    let mut tasks = Vec::new();
    for _ in 0..per_pod {
        for pod in pods {
            let body = webhook(vec![pod_alert("shop", pod)]);
            let client = gw.client.clone();
            let url = format!("{}/api/v1/signals/prometheus", gw.base);
            tasks.push(tokio::spawn(async move {
                let resp = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                (resp.status(), resp.json::<serde_json::Value>().await.unwrap())
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn concurrent_identical_signals_make_one_request_with_exact_count(strategy: Strategy) {
    let gw = Gateway::embedded(config(strategy)).await;
    let answers = storm(&gw, &["api-0".to_string()], 500).await;
    assert!(
        answers.iter().all(|(s, _)| s.is_success()),
        "every signal acknowledged: {:?}",
        answers.iter().find(|(s, _)| !s.is_success())
    );
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count(),
        1,
        "exactly one 201"
    );
    let mut counts: Vec<i64> = answers
        .iter()
        .map(|(_, b)| b["occurrenceCount"].as_i64().unwrap_or(1))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        (1..=500).collect::<Vec<_>>(),
        "each acknowledgement has its own place in the count"
    );
    let rrs = gw.store().all_requests();
    assert_eq!(rrs.len(), 1);
    assert_eq!(count_of(&rrs[0]), 500);
    assert!(gw.store().all_leases().is_empty());
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_identical_signals_make_one_request_counting_500() {
    concurrent_identical_signals_make_one_request_with_exact_count(Strategy::Optimistic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_identical_signals_make_one_request_counting_500_always_lock() {
    concurrent_identical_signals_make_one_request_with_exact_count(Strategy::AlwaysLock).await;
}

async fn fifty_incidents_of_twenty(strategy: Strategy) {
    let gw = Gateway::embedded(config(strategy)).await;
    let pods: Vec<String> = (0..50).map(|i| format!("pod-{i}")).collect();
    let answers = storm(&gw, &pods, 20).await;
    assert!(answers.iter().all(|(s, _)| s.is_success()));
    let rrs = gw.store().all_requests();
    assert_eq!(rrs.len(), 50);
    for rr in &rrs {
        assert_eq!(count_of(rr), 20, "{}", rr.spec.target_resource.name);
    }
    assert!(gw.store().all_leases().is_empty());
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_fingerprints_times_twenty_duplicates_make_fifty_requests_of_twenty() {
    fifty_incidents_of_twenty(Strategy::Optimistic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_fingerprints_times_twenty_duplicates_make_fifty_requests_of_twenty_always_lock() {
    fifty_incidents_of_twenty(Strategy::AlwaysLock).await;
}

#[tokio::test]
async fn after_the_request_completes_the_next_signal_opens_a_new_one() {
    let gw = Gateway::embedded(test_config()).await;
    let body = webhook(vec![pod_alert("shop", "api-0")]);
    let (_, _, first) = gw.alerts(&body).await;
    let first_name = first["remediationRequestName"].as_str().unwrap().to_owned();
    gw.store().set_phase("signals", &first_name, "Completed").unwrap();
    let (s, _, second) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::CREATED, "{second}");
    assert_ne!(second["remediationRequestName"], first_name.as_str());
    let (s, _, third) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(third["remediationRequestName"], second["remediationRequestName"]);
    assert_eq!(third["occurrenceCount"], 2);
    let rrs = gw.store().all_requests();
    assert_eq!(rrs.len(), 2);
    assert_eq!(rrs.iter().map(count_of).sum::<i64>(), 3);
    gw.stop().await.unwrap();
}

fn foreign_lease(name: &str, holder: &str, renewed_secs_ago: i64) -> Lease {
    let renewed = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(renewed_secs_ago);
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("signals".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(30),
            acquire_time: Some(MicroTime(renewed)),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }),
    }
}

/// The fingerprint and lock name the gateway derives for pod `shop/api-0`.
fn lock_name_of(fingerprint: &str) -> String {
    format!("gw-lock-{}", &fingerprint[..16])
}

#[tokio::test]
async fn a_lease_left_by_a_dead_holder_is_taken_over() {
    let gw = Gateway::embedded(test_config()).await;
    let fp = fp_of_pod("shop", "api-0");
    gw.store()
        .create_lease(
            Call::UNCOUNTED,
            &foreign_lease(&lock_name_of(&fp), "crashed-replica", 90),
        )
        .await
        .unwrap();
    let (s, _, b) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["fingerprint"], fp.as_str());
    assert_eq!(
        gw.metric("gateway_lock_acquisitions_total", &["outcome=\"takeover\""])
            .await,
        1.0
    );
    assert!(gw.store().all_leases().is_empty(), "the taken-over lease is released");
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_foreign_lease_delays_the_signal_which_then_counts_as_duplicate() {
    let gw = Gateway::embedded(config(Strategy::Optimistic)).await;
    let fp = fp_of_pod("shop", "api-0");
    let lease = gw
        .store()
        .create_lease(Call::UNCOUNTED, &foreign_lease(&lock_name_of(&fp), "replica-b", 0))
        .await
        .unwrap();
    let client = gw.client.clone();
    let url = format!("{}/api/v1/signals/prometheus", gw.base);
    let pending = tokio::spawn(async move {
        let resp = client
            .post(url)
            .header("content-type", "application/json")
            .body(webhook(vec![pod_alert("shop", "api-0")]).to_string())
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json::<serde_json::Value>().await.unwrap())
    });
    eventually(
        Duration::from_secs(10),
        "the gateway meets the foreign lease",
        || async {
            (gw.metric("gateway_lock_acquisitions_total", &["outcome=\"contended\""])
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(
        !pending.is_finished(),
        "the signal waits while replica-b holds the lock"
    );

    // replica-b creates the request and releases its lock, as a peer would.
    let theirs = RemediationRequest {
        metadata: ObjectMeta {
            name: Some(format!("rr-{}-1", &fp[..16])),
            namespace: Some("signals".into()),
            ..Default::default()
        },
        spec: signal_gateway::crd::RemediationRequestSpec {
            signal_name: "KubePodCrashLooping".into(),
            ..signal_gateway::crd::RemediationRequestSpec::example(&fp)
        },
        status: None,
    };
    let created = gw.store().create_request(Call::UNCOUNTED, &theirs).await.unwrap();
    // The peer counts its own signal with a conditional write, as a replica does; the waiting
    // gateway (woken by its watch when the RR appears) may count first, so re-read on Conflict.
    let name = created.metadata.name.clone().unwrap();
    loop {
        let current = gw.store().get_request(Call::UNCOUNTED, "signals", &name).await.unwrap();
        let next = Deduplication {
            first_seen_at: "2026-11-24T10:00:00Z".into(),
            last_seen_at: "2026-11-24T10:00:00Z".into(),
            occurrence_count: current.occurrence_count() + 1,
        };
        let rv = current.metadata.resource_version.clone().unwrap();
        match gw
            .store()
            .update_deduplication(Call::UNCOUNTED, "signals", &name, &rv, &next)
            .await
        {
            Ok(_) => break,
            Err(signal_gateway::cluster::ApiError::Conflict(_)) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    gw.store()
        .delete_lease(
            Call::UNCOUNTED,
            "signals",
            &lock_name_of(&fp),
            lease.metadata.resource_version.as_deref().unwrap(),
        )
        .await
        .unwrap();

    let (s, b) = pending.await.unwrap();
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(b["remediationRequestName"], name.as_str(), "counted into the peer's RR");
    assert_eq!(gw.store().all_requests().len(), 1);
    assert_eq!(
        count_of(&gw.store().all_requests()[0]),
        2,
        "the waiting signal is counted, never dropped"
    );
    assert!(gw.store().all_leases().is_empty());
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_live_foreign_lease_that_never_resolves_answers_503_within_the_deadline() {
    let mut c = test_config();
    c.server.request_timeout = Duration::from_millis(600);
    let gw = Gateway::embedded(c).await;
    let fp = fp_of_pod("shop", "api-0");
    gw.store()
        .create_lease(Call::UNCOUNTED, &foreign_lease(&lock_name_of(&fp), "replica-b", 0))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (s, h, b) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert!(h.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered near the deadline, not hung"
    );
    assert!(gw.store().all_requests().is_empty());
    assert!(
        gw.metric("gateway_lock_acquisition_failures_total", &["reason=\"timeout\""])
            .await
            >= 1.0
    );
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_backend_that_fails_every_call_yields_503_and_no_request() {
    let gw = Gateway::embedded(test_config()).await;
    gw.store().set_unavailable(true);
    let (s, h, b) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(h["content-type"], "application/problem+json");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let (s, _, b) = gw
        .alerts(&webhook(vec![pod_alert("shop", "a"), pod_alert("shop", "b")]))
        .await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "a batch with a retryable failure is 503: {b}"
    );
    assert_eq!(b["results"]["summary"]["failed"], 2);
    gw.store().set_unavailable(false);
    assert!(gw.store().all_requests().is_empty());
    assert!(gw.store().all_leases().is_empty());
    // and it recovers without restart
    let (s, _, _) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(s, StatusCode::CREATED);
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_drain_deadline_still_releases_every_lease() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let mut c = test_config();
    c.server.shutdown_timeout = Duration::from_millis(200);
    c.server.request_timeout = Duration::from_secs(30);
    let hangs = Faulty::new(store.clone(), |op| {
        if op == Op::CreateRequest {
            Fault::Hang
        } else {
            Fault::Pass
        }
    });
    let gw = Gateway::on(Arc::new(hangs), Some(store.clone()), c).await;
    let client = gw.client.clone();
    let url = format!("{}/api/v1/signals/prometheus", gw.base);
    let _pending = tokio::spawn(async move {
        let _ = client
            .post(url)
            .header("content-type", "application/json")
            .body(webhook(vec![pod_alert("shop", "api-0")]).to_string())
            .send()
            .await;
    });
    eventually(Duration::from_secs(10), "the creation lock is held", || async {
        (!store.all_leases().is_empty()).then_some(())
    })
    .await;
    gw.stop().await.unwrap();
    assert!(
        store.all_leases().is_empty(),
        "shutdown released the lease: {:?}",
        store.all_leases()
    );
}

#[tokio::test]
async fn under_sustained_overload_new_signals_are_shed_fast_and_admitted_again_when_it_clears() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let slow = Arc::new(AtomicBool::new(true));
    let flag = slow.clone();
    // Every lookup hangs: each signal waits out its whole deadline, like a saturated API server.
    let backend = Faulty::new(store.clone(), move |op| {
        if op == Op::ListRequests && flag.load(Ordering::SeqCst) {
            Fault::Hang
        } else {
            Fault::Pass
        }
    });
    let mut c = test_config();
    c.server.request_timeout = Duration::from_millis(300);
    let gw = Gateway::on(Arc::new(backend), Some(store), c).await;
    let bodies: Vec<serde_json::Value> = (0..12)
        .map(|i| webhook(vec![pod_alert("shop", &format!("p{i}"))]))
        .collect();
    let waves = futures::future::join_all(bodies.iter().map(|b| gw.alerts(b))).await;
    assert!(waves.iter().all(|(s, _, _)| *s == StatusCode::SERVICE_UNAVAILABLE));

    let started = std::time::Instant::now();
    let (status, headers, body) = gw.alerts(&webhook(vec![pod_alert("shop", "late")])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "shed at once instead of waiting out the deadline: {:?}",
        started.elapsed()
    );
    assert!(body["detail"].as_str().unwrap().contains("overloaded"), "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(gw.metric("gateway_signals_shed_total", &[]).await >= 1.0);

    slow.store(false, Ordering::SeqCst);
    eventually(
        Duration::from_secs(10),
        "admitted and stored once the overload clears",
        || async {
            let (status, _, _) = gw.alerts(&webhook(vec![pod_alert("shop", "late")])).await;
            (status == StatusCode::CREATED).then_some(())
        },
    )
    .await;
    gw.stop().await.unwrap();
}

/// A notification of several alerts is answered 503 when one of them could not be stored, and
/// Alertmanager resends it byte for byte: the alerts stored the first time must not be counted
/// twice, and the one that failed must be stored by the resend.
#[tokio::test]
async fn a_resent_notification_counts_its_stored_alerts_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let fail_next_create = Arc::new(AtomicBool::new(false));
    let flag = fail_next_create.clone();
    let backend = Faulty::new(store.clone(), move |op| {
        if op == Op::CreateRequest && flag.swap(false, Ordering::SeqCst) {
            Fault::Fail(signal_gateway::cluster::ApiError::Unavailable("injected".into()))
        } else {
            Fault::Pass
        }
    });
    let gw = Gateway::on(Arc::new(backend), Some(store.clone()), test_config()).await;
    // "web-0" already has its RR; "web-1" is a new incident whose first creation fails.
    let (status, _, _) = gw.alerts(&webhook(vec![pod_alert("shop", "web-0")])).await;
    assert_eq!(status, StatusCode::CREATED);
    fail_next_create.store(true, Ordering::SeqCst);
    let notification = webhook(vec![pod_alert("shop", "web-0"), pod_alert("shop", "web-1")]);
    let (status, _, body) = gw.alerts(&notification).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["results"]["results"][0]["status"], "duplicate", "{body}");
    assert_eq!(body["results"]["results"][1]["status"], "failed", "{body}");

    // Alertmanager resends the same notification.
    let (status, _, body) = gw.alerts(&notification).await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    assert_eq!(body["results"][0]["status"], "duplicate", "{body}");
    assert_eq!(
        body["results"][0]["occurrenceCount"], 2,
        "answered as stored the first time: {body}"
    );
    assert_eq!(body["results"][1]["status"], "created", "{body}");

    let counts: std::collections::BTreeMap<String, i64> = store
        .all_requests()
        .iter()
        .map(|rr| (rr.spec.target_resource.name.clone(), count_of(rr)))
        .collect();
    assert_eq!(
        counts.get("web-0"),
        Some(&2),
        "one signal, then one notification: {counts:?}"
    );
    assert_eq!(counts.get("web-1"), Some(&1), "{counts:?}");
    assert_eq!(gw.metric("gateway_signals_resent_total", &[]).await, 1.0);

    // A later, different notification is processed as usual; the same body again (a repeat
    // after a 2xx answer) is counted again: only resends of a 503 answer are remembered.
    let (status, _, _) = gw.alerts(&notification).await;
    assert_eq!(status, StatusCode::MULTI_STATUS);
    let web0 = store
        .all_requests()
        .into_iter()
        .find(|rr| rr.spec.target_resource.name == "web-0")
        .unwrap();
    assert_eq!(count_of(&web0), 3);
    gw.stop().await.unwrap();
}
