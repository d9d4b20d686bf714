//! HTTP surface: the signals API (ingest.rs), the admin port (admin.rs), problem+json errors
//! (problem.rs) and the per-request middleware (trace id, latency metric).

pub mod admin;
pub mod ingest;
pub mod problem;

use opentelemetry::trace::TraceContextExt as _;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Semaphore;

use crate::backend::embedded::EmbeddedStore;
use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use problem::Problem;

pub const TRACE_ID_HEADER: &str = "x-trace-id";

/// Shared by every handler.
pub struct AppState {
    pub pipeline: Pipeline,
    pub metrics: Metrics,
    pub registry: prometheus::Registry,
    pub cluster: Arc<dyn Cluster>,
    pub embedded: Option<Arc<EmbeddedStore>>,
    pub namespace: String,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// One permit per signal being processed.
    pub in_flight: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub shutting_down: AtomicBool,
}

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
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
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
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!(
        "http_request",
        trace_id = tracing::field::Empty,
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
