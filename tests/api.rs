//! The signals API contract on the embedded backend: response codes and bodies, fixtures from
//! real Alertmanager, Kubernetes Events, and every error class as problem+json.

mod common;

use common::{Gateway, count_of, fixture, pod_alert, test_config, webhook};
use reqwest::StatusCode;
use serde_json::{Value, json};

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
async fn more_signals_than_the_in_flight_cap_get_503_with_retry_after() {
    let mut config = test_config();
    config.server.max_in_flight = 2;
    let gw = Gateway::embedded(config).await;
    let body = webhook((0..3).map(|i| pod_alert("shop", &format!("p-{i}"))).collect());
    let (s, h, b) = gw.alerts(&body).await;
    assert_problem(s, &h, &b, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key("retry-after"));
    assert!(gw.store().all_requests().is_empty(), "a refused batch stores nothing");
    assert_eq!(gw.metric("gateway_signals_shed_total", &[]).await, 3.0);
    gw.stop().await.unwrap();
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
    let resp = get("/readyz").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.text().await.unwrap().contains("unavailable"));
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
        ns: &str,
        fp: &str,
    ) -> signal_gateway::cluster::Result<Vec<signal_gateway::crd::RemediationRequest>> {
        self.store.list_requests(ns, fp).await
    }
    async fn get_request(
        &self,
        ns: &str,
        name: &str,
    ) -> signal_gateway::cluster::Result<signal_gateway::crd::RemediationRequest> {
        self.store.get_request(ns, name).await
    }
    async fn create_request(
        &self,
        rr: &signal_gateway::crd::RemediationRequest,
    ) -> signal_gateway::cluster::Result<signal_gateway::crd::RemediationRequest> {
        self.store.create_request(rr).await
    }
    async fn update_deduplication(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        deduplication: &signal_gateway::crd::Deduplication,
    ) -> signal_gateway::cluster::Result<signal_gateway::crd::RemediationRequest> {
        self.store
            .update_deduplication(namespace, name, resource_version, deduplication)
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
        l: &k8s_openapi::api::coordination::v1::Lease,
    ) -> signal_gateway::cluster::Result<k8s_openapi::api::coordination::v1::Lease> {
        self.store.create_lease(l).await
    }
    async fn get_lease(
        &self,
        ns: &str,
        name: &str,
    ) -> signal_gateway::cluster::Result<k8s_openapi::api::coordination::v1::Lease> {
        self.store.get_lease(ns, name).await
    }
    async fn list_leases(
        &self,
        ns: &str,
        label: (&str, &str),
    ) -> signal_gateway::cluster::Result<Vec<k8s_openapi::api::coordination::v1::Lease>> {
        self.store.list_leases(ns, label).await
    }
    async fn update_lease(
        &self,
        l: &k8s_openapi::api::coordination::v1::Lease,
    ) -> signal_gateway::cluster::Result<k8s_openapi::api::coordination::v1::Lease> {
        self.store.update_lease(l).await
    }
    async fn delete_lease(&self, ns: &str, name: &str, rv: &str) -> signal_gateway::cluster::Result<()> {
        self.store.delete_lease(ns, name, rv).await
    }
    async fn get_metadata(
        &self,
        o: &signal_gateway::cluster::ObjectRef,
    ) -> signal_gateway::cluster::Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> {
        self.store.get_metadata(o).await
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
