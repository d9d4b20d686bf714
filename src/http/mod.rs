//! HTTP surface: the signals API (ingest.rs), the admin port (admin.rs), problem+json errors
//! (problem.rs) and the per-request middleware (trace id, latency metric).

pub mod admin;
pub mod ingest;
pub mod problem;
pub mod resend;
pub mod server;

use opentelemetry::trace::TraceContextExt as _;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Semaphore;

use crate::auth::{Authenticator, Verdict};
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
    /// Time a client has to send the body (408 beyond).
    pub body_read_timeout: Duration,
    pub request_timeout: Duration,
    pub auth: Arc<Authenticator>,
    /// Both ports serve TLS (adds Strict-Transport-Security).
    pub tls: bool,
    /// One permit per signal being processed.
    pub in_flight: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub shutting_down: AtomicBool,
    /// Stored alerts of multi-alert notifications answered 503, for their resend.
    pub resends: resend::ResendMemory,
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
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn_with_state(state.clone(), harden))
        .with_state(state)
}

/// Lets the request through only with credentials `auth.mode` accepts; 401/403 otherwise, 503
/// when the review API cannot answer. Runs before the body is read.
async fn authenticate(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    match state.auth.check(req.headers()).await {
        Ok(Verdict::Allowed { user }) => {
            tracing::Span::current().record("user", user.as_str());
            let known = state.auth.mode() != crate::config::AuthMode::None;
            req.extensions_mut().insert(Caller(known.then_some(user)));
            next.run(req).await
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
            tracing::info!(user = %user, reason = %reason, "request refused: not authorized");
            Problem::forbidden(format!("{user} may not send signals: {reason}"), &path).into_response()
        }
        Err(e) => Problem::unavailable(e.to_string(), Duration::from_secs(1), &path).into_response(),
    }
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

pub fn trace_id_from(traceparent: Option<&str>) -> String {
    if let Some(tp) = traceparent {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        if parts.len() >= 4
            && parts[0].len() == 2
            && parts[0] != "ff"
            && parts[1].len() == 32
            && parts[1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && parts[1].bytes().any(|b| b != b'0')
            && parts[2].len() == 16
        {
            return parts[1].to_owned();
        }
    }
    format!("{:016x}{:016x}", fastrand::u64(1..), fastrand::u64(..))
}

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
    // With OTLP export on, the span continues the caller's W3C trace (or starts one) and its
    // OpenTelemetry trace id is the one we answer with; without it, the id comes from the
    // traceparent header or is generated.
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&crate::telemetry::HeaderExtractor(req.headers()))
    });
    let _ = span.set_parent(parent);
    let otel_trace = span.context().span().span_context().trace_id();
    let trace_id = if otel_trace == opentelemetry::trace::TraceId::INVALID {
        trace_id_from(req.headers().get("traceparent").and_then(|v| v.to_str().ok()))
    } else {
        otel_trace.to_string()
    };
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
