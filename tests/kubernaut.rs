//! The drop-in contract with the rest of Kubernaut (KUBERNAUT.md), on the embedded backend: the
//! orchestrator's status survives the gateway's writes, Kubernaut's suppression rules decide where
//! a signal counts (also while time alone ends a cooldown), and specs, metadata and answers carry
//! Kubernaut's values. tests/testenv_kubernaut.rs holds the same promises on the real API server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, count_of, orchestrator_status, pod_alert, test_config, webhook};
use reqwest::StatusCode;
use serde_json::{Value, json};
use signal_gateway::Deps;
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::{Clock, OffsetClock, rfc3339};
use signal_gateway::cluster::{Call, Cluster};
use signal_gateway::config::Config;
use signal_gateway::crd::RemediationRequest;
use signal_gateway::dedup::Strategy;

/// Several gateways sharing one embedded store and one clock the test can move forward.
struct Fleet {
    store: Arc<EmbeddedStore>,
    clock: Arc<OffsetClock>,
    replicas: Vec<Gateway>,
}

fn config(strategy: Strategy, watch: bool) -> Config {
    let mut c = test_config();
    c.dedup.strategy = strategy;
    c.dedup.watch = watch;
    c
}

impl Fleet {
    async fn start(n: usize, config: Config) -> Self {
        let clock = Arc::new(OffsetClock::default());
        let store = Arc::new(EmbeddedStore::new(clock.clone()));
        Self::on(store.clone(), store, clock, n, config).await
    }

    /// `n` gateways on `cluster` (the store, or a fault-injecting wrapper around it).
    async fn on(
        cluster: Arc<dyn Cluster>,
        store: Arc<EmbeddedStore>,
        clock: Arc<OffsetClock>,
        n: usize,
        config: Config,
    ) -> Self {
        let mut replicas = Vec::new();
        for i in 0..n {
            let mut c = config.clone();
            c.identity.pod_name = format!("gw-{i}");
            replicas.push(Gateway::start(Deps::on(cluster.clone(), Some(store.clone()), clock.clone()), c).await);
        }
        Fleet { store, clock, replicas }
    }

    /// `n` identical alerts about `pod`, all at once, round-robin over the replicas.
    async fn storm(&self, pod: &str, n: usize) -> Vec<(StatusCode, Value)> {
        let body = webhook(vec![pod_alert("shop", pod)]);
        let sends = (0..n).map(|i| {
            let gw = &self.replicas[i % self.replicas.len()];
            let body = &body;
            async move {
                let (s, _, b) = gw.alerts(body).await;
                (s, b)
            }
        });
        futures::future::join_all(sends).await
    }

    /// The RR a first signal about `pod` creates, then Completed by the orchestrator with a
    /// cooldown of ten minutes (by the fleet's clock).
    async fn cooled_down(&self, pod: &str) -> String {
        let first = self.storm(pod, 1).await;
        let name = first[0].1["remediationRequestName"].as_str().unwrap().to_owned();
        let until = signal_gateway::clock::add(self.clock.now(), Duration::from_secs(600));
        let status = json!({"overallPhase": "Completed", "completionStatus": {"outcome": "Remediated"},
                            "routingStatus": {"nextAllowedExecution": rfc3339(until)}});
        self.store.patch_status("signals", &name, &status).unwrap();
        name
    }

    fn requests(&self) -> Vec<RemediationRequest> {
        self.store.all_requests()
    }

    fn raw(&self, name: &str) -> Value {
        let rr = self
            .requests()
            .into_iter()
            .find(|r| r.metadata.name.as_deref() == Some(name));
        serde_json::to_value(rr.expect("the RR exists")).unwrap()
    }

    async fn stop(self) {
        for gw in self.replicas {
            gw.stop().await.unwrap();
        }
    }
}

fn orchestrators_part(rr: &Value) -> Value {
    let mut status = rr["status"].clone();
    status.as_object_mut().unwrap().remove("deduplication");
    status
}

fn names(answers: &[(StatusCode, Value)]) -> std::collections::BTreeSet<String> {
    answers
        .iter()
        .map(|(_, b)| b["remediationRequestName"].as_str().unwrap_or("<none>").to_owned())
        .collect()
}

