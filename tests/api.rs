//! The signals API contract on the embedded backend: response codes and bodies, fixtures from
//! real Alertmanager, Kubernetes Events, and every error class as problem+json.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gateway, count_of, fixture, pod_alert, test_config, webhook};
use reqwest::StatusCode;
use serde_json::{Value, json};
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::SystemClock;
use tokio::sync::Semaphore;

fn assert_problem(status: StatusCode, headers: &reqwest::header::HeaderMap, body: &Value, want: StatusCode) {
    assert_eq!(status, want, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    for key in ["type", "title", "status", "detail", "instance"] {
        assert!(body.get(key).is_some(), "problem lacks {key}: {body}");
    }
    assert_eq!(body["status"], want.as_u16());
    assert!(headers.contains_key("x-trace-id"));
}

#[tokio::test]
async fn first_signal_creates_and_second_counts_as_duplicate() {
    let gw = Gateway::embedded(test_config()).await;
    let body = webhook(vec![pod_alert("shop", "api-0")]);
    let (s1, h1, b1) = gw.alerts(&body).await;
    assert_eq!(s1, StatusCode::CREATED, "{b1}");
    assert_eq!(b1["status"], "created");
    assert_eq!(b1["duplicate"], false);
    assert_eq!(b1["remediationRequestNamespace"], "signals");
    assert_eq!(b1["fingerprint"].as_str().unwrap().len(), 64);
    assert_eq!(h1["x-trace-id"].len(), 32);

    let (s2, _, b2) = gw.alerts(&body).await;
    assert_eq!(s2, StatusCode::ACCEPTED, "{b2}");
    assert_eq!(b2["status"], "duplicate");
    assert_eq!(b2["duplicate"], true);
    assert_eq!(b2["occurrenceCount"], 2);
    assert_eq!(b2["remediationRequestName"], b1["remediationRequestName"]);
    assert_eq!(b2["fingerprint"], b1["fingerprint"]);

    let rrs = gw.store().all_requests();
    assert_eq!(rrs.len(), 1);
    assert_eq!(count_of(&rrs[0]), 2);
    let spec = &rrs[0].spec;
    assert_eq!(
        (
            spec.signal_name.as_str(),
            spec.severity.as_str(),
            spec.signal_type.as_str(),
            spec.signal_source.as_str()
        ),
        ("KubePodCrashLooping", "critical", "alert", "prometheus")
    );
    assert_eq!(spec.target_resource.kind, "Pod");
    assert_eq!(spec.target_resource.namespace, "shop");
    assert!(gw.store().all_leases().is_empty(), "no lease may outlive a request");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn incoming_traceparent_is_continued() {
    let gw = Gateway::embedded(test_config()).await;
    let resp = gw
        .client
        .post(format!("{}/api/v1/signals/prometheus", gw.base))
        .header("content-type", "application/json")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(webhook(vec![pod_alert("shop", "api-0")]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-trace-id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn own_fixtures_single_batch_resolved_and_truncated_are_accepted() {
    let gw = Gateway::embedded(test_config()).await;
    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("single-alert-firing.json"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("batch-20-firing.json"),
        )
        .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{b}");
    assert_eq!(
        b["summary"],
        json!({"total": 20, "created": 20, "deduplicated": 0, "rejected": 0, "ignored": 0, "failed": 0})
    );
    assert_eq!(b["results"].as_array().unwrap().len(), 20);

    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("single-alert-resolved.json"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (&b["status"], &b["reason"]),
        (&json!("ignored"), &json!("resolved")),
        "{b}"
    );

    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("truncated-batch-firing.json"),
        )
        .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{b}");
    assert_eq!(b["summary"]["created"], 3);
    assert_eq!(gw.store().all_requests().len(), 1 + 20 + 3);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn captured_alertmanager_bodies_are_accepted() {
    let gw = Gateway::embedded(test_config()).await;
    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("pod-crashloop-batch-firing.json"),
        )
        .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{b}");
    assert_eq!(b["summary"]["total"], 3);
    assert_eq!(
        b["summary"]["created"], 3,
        "without cluster access each pod is its own target: {b}"
    );

    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("deployment-replicas-firing.json"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("node-filesystem-firing.json"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let node = gw
        .store()
        .all_requests()
        .into_iter()
        .find(|rr| rr.spec.target_resource.kind == "Node")
        .unwrap();
    assert_eq!(node.spec.target_resource.name, "worker-3");
    assert_eq!(node.spec.target_resource.namespace, "");

    let (s, _, b) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            fixture("pod-crashloop-batch-resolved.json"),
        )
        .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{b}");
    assert_eq!(b["summary"]["ignored"], 3);
    assert_eq!(gw.store().all_requests().len(), 5, "resolved alerts never create");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn warning_events_create_and_normal_events_are_ignored() {
    let gw = Gateway::embedded(test_config()).await;
    let ev: Value = serde_json::from_str(&fixture("event-warning-backoff.json")).unwrap();
    let (s, _, b) = gw.event(&ev).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, _, b) = gw.event(&ev).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(b["occurrenceCount"], 2);
    let rr = &gw.store().all_requests()[0];
    assert_eq!(rr.spec.signal_type, "alert");
    assert_eq!(rr.spec.signal_name, "BackOff");
    assert_eq!(rr.spec.signal_source, "kubernetes-events");

    let normal: Value = serde_json::from_str(&fixture("event-normal-pulled.json")).unwrap();
    let (s, _, b) = gw.event(&normal).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (&b["status"], &b["reason"]),
        (&json!("ignored"), &json!("normal_event")),
        "{b}"
    );
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn alerts_without_a_kubernetes_target_are_rejected_with_200() {
    let gw = Gateway::embedded(test_config()).await;
    let body = webhook(vec![
        json!({"status": "firing", "labels": {"alertname": "Watchdog", "severity": "none"}}),
    ]);
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (&b["status"], &b["reason"]),
        (&json!("rejected"), &json!("no_target_resource")),
        "{b}"
    );
    assert_eq!(b["rejection"]["reason"], "no_target_resource", "{b}");
    assert!(b["rejection"]["action"].as_str().unwrap().contains("label"), "{b}");
    let mixed = webhook(vec![
        pod_alert("shop", "a"),
        json!({"status": "firing", "labels": {"alertname": "Watchdog"}}),
    ]);
    let (s, _, b) = gw.alerts(&mixed).await;
    assert_eq!(s, StatusCode::MULTI_STATUS);
    assert_eq!(b["summary"]["created"], 1);
    assert_eq!(b["summary"]["rejected"], 1);
    assert_eq!(b["results"][1]["status"], "rejected");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_payloads_are_400_problems_naming_the_fault() {
    let gw = Gateway::embedded(test_config()).await;
    for (body, needle) in [
        ("{not json", "invalid Alertmanager webhook payload"),
        (r#"{"version":"4","alerts":[]}"#, "at least one alert"),
        (r#"{"version":"4","alerts":[{"status":"firing"}]}"#, "labels"),
        (
            r#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":["x"]}}]}"#,
            "alerts[0]",
        ),
        (
            r#"{"version":"3","alerts":[{"status":"firing","labels":{}}]}"#,
            "version",
        ),
    ] {
        let (s, h, b) = gw.post("/api/v1/signals/prometheus", "application/json", body).await;
        assert_problem(s, &h, &b, StatusCode::BAD_REQUEST);
        assert!(b["detail"].as_str().unwrap().contains(needle), "{body}: {b}");
        assert_eq!(b["instance"], "/api/v1/signals/prometheus");
    }
    let (s, h, b) = gw
        .post(
            "/api/v1/signals/kubernetes-event",
            "application/json",
            r#"{"type":"Warning","reason":"X"}"#,
        )
        .await;
    assert_problem(s, &h, &b, StatusCode::BAD_REQUEST);
    assert!(b["detail"].as_str().unwrap().contains("involvedObject"), "{b}");
    assert!(gw.store().all_requests().is_empty());
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn wrong_content_type_is_415_and_oversized_body_is_413() {
    let mut config = test_config();
    config.server.max_body_bytes = 4096;
    let gw = Gateway::embedded(config).await;
    let body = webhook(vec![pod_alert("shop", "a")]).to_string();
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let (s, h, b) = gw.post("/api/v1/signals/prometheus", ct, body.clone()).await;
        assert_problem(s, &h, &b, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let resp = gw
        .client
        .post(format!("{}/api/v1/signals/prometheus", gw.base))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "missing content type"
    );
    let (s, _, _) = gw
        .post("/api/v1/signals/prometheus", "application/json; charset=utf-8", body)
        .await;
    assert_eq!(s, StatusCode::CREATED, "charset parameter is fine");

    let big = webhook((0..100).map(|i| pod_alert("shop", &format!("p-{i}"))).collect()).to_string();
    assert!(big.len() > 4096);
    let (s, h, b) = gw
        .post("/api/v1/signals/prometheus", "application/json", big.clone())
        .await;
    assert_problem(s, &h, &b, StatusCode::PAYLOAD_TOO_LARGE);
    // Chunked (no Content-Length): the limit still holds while streaming.
    let stream = futures::stream::iter(
        big.into_bytes()
            .chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = gw
        .client
        .post(format!("{}/api/v1/signals/prometheus", gw.base))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(gw.store().all_requests().len(), 1);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_paths_and_methods_are_problems() {
    let gw = Gateway::embedded(test_config()).await;
    let (s, h, b) = gw.post("/api/v1/signals/nagios", "application/json", "{}").await;
    assert_problem(s, &h, &b, StatusCode::NOT_FOUND);
    let resp = gw
        .client
        .get(format!("{}/api/v1/signals/prometheus", gw.base))
        .send()
        .await
        .unwrap();
    let (s, h) = (resp.status(), resp.headers().clone());
    let b: Value = resp.json().await.unwrap();
    assert_problem(s, &h, &b, StatusCode::METHOD_NOT_ALLOWED);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_notification_with_more_alerts_than_the_in_flight_cap_is_stored_in_turns() {
    // Creates begun, and the most ever in progress at once (begun, not yet stored).
    let (begun, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let (b, m, st) = (begun.clone(), most.clone(), store.clone());
    let counting = Faulty::new(store.clone(), move |op| {
        if op == Op::CreateRequest {
            let in_progress = b.fetch_add(1, Ordering::SeqCst) + 1 - st.all_requests().len();
            m.fetch_max(in_progress, Ordering::SeqCst);
            return Fault::Delay(Duration::from_millis(5));
        }
        Fault::Pass
    });
    let mut config = test_config();
    config.server.max_in_flight = 2;
    let gw = Gateway::on(Arc::new(counting), Some(store.clone()), config).await;
    let body = webhook((0..7).map(|i| pod_alert("shop", &format!("p-{i}"))).collect());
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(
        s,
        StatusCode::MULTI_STATUS,
        "a notification larger than the cap can succeed: {b}"
    );
    assert_eq!(b["summary"]["created"], 7, "{b}");
    assert_eq!(store.all_requests().len(), 7);
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "never more than server.maxInFlight signals at once: {}",
        most.load(Ordering::SeqCst)
    );
    assert_eq!(gw.metric("gateway_signals_shed_total", &[]).await, 0.0);
    gw.stop().await.unwrap();
}

/// A gateway whose store holds every list until the gate opens, with all `places` of
/// `server.maxInFlight` taken by one notification waiting there (the task answers it).
async fn gateway_with_every_place_taken(
    places: usize,
    mut config: signal_gateway::config::Config,
) -> (
    Arc<Gateway>,
    Arc<Semaphore>,
    Arc<EmbeddedStore>,
    tokio::task::JoinHandle<(StatusCode, reqwest::header::HeaderMap, Value)>,
) {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let gated = Faulty::new(store.clone(), move |op| match op {
        Op::ListRequests => Fault::Gate(g.clone()),
        _ => Fault::Pass,
    });
    config.server.max_in_flight = places;
    let gw = Arc::new(Gateway::on(Arc::new(gated), Some(store.clone()), config).await);
    let busy = {
        let gw = gw.clone();
        let alerts = (0..places).map(|i| pod_alert("shop", &format!("busy-{i}"))).collect();
        tokio::spawn(async move { gw.alerts(&webhook(alerts)).await })
    };
    common::eventually(Duration::from_secs(10), "every place taken", || async {
        (gw.metric("gateway_signals_in_flight", &[]).await == places as f64).then_some(())
    })
    .await;
    (gw, gate, store, busy)
}

#[tokio::test]
async fn signals_beyond_the_in_flight_cap_get_503_with_retry_after() {
    let (gw, gate, store, busy) = gateway_with_every_place_taken(2, test_config()).await;
    let (s, h, b) = gw.alerts(&webhook(vec![pod_alert("shop", "c")])).await;
    assert_problem(s, &h, &b, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key("retry-after"));
    assert_eq!(gw.metric("gateway_signals_shed_total", &[]).await, 1.0);
    gate.add_permits(1000);
    let (s, _, b) = busy.await.unwrap();
    assert_eq!(s, StatusCode::MULTI_STATUS, "{b}");
    assert_eq!(store.all_requests().len(), 2, "the refused signal stored nothing");
    Arc::into_inner(gw).expect("one owner").stop().await.unwrap();
}

#[tokio::test]
async fn debug_endpoints_list_requests_and_set_phase() {
    let gw = Gateway::embedded(test_config()).await;
    let (_, _, created) = gw.alerts(&webhook(vec![pod_alert("shop", "a")])).await;
    let name = created["remediationRequestName"].as_str().unwrap();
    let list: Value = gw
        .client
        .get(format!("{}/debug/remediationrequests", gw.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["kind"], "RemediationRequestList");
    assert_eq!(list["items"][0]["metadata"]["name"], name);
    assert_eq!(list["items"][0]["status"]["deduplication"]["occurrenceCount"], 1);
    let resp = gw
        .client
        .put(format!("{}/debug/remediationrequests/{name}/phase", gw.admin))
        .json(&json!({"phase": "Completed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = gw
        .client
        .put(format!("{}/debug/remediationrequests/{name}/phase", gw.admin))
        .json(&json!({"phase": "Exploded"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = gw
        .client
        .put(format!("{}/debug/remediationrequests/nope/phase", gw.admin))
        .json(&json!({"phase": "Completed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_person_can_play_the_orchestrator_with_outcome_cooldown_and_any_status_field() {
    let gw = Gateway::embedded(test_config()).await;
    let body = webhook(vec![pod_alert("shop", "a")]);
    let (_, _, created) = gw.alerts(&body).await;
    let name = created["remediationRequestName"].as_str().unwrap();
    let phase = format!("{}/debug/remediationrequests/{name}/phase", gw.admin);
    let status = format!("{}/debug/remediationrequests/{name}/status", gw.admin);

    let resp = gw
        .client
        .put(&phase)
        .json(&json!({"phase": "Completed", "outcome": "ManualReviewRequired"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "manual review absorbs: {b}");

    let resp = gw
        .client
        .put(&phase)
        .json(&json!({"phase": "Completed", "outcome": "Remediated", "cooldown": "10m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let rr: Value = resp.json().await.unwrap();
    assert!(
        rr["status"]["routingStatus"]["nextAllowedExecution"].is_string(),
        "{rr}"
    );
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "the cooldown absorbs: {b}");

    let resp = gw
        .client
        .patch(&status)
        .json(&json!({"routingStatus": {"nextAllowedExecution": null}, "message": "done"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (s, _, b) = gw.alerts(&body).await;
    assert_eq!(s, StatusCode::CREATED, "cooldown lifted: a new RR: {b}");

    for (bad, why) in [
        (json!({"deduplication": {"occurrenceCount": 1}}), "the gateway's field"),
        (json!({"overallPhase": "Exploded"}), "outside the schema"),
        (json!(["not", "an", "object"]), "not a merge patch"),
    ] {
        let resp = gw.client.patch(&status).json(&bad).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{why}");
    }
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let gw = Gateway::embedded(test_config()).await;
    let get = |p: &str| gw.client.get(format!("{}{p}", gw.admin)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/readyz").await.unwrap().status(), StatusCode::OK);
    gw.store().set_unavailable(true);
    // A check's answer stands for a second (probes share it): the outage shows within that.
    let body = common::eventually(Duration::from_secs(10), "not ready while the store is down", || async {
        let resp = get("/readyz").await.unwrap();
        (resp.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(resp.text().await.unwrap())
    })
    .await;
    assert!(body.contains("unavailable"), "{body}");
    gw.store().set_unavailable(false);
    let text = gw.metrics().await;
    assert!(text.contains("gateway_build_info{backend=\"embedded\""), "{text}");
    gw.stop().await.unwrap();
}

/// The embedded store, except that the readiness probe can be made to hang (as it does when it
/// queues behind signal traffic for an API request slot).
struct SlowProbe {
    store: std::sync::Arc<signal_gateway::backend::embedded::EmbeddedStore>,
    hang: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl signal_gateway::cluster::Cluster for SlowProbe {
    fn backend_name(&self) -> &'static str {
        "embedded"
    }
    async fn list_requests(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        ns: &str,
        fp: &str,
    ) -> signal_gateway::cluster::Result<Vec<signal_gateway::crd::RemediationRequest>> {
        self.store.list_requests(call, ns, fp).await
    }
    async fn get_request(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        ns: &str,
        name: &str,
    ) -> signal_gateway::cluster::Result<signal_gateway::crd::RemediationRequest> {
        self.store.get_request(call, ns, name).await
    }
    async fn create_request(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        rr: &signal_gateway::crd::RemediationRequest,
    ) -> signal_gateway::cluster::Result<signal_gateway::crd::RemediationRequest> {
        self.store.create_request(call, rr).await
    }
    async fn update_deduplication(
        &self,
        call: signal_gateway::cluster::Call<'_>,

        namespace: &str,
        name: &str,
        resource_version: &str,
        deduplication: &signal_gateway::crd::Deduplication,
    ) -> signal_gateway::cluster::Result<signal_gateway::crd::RemediationRequest> {
        self.store
            .update_deduplication(call, namespace, name, resource_version, deduplication)
            .await
    }
    fn watch_requests(
        &self,
        ns: &str,
    ) -> futures::stream::BoxStream<'static, signal_gateway::cluster::Result<signal_gateway::cluster::RequestEvent>>
    {
        self.store.watch_requests(ns)
    }
    async fn create_lease(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        l: &k8s_openapi::api::coordination::v1::Lease,
    ) -> signal_gateway::cluster::Result<k8s_openapi::api::coordination::v1::Lease> {
        self.store.create_lease(call, l).await
    }
    async fn get_lease(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        ns: &str,
        name: &str,
    ) -> signal_gateway::cluster::Result<k8s_openapi::api::coordination::v1::Lease> {
        self.store.get_lease(call, ns, name).await
    }
    async fn list_leases(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        ns: &str,
        label: (&str, &str),
    ) -> signal_gateway::cluster::Result<Vec<k8s_openapi::api::coordination::v1::Lease>> {
        self.store.list_leases(call, ns, label).await
    }
    async fn update_lease(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        l: &k8s_openapi::api::coordination::v1::Lease,
    ) -> signal_gateway::cluster::Result<k8s_openapi::api::coordination::v1::Lease> {
        self.store.update_lease(call, l).await
    }
    async fn delete_lease(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        ns: &str,
        name: &str,
        rv: &str,
    ) -> signal_gateway::cluster::Result<()> {
        self.store.delete_lease(call, ns, name, rv).await
    }
    async fn get_metadata(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        o: &signal_gateway::cluster::ObjectRef,
    ) -> signal_gateway::cluster::Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> {
        self.store.get_metadata(call, o).await
    }
    fn watch_metadata(
        &self,
        kind: &signal_gateway::cluster::ApiKind,
    ) -> futures::stream::BoxStream<'static, signal_gateway::cluster::Result<signal_gateway::cluster::MetadataEvent>>
    {
        self.store.watch_metadata(kind)
    }
    fn watch_leases(
        &self,
        ns: &str,
        label: (&str, &str),
    ) -> futures::stream::BoxStream<'static, signal_gateway::cluster::Result<signal_gateway::cluster::LeaseEvent>> {
        self.store.watch_leases(ns, label)
    }
    async fn list_api_kinds(
        &self,
        call: signal_gateway::cluster::Call<'_>,
        core: bool,
    ) -> signal_gateway::cluster::Result<Vec<signal_gateway::cluster::ApiKind>> {
        self.store.list_api_kinds(call, core).await
    }
    async fn check_ready(&self, ns: &str) -> Result<(), String> {
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        self.store.check_ready(ns).await
    }
}

#[tokio::test]
async fn a_replica_storing_signals_stays_ready_even_when_its_probe_request_cannot_get_through() {
    use std::sync::atomic::Ordering;
    let store = std::sync::Arc::new(signal_gateway::backend::embedded::EmbeddedStore::new(
        std::sync::Arc::new(signal_gateway::clock::SystemClock),
    ));
    let cluster = std::sync::Arc::new(SlowProbe {
        store: store.clone(),
        hang: true.into(),
    });
    let gw = Gateway::on(cluster.clone(), Some(store), test_config()).await;
    let readyz = || async {
        gw.client
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(
        readyz().await,
        StatusCode::SERVICE_UNAVAILABLE,
        "no evidence and no probe answer: not ready"
    );
    let (status, _, _) = gw.alerts(&webhook(vec![pod_alert("shop", "web-1")])).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        readyz().await,
        StatusCode::OK,
        "signals just stored prove the backend answers"
    );
    cluster.hang.store(false, Ordering::SeqCst);
    gw.stop().await.unwrap();
}

/// Sends a POST head announcing `length` body bytes, then `body` (possibly only a part).
async fn post_head(gw: &Gateway, length: usize, body: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = gw.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/signals/prometheus HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    stream
}

/// The status code of the first response on `stream`, read within `within`.
async fn status_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}

/// A webhook of one alert padded with whitespace to exactly `len` bytes.
fn padded_webhook(pod: &str, len: usize) -> Vec<u8> {
    let mut body = webhook(vec![pod_alert("shop", pod)]).to_string().into_bytes();
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

#[tokio::test]
async fn an_overloaded_gateway_refuses_a_request_before_reading_its_body() {
    let mut config = test_config();
    // A server that read the body first would wait a minute for this one.
    config.server.body_read_timeout = Duration::from_secs(60);
    let (gw, gate, _store, busy) = gateway_with_every_place_taken(1, config).await;
    // A 1 MiB body announced and never sent: shed on the head alone.
    let mut stream = post_head(&gw, 1024 * 1024, b"").await;
    assert_eq!(
        status_within(&mut stream, Duration::from_secs(20)).await,
        Some(503),
        "answered 503 without reading (or waiting for) the body"
    );
    gate.add_permits(1000);
    assert_eq!(busy.await.unwrap().0, StatusCode::CREATED);
    Arc::into_inner(gw).expect("one owner").stop().await.unwrap();
}

#[tokio::test]
async fn request_bodies_held_in_memory_are_bounded_in_bytes() {
    let mut config = test_config();
    config.server.max_body_bytes = 1024 * 1024;
    config.server.max_buffered_body_bytes = 2 * 1024 * 1024;
    let gw = Gateway::embedded(config).await;
    let size = 1024 * 1024;
    // Two senders each hold 1 MiB of the budget with a body half sent.
    let (a, b) = (padded_webhook("a", size), padded_webhook("b", size));
    let mut first = post_head(&gw, size, &a[..size / 2]).await;
    let mut second = post_head(&gw, size, &b[..size / 2]).await;
    common::eventually(Duration::from_secs(10), "both bodies being read", || async {
        (gw.metric("gateway_http_body_bytes_buffered", &[]).await >= (2 * size) as f64).then_some(())
    })
    .await;
    // A third 1 MiB body does not fit: 503, at once.
    let (s, h, b3) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            padded_webhook("c", size),
        )
        .await;
    assert_problem(s, &h, &b3, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key("retry-after"));
    // The two finish and are stored; their budget comes back.
    use tokio::io::AsyncWriteExt;
    first.write_all(&a[size / 2..]).await.unwrap();
    second.write_all(&b[size / 2..]).await.unwrap();
    assert_eq!(status_within(&mut first, Duration::from_secs(20)).await, Some(201));
    assert_eq!(status_within(&mut second, Duration::from_secs(20)).await, Some(201));
    let (s, _, b4) = gw
        .post(
            "/api/v1/signals/prometheus",
            "application/json",
            padded_webhook("c", size),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b4}");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_readiness_probes_share_one_check_and_say_little() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let (checks, fail) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let (c, f) = (checks.clone(), fail.clone());
    let probed = Faulty::new(store.clone(), move |op| {
        if op != Op::CheckReady {
            return Fault::Pass;
        }
        c.fetch_add(1, Ordering::SeqCst);
        if f.load(Ordering::SeqCst) {
            return Fault::Fail(signal_gateway::cluster::ApiError::Forbidden(
                "remediationrequests.kubernaut.ai is forbidden: User \"system:serviceaccount:signal-gateway:signal-gateway\" cannot list in namespace \"signal-gateway\"".into(),
            ));
        }
        Fault::Delay(Duration::from_millis(200))
    });
    let gw = Gateway::on(Arc::new(probed), Some(store), test_config()).await;
    let probe = || async {
        let r = gw.client.get(format!("{}/readyz", gw.admin)).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    let answers = futures::future::join_all((0..50).map(|_| probe())).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK), "{answers:?}");
    assert_eq!(
        checks.load(Ordering::SeqCst),
        1,
        "50 concurrent probes, one backend check"
    );

    // Not ready: the answer says so, without the API error, RBAC or namespace detail.
    fail.store(true, Ordering::SeqCst);
    let (status, body) = common::eventually(Duration::from_secs(10), "not ready", || async {
        let (s, b) = probe().await;
        (s == StatusCode::SERVICE_UNAVAILABLE).then_some((s, b))
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    for secret in ["forbidden", "serviceaccount", "signal-gateway", "kubernaut.ai"] {
        assert!(!body.contains(secret), "the body tells a stranger {secret:?}: {body}");
    }
    gw.stop().await.unwrap();
}
