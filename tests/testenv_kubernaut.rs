//! The drop-in contract with the rest of Kubernaut (KUBERNAUT.md) against the real kube-apiserver,
//! with three replicas as OS processes: the orchestrator's status survives every gateway write,
//! Kubernaut's suppression rules absorb signals (and stop when a cooldown passes by time alone),
//! and an RR the gateway creates passes the API server's validation with Kubernaut's values.
//! The orchestrator is played by the testenv admin, writing the status subresource.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::contract::Orchestrator;
use common::testenv::{
    AdminOrchestrator, Replica, admin, raw_request, requests_for, start_replicas, storm, testenv, unique,
};
use common::{count_of, fp_of_pod, orchestrator_status, pod_alert, webhook};
use reqwest::StatusCode;
use serde_json::{Value, json};

// Three replicas, the API server and etcd share two cores: give the API server time (these
// tests are about where signals count, not about latency).
const OPTIMISTIC: &str = "logging:\n  format: json\nserver:\n  requestTimeout: 20s\nbackend:\n  apiTimeout: 15s\n";
const NO_WATCH: &str =
    "logging:\n  format: json\nserver:\n  requestTimeout: 20s\nbackend:\n  apiTimeout: 15s\ndedup:\n  watch: false\n";
const ALWAYS_LOCK: &str = "logging:\n  format: json\nserver:\n  requestTimeout: 20s\nbackend:\n  apiTimeout: 15s\ndedup:\n  strategy: always-lock\n";

fn orchestrators_part(rr: &Value) -> Value {
    let mut status = rr["status"].clone();
    status.as_object_mut().unwrap().remove("deduplication");
    status
}

fn names(answers: &[(StatusCode, Value)]) -> BTreeSet<String> {
    answers
        .iter()
        .map(|(_, b)| b["remediationRequestName"].as_str().unwrap_or("<none>").to_owned())
        .collect()
}

/// The RR the first signal about `pod` creates.
async fn first_request(replicas: &[Replica], client: &reqwest::Client, ns: &str, pod: &str) -> String {
    let answers = storm(replicas, client, ns, &[pod.to_owned()], 1).await;
    assert_eq!(answers[0].0, StatusCode::CREATED, "{:?}", answers[0].1);
    answers[0].1["remediationRequestName"].as_str().unwrap().to_owned()
}

