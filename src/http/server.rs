//! Serves a router on a listener with the transport limits of `server.*`: at most
//! `maxConnections` open connections per port, HTTP/1.1 with a bounded request head (size and
//! field count: 431 beyond), a deadline for the request head (slow or idle clients are
//! disconnected), a deadline for a stalled write (a client that stops reading is disconnected),
//! optional TLS whose certificate is re-read when its files change, and graceful shutdown (stop
//! accepting, finish requests in flight).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

use crate::config;
use crate::metrics::Metrics;

/// Transport settings shared by both ports.
#[derive(Clone)]
pub struct Transport {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    /// Open connections per port; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Longest a write may make no progress before the connection is closed.
    pub write_timeout: Duration,
    pub tls: Option<TlsAcceptor>,
    /// The certificate `tls` serves (for its fingerprint, which peers pin: ADR 0014).
    pub cert: Option<Arc<ReloadingCert>>,
    pub metrics: Metrics,
}

impl Transport {
    /// From `server.*`; loads the TLS certificate (an error when it cannot be used) and starts
    /// watching its files.
    pub fn from_config(server: &config::Server, metrics: &Metrics) -> anyhow::Result<Self> {
        let (tls, cert) = match &server.tls {
            None => (None, None),
            Some(tls) => {
                crate::backend::kubernetes::KubernetesCluster::install_crypto_provider();
                let resolver = Arc::new(ReloadingCert::load(&tls.cert_file, &tls.key_file, metrics.clone())?);
                resolver.watch();
                let mut config = rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_cert_resolver(resolver.clone());
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                (Some(TlsAcceptor::from(Arc::new(config))), Some(resolver))
            }
        };
        Ok(Transport {
            max_header_bytes: server.max_header_bytes,
            max_headers: server.max_headers,
            header_read_timeout: server.header_read_timeout,
            max_connections: server.max_connections,
            write_timeout: server.write_timeout,
            tls,
            cert,
            metrics: metrics.clone(),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Accepts connections on the port named `port` (a metric label: `signals` or `admin`) until
/// `shutdown` resolves, then waits for the requests in flight. At most
/// `transport.max_connections` are open at once: one more is closed as soon as it is accepted
/// (counted), so idle or slow clients cannot pile up sockets and tasks without bound.
pub async fn serve(
    port: &'static str,
    listener: TcpListener,
    router: Router,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let service = TowerToHyperService::new(router);
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(http1_builder(&transport));
    let places = Arc::new(Semaphore::new(transport.max_connections.max(1)));
    let open = transport.metrics.http_connections.with_label_values(&[port]);
    let refused = transport.metrics.http_connections_refused.with_label_values(&[port]);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (service, builder, watcher) = (service.clone(), builder.clone(), graceful.watcher());
        let tls = transport.tls.clone();
        let (handshake_timeout, write_timeout) = (transport.header_read_timeout, transport.write_timeout);
        let open = open.clone();
        tokio::spawn(async move {
            let _open = OpenConnection::new(open, place);
            match tls {
                None => {
                    let conn =
                        builder.serve_connection(TokioIo::new(StallTimeout::new(stream, write_timeout)), service);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                Some(acceptor) => {
                    let stream = StallTimeout::new(stream, write_timeout);
                    let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One open connection: its place under `server.maxConnections` and its count in the gauge,
/// both given back however the connection ends.
struct OpenConnection {
    gauge: prometheus::IntGauge,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(gauge: prometheus::IntGauge, place: tokio::sync::OwnedSemaphorePermit) -> Self {
        gauge.inc();
        OpenConnection { gauge, _place: place }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// How long a client may keep a connection idle before reusing it, for a server that closes idle
/// connections after `keep_alive` (ours: `server.headerReadTimeout`): well within it, so a
/// request is never sent on a connection as the server closes it (it would be cut off, answered
/// by nobody).
pub fn reuse_within(keep_alive: Duration) -> Duration {
    keep_alive / 4
}

/// HTTP/1.1 with the head limits and deadline of `transport` (the deadline also closes idle
/// keep-alive connections).
fn http1_builder(transport: &Transport) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(transport.header_read_timeout)
        .max_header_size(transport.max_header_bytes)
        .max_headers(transport.max_headers);
    builder
}

/// A connection whose writes fail with `TimedOut` once one has made no progress for `timeout`:
/// a client that stops reading cannot hold an answer, its buffers and its connection forever.
pub struct StallTimeout<S> {
    inner: S,
    timeout: Duration,
    /// Armed when a write is pending, disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        StallTimeout {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Passes `poll` through; a `Pending` that lasts `timeout` becomes an error.
    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading (server.writeTimeout)",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, poll)
    }
}

/// The serving certificate, replaced when the certificate or key file changes. A pair that does
/// not load (half-written, mismatched) keeps the previous certificate in use.
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    metrics: Metrics,
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path, metrics: Metrics) -> anyhow::Result<Self> {
        let key = load_certified_key(cert_file, key_file)?;
        Ok(ReloadingCert {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(Arc::new(key)),
            metrics,
        })
    }

    /// SHA-256 of the leaf certificate served now (DER), lowercase hex.
    pub fn leaf_sha256(&self) -> String {
        let current = self.current.read().expect("certificate lock poisoned").clone();
        current
            .end_entity_cert()
            .map(|c| sha256_hex(c.as_ref()))
            .unwrap_or_default()
    }

    pub fn reload(&self) {
        match load_certified_key(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *self.current.write().expect("certificate lock poisoned") = Arc::new(key);
                self.metrics
                    .file_reloads
                    .with_label_values(&["tls_certificate", "ok"])
                    .inc();
                tracing::info!(cert = %self.cert_file.display(), "reloaded the TLS certificate");
            }
            Err(e) => {
                self.metrics
                    .file_reloads
                    .with_label_values(&["tls_certificate", "error"])
                    .inc();
                tracing::error!(error = %e, "could not reload the TLS certificate; keeping the previous one");
            }
        }
    }

    /// Re-reads both files whenever either changes; stops when the resolver is dropped.
    fn watch(self: &Arc<Self>) {
        for path in [self.cert_file.clone(), self.key_file.clone()] {
            let weak = Arc::downgrade(self);
            tokio::spawn(crate::auth::watch_file(path, move || match weak.upgrade() {
                Some(r) => {
                    r.reload();
                    true
                }
                None => false,
            }));
        }
    }
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock poisoned").clone())
    }
}

/// Lowercase hex SHA-256 of `bytes` (a certificate's DER, as pinned between replicas).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    crate::fingerprint::hex(&sha2::Sha256::digest(bytes))
}

fn load_certified_key(cert_file: &Path, key_file: &Path) -> anyhow::Result<CertifiedKey> {
    let read = |path: &Path| {
        crate::auth::read_whole(path).map_err(|e| match e {
            crate::auth::ReadError::Changing => anyhow::anyhow!("{} changed while being read", path.display()),
            crate::auth::ReadError::Io(e) => anyhow::anyhow!("cannot read {}: {e}", path.display()),
        })
    };
    let chain = CertificateDer::pem_slice_iter(read(cert_file)?.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", cert_file.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert_file.display());
    let key = PrivateKeyDer::from_pem_slice(read(key_file)?.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot read a private key from {}: {e}", key_file.display()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("unsupported private key in {}: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|e| anyhow::anyhow!("{} does not match {}: {e}", key_file.display(), cert_file.display()))?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_client_that_stops_reading_its_answer_is_disconnected_after_the_write_timeout() {
        let big = "x".repeat(4 * 1024 * 1024);
        let router = Router::new().route("/big", axum::routing::get(move || async move { big.clone() }));
        let transport = Transport {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_read_timeout: Duration::from_secs(60),
            max_connections: 1,
            write_timeout: Duration::from_millis(200),
            tls: None,
            cert: None,
            metrics: Metrics::register(&prometheus::Registry::new()).unwrap(),
        };
        // A connection with a small buffer, whose client asks and then never reads.
        let (mut client, server) = tokio::io::duplex(4096);
        client
            .write_all(b"GET /big HTTP/1.1\r\nhost: gw\r\n\r\n")
            .await
            .unwrap();
        let conn = http1_builder(&transport).serve_connection(
            TokioIo::new(StallTimeout::new(server, transport.write_timeout)),
            TowerToHyperService::new(router),
        );
        let ended = tokio::time::timeout(Duration::from_secs(20), conn).await;
        let err = ended.expect("the connection is closed, not held").unwrap_err();
        assert!(format!("{err:?}").contains("TimedOut"), "{err:?}");
        drop(client);
    }
}
