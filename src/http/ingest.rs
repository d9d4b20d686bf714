//! The signals API: validates the request (content type, size, shape), runs each signal through
//! the pipeline and maps outcomes to the response contract of DESIGN.md.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::AppState;
use super::problem::Problem;
use super::resend;
use crate::absorb::Absorbs;
use crate::pipeline::Outcome;
use crate::signal::{Skip, Source, alertmanager, event};

pub async fn prometheus(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let user = caller(&req);
    let (body, _held) = match read_json_body(&state, req).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let batch = match alertmanager::parse(&body) {
        Ok(b) => b,
        Err(e) => return Problem::bad_request(e.0, &path).into_response(),
    };
    state.metrics.batch_size.observe(batch.alerts.len() as f64);
    if batch.truncated_alerts > 0 {
        tracing::warn!(
            truncated = batch.truncated_alerts,
            group_key = batch.group_key.as_deref().unwrap_or(""),
            "Alertmanager truncated alerts from this notification"
        );
    }
    let firing = batch.alerts.iter().filter(|a| a.is_ok()).count();
    // A notification with more firing alerts than server.maxInFlight takes every place and
    // stores its alerts in turns, so it can succeed (issue 13, 7); signals in flight never
    // exceed the cap.
    let places = firing.min(state.max_in_flight);
    let _permits = match admit(&state, firing, places, &path) {
        Ok(p) => p,
        Err(p) => return p.into_response(),
    };
    let deadline = Instant::now() + state.request_timeout;
    let total = batch.alerts.len();
    // A notification answered 503 earlier comes again: its alerts stored then are answered as
    // they were, not counted twice (resend.rs).
    let key = (total > 1).then(|| resend::key_of(&body));
    let mut remembered = key
        .as_ref()
        .and_then(|k| state.resends.take(k, total))
        .unwrap_or_default();
    remembered.resize(total, None);
    let outcomes: Vec<Outcome> =
        futures::stream::iter(batch.alerts.into_iter().zip(remembered).map(|(item, known)| {
            let (state, user) = (state.clone(), user.clone());
            async move {
                if let Some(stored) = known {
                    state.metrics.signals_resent.inc();
                    return stored;
                }
                match item {
                    Ok(signal) => state.pipeline.process(signal, user.as_deref(), deadline).await,
                    Err(skip) => state.pipeline.skipped(Source::Prometheus, "none", skip),
                }
            }
        }))
        .buffered(places.max(1))
        .collect()
        .await;
    if total == 1 {
        return single_response(outcomes.into_iter().next().expect("one outcome"), &path);
    }
    if let Some(key) = key
        && outcomes.iter().any(|o| matches!(o, Outcome::Failed { .. }))
    {
        state.resends.remember(key, &outcomes);
    }
    batch_response(outcomes, &path)
}

pub async fn kubernetes_event(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let user = caller(&req);
    let (body, _held) = match read_json_body(&state, req).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let parsed = match event::parse(&body) {
        Ok(p) => p,
        Err(e) => return Problem::bad_request(e.0, &path).into_response(),
    };
    let outcome = match parsed {
        Ok(signal) => {
            let _permit = match admit(&state, 1, 1, &path) {
                Ok(p) => p,
                Err(p) => return p.into_response(),
            };
            state
                .pipeline
                .process(signal, user.as_deref(), Instant::now() + state.request_timeout)
                .await
        }
        Err(skip) => state.pipeline.skipped(Source::KubernetesEvent, "none", skip),
    };
    single_response(outcome, &path)
}

/// The authenticated user of the request (see [`super::Caller`]).
fn caller(req: &Request) -> Option<String> {
    req.extensions().get::<super::Caller>().and_then(|c| c.0.clone())
}

/// Share of `server.requestTimeout` that recent signals may take before new ones are shed.
const SHED_AT: f64 = 0.8;

/// Shutting down, or recent signals near their deadline: `signals` signals are shed.
fn overloaded(state: &AppState, signals: usize, path: &str) -> Result<(), Problem> {
    if state.shutting_down.load(Ordering::SeqCst) {
        state.metrics.signals_shed.inc_by(signals as u64);
        return Err(Problem::unavailable(
            "the gateway is shutting down",
            Duration::from_secs(1),
            path,
        ));
    }
    // Recent signals took most of their deadline: more would only wait theirs out too.
    if let Some(took) = state.pipeline.latency.above(state.request_timeout.mul_f64(SHED_AT)) {
        state.metrics.signals_shed.inc_by(signals as u64);
        return Err(Problem::unavailable(
            format!(
                "overloaded: signals take {took:.1} s to store (deadline {} s); retry later",
                state.request_timeout.as_secs_f64()
            ),
            Duration::from_secs(2),
            path,
        ));
    }
    Ok(())
}

fn no_place(state: &AppState, signals: usize, path: &str) -> Problem {
    state.metrics.signals_shed.inc_by(signals as u64);
    Problem::unavailable(
        format!(
            "too many signals in flight (limit {}); retry later",
            state.max_in_flight
        ),
        Duration::from_secs(1),
        path,
    )
}

