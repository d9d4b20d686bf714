//! Configuration: a strict YAML file (unknown keys are errors that name the key), overridden by
//! command-line flags. Every key is documented in docs/configuration.md.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dedup::Strategy;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Config {
    pub server: Server,
    pub backend: Backend,
    pub lock: Lock,
    pub dedup: Dedup,
    pub owner_resolution: OwnerResolution,
    pub logging: Logging,
    pub tracing: Tracing,
    pub auth: Auth,
    pub scope: Scope,
    pub freshness: Freshness,
    pub audit: Audit,
    pub ownership: Ownership,
    /// Who this replica is and where its objects live; from the environment, not the file.
    #[serde(skip)]
    pub identity: Identity,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Signals processed at once; more are refused with 503 + Retry-After.
    pub max_in_flight: usize,
    /// Request bodies held in memory at once, in bytes (each counted at its Content-Length, or
    /// at `maxBodyBytes` when chunked, from before it is read until its answer); a body that
    /// does not fit is refused with 503 + Retry-After.
    pub max_buffered_body_bytes: usize,
    /// Time a signal may take until its outcome is stored; past it the answer is 503.
    #[serde(with = "friendly_duration")]
    pub request_timeout: Duration,
    /// Drain deadline after SIGTERM; keep it below the pod's terminationGracePeriodSeconds.
    #[serde(with = "friendly_duration")]
    pub shutdown_timeout: Duration,
    /// Largest request head (request line plus headers); larger ones are refused (431).
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Time a client has to send a request head (also the idle keep-alive limit); slower
    /// connections are closed.
    #[serde(with = "friendly_duration")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the whole request body; past it the answer is 503 +
    /// Retry-After (a stalled body may be the network: the sender retries).
    #[serde(with = "friendly_duration")]
    pub body_read_timeout: Duration,
    /// Open connections per port; a connection beyond it is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time a write to a client may make no progress (a reader that stopped reading); past it
    /// the connection is closed.
    #[serde(with = "friendly_duration")]
    pub write_timeout: Duration,
    /// TLS for both ports when set (PEM files, re-read when they change).
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tls {
    /// Certificate chain, PEM (leaf first).
    pub cert_file: std::path::PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Bearer tokens checked with TokenReview and authorized with a SubjectAccessReview.
    #[default]
    Kubernetes,
    /// Bearer tokens listed in `auth.tokensFile`.
    Static,
    /// No authentication: anyone who reaches the port may create RemediationRequests.
    None,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Kubernetes => "kubernetes",
            AuthMode::Static => "static",
            AuthMode::None => "none",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Auth {
    pub mode: AuthMode,
    /// `static`: file with one token per line (`#` comments); re-read when it changes.
    pub tokens_file: Option<std::path::PathBuf>,
    /// `kubernetes`: how long an allowed or denied token is remembered (keyed by its SHA-256).
    #[serde(rename = "cacheTTL", with = "friendly_duration")]
    pub cache_ttl: Duration,
    /// `kubernetes`: how long an unknown (unauthenticated) token is remembered.
    #[serde(rename = "negativeCacheTTL", with = "friendly_duration")]
    pub negative_cache_ttl: Duration,
    /// `kubernetes`: TokenReview audiences (empty: the API server's).
    pub audiences: Vec<String>,
    /// `kubernetes`: reviews per second of tokens not known to belong to a sender (a flood of
    /// bogus tokens costs the API server at most this); beyond it the answer is 503.
    pub review_rate: u32,
    /// `kubernetes`: reviews of unknown tokens that may happen at once after a quiet while.
    pub review_burst: u32,
    /// `kubernetes`: reviews in flight at once (on their own connections, apart from the
    /// RemediationRequest writes).
    pub max_concurrent_reviews: usize,
    /// `kubernetes`: the permission a sender needs (SubjectAccessReview resource attributes).
    pub authorization: AccessAttributes,
}

/// SubjectAccessReview resource attributes. The default (create on the Service
/// `gateway-service` in the gateway's namespace) is what Kubernaut's chart grants its senders
/// (ClusterRole `gateway-signal-source`), so they need no new RBAC.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AccessAttributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    /// Empty: the gateway's namespace.
    pub namespace: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Scope {
    /// Only act on targets opted in with the label `kubernaut.ai/managed=true` (on the target
    /// or its namespace; `kubernaut.ai/managed=false` on the target opts it out).
    pub require_managed_label: bool,
    /// How long a label read is remembered.
    #[serde(rename = "cacheTTL", with = "friendly_duration")]
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Freshness {
    /// Signals timestamped further than this in the future are rejected (`future_timestamp`).
    #[serde(with = "friendly_duration")]
    pub max_future_skew: Duration,
    /// Signals older than this are rejected (`stale_signal`); `0s` turns the check off.
    #[serde(with = "friendly_duration")]
    pub max_age: Duration,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            mode: AuthMode::Kubernetes,
            tokens_file: None,
            cache_ttl: Duration::from_secs(30),
            negative_cache_ttl: Duration::from_secs(5),
            audiences: Vec::new(),
            review_rate: 20,
            review_burst: 40,
            max_concurrent_reviews: 4,
            authorization: AccessAttributes::default(),
        }
    }
}

