//! signal-gateway: Alertmanager and Kubernetes-event signals, deduplicated into Kubernaut
//! `RemediationRequest`s across replicas. `run` wires the parts; the domain modules
//! (signal, target, fingerprint, dedup, lock, coalesce, pipeline) talk to the cluster only
//! through the [`cluster::Cluster`] port.
#![forbid(unsafe_code)]

pub mod absorb;
pub mod admission;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod bounded;
pub mod clock;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod crd;
pub mod dedup;
pub mod discovery;
pub mod fingerprint;
pub mod hints;
pub mod http;
pub mod lock;
pub mod metrics;
pub mod ownercache;
pub mod ownership;
pub mod pipeline;
pub mod readcache;
pub mod signal;
pub mod target;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use backend::embedded::EmbeddedStore;
use backend::kubernetes::KubernetesCluster;
use backend::metered::Metered;
use clock::{SharedClock, SystemClock};
use cluster::Cluster;
use config::{BackendKind, Config};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The two sockets the gateway serves; bound by the caller so tests can use port 0.
pub struct Listeners {
    pub signals: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let signals = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding signals port {}", config.server.listen))?;
        let admin = TcpListener::bind(config.server.admin_listen)
            .await
            .with_context(|| format!("binding admin port {}", config.server.admin_listen))?;
        Ok(Listeners { signals, admin })
    }
}

/// What the gateway runs on: the cluster port, the clock and the metrics registry.
pub struct Deps {
    pub cluster: Arc<dyn Cluster>,
    /// Set on the embedded backend (enables the debug endpoints).
    pub embedded: Option<Arc<EmbeddedStore>>,
    pub clock: SharedClock,
    pub registry: prometheus::Registry,
    pub metrics: metrics::Metrics,
    /// TokenReview/SubjectAccessReview for `auth.mode: kubernetes` (set on the kubernetes backend).
    pub reviewer: Option<Arc<dyn auth::Reviewer>>,
}

impl Deps {
    /// An embedded store on `clock`.
    pub fn embedded(clock: SharedClock) -> Self {
        let store = Arc::new(EmbeddedStore::new(clock.clone()));
        Self::on(store.clone(), Some(store), clock)
    }

    /// Any cluster adapter (tests wrap an embedded store to inject faults).
    pub fn on(cluster: Arc<dyn Cluster>, embedded: Option<Arc<EmbeddedStore>>, clock: SharedClock) -> Self {
        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::register(&registry).expect("metrics register once on a new registry");
        Deps {
            cluster,
            embedded,
            clock,
            registry,
            metrics,
            reviewer: None,
        }
    }

    /// The backend the configuration asks for (`auto`: kubernetes when a cluster is configured).
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let clock: SharedClock = Arc::new(SystemClock);
        let kind = match config.backend.kind {
            BackendKind::Auto if cluster_configured() => BackendKind::Kubernetes,
            BackendKind::Auto => BackendKind::Embedded,
            k => k,
        };
        if kind == BackendKind::Embedded {
            tracing::warn!(
                "using the embedded backend: state lives in this process only (for trying out and tests, not production)"
            );
            return Ok(Deps::embedded(clock));
        }
        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::register(&registry)?;
        let cluster = KubernetesCluster::connect(
            config.backend.api_timeout,
            config.backend.max_concurrent_requests,
            config.auth.max_concurrent_reviews + auth::KNOWN_REVIEW_SLOTS,
            metrics.clone(),
        )
        .await
        .context("connecting to the Kubernetes API server")?;
        let reviewer: Arc<dyn auth::Reviewer> = Arc::new(backend::review::KubeReviewer::new(cluster.review_client()));
        Ok(Deps {
            cluster: Arc::new(cluster),
            embedded: None,
            clock,
            registry,
            metrics,
            reviewer: Some(reviewer),
        })
    }
}

/// In-cluster, or a kubeconfig in KUBECONFIG or ~/.kube/config.
fn cluster_configured() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("HOME").is_some_and(|h| std::path::Path::new(&h).join(".kube/config").exists())
}

/// Runs the gateway until `shutdown` resolves, then drains and releases every lease.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let deps = Deps::from_config(&config).await?;
    serve(deps, config, listeners, shutdown).await
}

