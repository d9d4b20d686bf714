//! The HTTP side of the trail: `POST <url>/api/v1/audit/events/batch` with the pod's
//! ServiceAccount token, over the hyper client and rustls the kube client already uses. The token
//! file is read for every batch (the projected token rotates; reading a small file costs nothing
//! next to the request); the CA file is checked for every batch and re-read when it changes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounterVec;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::trail::{Attempt, Deliver};

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The path DataStorage takes batches on.
pub const BATCH_PATH: &str = "/api/v1/audit/events/batch";
/// Most bytes of an answer read (for the log line of a refused batch).
const ANSWER_MAX: usize = 4096;
/// Most bytes of a token file read.
const TOKEN_MAX: u64 = 64 * 1024;

/// Modification time and length: a changed file has a different stamp.
type Stamp = Option<(Option<std::time::SystemTime>, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()))
}

pub struct HttpDelivery {
    batch_url: Uri,
    token_file: PathBuf,
    ca_file: Option<PathBuf>,
    client: Mutex<(Stamp, HttpsClient)>,
    file_reloads: IntCounterVec,
    /// The token file could not be read at the last attempt (warned once per change).
    token_missing: AtomicBool,
}

impl HttpDelivery {
    pub fn new(config: &crate::config::Audit, file_reloads: IntCounterVec) -> anyhow::Result<Self> {
        let batch_url: Uri = format!("{}{BATCH_PATH}", config.url.trim_end_matches('/'))
            .parse()
            .with_context(|| format!("audit.url {:?} is not a valid URL", config.url))?;
        let ca_file = (!config.ca_file.is_empty()).then(|| PathBuf::from(&config.ca_file));
        let stamp = ca_file.as_deref().and_then(stamp);
        let client = build_client(ca_file.as_deref())?;
        Ok(HttpDelivery {
            batch_url,
            token_file: config.token_file.clone(),
            ca_file,
            client: Mutex::new((stamp, client)),
            file_reloads,
            token_missing: AtomicBool::new(false),
        })
    }

    /// The client, rebuilt first when the CA file changed (a file that does not load keeps the
    /// previous client).
    fn client(&self) -> HttpsClient {
        let mut current = self.client.lock().expect("audit client poisoned");
        if let Some(path) = &self.ca_file {
            let now = stamp(path);
            if now != current.0 {
                current.0 = now;
                match build_client(Some(path)) {
                    Ok(c) => {
                        tracing::info!(path = %path.display(), "reloaded the audit CA file");
                        current.1 = c;
                        self.file_reloads.with_label_values(&["audit_ca", "ok"]).inc();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not reload the audit CA file; keeping the previous one");
                        self.file_reloads.with_label_values(&["audit_ca", "error"]).inc();
                    }
                }
            }
        }
        current.1.clone()
    }

    /// `Bearer <token>` from the token file, or `None` (warned once) when it cannot be read.
    fn authorization(&self) -> Option<HeaderValue> {
        let read = read_token(&self.token_file);
        match read {
            Ok(value) => {
                if self.token_missing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %self.token_file.display(), "audit token file readable again");
                }
                Some(value)
            }
            Err(e) => {
                if !self.token_missing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        path = %self.token_file.display(), error = %e,
                        "cannot read audit.tokenFile; sending audit batches without a bearer token"
                    );
                }
                None
            }
        }
    }

    /// GETs `url` (DataStorage's readiness): `Ok` on 2xx. The caller bounds the time.
    pub async fn check(&self, url: &Uri) -> Result<(), String> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url.clone())
            .header(USER_AGENT, user_agent())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        match self.client().request(req).await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("DataStorage readiness {url} answered {}", resp.status())),
            Err(e) => Err(format!("DataStorage readiness {url}: {}", chain(&e))),
        }
    }
}

#[async_trait]
impl Deliver for HttpDelivery {
    async fn deliver(&self, body: Bytes) -> Attempt {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.batch_url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, application/problem+json")
            .header(USER_AGENT, user_agent());
        if let Some(auth) = self.authorization() {
            req = req.header(AUTHORIZATION, auth);
        }
        let req = match req.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Rejected {
                    status: 0,
                    detail: format!("could not build the request: {e}"),
                };
            }
        };
        let resp = match self.client().request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    result: "connection_error",
                    why: chain(&e),
                };
            }
        };
        let status = resp.status();
        // Reading the answer also lets the connection be reused.
        let detail = match Limited::new(resp.into_body(), ANSWER_MAX).collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => String::from("(answer larger than 4 KiB or broken)"),
        };
        if status.is_success() {
            Attempt::Sent
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Attempt::Retry {
                result: "server_error",
                why: format!("{status}: {detail}"),
            }
        } else {
            Attempt::Rejected {
                status: status.as_u16(),
                detail,
            }
        }
    }
}

fn user_agent() -> HeaderValue {
    HeaderValue::from_static(concat!("signal-gateway/", env!("CARGO_PKG_VERSION")))
}

fn read_token(path: &Path) -> anyhow::Result<HeaderValue> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(TOKEN_MAX)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| anyhow::anyhow!("{} holds characters a header cannot carry", path.display()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// An HTTP(S) client trusting `ca_file` (PEM), or the system's roots without one.
fn build_client(ca_file: Option<&Path>) -> anyhow::Result<HttpsClient> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                roots
                    .add(cert.with_context(|| format!("parsing {}", path.display()))?)
                    .with_context(|| format!("a certificate of {}", path.display()))?;
            }
            anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", path.display());
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(tls)
        }
        None => match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
            Ok(b) => b,
            Err(e) => {
                // Plain http:// still works; an https:// DataStorage then needs audit.caFile.
                tracing::debug!(error = %e, "no system CA certificates; https needs audit.caFile");
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                builder.with_tls_config(tls)
            }
        },
    };
    let connector = builder.https_or_http().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(2)
        .build(connector))
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