impl Default for AccessAttributes {
    fn default() -> Self {
        AccessAttributes {
            verb: "create".into(),
            group: String::new(),
            resource: "services".into(),
            subresource: String::new(),
            name: "gateway-service".into(),
            namespace: String::new(),
        }
    }
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            require_managed_label: false,
            cache_ttl: Duration::from_secs(30),
        }
    }
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            max_future_skew: Duration::from_secs(300),
            max_age: Duration::ZERO,
        }
    }
}

/// The audit trail to Kubernaut's DataStorage (src/audit/, docs/audit.md). Off while `url` is empty.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Audit {
    /// DataStorage base URL (`/api/v1/audit/events/batch` is appended); empty: no audit trail.
    pub url: String,
    /// Bearer token sent to DataStorage, re-read for every batch (the projected token rotates).
    pub token_file: std::path::PathBuf,
    /// CA bundle (PEM) DataStorage's certificate must chain to; empty: the system's roots.
    pub ca_file: String,
    /// Most events held (waiting or in flight); a full buffer refuses the newest.
    pub buffer_size: usize,
    /// Most bytes of event text held (waiting or in flight); the memory bound.
    pub buffer_bytes: usize,
    /// Most events in one batch.
    pub batch_size: usize,
    /// A partial batch goes out this long after its oldest event was recorded.
    #[serde(with = "friendly_duration")]
    pub flush_interval: Duration,
    /// Retries of a batch answered 5xx/408/429, timed out or not connected, before it is dropped.
    pub max_retries: u32,
    /// First retry delay (jittered, doubling up to 30 s).
    #[serde(with = "friendly_duration")]
    pub retry_backoff: Duration,
    /// Time one batch request may take.
    #[serde(with = "friendly_duration")]
    pub timeout: Duration,
    /// DataStorage readiness URL; when set, `/readyz` also needs it to answer 2xx.
    #[serde(rename = "healthURL")]
    pub health_url: String,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            url: String::new(),
            token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            ca_file: String::new(),
            buffer_size: 10_000,
            buffer_bytes: 32 * 1024 * 1024,
            batch_size: 100,
            flush_interval: Duration::from_secs(1),
            max_retries: 8,
            retry_backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
            health_url: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Kubernetes when a cluster is configured (in-cluster or kubeconfig), else embedded.
    #[default]
    Auto,
    Embedded,
    Kubernetes,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Backend {
    pub kind: BackendKind,
    /// Namespace of RemediationRequests and Leases; default POD_NAMESPACE.
    pub namespace: Option<String>,
    /// Prefixes fingerprints and fills spec.clusterID when set.
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    /// Per-request timeout of Kubernetes API calls.
    #[serde(with = "friendly_duration")]
    pub api_timeout: Duration,
    /// Most Kubernetes API requests in flight per replica; more wait in the replica. The kube
    /// client speaks HTTP/1.1, so this also bounds its connections to the API server.
    pub max_concurrent_requests: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Lock {
    #[serde(with = "friendly_duration")]
    pub lease_duration: Duration,
    #[serde(with = "friendly_duration")]
    pub backoff_initial: Duration,
    #[serde(with = "friendly_duration")]
    pub backoff_max: Duration,
}

/// Fingerprint ownership among the replicas (ADR 0014).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Ownership {
    /// Own shards of the fingerprints through member Leases and forward signals to their owner.
    pub enabled: bool,
    /// Member Lease duration: a crashed replica's shards move after it (renewed every third).
    #[serde(with = "friendly_duration")]
    pub lease_duration: Duration,
    /// Number of shards the fingerprints fall into (the same on every replica).
    pub shards: u32,
    /// Where peers reach this replica's signals port (`http://host:port`); empty:
    /// `http://<POD_IP>:<signals port>` (127.0.0.1 without POD_IP).
    pub advertise_address: String,
    /// Forwards in flight at once; beyond, signals take the local path.
    pub max_forwards_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Dedup {
    pub strategy: Strategy,
    /// Most signals of one fingerprint stored by one write.
    pub max_batch: usize,
    /// Watch the namespace's RemediationRequests to keep duplicate hints fresh (optimistic only).
    pub watch: bool,
    /// After a status-update conflict, how long to wait for the watch to deliver the newer
    /// version before reading it from the API server.
    #[serde(with = "friendly_duration")]
    pub watch_wait: Duration,
    /// Group commit: how long a hot fingerprint's batch may wait for more signals before its write.
    #[serde(with = "friendly_duration")]
    pub linger: Duration,
    /// How long a batch that only counts into a known active RR may wait for more signals of its
    /// incident, when that incident's signals overlap (ADR 0016); zero: like any other batch.
    #[serde(with = "friendly_duration")]
    pub count_linger: Duration,
    /// A batch in its count linger is written as soon as it holds this many signals (once the
    /// hot linger has passed).
    pub flush_at: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OwnerResolution {
    pub enabled: bool,
    pub max_depth: usize,
    #[serde(rename = "cacheTTL", with = "friendly_duration")]
    pub cache_ttl: Duration,
    /// The watch-fed cache of the controller owners of the kinds resolution reads.
    pub metadata_cache: MetadataCache,
}

/// Metadata-only watches of the kinds owner resolution reads ([`crate::ownercache`]): their
/// objects' controller owners are answered from memory, with no read per signal.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MetadataCache {
    pub enabled: bool,
    /// Kinds watched (cluster-wide) besides Pods: `ReplicaSet`, `Job` (the kinds whose owner
    /// resolution reads; a Deployment, StatefulSet, DaemonSet or CronJob is the top of its chain
    /// and never read).
    pub kinds: Vec<String>,
    /// Also watch every Pod (many objects that change often; off by default).
    pub pods: bool,
    /// Most objects held, over all kinds (least recently used forgotten first: a forgotten
    /// object is read as without the cache).
    pub max_objects: usize,
    /// Most bytes held, over all kinds, as counted by `gateway_owner_cache_bytes`.
    pub max_bytes: usize,
}

impl Default for MetadataCache {
    fn default() -> Self {
        MetadataCache {
            enabled: true,
            kinds: vec!["ReplicaSet".into(), "Job".into()],
            pods: false,
            max_objects: 100_000,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

impl MetadataCache {
    /// The kinds to watch (Pod first when `pods`), each once, or why one cannot be.
    pub fn watched_kinds(&self) -> anyhow::Result<Vec<&'static str>> {
        let mut kinds: Vec<&'static str> = Vec::new();
        if self.pods {
            kinds.push("Pod");
        }
        for kind in &self.kinds {
            let Some(&known) = crate::ownercache::WATCHABLE
                .iter()
                .find(|k| **k != "Pod" && k.eq_ignore_ascii_case(kind))
            else {
                anyhow::bail!(
                    "ownerResolution.metadataCache.kinds: {kind:?} cannot be watched: owner resolution reads only {} (Pods: set pods: true); a Deployment, StatefulSet, DaemonSet or CronJob is the top of its chain and never read",
                    crate::ownercache::WATCHABLE
                        .iter()
                        .filter(|k| **k != "Pod")
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            if !kinds.contains(&known) {
                kinds.push(known);
            }
        }
        Ok(kinds)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Logging {
    pub format: LogFormat,
    /// `tracing` filter directive; RUST_LOG overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Tracing {
    /// OTLP/HTTP base URL (`/v1/traces` is appended); empty: off unless OTEL_EXPORTER_OTLP_ENDPOINT is set.
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Lease holder identity (POD_NAME).
    pub pod_name: String,
    /// POD_NAMESPACE, the default namespace for RRs and Leases.
    pub pod_namespace: String,
    /// POD_IP (the forwarding address peers use; may be empty).
    pub pod_ip: String,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin_listen: ([0, 0, 0, 0], 9090).into(),
            max_body_bytes: 1024 * 1024,
            max_in_flight: 4096,
            max_buffered_body_bytes: 32 * 1024 * 1024,
            request_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(20),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            write_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            kind: BackendKind::Auto,
            namespace: None,
            cluster_id: String::new(),
            api_timeout: Duration::from_secs(4),
            max_concurrent_requests: 32,
        }
    }
}

impl Default for Lock {
    fn default() -> Self {
        Lock {
            lease_duration: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
        }
    }
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup {
            strategy: Strategy::Optimistic,
            max_batch: 1000,
            watch: true,
            watch_wait: Duration::from_millis(30),
            linger: Duration::from_millis(25),
            count_linger: Duration::from_millis(250),
            flush_at: 8,
        }
    }
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            enabled: false,
            lease_duration: Duration::from_secs(15),
            shards: 64,
            advertise_address: String::new(),
            max_forwards_in_flight: 256,
        }
    }
}

impl Default for OwnerResolution {
    fn default() -> Self {
        OwnerResolution {
            enabled: true,
            max_depth: 5,
            cache_ttl: Duration::from_secs(30),
            metadata_cache: MetadataCache::default(),
        }
    }
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: Server::default(),
            backend: Backend::default(),
            lock: Lock::default(),
            dedup: Dedup::default(),
            owner_resolution: OwnerResolution::default(),
            logging: Logging::default(),
            tracing: Tracing::default(),
            auth: Auth::default(),
            scope: Scope::default(),
            freshness: Freshness::default(),
            audit: Audit::default(),
            ownership: Ownership::default(),
            identity: Identity {
                pod_name: "signal-gateway".into(),
                pod_namespace: "default".into(),
                pod_ip: String::new(),
            },
        }
    }
}