/// [`run`] on given dependencies (tests pass an embedded store or a failing backend).
pub async fn serve(
    deps: Deps,
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let metrics = deps.metrics.clone();
    metrics
        .build_info
        .with_label_values(&[VERSION, deps.cluster.backend_name(), config.dedup.strategy.as_str()])
        .set(1);
    let cluster: Arc<dyn Cluster> = Arc::new(
        Metered::new(deps.cluster.clone(), metrics.clone()).with_slots(config.backend.max_concurrent_requests),
    );
    let namespace = config.namespace().to_owned();
    let authenticator = Arc::new(auth::Authenticator::new(
        &config.auth,
        &namespace,
        deps.reviewer.clone(),
        metrics.clone(),
    )?);
    authenticator.watch_files();
    let transport = http::server::Transport::from_config(&config.server, &metrics)?;
    // The Lease holder identity: the pod name plus a per-process part, so two processes that
    // share a pod name never take each other's live lock for their own leftover.
    let holder = lock::process_identity(&config.identity.pod_name);
    let lock = lock::LeaseLock::new(
        cluster.clone(),
        deps.clock.clone(),
        namespace.clone(),
        holder.clone(),
        config.lock.lease_duration,
        metrics.clone(),
    );
    let signals_addr = listeners.signals.local_addr()?;
    // Shard ownership (ADR 0014): a member Lease per replica; creates of owned shards need no
    // per-fingerprint Lease, and signals of other shards go to their owner.
    let ownership = config.ownership.enabled.then(|| {
        let address = if config.ownership.advertise_address.is_empty() {
            let host = if config.identity.pod_ip.is_empty() {
                "127.0.0.1".to_owned()
            } else {
                config.identity.pod_ip.clone()
            };
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            let scheme = if transport.is_tls() { "https" } else { "http" };
            format!("{scheme}://{host}:{}", signals_addr.port())
        } else {
            config.ownership.advertise_address.clone()
        };
        ownership::Ownership::new(
            cluster.clone(),
            deps.clock.clone(),
            metrics.clone(),
            ownership::Settings {
                namespace: namespace.clone(),
                identity: holder.clone(),
                address,
                cert_sha256: transport
                    .cert
                    .clone()
                    .map(|cert| Arc::new(move || cert.leaf_sha256()) as Arc<dyn Fn() -> String + Send + Sync>),
                lease_duration: config.ownership.lease_duration,
                shards: config.ownership.shards,
                write_grace: config.backend.api_timeout + std::time::Duration::from_secs(1),
            },
        )
    });
    let dedup = dedup::Dedup::new(
        cluster.clone(),
        lock.clone(),
        deps.clock.clone(),
        metrics.clone(),
        dedup::Settings {
            namespace: namespace.clone(),
            strategy: config.dedup.strategy,
            backoff_initial: config.lock.backoff_initial,
            backoff_max: config.lock.backoff_max,
            // Past the client's own request timeout, so that timeout (an honest "unknown") ends
            // a write in flight rather than this bound.
            write_grace: config.backend.api_timeout + std::time::Duration::from_secs(1),
            watch: config.dedup.watch,
            watch_wait: config.dedup.watch_wait,
        },
    );
    let dedup = Arc::new(match &ownership {
        Some(o) => dedup.with_ownership(o.clone()),
        None => dedup,
    });
    // Lingering saves API-server writes; the in-process store has none to save (its "latency" is
    // this process's own scheduling, which lingering would only lengthen).
    let lingers = if deps.embedded.is_some() {
        coalesce::Lingers::NONE
    } else {
        coalesce::Lingers {
            linger: config.dedup.linger,
            count_linger: config.dedup.count_linger,
            flush_at: config.dedup.flush_at,
        }
    };
    let audit = audit::start(&config.audit, &metrics)?;
    let resolver = target::OwnerResolver::new(
        cluster.clone(),
        config.owner_resolution.enabled,
        config.owner_resolution.max_depth,
        config.owner_resolution.cache_ttl,
    );
    let owner_cache = &config.owner_resolution.metadata_cache;
    // The owner cache's watches run until the gateway stops (dropped at the end of serve).
    let (resolver, _owner_watches) = if config.owner_resolution.enabled && owner_cache.enabled {
        let (resolver, watches) = resolver.with_owner_cache(
            &owner_cache.watched_kinds()?,
            bounded::Limits {
                entries: owner_cache.max_objects,
                bytes: owner_cache.max_bytes,
            },
            metrics.owner_cache.clone(),
        );
        (resolver, Some(watches))
    } else {
        (resolver, None)
    };
    let pipeline = pipeline::Pipeline {
        latency: pipeline::LatencyTracker::default(),
        freshness: admission::Freshness::new(&config.freshness),
        scope: admission::Scope::new(
            cluster.clone(),
            discovery::Discovery::new(cluster.clone()),
            &config.scope,
        ),
        resolver,
        coalescer: coalesce::Coalescer::new(dedup, metrics.clone(), config.dedup.max_batch, lingers),
        clock: deps.clock.clone(),
        metrics: metrics.clone(),
        cluster_id: config.backend.cluster_id.clone(),
        audit: audit.sink.clone(),
        ownership: ownership.clone().map(|o| {
            let forwarder: Arc<dyn ownership::Forwarder> = Arc::new(http::forward::HttpForwarder::new(
                config.ownership.max_forwards_in_flight,
                config.backend.api_timeout + std::time::Duration::from_secs(1),
                config.server.header_read_timeout,
            ));
            (o, forwarder)
        }),
    };
    let state = Arc::new(http::AppState {
        pipeline,
        metrics: metrics.clone(),
        registry: deps.registry.clone(),
        cluster: cluster.clone(),
        embedded: deps.embedded.clone(),
        namespace: namespace.clone(),
        max_body_bytes: config.server.max_body_bytes,
        body_read_timeout: config.server.body_read_timeout,
        request_timeout: config.server.request_timeout,
        auth: authenticator,
        tls: transport.is_tls(),
        in_flight: Arc::new(Semaphore::new(config.server.max_in_flight)),
        body_budget: Arc::new(Semaphore::new(
            config.server.max_buffered_body_bytes / http::ingest::BODY_BUDGET_UNIT,
        )),
        max_in_flight: config.server.max_in_flight,
        shutting_down: AtomicBool::new(false),
        resends: Default::default(),
        readiness: Default::default(),
        audit_health: audit.health.clone(),
    });

    let (stop_signals, mut signals_stopped) = watch::channel(false);
    let (stop_admin, mut admin_stopped) = watch::channel(false);
    let admin_addr = listeners.admin.local_addr()?;
    let mut signals_server = tokio::spawn(http::server::serve(
        "signals",
        listeners.signals,
        http::signals_router(state.clone()),
        transport.clone(),
        async move {
            let _ = signals_stopped.wait_for(|s| *s).await;
        },
    ));
    let admin_server = tokio::spawn(http::server::serve(
        "admin",
        listeners.admin,
        http::admin::admin_router(state.clone())
            .layer(axum::middleware::from_fn_with_state(state.clone(), http::harden)),
        transport.clone(),
        async move {
            let _ = admin_stopped.wait_for(|s| *s).await;
        },
    ));
    tracing::info!(
        signals = %signals_addr, admin = %admin_addr, backend = deps.cluster.backend_name(),
        namespace = %namespace, holder = %holder, strategy = config.dedup.strategy.as_str(),
        auth = config.auth.mode.as_str(), tls = transport.is_tls(),
        "signal-gateway started"
    );

    let (stop_sweep, sweep_stopped) = watch::channel(false);
    let sweeper = tokio::spawn(lock.clone().sweep_loop(sweep_stopped));
    let (stop_membership, membership_stopped) = watch::channel(false);
    let membership = ownership.clone().map(|o| tokio::spawn(o.run(membership_stopped)));

    let mut server_failed = None;
    tokio::select! {
        _ = shutdown => tracing::info!("shutdown requested; draining in-flight signals"),
        r = &mut signals_server => server_failed = Some(r),
    }
    state.shutting_down.store(true, Ordering::SeqCst);
    // One drain deadline for the signals in flight and then the audit events they left.
    let drain_deadline = tokio::time::Instant::now() + config.server.shutdown_timeout;
    let _ = stop_signals.send(true);
    if server_failed.is_none() {
        match tokio::time::timeout_at(drain_deadline, &mut signals_server).await {
            Ok(_) => tracing::info!("drained"),
            Err(_) => {
                tracing::warn!(timeout = ?config.server.shutdown_timeout, "drain deadline passed; abandoning in-flight requests");
                signals_server.abort();
            }
        }
    }
    let _ = stop_sweep.send(true);
    let _ = sweeper.await;
    // After the drain: the shards move to the peers at their next round.
    let _ = stop_membership.send(true);
    if let Some(task) = membership {
        let _ = task.await;
    }
    let flush_audit = async {
        if let Some(task) = audit.task {
            task.drain(drain_deadline).await;
        }
    };
    let (released, ()) = tokio::join!(lock.release_all(), flush_audit);
    if released > 0 {
        tracing::info!(released, "released leases still held at shutdown");
    }
    let _ = stop_admin.send(true);
    let _ = admin_server.await;
    tracing::info!("stopped");
    match server_failed {
        Some(Ok(Err(e))) => Err(anyhow::anyhow!("signals server failed: {e}")),
        Some(Err(e)) => Err(anyhow::anyhow!("signals server task failed: {e}")),
        _ => Ok(()),
    }
}
