//! Races, leaks and holes a line-by-line review found (issue 13), each held as the promise it
//! breaks — no second active RR, exact counts for acknowledged signals, no leaked lease, errors
//! are not absence — on the embedded backend with injected faults. (Paths that need the real API
//! server are in tests/testenv_races.rs.)

mod common;

use std::sync::Arc;

use common::{Gateway, pod_alert, test_config, webhook};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use reqwest::StatusCode;
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::{ApiError, ObjectRef};

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
    let gw = Gateway::on(throttled, Some(store.clone()), test_config()).await;
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
