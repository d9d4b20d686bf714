//! Configuration: a strict YAML file (unknown keys are errors that name the key), overridden by
//! command-line flags. Every key is documented in docs/configuration.md.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// Time a signal may take until its outcome is stored; past it the answer is 503.
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub request_timeout: Duration,
    /// Drain deadline after SIGTERM; keep it below the pod's terminationGracePeriodSeconds.
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub api_timeout: Duration,
    /// Most Kubernetes API requests in flight per replica; more wait in the replica. The kube
    /// client speaks HTTP/1.1, so this also bounds its connections to the API server.
    pub max_concurrent_requests: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Lock {
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub lease_duration: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub backoff_initial: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub backoff_max: Duration,
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
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub watch_wait: Duration,
    /// Group commit: how long a hot fingerprint's batch may wait for more signals before its write.
    #[serde(deserialize_with = "duration", serialize_with = "format_duration")]
    pub linger: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OwnerResolution {
    pub enabled: bool,
    pub max_depth: usize,
    #[serde(
        rename = "cacheTTL",
        deserialize_with = "duration",
        serialize_with = "format_duration"
    )]
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin_listen: ([0, 0, 0, 0], 9090).into(),
            max_body_bytes: 1024 * 1024,
            max_in_flight: 4096,
            request_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(20),
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
        }
    }
}

impl Default for OwnerResolution {
    fn default() -> Self {
        OwnerResolution {
            enabled: true,
            max_depth: 5,
            cache_ttl: Duration::from_secs(30),
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
            identity: Identity {
                pod_name: "signal-gateway".into(),
                pod_namespace: "default".into(),
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
            self.server.request_timeout > Duration::ZERO,
            "server.requestTimeout must be positive"
        );
        anyhow::ensure!(self.server.max_in_flight > 0, "server.maxInFlight must be positive");
        anyhow::ensure!(self.dedup.max_batch > 0, "dedup.maxBatch must be positive");
        anyhow::ensure!(
            self.dedup.linger < self.server.request_timeout / 2,
            "dedup.linger must be less than half of server.requestTimeout"
        );
        anyhow::ensure!(
            self.server.max_body_bytes >= 1024,
            "server.maxBodyBytes must be at least 1024"
        );
        anyhow::ensure!(
            crate::signal::is_valid_namespace(self.namespace()),
            "namespace {:?} is not a valid namespace name",
            self.namespace()
        );
        anyhow::ensure!(
            !self.identity.pod_name.is_empty(),
            "the pod name (POD_NAME) must not be empty"
        );
        Ok(())
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h` (one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("invalid duration unit in {s:?}; use ms, s, m or h")),
    })
}

fn format_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    let ms = d.as_millis();
    let text = if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    };
    s.serialize_str(&text)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
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
    fn bad_values_are_explained() {
        let err = Config::from_yaml("lock:\n  leaseDuration: 30\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a unit"), "{err}");
        let err = Config::from_yaml("dedup:\n  strategy: sometimes\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
    }
}
