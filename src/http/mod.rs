//! HTTP surface: the signals API (ingest.rs), the admin port (admin.rs), problem+json errors
//! (problem.rs) and the per-request middleware (trace id, latency metric).

pub mod admin;
pub mod forward;
pub mod ingest;
pub mod problem;
pub mod readiness;
pub mod resend;
pub mod server;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Semaphore;

use crate::auth::{Authenticator, Unavailable, Verdict};
use crate::backend::embedded::EmbeddedStore;
use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use problem::Problem;

pub const TRACE_ID_HEADER: &str = "x-trace-id";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Shared by every handler.
pub struct AppState {
    pub pipeline: Pipeline,
    pub metrics: Metrics,
    pub registry: prometheus::Registry,
    pub cluster: Arc<dyn Cluster>,
    pub embedded: Option<Arc<EmbeddedStore>>,
    pub namespace: String,
    pub max_body_bytes: usize,
    /// Time a client has to send the body (503 + Retry-After beyond).
    pub body_read_timeout: Duration,
    pub request_timeout: Duration,
    pub auth: Arc<Authenticator>,
    /// Both ports serve TLS (adds Strict-Transport-Security).
    pub tls: bool,
    /// One permit per signal being processed.
    pub in_flight: Arc<Semaphore>,
    /// `server.maxBufferedBodyBytes` in units of [`ingest::BODY_BUDGET_UNIT`].
    pub body_budget: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub shutting_down: AtomicBool,
    /// Stored alerts of multi-alert notifications answered 503, for their resend.
    pub resends: resend::ResendMemory,
    /// `/readyz`: one backend check at a time, shared by the probes.
    pub readiness: readiness::Readiness,
    /// DataStorage's readiness, when `/readyz` should depend on it (`audit.healthURL`).
    pub audit_health: Option<crate::audit::Health>,
}

/// Who sent a request, as authentication knows them: the user for `auth.mode` kubernetes or
/// static, `None` for `none`. Put on the request by [`authenticate`] for the handlers to pass on.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<String>);

pub fn signals_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/api/v1/signals/prometheus",
            post(ingest::prometheus).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/signals/kubernetes-event",
            post(ingest::kubernetes_event).fallback(method_not_allowed),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        // Peers only: authenticated by this replica's forwarding key, not a sender's token.
        .route(
            forward::FORWARD_PATH,
            post(forward::receive).fallback(method_not_allowed),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn_with_state(state.clone(), harden))
        .with_state(state)
}

/// Lets the request through only with credentials `auth.mode` accepts; 401/403 otherwise, 503
/// when the review API cannot answer. Runs before the body is read.
async fn authenticate(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let mut refusal = match state.auth.check(req.headers()).await {
        Ok(Verdict::Allowed { user }) => {
            tracing::Span::current().record("user", user.as_str());
            let known = state.auth.mode() != crate::config::AuthMode::None;
            req.extensions_mut().insert(Caller(known.then_some(user)));
            return next.run(req).await;
        }
        Ok(Verdict::Unauthenticated(why)) => {
            tracing::info!(reason = why, "request refused: not authenticated");
            let mut resp = Problem::unauthorized(why, &path).into_response();
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"signal-gateway\""),
            );
            resp
        }
        Ok(Verdict::Forbidden { user, reason }) => {
            // The reason (RBAC detail) goes to the log only.
            tracing::info!(user = %user, reason = %reason, "request refused: not authorized");
            Problem::forbidden(format!("{user} may not send signals"), &path).into_response()
        }
        // The caller is not authenticated: the answer says what to do, the log says why.
        Err(e) => {
            let detail = match e {
                Unavailable::Limited => "too many new tokens to review at once; retry later",
                Unavailable::ReviewFailed(_) => "the token cannot be checked now; retry later",
            };
            Problem::unavailable(detail, Duration::from_secs(1), &path).into_response()
        }
    };
    // A refused caller does not keep its connection (it costs one request, not a socket held
    // with cheap refusals); a sender that is let in keeps its keep-alive connection.
    close_after(&mut refusal);
    refusal
}

/// Closes the connection once `resp` is sent.
fn close_after(resp: &mut Response) {
    resp.headers_mut()
        .insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
}

/// Headers every response of both ports carries: no sniffing, framing, caching or referrers;
/// HSTS on TLS. Also echoes a well-formed `X-Request-Id` or generates one.
pub async fn harden(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map_or_else(
            || format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            str::to_owned,
        );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        req.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let span = tracing::info_span!("request", request_id = %request_id);
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    let status = resp.status();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.entry(axum::http::header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    // No such endpoint or method: cheap to ask, so not a reason to keep a connection open.
    if matches!(status, StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED) {
        h.insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if state.tls {
        h.insert(
            "strict-transport-security",
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    resp
}

/// 1-128 characters of `[A-Za-z0-9._:-]` (anything else is replaced, never echoed).
fn valid_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

async fn not_found(req: Request) -> Response {
    Problem::not_found(req.uri().path()).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    Problem::method_not_allowed(req.uri().path()).into_response()
}

/// The trace id of a request: the caller's W3C `traceparent` trace id, or a new random one.
#[derive(Debug, Clone)]
pub struct TraceId(pub String);

/// Per request: trace id (header, span field), latency histogram by endpoint and code.
async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    // HTTP allows any token as a method: only the standard ones become label values.
    let method = match *req.method() {
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::DELETE | Method::PATCH | Method::OPTIONS => {
            req.method().as_str()
        }
        _ => "other",
    }
    .to_owned();
    let span = tracing::info_span!(
        "http_request",
        trace_id = tracing::field::Empty,
        user = tracing::field::Empty,
        endpoint = %endpoint,
        method = %method
    );
    // The span continues the caller's W3C trace (a valid `traceparent`, as the W3C propagator
    // reads it) and answers with its trace id. With OTLP export on, the span's own OpenTelemetry
    // trace id is that id (or a new one); without export, a request without a valid
    // traceparent gets a random id.
    let parent = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(req.headers()));
    let remote = parent.span().span_context().trace_id();
    let _ = span.set_parent(parent);
    let otel_trace = span.context().span().span_context().trace_id();
    let trace_id = [otel_trace, remote]
        .into_iter()
        .find(|t| *t != opentelemetry::trace::TraceId::INVALID)
        .map_or_else(
            || format!("{:016x}{:016x}", fastrand::u64(1..), fastrand::u64(..)),
            |t| t.to_string(),
        );
    span.record("trace_id", trace_id.as_str());
    req.extensions_mut().insert(TraceId(trace_id.clone()));
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    if let Ok(v) = HeaderValue::from_str(&trace_id) {
        resp.headers_mut().insert(TRACE_ID_HEADER, v);
    }
    state
        .metrics
        .http_duration
        .with_label_values(&[&endpoint, &method, resp.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}