/// Load shedding for `signals` signals that need `places` permits (one per signal processed at
/// once); too few left, recent signals near their deadline, or shutting down -> 503 +
/// Retry-After.
fn admit(state: &AppState, signals: usize, places: usize, path: &str) -> Result<Option<OwnedSemaphorePermit>, Problem> {
    overloaded(state, signals, path)?;
    if signals == 0 {
        return Ok(None);
    }
    let wanted = u32::try_from(places).unwrap_or(u32::MAX);
    match state.in_flight.clone().try_acquire_many_owned(wanted) {
        Ok(p) => Ok(Some(p)),
        Err(_) => Err(no_place(state, signals, path)),
    }
}

/// A request body's share of `server.maxBufferedBodyBytes`, held until the answer.
pub struct HeldBody {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    gauge: prometheus::IntGauge,
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes);
    }
}

/// The unit of the body budget (`AppState::body_budget` counts KiB).
pub const BODY_BUDGET_UNIT: usize = 1024;

/// Takes the body's share of the budget: its Content-Length, or the most it may be.
fn hold_body(state: &AppState, announced: usize, path: &str) -> Result<HeldBody, Problem> {
    let units = u32::try_from(announced.div_ceil(BODY_BUDGET_UNIT).max(1)).unwrap_or(u32::MAX);
    let permit = state.body_budget.clone().try_acquire_many_owned(units).map_err(|_| {
        state.metrics.signals_shed.inc();
        Problem::unavailable(
            "too many request bodies in memory (server.maxBufferedBodyBytes); retry later",
            Duration::from_secs(1),
            path,
        )
    })?;
    let bytes = i64::from(units) * BODY_BUDGET_UNIT as i64;
    state.metrics.body_bytes_buffered.add(bytes);
    Ok(HeldBody {
        _permit: permit,
        bytes,
        gauge: state.metrics.body_bytes_buffered.clone(),
    })
}

/// Checks the content type, sheds load before anything is read (shutting down, overloaded, no
/// place for a signal, no room in the body budget), then reads at most `max_body_bytes`. The
/// body's share of the budget is held by the returned [`HeldBody`] until the answer.
async fn read_json_body(state: &AppState, req: Request) -> Result<(Bytes, HeldBody), Problem> {
    let path = req.uri().path().to_owned();
    check_content_type(req.headers(), &path)?;
    let limit = state.max_body_bytes;
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit as u64) {
        return Err(Problem::too_large(limit, &path));
    }
    // Shed on the head alone: a request that would be refused after parsing is refused before
    // its body is buffered and copied per alert.
    overloaded(state, 1, &path)?;
    if state.in_flight.available_permits() == 0 {
        return Err(no_place(state, 1, &path));
    }
    let held = hold_body(state, announced.map_or(limit, |len| len as usize), &path)?;
    let body: Body = req.into_body();
    let read = tokio::time::timeout(state.body_read_timeout, Limited::new(body, limit).collect());
    let Ok(collected) = read.await else {
        // A body that stalls may be network trouble: transient, so the sender retries.
        return Err(Problem::unavailable(
            format!(
                "the request body did not arrive within {} s",
                state.body_read_timeout.as_secs_f64()
            ),
            Duration::from_secs(1),
            &path,
        ));
    };
    match collected {
        Ok(collected) => Ok((collected.to_bytes(), held)),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Problem::too_large(limit, &path))
        }
        Err(e) => Err(Problem::bad_request(format!("could not read request body: {e}"), &path)),
    }
}

fn check_content_type(headers: &HeaderMap, path: &str) -> Result<(), Problem> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(Problem::unsupported_media_type(None, path));
    };
    let text = value.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        Ok(())
    } else {
        Err(Problem::unsupported_media_type(Some(text), path))
    }
}