async fn orchestrator_state_survives(config: &str, tag: &str) {
    let (replicas, client) = start_replicas(&format!("{tag}-{}", unique()), 3, config).await;
    let ns = format!("shop-{}", unique());
    let gw_ns = &testenv().namespace;
    let admin = admin().await;
    let orchestrator = AdminOrchestrator(admin.clone());
    let name = first_request(&replicas, &client, &ns, "api-0").await;
    orchestrator
        .patch_status(gw_ns, &name, orchestrator_status())
        .await
        .expect("the orchestrator's status is valid under our CRD");
    let before = orchestrators_part(&raw_request(&admin, gw_ns, &name).await);
    assert_eq!(
        before,
        orchestrator_status(),
        "the API server kept every orchestrator field"
    );

    let answers = storm(&replicas, &client, &ns, &["api-0".to_owned()], 100).await;
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s != StatusCode::ACCEPTED).collect();
    assert!(
        refused.is_empty(),
        "{} of 100 not 202, e.g. {:?}",
        refused.len(),
        refused.first()
    );
    assert_eq!(names(&answers), [name.clone()].into());
    let rrs = requests_for(&admin, gw_ns, &fp_of_pod(&ns, "api-0")).await;
    assert_eq!(rrs.len(), 1, "no second RR");
    assert_eq!(count_of(&rrs[0]), 101, "the count equals the acknowledged signals");
    assert_eq!(
        orchestrators_part(&raw_request(&admin, gw_ns, &name).await),
        before,
        "every field the orchestrator owns is unchanged after 100 gateway writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrators_status_survives_a_hundred_concurrent_duplicates_over_three_replicas() {
    orchestrator_state_survives(OPTIMISTIC, "own").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrators_status_survives_a_hundred_concurrent_duplicates_over_three_replicas_always_lock() {
    orchestrator_state_survives(ALWAYS_LOCK, "own-lock").await;
}

/// The orchestrator's cooldown of `name`: until `until`.
async fn cool_down(orchestrator: &AdminOrchestrator, name: &str, until: jiff::Timestamp) {
    orchestrator
        .patch_status(
            &testenv().namespace,
            name,
            json!({"overallPhase": "Completed", "completionStatus": {"outcome": "Remediated"},
                   "routingStatus": {"nextAllowedExecution": signal_gateway::clock::rfc3339(until)}}),
        )
        .await
        .unwrap();
}

async fn finished_requests_absorb_until_their_rule_ends(config: &str, tag: &str) {
    let (replicas, client) = start_replicas(&format!("{tag}-{}", unique()), 3, config).await;
    let ns = format!("shop-{}", unique());
    let gw_ns = &testenv().namespace;
    let admin = admin().await;
    let orchestrator = AdminOrchestrator(admin.clone());

    // Manual review: a person must look first; signals keep counting into it.
    let review = first_request(&replicas, &client, &ns, "review-0").await;
    orchestrator
        .patch_status(
            gw_ns,
            &review,
            json!({"overallPhase": "Completed", "completionStatus": {"outcome": "ManualReviewRequired", "requiresManualReview": true}}),
        )
        .await
        .unwrap();
    let answers = storm(&replicas, &client, &ns, &["review-0".to_owned()], 30).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED), "{answers:?}");
    assert_eq!(names(&answers), [review.clone()].into());

    // Cooldown: absorbs until nextAllowedExecution passes (an hour: however slow the machine).
    let cooled = first_request(&replicas, &client, &ns, "cool-0").await;
    let hour = signal_gateway::clock::add(jiff::Timestamp::now(), Duration::from_secs(3600));
    cool_down(&orchestrator, &cooled, hour).await;
    let answers = storm(&replicas, &client, &ns, &["cool-0".to_owned()], 30).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED), "{answers:?}");
    assert_eq!(names(&answers), [cooled.clone()].into());
    let fp = fp_of_pod(&ns, "cool-0");
    let count_of_cooled = || async {
        let rrs = requests_for(&admin, gw_ns, &fp).await;
        count_of(
            rrs.iter()
                .find(|r| r.metadata.name.as_deref() == Some(cooled.as_str()))
                .unwrap(),
        )
    };
    assert_eq!(count_of_cooled().await, 31);

    // The orchestrator shortens the cooldown to end two seconds from now; it then passes with
    // time alone (no write at that moment): the next 30 concurrent signals over the three
    // replicas open exactly one new RR.
    let until = signal_gateway::clock::add(jiff::Timestamp::now(), Duration::from_secs(2));
    cool_down(&orchestrator, &cooled, until).await;
    let wait = until.duration_since(jiff::Timestamp::now()).unsigned_abs() + Duration::from_millis(50);
    tokio::time::sleep(wait).await; // waiting for the time itself, not for a condition
    let answers = storm(&replicas, &client, &ns, &["cool-0".to_owned()], 30).await;
    assert!(answers.iter().all(|(s, _)| s.is_success()), "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count(),
        1,
        "exactly one new RR: {answers:?}"
    );
    let fresh = names(&answers);
    assert_eq!(fresh.len(), 1, "{fresh:?}");
    assert!(!fresh.contains(&cooled));
    assert_eq!(
        count_of_cooled().await,
        31,
        "nothing counted into it after its cooldown"
    );
    assert_eq!(requests_for(&admin, gw_ns, &fp).await.len(), 2);
    assert_eq!(
        requests_for(&admin, gw_ns, &fp_of_pod(&ns, "review-0")).await.len(),
        1,
        "the review RR still stands alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_review_and_cooldown_absorb_over_three_replicas_and_a_passed_cooldown_opens_one_request() {
    finished_requests_absorb_until_their_rule_ends(OPTIMISTIC, "absorb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_review_and_cooldown_absorb_over_three_replicas_and_a_passed_cooldown_opens_one_request_without_watch() {
    finished_requests_absorb_until_their_rule_ends(NO_WATCH, "absorb-nw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_review_and_cooldown_absorb_over_three_replicas_and_a_passed_cooldown_opens_one_request_always_lock() {
    finished_requests_absorb_until_their_rule_ends(ALWAYS_LOCK, "absorb-lock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_gateway_creates_passes_the_api_servers_validation_with_kubernauts_values() {
    let replica = Replica::start(&format!("values-{}", unique()), OPTIMISTIC);
    let client = common::client();
    replica.wait_ready(&client).await;
    let ns = format!("shop-{}", unique());
    let mut alert = pod_alert(&ns, "api-0");
    alert["labels"]["long"] = json!("v".repeat(100));
    alert["labels"]["severity"] = json!("P1-Page-Immediately");
    let mut body = webhook(vec![alert]);
    let cluster = format!("eu-{}", unique());
    body["commonLabels"] = json!({"cluster": cluster});
    let r = client
        .post(format!("{}/api/v1/signals/prometheus", replica.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{}", replica.log_text());
    let answer: Value = r.json().await.unwrap();
    let name = answer["remediationRequestName"].as_str().unwrap();
    let rr = raw_request(&admin().await, &testenv().namespace, name).await;
    let spec = &rr["spec"];
    assert_eq!(spec["signalType"], "alert");
    assert_eq!(spec["signalSource"], "prometheus");
    assert_eq!(spec["targetType"], "kubernetes");
    assert_eq!(
        spec["severity"], "P1-Page-Immediately",
        "the sender's severity, unnormalised"
    );
    assert_eq!(spec["clusterID"], cluster.as_str());
    assert_eq!(spec["signalLabels"]["long"].as_str().unwrap().len(), 63);
    assert!(spec["firingTime"].as_str().unwrap().starts_with("2026-11-24T10:00:00"));
    let provider: Value = serde_json::from_str(spec["providerData"].as_str().unwrap()).unwrap();
    assert_eq!(provider["namespace"], ns.as_str());
    assert_eq!(
        serde_json::from_str::<Value>(spec["originalPayload"].as_str().unwrap()).unwrap(),
        body,
        "the request body as received"
    );
    assert_eq!(
        rr["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "gateway-service"
    );
    assert_eq!(rr["metadata"]["labels"]["app.kubernetes.io/component"], "remediation");
    assert!(rr["metadata"]["annotations"]["kubernaut.ai/created-at"].is_string());
    assert_eq!(rr["status"]["deduplication"]["occurrenceCount"], 1);
    // The selectable fields Kubernaut's services query by are served.
    let by_severity = common::testenv::kubectl(&[
        "-n",
        &testenv().namespace,
        "get",
        "rr",
        "--field-selector",
        &format!("spec.clusterID={cluster},spec.severity=P1-Page-Immediately,spec.signalType=alert"),
        "-o",
        "name",
    ]);
    assert_eq!(by_severity, format!("remediationrequest.kubernaut.ai/{name}"));
}