impl Config {
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Self::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Namespace of RRs and Leases.
    pub fn namespace(&self) -> &str {
        self.backend
            .namespace
            .as_deref()
            .unwrap_or(&self.identity.pod_namespace)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.lock.lease_duration >= Duration::from_secs(3),
            "lock.leaseDuration must be at least 3s"
        );
        anyhow::ensure!(
            self.lock.lease_duration > self.backend.api_timeout + Duration::from_secs(1),
            "lock.leaseDuration ({:?}) must exceed backend.apiTimeout + 1s ({:?}): a create under the lock must complete before the lock can be taken over",
            self.lock.lease_duration,
            self.backend.api_timeout + Duration::from_secs(1)
        );
        anyhow::ensure!(
            self.server.request_timeout > Duration::ZERO,
            "server.requestTimeout must be positive"
        );
        if self.ownership.enabled {
            let grace = self.backend.api_timeout + Duration::from_secs(1);
            anyhow::ensure!(
                self.ownership.lease_duration > grace * 2,
                "ownership.leaseDuration ({:?}) must exceed twice backend.apiTimeout + 1s ({:?}): an owner's create must land while its ownership is valid",
                self.ownership.lease_duration,
                grace * 2
            );
            anyhow::ensure!(
                (1..=4096).contains(&self.ownership.shards),
                "ownership.shards must be between 1 and 4096"
            );
            anyhow::ensure!(
                self.ownership.max_forwards_in_flight > 0,
                "ownership.maxForwardsInFlight must be positive"
            );
            // Forwards go to the peer's signals port, which speaks TLS when server.tls is set.
            let a = &self.ownership.advertise_address;
            let scheme = if self.server.tls.is_some() {
                "https://"
            } else {
                "http://"
            };
            anyhow::ensure!(
                a.is_empty() || a.starts_with(scheme),
                "ownership.advertiseAddress must be an {scheme} URL (the signals port, {} server.tls)",
                if self.server.tls.is_some() { "with" } else { "without" }
            );
        }
        anyhow::ensure!(self.server.max_in_flight > 0, "server.maxInFlight must be positive");
        anyhow::ensure!(self.dedup.max_batch > 0, "dedup.maxBatch must be positive");
        anyhow::ensure!(self.dedup.flush_at > 0, "dedup.flushAt must be positive");
        anyhow::ensure!(
            self.dedup.linger < self.server.request_timeout / 2,
            "dedup.linger must be less than half of server.requestTimeout"
        );
        anyhow::ensure!(
            self.server.max_body_bytes >= 1024,
            "server.maxBodyBytes must be at least 1024"
        );
        anyhow::ensure!(
            self.server.max_buffered_body_bytes >= self.server.max_body_bytes,
            "server.maxBufferedBodyBytes must be at least server.maxBodyBytes"
        );
        anyhow::ensure!(
            crate::signal::is_valid_namespace(self.namespace()),
            "namespace {:?} is not a valid namespace name",
            self.namespace()
        );
        anyhow::ensure!(
            self.server.max_header_bytes >= 1024 && self.server.max_headers >= 8,
            "server.maxHeaderBytes must be at least 1024 and server.maxHeaders at least 8"
        );
        anyhow::ensure!(
            self.server.header_read_timeout > Duration::ZERO
                && self.server.body_read_timeout > Duration::ZERO
                && self.server.write_timeout > Duration::ZERO,
            "server.headerReadTimeout, server.bodyReadTimeout and server.writeTimeout must be positive"
        );
        anyhow::ensure!(
            self.server.max_connections > 0,
            "server.maxConnections must be positive"
        );
        match self.auth.mode {
            AuthMode::Static => anyhow::ensure!(
                self.auth.tokens_file.is_some(),
                "auth.mode static needs auth.tokensFile"
            ),
            AuthMode::Kubernetes => {
                anyhow::ensure!(
                    !self.auth.authorization.verb.is_empty() && !self.auth.authorization.resource.is_empty(),
                    "auth.authorization needs a verb and a resource"
                );
                anyhow::ensure!(
                    self.auth.review_rate > 0 && self.auth.review_burst > 0 && self.auth.max_concurrent_reviews > 0,
                    "auth.reviewRate, auth.reviewBurst and auth.maxConcurrentReviews must be positive"
                );
            }
            AuthMode::None => {}
        }
        if !self.audit.url.is_empty() {
            let a = &self.audit;
            anyhow::ensure!(
                a.url.starts_with("http://") || a.url.starts_with("https://"),
                "audit.url must be an http:// or https:// URL"
            );
            anyhow::ensure!(
                a.health_url.is_empty() || a.health_url.starts_with("http://") || a.health_url.starts_with("https://"),
                "audit.healthURL must be an http:// or https:// URL"
            );
            anyhow::ensure!(
                a.buffer_size > 0 && a.batch_size > 0 && a.batch_size <= a.buffer_size,
                "audit.bufferSize and audit.batchSize must be positive, the batch no larger than the buffer"
            );
            anyhow::ensure!(a.buffer_bytes >= 64 * 1024, "audit.bufferBytes must be at least 65536");
            anyhow::ensure!(
                a.flush_interval > Duration::ZERO && a.timeout > Duration::ZERO && a.retry_backoff > Duration::ZERO,
                "audit.flushInterval, audit.timeout and audit.retryBackoff must be positive"
            );
        }
        let cache = &self.owner_resolution.metadata_cache;
        if cache.enabled {
            cache.watched_kinds()?;
            anyhow::ensure!(
                cache.max_objects > 0 && cache.max_bytes >= 64 * 1024,
                "ownerResolution.metadataCache.maxObjects must be positive and maxBytes at least 65536"
            );
        }
        anyhow::ensure!(
            !self.identity.pod_name.is_empty(),
            "the pod name (POD_NAME) must not be empty"
        );
        Ok(())
    }
}