/// The JSON object describing one outcome (also an element of a batch's `results`): ours, and a
/// superset of what Kubernaut's gateway answers (KUBERNAUT.md, "Response bodies"), so clients of
/// either parse it.
fn outcome_json(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Stored { fingerprint, ack } if ack.created => json!({
            "status": "created", "duplicate": false, "fingerprint": fingerprint.as_str(),
            "remediationRequestName": ack.name, "remediationRequestNamespace": ack.namespace,
            "message": format!("RemediationRequest {}/{} created", ack.namespace, ack.name),
        }),
        Outcome::Stored { fingerprint, ack } => {
            let reference = format!("{}/{}", ack.namespace, ack.name);
            json!({
                "status": "duplicate", "duplicate": true, "fingerprint": fingerprint.as_str(),
                "remediationRequestName": ack.name, "remediationRequestNamespace": ack.namespace,
                "occurrenceCount": ack.occurrence_count,
                "message": format!(
                    "duplicate signal counted into RemediationRequest {reference} ({}; occurrence {})",
                    absorbed_because(ack.absorbed_by), ack.occurrence_count
                ),
                "metadata": {
                    "count": ack.occurrence_count, "remediationRequestRef": reference,
                    "firstOccurrence": ack.first_seen_at, "lastOccurrence": ack.last_seen_at,
                },
            })
        }
        Outcome::Skipped {
            skip,
            target,
            fingerprint,
        } => {
            let (message, action) = explain(skip);
            let mut body = json!({
                "status": skip.status(), "reason": skip.reason(), "message": message,
                "duplicate": false, "fingerprint": fingerprint.as_ref().map(|f| f.as_str()),
            });
            if matches!(skip, Skip::Rejected(_)) {
                body["rejection"] = json!({
                    "status": skip.status(), "reason": skip.reason(), "message": message,
                    "resource": target.as_ref().map(|t| format!("{}:{}:{}", t.namespace, t.kind, t.name)),
                    "action": action,
                });
            }
            body
        }
        Outcome::Failed { fingerprint, error } => json!({
            "status": "failed", "fingerprint": fingerprint.as_ref().map(|f| f.as_str()),
            "reason": error.reason(), "error": error.to_string(),
            "message": format!("signal not stored: {error}; retry"),
        }),
    }
}

fn absorbed_because(rule: Absorbs) -> &'static str {
    match rule {
        Absorbs::Active => "its remediation is in progress",
        Absorbs::ManualReview => "it awaits manual review",
        Absorbs::Cooldown(_) => "its remediation cooldown has not passed",
    }
}

/// What a skipped signal's answer tells its sender: what happened, and what an operator can do.
fn explain(skip: &Skip) -> (&'static str, &'static str) {
    match skip.reason() {
        "resolved" => ("resolved alerts open no RemediationRequest", "none"),
        "normal_event" => ("Normal events are not signals; Warning and Error events are", "none"),
        "missing_alertname" => ("the alert has no alertname label", "set the alertname label"),
        "no_target_resource" => (
            "the alert names no Kubernetes resource",
            "add a pod, deployment, statefulset, daemonset, replicaset, job_name, cronjob, node or persistentvolume(claim) label",
        ),
        "missing_namespace" => (
            "the alert's resource is namespaced but has no namespace",
            "add a namespace label",
        ),
        "invalid_target_name" | "invalid_namespace" | "invalid_target_kind" | "invalid_target_api_version" => (
            "the signal's resource is not a valid Kubernetes object reference",
            "fix the resource labels of the alert or the event's involvedObject",
        ),
        crate::admission::UNMANAGED_RESOURCE => (
            "the resource is not managed by Kubernaut",
            "label the resource or its namespace kubernaut.ai/managed=true",
        ),
        crate::admission::FUTURE_TIMESTAMP => (
            "the signal's timestamp is too far in the future",
            "check the sender's clock (freshness.maxFutureSkew)",
        ),
        crate::admission::STALE_SIGNAL => (
            "the signal is older than freshness.maxAge",
            "send fresher signals or raise freshness.maxAge",
        ),
        crate::admission::INVALID_TIMESTAMP => ("the signal's timestamp is not RFC 3339", "send RFC 3339 timestamps"),
        _ => (
            "the signal produces no RemediationRequest",
            "see docs/api.md for the reason",
        ),
    }
}

fn single_response(outcome: Outcome, path: &str) -> Response {
    let status = match &outcome {
        Outcome::Stored { ack, .. } if ack.created => StatusCode::CREATED,
        Outcome::Stored { .. } => StatusCode::ACCEPTED,
        Outcome::Skipped { .. } => StatusCode::OK,
        Outcome::Failed { error, .. } => {
            return Problem::unavailable(format!("signal not stored: {error}"), error.retry_after(), path)
                .into_response();
        }
    };
    (status, axum::Json(outcome_json(&outcome))).into_response()
}

fn batch_response(outcomes: Vec<Outcome>, path: &str) -> Response {
    let count = |label: &str| outcomes.iter().filter(|o| o.label() == label).count();
    let summary = json!({
        "total": outcomes.len(), "created": count("created"), "deduplicated": count("duplicate"),
        "rejected": count("rejected"), "ignored": count("ignored"), "failed": count("failed"),
    });
    let results: Vec<Value> = outcomes.iter().map(outcome_json).collect();
    let retry_after = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Failed { error, .. } => Some(error.retry_after()),
            _ => None,
        })
        .max();
    if let Some(retry_after) = retry_after {
        let mut p = Problem::unavailable(
            format!(
                "{} of {} alerts could not be stored; Alertmanager should retry the notification",
                count("failed"),
                outcomes.len()
            ),
            retry_after,
            path,
        );
        p.results = Some(Box::new(json!({"results": results, "summary": summary})));
        return p.into_response();
    }
    (
        StatusCode::MULTI_STATUS,
        axum::Json(json!({"results": results, "summary": summary})),
    )
        .into_response()
}
