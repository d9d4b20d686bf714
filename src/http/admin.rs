//! Admin port: `/metrics`, `/healthz`, `/readyz`, and on the embedded backend only the debug
//! endpoints that let a person list RemediationRequests and play the orchestrator: set the
//! phase, the outcome and a cooldown, or merge-patch any orchestrator-owned status field.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::problem::Problem;
use crate::cluster::ApiError;
use crate::crd::PHASES;

pub fn admin_router(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if state.embedded.is_some() {
        router = router
            .route("/debug/remediationrequests", get(list_requests))
            .route("/debug/remediationrequests/{name}/phase", put(set_phase))
            .route("/debug/remediationrequests/{name}/status", patch(patch_status));
    }
    router
        .fallback(|req: Request| async move { Problem::not_found(req.uri().path()).into_response() })
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut resp = crate::metrics::Metrics::render(&state.registry).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// How recent a stored signal must be to stand in for a readiness probe.
const RECENT_SUCCESS: Duration = Duration::from_secs(5);

/// Ready when not shutting down and the backend answers. A signal stored within the last few
/// seconds proves that by itself: under load the probe's own request would queue behind signal
/// traffic (backend.maxConcurrentRequests), time out, and take every busy replica out of its
/// Service at once.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n").into_response();
    }
    // audit.healthURL: DataStorage must be ready too (Kubernaut's gateway does the same).
    if let Some(health) = &state.audit_health
        && let Err(reason) = health.check().await
    {
        tracing::warn!(reason = %reason, "not ready");
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response();
    }
    if state.pipeline.latency.stored_within(RECENT_SUCCESS) {
        return "ok\n".into_response();
    }
    match state.readiness.check(&*state.cluster, &state.namespace).await {
        Ok(()) => "ok\n".into_response(),
        Err(not_ready) => (StatusCode::SERVICE_UNAVAILABLE, not_ready.body()).into_response(),
    }
}

async fn list_requests(State(state): State<Arc<AppState>>) -> Response {
    let store = state
        .embedded
        .as_ref()
        .expect("route only exists with the embedded backend");
    axum::Json(json!({
        "apiVersion": "kubernaut.ai/v1alpha1",
        "kind": "RemediationRequestList",
        "metadata": {"resourceVersion": store.resource_version()},
        "items": store.all_requests(),
    }))
    .into_response()
}

/// `PUT .../phase`: the phase, and optionally how the remediation ended and a cooldown.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseBody {
    /// Any `overallPhase` Kubernaut knows; empty removes it (not picked up yet).
    phase: String,
    /// `completionStatus.outcome`, e.g. `ManualReviewRequired`.
    #[serde(default)]
    outcome: Option<String>,
    /// A cooldown from now (`10m`, `1h`): `routingStatus.nextAllowedExecution`.
    #[serde(default)]
    cooldown: Option<String>,
}

const BODY_LIMIT: usize = 64 * 1024;

async fn read_body(req: Request, path: &str) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(req.into_body(), BODY_LIMIT)
        .await
        .map_err(|_| Problem::too_large(BODY_LIMIT, path).into_response())
}

async fn set_phase(State(state): State<Arc<AppState>>, Path(name): Path<String>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let bytes = match read_body(req, &path).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body: PhaseBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return Problem::bad_request(
                format!("expected {{\"phase\": \"...\", \"outcome\"?: \"...\", \"cooldown\"?: \"10m\"}}: {e}"),
                &path,
            )
            .into_response();
        }
    };
    if !body.phase.is_empty() && !PHASES.contains(&body.phase.as_str()) {
        return Problem::bad_request(format!("unknown phase {:?}; one of {PHASES:?}", body.phase), &path)
            .into_response();
    }
    let mut status = json!({ "overallPhase": (!body.phase.is_empty()).then_some(body.phase) });
    if let Some(outcome) = body.outcome {
        status["completionStatus"] = json!({ "outcome": outcome });
    }
    if let Some(cooldown) = body.cooldown {
        let Ok(d) = crate::config::parse_duration(&cooldown) else {
            return Problem::bad_request(format!("cooldown {cooldown:?} is not a duration such as 10m"), &path)
                .into_response();
        };
        let until = crate::clock::add(state.pipeline.clock.now(), d);
        status["routingStatus"] = json!({ "nextAllowedExecution": crate::clock::rfc3339(until) });
    }
    write_status(&state, &name, &status, &path)
}

/// `PATCH .../status`: a JSON merge patch of the status, as the orchestrator writes it. The
/// gateway's own `deduplication` is not the orchestrator's to write.
async fn patch_status(State(state): State<Arc<AppState>>, Path(name): Path<String>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let bytes = match read_body(req, &path).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let patch: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(p @ serde_json::Value::Object(_)) => p,
        Ok(_) => {
            return Problem::bad_request("expected a JSON object (a merge patch of the status)", &path).into_response();
        }
        Err(e) => return Problem::bad_request(format!("invalid JSON: {e}"), &path).into_response(),
    };
    if patch.get("deduplication").is_some() {
        return Problem::bad_request("status.deduplication belongs to the gateway", &path).into_response();
    }
    write_status(&state, &name, &patch, &path)
}

fn write_status(state: &AppState, name: &str, patch: &serde_json::Value, path: &str) -> Response {
    let store = state
        .embedded
        .as_ref()
        .expect("route only exists with the embedded backend");
    match store.patch_status(&state.namespace, name, patch) {
        Ok(rr) => axum::Json(rr).into_response(),
        Err(ApiError::NotFound) => Problem::not_found(path).into_response(),
        Err(ApiError::Invalid(why)) => Problem::bad_request(why, path).into_response(),
        Err(e) => Problem::unavailable(e.to_string(), Duration::from_secs(1), path).into_response(),
    }
}