/// Parses a duration in jiff's friendly format (`250ms`, `30s`, `1m30s`, `1.5s`, `2 hours`) or
/// ISO 8601 (`PT30S`); never negative.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let signed: jiff::SignedDuration = s
        .trim()
        .parse()
        .map_err(|e| format!("invalid duration {s:?} (write it like 250ms, 30s or 1m30s): {e}"))?;
    Duration::try_from(signed).map_err(|_| format!("invalid duration {s:?}: must not be negative"))
}

/// Durations in the file: jiff's friendly format (or ISO 8601) in, friendly compact out.
mod friendly_duration {
    pub use jiff::fmt::serde::unsigned_duration::friendly::compact::required::{deserialize, serialize};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = Config::from_yaml("dedup:\n  strategy: optimistic\n  maxBatchh: 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("maxBatchh"), "{err}");
        let err = Config::from_yaml("serverr: {}\n").unwrap_err().to_string();
        assert!(err.contains("serverr"), "{err}");
    }

    #[test]
    fn every_section_parses_with_durations_and_strategy() {
        let c = Config::from_yaml(
            "server:\n  listen: 127.0.0.1:1\n  requestTimeout: 250ms\nlock:\n  leaseDuration: 1m\ndedup:\n  strategy: always-lock\nbackend:\n  kind: embedded\n  clusterID: east\n",
        )
        .unwrap();
        assert_eq!(c.server.request_timeout, Duration::from_millis(250));
        assert_eq!(c.lock.lease_duration, Duration::from_secs(60));
        assert_eq!(c.dedup.strategy, Strategy::AlwaysLock);
        assert_eq!(c.backend.kind, BackendKind::Embedded);
        assert_eq!(c.backend.cluster_id, "east");
        assert_eq!(c.server.max_body_bytes, 1024 * 1024, "unset keys keep defaults");
    }

