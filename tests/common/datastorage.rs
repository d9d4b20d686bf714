//! A DataStorage-compatible audit receiver for tests: `POST /api/v1/audit/events/batch` validates
//! every event against the contract (KUBERNAUT.md, "Audit events to DataStorage": required
//! fields, types, enums, lengths, and what each event type must say), records the bearer token
//! and the body of every request, and answers as told: 201, 500, 400 or never. `GET /readyz`
//! answers 200 while it answers batches 201, 503 otherwise.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Created,
    ServerError,
    BadRequest,
    Hang,
}

/// One batch request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub token: Option<String>,
    pub body: Bytes,
    pub events: Vec<Value>,
    /// What it was answered (`None`: never answered).
    pub status: Option<u16>,
}

#[derive(Default)]
struct Inner {
    mode: Option<Mode>,
    requests: Vec<Received>,
    violations: Vec<String>,
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            mode: Some(mode),
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/api/v1/audit/events/batch", post(batch))
            .route("/readyz", get(readyz))
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, inner }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.inner.lock().unwrap().mode = Some(mode);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Events of the requests answered 201, in the order received.
    pub fn stored(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.status == Some(201))
            .flat_map(|r| r.events)
            .collect()
    }

    /// Every contract violation seen in any event so far.
    pub fn violations(&self) -> Vec<String> {
        self.inner.lock().unwrap().violations.clone()
    }
}

