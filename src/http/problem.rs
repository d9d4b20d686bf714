//! RFC 7807 `application/problem+json` responses, the only error body the gateway sends.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type", serialize_with = "problem_type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub instance: String,
    /// Per-alert outcomes when a batch failed (503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Box<serde_json::Value>>,
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl Problem {
    fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
        instance: &str,
    ) -> Self {
        Problem {
            kind: slug,
            title,
            status: status.as_u16(),
            detail: detail.into(),
            instance: instance.to_owned(),
            results: None,
            retry_after: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>, instance: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "validation-error",
            "Invalid signal payload",
            detail,
            instance,
        )
    }

    pub fn too_large(limit: usize, instance: &str) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            format!("request body exceeds the limit of {limit} bytes"),
            instance,
        )
    }

    pub fn unsupported_media_type(got: Option<&str>, instance: &str) -> Self {
        let detail = match got {
            Some(ct) => format!("content type {ct:?} is not supported; send application/json"),
            None => "missing Content-Type; send application/json".into(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
            instance,
        )
    }

    pub fn unauthorized(detail: impl Into<String>, instance: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
            detail,
            instance,
        )
    }

    pub fn forbidden(detail: impl Into<String>, instance: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail, instance)
    }

    pub fn not_found(instance: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "no such endpoint",
            instance,
        )
    }

    pub fn method_not_allowed(instance: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            "use POST",
            instance,
        )
    }

    pub fn unavailable(detail: impl Into<String>, retry_after: Duration, instance: &str) -> Self {
        let mut p = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service-unavailable",
            "Service unavailable",
            detail,
            instance,
        );
        p.retry_after = Some(retry_after);
        p
    }
}

/// `type` is a URI per problem kind.
fn problem_type<S: serde::Serializer>(slug: &&'static str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("https://kubernaut.ai/problems/{slug}"))
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).expect("problem serialises");
        let mut resp = (status, body).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(d) = retry_after {
            let secs = d.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