async fn orchestrator_state_survives_concurrent_duplicates(strategy: Strategy) {
    let fleet = Fleet::start(3, config(strategy, true)).await;
    let first = fleet.storm("api-0", 1).await;
    assert_eq!(first[0].0, StatusCode::CREATED, "{:?}", first[0].1);
    let name = first[0].1["remediationRequestName"].as_str().unwrap().to_owned();
    fleet
        .store
        .patch_status("signals", &name, &orchestrator_status())
        .unwrap();
    let before = orchestrators_part(&fleet.raw(&name));
    assert_eq!(before, orchestrator_status());

    let answers = fleet.storm("api-0", 100).await;
    for (s, b) in &answers {
        assert_eq!(*s, StatusCode::ACCEPTED, "{b}");
    }
    assert_eq!(
        names(&answers),
        [name.clone()].into(),
        "every duplicate counts into the one RR"
    );
    let rrs = fleet.requests();
    assert_eq!(rrs.len(), 1);
    assert_eq!(count_of(&rrs[0]), 101, "the count equals the acknowledged signals");
    assert_eq!(
        orchestrators_part(&fleet.raw(&name)),
        before,
        "every field the orchestrator owns is unchanged"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrators_status_survives_a_hundred_concurrent_duplicates_over_three_replicas() {
    orchestrator_state_survives_concurrent_duplicates(Strategy::Optimistic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrators_status_survives_a_hundred_concurrent_duplicates_over_three_replicas_always_lock() {
    orchestrator_state_survives_concurrent_duplicates(Strategy::AlwaysLock).await;
}

/// A finished RR that Kubernaut keeps absorbing: `held` is the status the orchestrator leaves.
async fn a_finished_request_absorbs_until_its_rule_ends(strategy: Strategy, watch: bool) {
    let fleet = Fleet::start(3, config(strategy, watch)).await;
    // Manual review: absorbs however much time passes.
    let review = fleet.storm("review-0", 1).await[0].1["remediationRequestName"]
        .as_str()
        .unwrap()
        .to_owned();
    fleet
        .store
        .patch_status(
            "signals",
            &review,
            &json!({"overallPhase": "Completed", "completionStatus": {"outcome": "ManualReviewRequired", "requiresManualReview": true}}),
        )
        .unwrap();
    let answers = fleet.storm("review-0", 30).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED), "{answers:?}");
    assert_eq!(names(&answers), [review.clone()].into());
    fleet.clock.advance(Duration::from_secs(24 * 3600));
    let answers = fleet.storm("review-0", 3).await;
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED),
        "a day later: {answers:?}"
    );

    // Cooldown: absorbs until nextAllowedExecution, then the next signals open exactly one RR.
    let cooled = fleet.cooled_down("cooldown-0").await;
    let answers = fleet.storm("cooldown-0", 30).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED), "{answers:?}");
    assert_eq!(names(&answers), [cooled.clone()].into());
    let counted = |name: &str| {
        count_of(
            fleet
                .requests()
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(name))
                .unwrap(),
        )
    };
    assert_eq!(counted(&cooled), 31);

    // Time alone ends the cooldown: no write to the RR, and every replica notices.
    fleet.clock.advance(Duration::from_secs(601));
    let answers = fleet.storm("cooldown-0", 30).await;
    assert!(answers.iter().all(|(s, _)| s.is_success()), "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).count(),
        1,
        "exactly one new RR: {answers:?}"
    );
    let fresh = names(&answers);
    assert_eq!(fresh.len(), 1, "all 30 in the one new RR: {fresh:?}");
    assert!(!fresh.contains(&cooled));
    assert_eq!(
        counted(&cooled),
        31,
        "nothing counted into the RR after its cooldown passed"
    );
    assert_eq!(counted(fresh.iter().next().unwrap()), 30);
    assert_eq!(fleet.requests().len(), 3, "review, cooled and the one new RR");
    assert!(fleet.store.all_leases().is_empty());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_review_and_cooldown_absorb_and_a_passed_cooldown_opens_exactly_one_request_with_watch() {
    a_finished_request_absorbs_until_its_rule_ends(Strategy::Optimistic, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_review_and_cooldown_absorb_and_a_passed_cooldown_opens_exactly_one_request_without_watch() {
    a_finished_request_absorbs_until_its_rule_ends(Strategy::Optimistic, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_review_and_cooldown_absorb_and_a_passed_cooldown_opens_exactly_one_request_always_lock() {
    a_finished_request_absorbs_until_its_rule_ends(Strategy::AlwaysLock, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_that_passes_while_signals_coalesce_sends_them_to_one_new_request() {
    let clock = Arc::new(OffsetClock::default());
    let store = Arc::new(EmbeddedStore::new(clock.clone()));
    // Once armed, the next count write waits at the gate: signals coalesce behind it.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, a) = (gate.clone(), armed.clone());
    let cluster = Arc::new(Faulty::new(store.clone(), move |op| {
        if op == Op::UpdateDeduplication && a.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Fault::Gate(g.clone())
        } else {
            Fault::Pass
        }
    }));
    let fleet = Fleet::on(cluster, store, clock, 1, config(Strategy::Optimistic, true)).await;
    let cooled = fleet.cooled_down("api-0").await;
    let gw = &fleet.replicas[0];
    let body = webhook(vec![pod_alert("shop", "api-0")]);
    // One signal counted into the cooled-down RR first: its write leaves this replica's hint at
    // the RR's newest version whenever the watch delivers the orchestrator's status, so the held
    // write below is decided on the cooldown (a hint from before it would meet a Conflict at the
    // gate and be decided again after the clock moved: a new RR, rightly, but not this test).
    let (primed, _, b) = gw.alerts(&body).await;
    assert_eq!(primed, StatusCode::ACCEPTED, "counted while the cooldown ran: {b}");

    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let held = gw.alerts(&body);
    let rest = async {
        // Queue 20 more behind the held write, then let the cooldown pass while they wait.
        common::eventually(Duration::from_secs(10), "the first write waits at the gate", || async {
            (!armed.load(std::sync::atomic::Ordering::SeqCst)).then_some(())
        })
        .await;
        let queued = futures::future::join_all((0..20).map(|_| gw.alerts(&body)));
        let release = async {
            common::eventually(
                Duration::from_secs(10),
                "signals queue behind the held write",
                || async { (gw.metric("gateway_signals_in_flight", &[]).await >= 21.0).then_some(()) },
            )
            .await;
            fleet.clock.advance(Duration::from_secs(601));
            gate.add_permits(1);
        };
        let (answers, ()) = tokio::join!(queued, release);
        answers
    };
    let ((first, _, b), rest) = tokio::join!(held, rest);
    assert_eq!(first, StatusCode::ACCEPTED, "decided while the cooldown ran: {b}");
    assert_eq!(b["remediationRequestName"], cooled.as_str());
    let rest: Vec<(StatusCode, Value)> = rest.into_iter().map(|(s, _, b)| (s, b)).collect();
    assert_eq!(
        rest.iter().filter(|(s, _)| *s == StatusCode::CREATED).count(),
        1,
        "{rest:?}"
    );
    assert!(rest.iter().all(|(s, _)| s.is_success()), "{rest:?}");
    let fresh = names(&rest);
    assert_eq!(
        fresh.len(),
        1,
        "one new RR for the signals written after the cooldown: {fresh:?}"
    );
    let rrs = fleet.requests();
    assert_eq!(rrs.len(), 2);
    let count = |n: &str| count_of(rrs.iter().find(|r| r.metadata.name.as_deref() == Some(n)).unwrap());
    assert_eq!(count(&cooled), 3, "the first signal, the primer and the held one");
    assert_eq!(count(fresh.iter().next().unwrap()), 20);
    fleet.stop().await;
}

#[tokio::test]
async fn a_request_carries_kubernauts_spec_values_labels_and_annotation() {
    let gw = Gateway::embedded(test_config()).await;
    let long = "v".repeat(100);
    let mut alert = pod_alert("shop", "api-0");
    alert["labels"]["long"] = json!(long);
    alert["annotations"]["description"] = json!("d".repeat(300_000));
    let mut body = webhook(vec![alert]);
    body["commonLabels"] = json!({"cluster": "eu-west-1", "alertname": "KubePodCrashLooping"});
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let rr = gw.store().all_requests().remove(0);
    let spec = &rr.spec;
    assert_eq!(spec.signal_type, "alert");
    assert_eq!(spec.signal_source, "prometheus");
    assert_eq!(spec.target_type, "kubernetes");
    assert_eq!(spec.severity, "critical");
    assert_eq!(spec.cluster_id, "eu-west-1", "commonLabels.cluster names the cluster");
    let expected = signal_gateway::fingerprint::Fingerprint::of("eu-west-1", &spec.target_resource);
    assert_eq!(
        spec.signal_fingerprint,
        expected.as_str(),
        "the cluster-prefixed fingerprint"
    );
    assert_eq!(b["fingerprint"], expected.as_str());
    assert_eq!(
        spec.firing_time.parse::<jiff::Timestamp>().unwrap(),
        "2026-11-24T10:00:00Z".parse::<jiff::Timestamp>().unwrap(),
        "the sender's startsAt"
    );
    assert!(spec.received_time.parse::<jiff::Timestamp>().is_ok());
    assert_eq!(spec.signal_labels["long"].chars().count(), 63, "label values cut to 63");
    assert_eq!(spec.signal_annotations["description"].chars().count(), 262_000);
    let provider: Value = serde_json::from_str(&spec.provider_data).unwrap();
    assert_eq!(provider["namespace"], "shop");
    assert_eq!(provider["labels"]["pod"], "api-0");
    assert_eq!(provider["labels"]["long"].as_str().unwrap().len(), 63);
    assert!(spec.original_payload.len() <= signal_gateway::signal::ORIGINAL_PAYLOAD_MAX);
    let labels = rr.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "gateway-service");
    assert_eq!(labels["app.kubernetes.io/component"], "remediation");
    let created_at = &rr.metadata.annotations.clone().unwrap()["kubernaut.ai/created-at"];
    assert!(created_at.parse::<jiff::Timestamp>().is_ok(), "{created_at}");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_signal_without_a_start_time_fires_when_received_and_error_events_are_signals() {
    let gw = Gateway::embedded(test_config()).await;
    let mut alert = pod_alert("shop", "api-1");
    alert.as_object_mut().unwrap().remove("startsAt");
    let sent = webhook(vec![alert]);
    let (s, _, b) = gw.alerts(&sent).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let rr = gw.store().all_requests().remove(0);
    assert_eq!(rr.spec.firing_time, rr.spec.received_time, "the receive time stands in");
    assert_eq!(
        &*rr.spec.original_payload,
        sent.to_string(),
        "the request body as received"
    );

    let mut event: Value = serde_json::from_str(&common::fixture("event-warning-backoff.json")).unwrap();
    event["type"] = json!("Error");
    let (s, _, b) = gw.event(&event).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let created = gw
        .store()
        .all_requests()
        .into_iter()
        .find(|r| r.spec.signal_source == "kubernetes-events")
        .expect("the Error event's RR");
    assert_eq!(created.spec.signal_type, "alert");
    assert_eq!(created.spec.severity, "error");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn answers_are_a_superset_of_kubernauts() {
    let gw = Gateway::embedded(test_config()).await;
    let body = webhook(vec![pod_alert("shop", "api-0")]);
    let (_, _, created) = gw.alerts(&body).await;
    assert!(created["message"].as_str().unwrap().contains("created"), "{created}");
    let (_, _, dup) = gw.alerts(&body).await;
    let name = dup["remediationRequestName"].as_str().unwrap();
    assert!(dup["message"].is_string(), "{dup}");
    assert_eq!(dup["metadata"]["count"], 2);
    assert_eq!(dup["metadata"]["remediationRequestRef"], format!("signals/{name}"));
    let rr = gw.store().all_requests().remove(0);
    let d = rr.status.unwrap().deduplication.unwrap();
    assert_eq!(dup["metadata"]["firstOccurrence"], d.first_seen_at);
    assert_eq!(dup["metadata"]["lastOccurrence"], d.last_seen_at);

    let mut scoped = test_config();
    scoped.scope.require_managed_label = true;
    let gw2 = Gateway::embedded(scoped).await;
    let (s, _, rejected) = gw2.alerts(&body).await;
    assert_eq!(s, StatusCode::OK, "{rejected}");
    assert_eq!(rejected["duplicate"], false);
    assert_eq!(rejected["fingerprint"].as_str().unwrap().len(), 64, "{rejected}");
    assert!(rejected["message"].is_string());
    let r = &rejected["rejection"];
    assert_eq!(
        (&r["status"], &r["reason"]),
        (&json!("rejected"), &json!("unmanaged_resource")),
        "{rejected}"
    );
    assert_eq!(r["resource"], "shop:Pod:api-0");
    assert!(
        r["action"].as_str().unwrap().contains("kubernaut.ai/managed=true"),
        "{rejected}"
    );
    assert!(r["message"].is_string());

    let (s, _, batch) = gw
        .alerts(&webhook(vec![pod_alert("shop", "api-0"), pod_alert("shop", "api-9")]))
        .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{batch}");
    for result in batch["results"].as_array().unwrap() {
        for field in ["status", "fingerprint", "message"] {
            assert!(result[field].is_string(), "{field} in {result}");
        }
    }
    for field in ["total", "created", "deduplicated", "rejected", "failed"] {
        assert!(batch["summary"][field].is_u64(), "{field} in {batch}");
    }
    gw.stop().await.unwrap();
    gw2.stop().await.unwrap();
}

#[tokio::test]
async fn requests_written_with_the_older_values_are_still_found_and_counted() {
    let gw = Gateway::embedded(test_config()).await;
    let fp = common::fp_of_pod("shop", "api-0");
    let old = RemediationRequest {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(format!("rr-{}-1", &fp[..16])),
            namespace: Some("signals".into()),
            labels: Some([("app.kubernetes.io/managed-by".to_owned(), "signal-gateway".to_owned())].into()),
            ..Default::default()
        },
        spec: signal_gateway::crd::RemediationRequestSpec {
            signal_type: "prometheus-alert".into(),
            signal_source: "signal-gateway".into(),
            ..signal_gateway::crd::RemediationRequestSpec::example(&fp)
        },
        status: None,
    };
    gw.store().create_request(Call::UNCOUNTED, &old).await.unwrap();
    let (s, _, b) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(s, StatusCode::ACCEPTED, "counted into the older RR: {b}");
    assert_eq!(b["remediationRequestName"], old.metadata.name.clone().unwrap());
    assert_eq!(gw.store().all_requests().len(), 1);
    gw.stop().await.unwrap();
}