async fn readyz(State(inner): State<Arc<Mutex<Inner>>>) -> StatusCode {
    match inner.lock().unwrap().mode {
        Some(Mode::Created) => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn batch(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let parsed: Result<Vec<Value>, _> = serde_json::from_slice(&body);
    let (events, mut problems) = match parsed {
        Ok(events) => (events, Vec::new()),
        Err(e) => (Vec::new(), vec![format!("body is not a JSON array of events: {e}")]),
    };
    if events.is_empty() && problems.is_empty() {
        problems.push("an empty batch".into());
    }
    for (i, e) in events.iter().enumerate() {
        problems.extend(validate(e).into_iter().map(|p| format!("event {i}: {p}: {e}")));
    }
    let mode = {
        let mut st = inner.lock().unwrap();
        st.violations.extend(problems.iter().cloned());
        let mode = if problems.is_empty() {
            st.mode.unwrap()
        } else {
            Mode::BadRequest
        };
        let status = match mode {
            Mode::Created => Some(201),
            Mode::ServerError => Some(500),
            Mode::BadRequest => Some(400),
            Mode::Hang => None,
        };
        st.requests.push(Received {
            token,
            body,
            events: events.clone(),
            status,
        });
        mode
    };
    let problem = |status: u16, detail: &str| {
        (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/problem+json")],
            json!({"type": "about:blank", "title": "audit batch refused", "status": status, "detail": detail})
                .to_string(),
        )
            .into_response()
    };
    match mode {
        Mode::Created => (
            StatusCode::CREATED,
            axum::Json(json!({
                "event_ids": (0..events.len()).map(|i| format!("00000000-0000-4000-8000-{i:012}")).collect::<Vec<_>>(),
                "message": format!("{} events stored", events.len()),
            })),
        )
            .into_response(),
        Mode::ServerError => problem(500, "database unavailable"),
        Mode::BadRequest => problem(400, &problems.join("; ")),
        Mode::Hang => futures::future::pending().await,
    }
}

const TYPES: [&str; 4] = [
    "gateway.signal.received",
    "gateway.signal.deduplicated",
    "gateway.crd.created",
    "gateway.crd.failed",
];

/// Contract violations of one event (empty: valid).
pub fn validate(e: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let mut need_str = |v: &Value, field: &str, max: usize| -> Option<String> {
        match v.get(field) {
            Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= max => Some(s.clone()),
            Some(Value::String(s)) => {
                bad.push(format!("{field} has {} characters (1..={max})", s.chars().count()));
                None
            }
            other => {
                bad.push(format!("{field} must be a string, is {other:?}"));
                None
            }
        }
    };
    let version = need_str(e, "version", 20);
    let event_type = need_str(e, "event_type", 100);
    let timestamp = need_str(e, "event_timestamp", 64);
    let category = need_str(e, "event_category", 50);
    let action = need_str(e, "event_action", 50);
    let outcome = need_str(e, "event_outcome", 20);
    let actor_type = need_str(e, "actor_type", 100);
    let actor_id = need_str(e, "actor_id", 255);
    let resource_type = need_str(e, "resource_type", 100);
    let resource_id = need_str(e, "resource_id", 255);
    let _ = need_str(e, "correlation_id", 255);
    let severity = need_str(e, "severity", 50);
    for optional in ["namespace", "cluster_id"] {
        if let Some(v) = e.get(optional)
            && !v.is_string()
        {
            bad.push(format!("{optional} must be a string"));
        }
    }
    if version.as_deref() != Some("1.0") {
        bad.push(format!("version {version:?}"));
    }
    if let Some(t) = &timestamp
        && t.parse::<jiff::Timestamp>().is_err()
    {
        bad.push(format!("event_timestamp {t:?} is not RFC 3339"));
    }
    if category.as_deref() != Some("gateway") {
        bad.push(format!("event_category {category:?}"));
    }
    if !matches!(outcome.as_deref(), Some("success" | "failure" | "pending")) {
        bad.push(format!("event_outcome {outcome:?}"));
    }
    if !e.get("duration_ms").is_some_and(Value::is_u64) {
        bad.push("duration_ms must be a non-negative integer".into());
    }
    let Some(event_type) = event_type.filter(|t| TYPES.contains(&t.as_str())) else {
        bad.push("event_type is not a gateway event type".into());
        return bad;
    };
    let Some(data) = e.get("event_data").filter(|d| d.is_object()) else {
        bad.push("event_data must be an object".into());
        return bad;
    };
    // event_data: five required strings, the others typed when present.
    for field in ["event_type", "signal_type", "signal_name", "namespace", "fingerprint"] {
        if !data.get(field).is_some_and(Value::is_string) {
            bad.push(format!("event_data.{field} is required (string)"));
        }
    }
    if data["event_type"] != event_type.as_str() {
        bad.push("event_data.event_type differs from event_type".into());
    }
    if data["signal_type"] != "alert" {
        bad.push(format!("event_data.signal_type {}", data["signal_type"]));
    }
    let fingerprint = data["fingerprint"].as_str().unwrap_or("");
    if fingerprint.len() != 64
        || !fingerprint
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bad.push(format!("event_data.fingerprint {fingerprint:?}"));
    }
    for field in ["severity", "resource_kind", "resource_name", "remediation_request"] {
        if data.get(field).is_some_and(|v| !v.is_string()) {
            bad.push(format!("event_data.{field} must be a string"));
        }
    }
    if data.get("severity").is_some() && data["severity"].as_str() != severity.as_deref() {
        bad.push("event_data.severity differs from severity".into());
    }
    if let Some(rr) = data.get("remediation_request").and_then(Value::as_str)
        && rr.split('/').filter(|p| !p.is_empty()).count() != 2
    {
        bad.push(format!("event_data.remediation_request {rr:?} is not ns/name"));
    }
    if let Some(s) = data.get("deduplication_status")
        && !matches!(s.as_str(), Some("new" | "duplicate"))
    {
        bad.push(format!("event_data.deduplication_status {s}"));
    }
    if let Some(c) = data.get("occurrence_count")
        && !c.as_i64().is_some_and(|c| (1..=i64::from(i32::MAX)).contains(&c))
    {
        bad.push(format!("event_data.occurrence_count {c} is not a positive int32"));
    }
    if data.get("original_payload").is_some_and(|p| !p.is_object()) {
        bad.push("event_data.original_payload must be an object".into());
    }
    for (field, max) in [("signal_labels", 63), ("signal_annotations", 262_000)] {
        if let Some(m) = data.get(field) {
            match m.as_object() {
                Some(m) => {
                    for (k, v) in m {
                        match v.as_str() {
                            Some(v) if v.chars().count() <= max => {}
                            Some(v) => bad.push(format!("{field}.{k} has {} characters", v.chars().count())),
                            None => bad.push(format!("{field}.{k} must be a string")),
                        }
                    }
                }
                None => bad.push(format!("event_data.{field} must be a string map")),
            }
        }
    }
    if let Some(d) = data.get("error_details") {
        let ok = d["message"].is_string()
            && d["code"].is_string()
            && d["component"] == "gateway"
            && d["retry_possible"].is_boolean();
        if !ok {
            bad.push(format!(
                "error_details {d} lacks message/code/component gateway/retry_possible"
            ));
        }
    }
    // What each event type must say.
    let is = |v: &Option<String>, want: &str| v.as_deref() == Some(want);
    let rr = data.get("remediation_request").and_then(Value::as_str);
    match event_type.as_str() {
        "gateway.signal.received" | "gateway.signal.deduplicated" => {
            let received = event_type == "gateway.signal.received";
            if !is(&action, if received { "received" } else { "deduplicated" }) {
                bad.push(format!("event_action {action:?}"));
            }
            let sender = match actor_type.as_deref() {
                Some("authenticated-service" | "external") => actor_id.is_some(),
                _ => false,
            };
            if !sender {
                bad.push(format!("actor {actor_type:?}/{actor_id:?} is not the sender"));
            }
            if !is(&resource_type, "Signal") || resource_id.as_deref() != Some(fingerprint) {
                bad.push(format!("resource {resource_type:?}/{resource_id:?} is not the signal"));
            }
            let status = if received { "new" } else { "duplicate" };
            if data["deduplication_status"] != status || rr.is_none() {
                bad.push(format!(
                    "deduplication_status must be {status} with remediation_request"
                ));
            }
            if !received && !data["occurrence_count"].is_i64() {
                bad.push("a deduplicated event needs occurrence_count".into());
            }
        }
        "gateway.crd.created" => {
            if !is(&action, "created") || !is(&actor_type, "gateway") || !is(&actor_id, "crd-creator") {
                bad.push(format!("created by {actor_type:?}/{actor_id:?} action {action:?}"));
            }
            if !is(&resource_type, "RemediationRequest") || resource_id.as_deref() != rr || rr.is_none() {
                bad.push(format!(
                    "resource {resource_type:?}/{resource_id:?} is not the RR {rr:?}"
                ));
            }
            if data["occurrence_count"] != 1 {
                bad.push("a created RR has occurrence_count 1".into());
            }
        }
        _ => {
            if !is(&action, "failed") || !is(&outcome, "failure") {
                bad.push(format!("a failed creation has action {action:?} outcome {outcome:?}"));
            }
            if data.get("error_details").is_none() {
                bad.push("a failed creation needs error_details".into());
            }
        }
    }
    bad
}