    #[test]
    fn durations_take_several_units_and_survive_a_round_trip() {
        let c = Config::from_yaml(
            "lock:\n  leaseDuration: 1m30s\nserver:\n  requestTimeout: 1.5s\n  shutdownTimeout: 20 seconds\n",
        )
        .unwrap();
        assert_eq!(c.lock.lease_duration, Duration::from_secs(90));
        assert_eq!(c.server.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(parse_duration("2h5m"), Ok(Duration::from_secs(7500)));
        let text = serde_saphyr::to_string(&c).unwrap();
        let again = Config::from_yaml(&text).unwrap();
        assert_eq!(again.lock.lease_duration, c.lock.lease_duration, "{text}");
        assert_eq!(again.server.request_timeout, c.server.request_timeout, "{text}");
        assert!(
            text.contains("leaseDuration: 1m 30s") || text.contains("leaseDuration: 1m30s"),
            "{text}"
        );
    }

    #[test]
    fn the_metadata_cache_watches_only_kinds_whose_owner_resolution_reads() {
        let c = Config::default();
        assert_eq!(
            c.owner_resolution.metadata_cache.watched_kinds().unwrap(),
            ["ReplicaSet", "Job"]
        );
        let c = Config::from_yaml(
            "ownerResolution:\n  metadataCache:\n    pods: true\n    kinds: [replicaset, ReplicaSet]\n",
        )
        .unwrap();
        assert_eq!(
            c.owner_resolution.metadata_cache.watched_kinds().unwrap(),
            ["Pod", "ReplicaSet"]
        );
        let c = Config::from_yaml("ownerResolution:\n  metadataCache:\n    kinds: [Deployment]\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("\"Deployment\"") && err.contains("never read"), "{err}");
        let off =
            Config::from_yaml("ownerResolution:\n  metadataCache:\n    enabled: false\n    kinds: [Deployment]\n")
                .unwrap();
        assert!(off.validate().is_ok(), "a cache that is off watches nothing");
    }

