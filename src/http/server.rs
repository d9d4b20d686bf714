//! Serves a router on a listener with the transport limits of `server.*`: HTTP/1.1 with a bounded
//! request head (size and field count: 431 beyond), a deadline for the request head (slow or idle
//! clients are disconnected), optional TLS whose certificate is re-read when its files change, and
//! graceful shutdown (stop accepting, finish requests in flight).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config;
use crate::metrics::Metrics;

/// Transport settings shared by both ports.
#[derive(Clone)]
pub struct Transport {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub tls: Option<TlsAcceptor>,
}

impl Transport {
    /// From `server.*`; loads the TLS certificate (an error when it cannot be used) and starts
    /// watching its files.
    pub fn from_config(server: &config::Server, metrics: &Metrics) -> anyhow::Result<Self> {
        let tls = match &server.tls {
            None => None,
            Some(tls) => {
                crate::backend::kubernetes::KubernetesCluster::install_crypto_provider();
                let resolver = Arc::new(ReloadingCert::load(&tls.cert_file, &tls.key_file, metrics.clone())?);
                resolver.watch();
                let mut config = rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_cert_resolver(resolver);
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(TlsAcceptor::from(Arc::new(config)))
            }
        };
        Ok(Transport {
            max_header_bytes: server.max_header_bytes,
            max_headers: server.max_headers,
            header_read_timeout: server.header_read_timeout,
            tls,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Accepts connections until `shutdown` resolves, then waits for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let service = TowerToHyperService::new(router);
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(transport.header_read_timeout)
        .max_header_size(transport.max_header_bytes)
        .max_headers(transport.max_headers);
    let builder = Arc::new(builder);
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
        let _ = stream.set_nodelay(true);
        let (service, builder, watcher) = (service.clone(), builder.clone(), graceful.watcher());
        let tls = transport.tls.clone();
        let handshake_timeout = transport.header_read_timeout;
        tokio::spawn(async move {
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                Some(acceptor) => {
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
