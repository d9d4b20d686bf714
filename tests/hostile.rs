//! Hostile input that fills the gateway's memories of sender-chosen keys, on the embedded backend
//! (so that 100 000 distinct keys cost seconds, not API-server minutes; the same caches serve the
//! kubernetes backend): owner and label answers for 100 000 invented targets (the read caches),
//! and 100 000 distinct notifications answered 503 with alerts stored (the resend memory). The
//! promise: memory stays within the caches' byte bounds, however many keys arrive. Figures are
//! printed (`--nocapture`); the bounds are asserted. (Tokens, kinds and sockets against the real
//! API server: tests/testenv_hostile.rs.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Gateway, pod_alert, test_config, webhook};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use reqwest::StatusCode;
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::{ApiError, ObjectRef};

const MIB: u64 = 1024 * 1024;

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    common::rss_bytes(None)
}

fn managed(value: &str) -> ObjectMeta {
    ObjectMeta {
        labels: Some([("kubernaut.ai/managed".to_owned(), value.to_owned())].into()),
        ..ObjectMeta::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memories_of_sender_chosen_keys_stay_within_their_byte_bounds() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    store.put_object(ObjectRef::namespace("managed"), managed("true"));
    store.put_object(ObjectRef::namespace("plain"), ObjectMeta::default());
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let cluster = Faulty::new(store.clone(), move |op| match op {
        Op::GetMetadata if f.load(Ordering::SeqCst) => Fault::Fail(ApiError::Unavailable("flaky".into())),
        _ => Fault::Pass,
    });
    let mut config = test_config();
    config.scope.require_managed_label = true;
    // Nothing expires during the test: every key stays a candidate for memory.
    config.scope.cache_ttl = Duration::from_secs(3600);
    config.owner_resolution.cache_ttl = Duration::from_secs(3600);
    config.server.request_timeout = Duration::from_secs(30);
    let gw = Gateway::on(Arc::new(cluster), Some(store.clone()), config).await;
    let post = |body: String| {
        gw.client
            .post(format!("{}/api/v1/signals/prometheus", gw.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let warm = webhook((0..1000).map(|i| pod_alert("plain", &format!("warm-{i}"))).collect());
    assert_eq!(post(warm.to_string()).await.unwrap().status(), StatusCode::MULTI_STATUS);
    // The read caches: 100 000 invented pods, each an owner read and a label read (answered from
    // the store: not found), remembered for an hour. Memory is measured after each half: the
    // caches reach their byte bounds in the first, so the second must not add to it.
    // 100 alerts per notification (~50 KB bodies): allocations of that size are reused, where
    // half-megabyte bodies left the allocator holding more than the caches grow by.
    let invented = |half: usize| {
        futures::stream::iter((0..500).map(move |batch| {
            let alerts = (0..100)
                .map(|i| pod_alert("plain", &format!("invented-{half}-{batch}-{i}")))
                .collect();
            post(webhook(alerts).to_string())
        }))
        .buffer_unordered(4)
        .map(|r| r.unwrap().status())
        .collect::<Vec<_>>()
    };
    let rss_start = rss();
    assert!(invented(0).await.iter().all(|s| *s == StatusCode::MULTI_STATUS));
    let rss_half = rss();
    assert!(invented(1).await.iter().all(|s| *s == StatusCode::MULTI_STATUS));
    let rss_reads = rss();

    // The resend memory: 100 000 distinct notifications of two alerts, one stored (its target's
    // answers are cached), one failing (a new target while reads fail): each answered 503 and
    // remembered.
    let steady = webhook(vec![pod_alert("managed", "steady")]);
    assert_eq!(post(steady.to_string()).await.unwrap().status(), StatusCode::CREATED);
    failing.store(true, Ordering::SeqCst);
    let resendable = |half: usize| {
        futures::stream::iter((0..50_000).map(move |i| {
            let alerts = vec![
                pod_alert("managed", "steady"),
                pod_alert("managed", &format!("flaky-{half}-{i}")),
            ];
            post(webhook(alerts).to_string())
        }))
        .buffer_unordered(64)
        .map(|r| r.unwrap().status())
        .collect::<Vec<_>>()
    };
    assert!(
        resendable(0)
            .await
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE)
    );
    let rss_resend_half = rss();
    assert!(
        resendable(1)
            .await
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE)
    );
    let rss_end = rss();
    eprintln!(
        "RSS (MiB): {} warm; invented targets: {} after 50 000, {} after 100 000; resendable notifications: {} after 50 000, {} after 100 000",
        rss_start / MIB,
        rss_half / MIB,
        rss_reads / MIB,
        rss_resend_half / MIB,
        rss_end / MIB
    );
    // Bounded memories: the second 50 000 keys of each kind add nothing beyond allocator slack.
    let first_half = rss_half.saturating_sub(rss_start);
    assert!(
        rss_reads < rss_half + 16 * MIB,
        "the read caches grew by {} MiB over the second 50 000 targets (by {} MiB over the first)",
        rss_reads.saturating_sub(rss_half) / MIB,
        first_half / MIB
    );
    assert!(
        rss_end < rss_resend_half + 16 * MIB,
        "the resend memory grew by {} MiB over the second 50 000 notifications",
        rss_end.saturating_sub(rss_resend_half) / MIB
    );
    let count = store.all_requests().iter().map(common::count_of).sum::<i64>();
    assert_eq!(count, 100_001, "every stored alert counted once");
    gw.stop().await.unwrap();
}