    #[test]
    fn bad_values_are_explained() {
        let err = Config::from_yaml("lock:\n  leaseDuration: 30\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaseDuration") && err.contains("unit"), "{err}");
        assert!(parse_duration("-5s").is_err(), "durations are never negative");
        let err = Config::from_yaml("dedup:\n  strategy: sometimes\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
        let err = Config::from_yaml("dedup:\n  flushAt: 0\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("dedup.flushAt"), "{err}");
    }

    #[test]
    fn the_count_linger_and_its_flush_size_are_read() {
        let c = Config::from_yaml("dedup:\n  countLinger: 400ms\n  flushAt: 12\n").unwrap();
        assert_eq!(c.dedup.count_linger, Duration::from_millis(400));
        assert_eq!(c.dedup.flush_at, 12);
        let d = Config::from_yaml("dedup:\n  countLinger: 0ms\n").unwrap();
        assert_eq!(d.dedup.count_linger, Duration::ZERO, "0ms turns it off");
    }

    #[test]
    fn ownership_forwards_to_an_address_with_the_signals_port_s_scheme() {
        let mut c = Config::default();
        c.ownership.enabled = true;
        c.validate().unwrap();
        for (tls, address, ok) in [
            (false, "http://10.0.0.1:8080", true),
            (false, "https://10.0.0.1:8080", false),
            (true, "https://10.0.0.1:8443", true),
            (true, "http://10.0.0.1:8443", false),
            (true, "", true),
        ] {
            c.server.tls = tls.then(|| Tls {
                cert_file: "tls.crt".into(),
                key_file: "tls.key".into(),
            });
            c.ownership.advertise_address = address.into();
            assert_eq!(c.validate().is_ok(), ok, "tls {tls}, {address:?}");
        }
    }
}
