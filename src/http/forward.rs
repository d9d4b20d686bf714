//! Forwarding between replicas (ADR 0014): the client that sends a signal to the owner of its
//! shard, and the owner's endpoint `POST /internal/v1/forward` on the signals port.
//!
//! The endpoint takes the fingerprint and RR spec the receiving replica computed, with the
//! sender's remaining deadline and trace context, and answers only after the write is stored
//! (200 + the acknowledgement) or certainly not (503). It is authenticated by the owner's
//! per-process key, published in its member Lease (readable only by who may read Leases in the
//! gateway's namespace), and never forwards again: a replica that no longer owns the shard takes
//! the Lease-guarded path itself.
//!
//! With `server.tls` the signals port, and so the forward, speaks TLS. Peers are reached by pod
//! IP, which a Service's certificate does not name, so the forwarder trusts no CA: it accepts
//! exactly the certificate whose SHA-256 the owner published in its member Lease, beside the key.
//! A certificate that differs fails the handshake, before anything is sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::AppState;
use super::problem::Problem;
use crate::coalesce::Ack;
use crate::crd::RemediationRequestSpec;
use crate::dedup::DedupError;
use crate::fingerprint::Fingerprint;
use crate::ownership::{Forwarded, Forwarder, Peer};

pub const FORWARD_PATH: &str = "/internal/v1/forward";
/// The owner's key, as its member Lease publishes it.
pub const KEY_HEADER: &str = "x-signal-gateway-forward-key";
/// On a 503: `refused` when the owner did not process the signal at all (the sender may take the
/// local path), absent when it tried and it is not stored.
pub const REFUSED_HEADER: &str = "x-signal-gateway-forward";
/// Largest forward body: a spec carries the original payload (at most 256 KiB) and bounded
/// labels and annotations.
pub const MAX_FORWARD_BYTES: usize = 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardRequest {
    pub fingerprint: String,
    pub spec: RemediationRequestSpec,
    /// What is left of the sender's deadline, in milliseconds.
    pub deadline_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotStored {
    reason: String,
    retry_after_ms: u64,
}

/// The owner's side.
pub async fn receive(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let m = &state.metrics;
    let refuse = |status: StatusCode, detail: &str| {
        m.forwarded_received.with_label_values(&["refused"]).inc();
        let mut resp = match status {
            StatusCode::FORBIDDEN => Problem::forbidden(detail.to_owned(), FORWARD_PATH).into_response(),
            StatusCode::PAYLOAD_TOO_LARGE => Problem::too_large(MAX_FORWARD_BYTES, FORWARD_PATH).into_response(),
            StatusCode::SERVICE_UNAVAILABLE => {
                Problem::unavailable(detail.to_owned(), Duration::from_secs(1), FORWARD_PATH).into_response()
            }
            _ => Problem::bad_request(detail.to_owned(), FORWARD_PATH).into_response(),
        };
        resp.headers_mut()
            .insert(REFUSED_HEADER, HeaderValue::from_static("refused"));
        // The body may be unread: the connection ends here, and says so, so no client reuses it
        // (a pooled forward sent into a closing connection would have an unknown outcome).
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    };
    let Some((ownership, _)) = &state.pipeline.ownership else {
        return refuse(StatusCode::NOT_FOUND, "forwarding is off on this replica");
    };
    let key = req.headers().get(KEY_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !bool::from(key.ct_eq(ownership.key().as_bytes())) {
        return refuse(StatusCode::FORBIDDEN, "not a forward from a member");
    }
    if state.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many signals in flight");
    };
    let body = tokio::time::timeout(
        state.body_read_timeout,
        Limited::new(req.into_body(), MAX_FORWARD_BYTES).collect(),
    )
    .await;
    let body = match body {
        Ok(Ok(body)) => body,
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "forward body too large");
        }
        _ => return refuse(StatusCode::BAD_REQUEST, "forward body unreadable"),
    };
    let Ok(fwd) = serde_json::from_slice::<ForwardRequest>(&body.to_bytes()) else {
        return refuse(StatusCode::BAD_REQUEST, "forward body is not a forward request");
    };
    let Some(fp) = Fingerprint::parse(&fwd.fingerprint) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid fingerprint");
    };
    if fwd.spec.signal_fingerprint != fp.as_str() {
        return refuse(StatusCode::BAD_REQUEST, "the spec names another fingerprint");
    }
    let budget = Duration::from_millis(fwd.deadline_ms).min(state.request_timeout);
    let deadline = Instant::now() + budget;
    let result = state.pipeline.coalescer.submit(fp, fwd.spec, deadline).await;
    drop(permit);
    match result {
        Ok(ack) => {
            m.forwarded_received.with_label_values(&["stored"]).inc();
            let body = serde_json::to_vec(&ack).expect("answer serialises");
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => {
            m.forwarded_received.with_label_values(&["failed"]).inc();
            let body = serde_json::to_vec(&NotStored {
                reason: e.reason().to_owned(),
                retry_after_ms: u64::try_from(e.retry_after().as_millis()).unwrap_or(u64::MAX),
            })
            .expect("answer serialises");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
    }
}

/// Most peer hosts whose certificate fingerprint is kept at once.
const MAX_PINNED_PEERS: usize = 1024;

/// The certificates peers published, by host as forwards address them: a TLS forward accepts
/// its peer's and no other.
#[derive(Debug)]
struct PinnedPeers {
    pins: Mutex<HashMap<String, String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedPeers {
    /// The key of `host` as it appears in a URI (`[::1]`) and as rustls names it (`::1`).
    fn key(host: &str) -> String {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => host.to_ascii_lowercase(),
        }
    }

    /// Pins `host` to `cert_sha256` before a forward to it. Peers come and go with their pod IPs:
    /// past [`MAX_PINNED_PEERS`] hosts the map starts again (every forward pins its peer anew; a
    /// handshake caught by the reset falls back to the local path once).
    fn pin(&self, host: &str, cert_sha256: &str) {
        let mut pins = self.pins.lock().expect("pins poisoned");
        let key = Self::key(host);
        if pins.len() >= MAX_PINNED_PEERS && !pins.contains_key(&key) {
            pins.clear();
        }
        pins.insert(key, cert_sha256.to_owned());
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedPeers {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let host = match server_name {
            rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => Self::key(&other.to_str()),
        };
        let pinned = self.pins.lock().expect("pins poisoned").get(&host).cloned();
        match pinned {
            Some(pin) if pin == super::server::sha256_hex(end_entity.as_ref()) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::General(format!(
                "{host} presented a certificate its member Lease does not publish"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The receiving replica's side: one pooled HTTP/1.1 client (plain or TLS, as the peer's address
/// says), a bounded number of forwards in flight.
pub struct HttpForwarder {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    pins: Arc<PinnedPeers>,
    slots: Arc<Semaphore>,
    /// How long past the deadline an owner may still be finishing a write already sent.
    grace: Duration,
}

impl HttpForwarder {
    /// `peer_keep_alive` is how long an owner keeps an idle connection open
    /// (`server.headerReadTimeout`, the same on every member). A pooled connection is reused only
    /// [`within`](super::server::reuse_within) it: one reused as the owner closes it would cut a
    /// sent forward off unanswered, and its sender would get a 503 that nobody meant.
    pub fn new(max_in_flight: usize, grace: Duration, peer_keep_alive: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pins = Arc::new(PinnedPeers {
            pins: Mutex::new(HashMap::new()),
            provider: provider.clone(),
        });
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(pins.clone())
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(super::server::reuse_within(peer_keep_alive))
            .build(connector);
        HttpForwarder {
            client,
            pins,
            slots: Arc::new(Semaphore::new(max_in_flight)),
            grace,
        }
    }
}

#[async_trait::async_trait]
impl Forwarder for HttpForwarder {
    async fn forward(
        &self,
        peer: &Peer,
        fp: &Fingerprint,
        spec: &RemediationRequestSpec,
        deadline: Instant,
    ) -> Forwarded {
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            return Forwarded::NotSent("saturated");
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Forwarded::Failed(DedupError::DeadlineExceeded);
        }
        let body = serde_json::to_vec(&ForwardRequest {
            fingerprint: fp.as_str().to_owned(),
            spec: spec.clone(),
            deadline_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        })
        .expect("forward request serialises");
        let Ok(uri) = format!("{}{FORWARD_PATH}", peer.address.trim_end_matches('/')).parse::<http::Uri>() else {
            return Forwarded::NotSent("refused");
        };
        // The connector speaks TLS for exactly this scheme.
        if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
            // A TLS peer that published no certificate cannot be told from an impostor.
            let Some(host) = uri.host() else {
                return Forwarded::NotSent("refused");
            };
            if peer.cert_sha256.is_empty() {
                return Forwarded::NotSent("untrusted");
            }
            self.pins.pin(host, &peer.cert_sha256);
        }
        let Ok(mut req) = http::Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(KEY_HEADER, peer.key.as_str())
            .body(Full::new(Bytes::from(body)))
        else {
            return Forwarded::NotSent("refused");
        };
        // The owner's span continues this signal's trace.
        let context = tracing::Span::current().context();
        TraceContextPropagator::new()
            .inject_context(&context, &mut opentelemetry_http::HeaderInjector(req.headers_mut()));
        let answered = tokio::time::timeout_at(deadline + self.grace, async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let refused = resp.headers().contains_key(REFUSED_HEADER);
            let body = Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, hyper_util::client::legacy::Error>((status, refused, body))
        })
        .await;
        match answered {
            Err(_) => Forwarded::Unanswered,
            // No connection was made: certainly not sent. A TLS peer whose certificate is not
            // the one it published fails here too, before a byte of the forward is sent.
            Ok(Err(e)) if e.is_connect() && rejected_certificate(&e) => Forwarded::NotSent("untrusted"),
            Ok(Err(e)) if e.is_connect() => Forwarded::NotSent("unreachable"),
            Ok(Err(_)) => Forwarded::Unanswered,
            Ok(Ok((StatusCode::OK, _, body))) => match serde_json::from_slice::<Ack>(&body) {
                Ok(ack) => Forwarded::Stored(ack),
                // 200 means stored, but not what: the sender cannot answer its own sender.
                Err(_) => Forwarded::Unanswered,
            },
            Ok(Ok((StatusCode::SERVICE_UNAVAILABLE, false, body))) => {
                let not = serde_json::from_slice::<NotStored>(&body).ok();
                Forwarded::Failed(DedupError::Owner {
                    reason: crate::dedup::known_reason(not.as_ref().map_or("", |n| n.reason.as_str())),
                    retry_after: Duration::from_millis(not.map_or(2000, |n| n.retry_after_ms)),
                })
            }
            // Refused before any processing (bad key after a restart, shutting down, full):
            // nothing of it is stored.
            Ok(Ok(_)) => Forwarded::NotSent("refused"),
        }
    }
}

/// Whether a connect error is the TLS handshake failing on the peer's certificate (a rustls
/// error somewhere in the chain, which nests it in I/O errors whose `source` skips it).
fn rejected_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
        && rejected_certificate(inner)
    {
        return true;
    }
    e.source().is_some_and(rejected_certificate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::absorb::Absorbs;

    /// A peer's pin is found under the name rustls gives its address, and the pins stay bounded
    /// however many pod IPs come and go.
    #[test]
    fn pins_are_found_by_address_and_bounded() {
        let pins = PinnedPeers {
            pins: Mutex::new(HashMap::new()),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        pins.pin("[::1]", "a");
        pins.pin("Gateway-0.Peers", "b");
        assert_eq!(
            pins.pins
                .lock()
                .unwrap()
                .get(&PinnedPeers::key("::1"))
                .map(String::as_str),
            Some("a")
        );
        assert_eq!(
            pins.pins.lock().unwrap().get("gateway-0.peers").map(String::as_str),
            Some("b")
        );
        for i in 0..3 * MAX_PINNED_PEERS {
            pins.pin(&format!("10.0.{}.{}", i / 256, i % 256), "c");
            assert!(pins.pins.lock().unwrap().len() <= MAX_PINNED_PEERS);
        }
        assert_eq!(
            pins.pins.lock().unwrap().get("10.0.11.255").map(String::as_str),
            Some("c"),
            "the latest pin is kept"
        );
    }

    /// The forwarding replica answers its sender with the owner's answer: every field, the
    /// cooldown's end included, survives the trip.
    #[test]
    fn an_owners_answer_reaches_the_sender_whole() {
        for absorbed_by in [
            Absorbs::Active,
            Absorbs::ManualReview,
            Absorbs::Cooldown("2026-12-02T06:30:00Z".parse().unwrap()),
        ] {
            let ack = Ack {
                name: "rr-0123456789abcdef-1".into(),
                namespace: "kubernaut-system".into(),
                created: false,
                occurrence_count: 7,
                first_seen_at: "2026-12-02T06:00:00Z".into(),
                last_seen_at: "2026-12-02T06:10:00Z".into(),
                absorbed_by,
                api_calls: 0.25,
            };
            let wire = serde_json::to_vec(&ack).unwrap();
            assert_eq!(serde_json::from_slice::<Ack>(&wire).unwrap(), ack);
        }
        // An answer that names no rule the sender knows is no answer it can pass on.
        let unknown = br#"{"name":"a","namespace":"b","created":true,"occurrenceCount":1,"firstSeenAt":"","lastSeenAt":"","absorbedBy":{"rule":"later"},"apiCalls":1.0}"#;
        assert!(serde_json::from_slice::<Ack>(unknown).is_err());
    }
}
