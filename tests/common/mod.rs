//! Test harness: a whole gateway in-process on port 0 (embedded store or any `Cluster`), plus
//! payload builders and a poll-with-deadline helper. Nothing here sleeps to "wait for" things.
#![allow(dead_code)]

pub mod contract;
pub mod datastorage;
pub mod testenv;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::clock::{SharedClock, SystemClock};
use signal_gateway::cluster::Cluster;
use signal_gateway::config::Config;
use signal_gateway::{Deps, Listeners};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Gateway {
    pub base: String,
    pub admin: String,
    pub store: Option<Arc<EmbeddedStore>>,
    pub client: reqwest::Client,
    pub namespace: String,
    /// How long the gateway keeps an idle connection open (`server.headerReadTimeout`).
    keep_alive: Duration,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn test_config() -> Config {
    let mut c = Config::default();
    c.identity.pod_name = "gw-test".into();
    c.identity.pod_namespace = "signals".into();
    // Authentication has its own tests (tests/auth.rs); elsewhere anyone may send.
    c.auth.mode = signal_gateway::config::AuthMode::None;
    c
}

/// An HTTP client for gateways that keep idle connections open for `keep_alive`
/// (`server.headerReadTimeout`): it reuses a pooled connection only
/// [`within`](signal_gateway::http::server::reuse_within) that, never as the gateway closes it.
/// A request sent on a connection the server is closing is cut off (a reset or an incomplete
/// message), a transport error no answer of the gateway caused.
pub fn client_within(keep_alive: Duration) -> reqwest::Client {
    builder_within(keep_alive).build().unwrap()
}

/// The builder of [`client_within`], for clients that need more (TLS settings).
fn builder_within(keep_alive: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(signal_gateway::http::server::reuse_within(keep_alive))
}

/// How long a client of gateways with the default `server.headerReadTimeout` may keep a
/// connection idle (also well within any limit of the Prometheus, Alertmanager and API-server
/// processes the tests talk to).
pub fn default_reuse() -> Duration {
    signal_gateway::http::server::reuse_within(Config::default().server.header_read_timeout)
}

/// [`client_within`] the default keep-alive limit of gateways.
pub fn client() -> reqwest::Client {
    client_within(Config::default().server.header_read_timeout)
}

impl Gateway {
    /// A gateway on a fresh embedded store.
    pub async fn embedded(config: Config) -> Self {
        let clock: SharedClock = Arc::new(SystemClock);
        Self::start(Deps::embedded(clock), config).await
    }

    /// A gateway on `cluster` (a wrapper around an embedded store, for fault injection).
    pub async fn on(cluster: Arc<dyn Cluster>, store: Option<Arc<EmbeddedStore>>, config: Config) -> Self {
        Self::start(Deps::on(cluster, store, Arc::new(SystemClock)), config).await
    }

    pub async fn start(deps: Deps, config: Config) -> Self {
        let signals = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", signals.local_addr().unwrap());
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let store = deps.embedded.clone();
        let namespace = config.namespace().to_owned();
        let keep_alive = config.server.header_read_timeout;
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(signal_gateway::serve(
            deps,
            config,
            Listeners { signals, admin },
            async move {
                let _ = rx.await;
            },
        ));
        let client = client_within(keep_alive);
        Gateway {
            base,
            admin: admin_url,
            store,
            client,
            namespace,
            keep_alive,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn store(&self) -> &EmbeddedStore {
        self.store.as_deref().expect("embedded gateway")
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, HeaderMap, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, value)
    }

    pub async fn alerts(&self, body: &Value) -> (StatusCode, HeaderMap, Value) {
        self.post("/api/v1/signals/prometheus", "application/json", body.to_string())
            .await
    }

    pub async fn event(&self, body: &Value) -> (StatusCode, HeaderMap, Value) {
        self.post("/api/v1/signals/kubernetes-event", "application/json", body.to_string())
            .await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sum of every sample of `name` whose labels contain all of `labels` (`k="v"` strings).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }

    /// The same gateway addressed over TLS (started with `server.tls`): both ports speak HTTPS,
    /// and the client takes any certificate (tests make their own, self-signed), pooling as
    /// [`client_within`] does.
    pub fn over_tls(mut self) -> Self {
        self.base = self.base.replace("http://", "https://");
        self.admin = self.admin.replace("http://", "https://");
        self.client = builder_within(self.keep_alive)
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        self
    }

    /// Stops the gateway (graceful shutdown) and returns what `serve` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.take().unwrap().send(());
        self.handle.take().unwrap().await.unwrap()
    }
}

/// A fresh directory under the system's temp dir, `sg-<tag>-<pid>-<random>`.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sg-{tag}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A self-signed certificate for 127.0.0.1 and its key, `<dir>/<tag>.crt` and `<dir>/<tag>.key`,
/// made with the openssl CLI.
pub fn self_signed_cert(dir: &std::path::Path, tag: &str) -> signal_gateway::config::Tls {
    let (cert, key) = (dir.join(format!("{tag}.crt")), dir.join(format!("{tag}.key")));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args([
            "-days",
            "2",
            "-subj",
            &format!("/CN={tag}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    signal_gateway::config::Tls {
        cert_file: cert,
        key_file: key,
    }
}

pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let metric = l.split_whitespace().next().unwrap_or("");
            let base = metric.split('{').next().unwrap_or("");
            base == name && labels.iter().all(|want| metric.contains(want))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// One firing alert about a pod.
pub fn pod_alert(namespace: &str, pod: &str) -> Value {
    json!({
        "status": "firing",
        "labels": {"alertname": "KubePodCrashLooping", "namespace": namespace, "pod": pod, "severity": "critical"},
        "annotations": {"summary": "Pod is crash looping"},
        "startsAt": "2026-11-24T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": "0123456789abcdef"
    })
}

/// An Alertmanager v4 webhook body with `alerts`.
pub fn webhook(alerts: Vec<Value>) -> Value {
    json!({
        "version": "4", "groupKey": "{}:{alertname=\"KubePodCrashLooping\"}", "truncatedAlerts": 0,
        "status": "firing", "receiver": "signal-gateway", "groupLabels": {"alertname": "KubePodCrashLooping"},
        "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
        "alerts": alerts
    })
}

pub fn fixture(name: &str) -> String {
    let local = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let shared = format!("{}/tests/fixtures/alertmanager-0.25/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&local)
        .or_else(|_| std::fs::read_to_string(&shared))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Polls `check` until it returns Some or `within` passes (then panics with `what`).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// occurrenceCount of a stored RR.
pub fn count_of(rr: &signal_gateway::crd::RemediationRequest) -> i64 {
    i64::from(rr.occurrence_count())
}

/// An object reference as Kubernaut's controllers write them (every field set).
fn object_ref(kind: &str, name: &str) -> Value {
    json!({
        "apiVersion": "kubernaut.ai/v1alpha1", "kind": kind, "name": name, "namespace": "kubernaut-system",
        "uid": "5b0c3f2e-6a1d-4c1e-9f00-0123456789ab", "resourceVersion": "4711", "fieldPath": "spec",
    })
}

/// A status with every field the orchestrator and its fellow controllers own set, as they write
/// them (KUBERNAUT.md, "Status fields owned by others"; tests/kubernaut_contract.rs checks that
/// it covers every such path of Kubernaut's schema). The phase is active: signals count into it.
pub fn orchestrator_status() -> Value {
    json!({
        "observedGeneration": 2,
        "overallPhase": "Executing",
        "message": "executing workflow restart-deployment",
        "startTime": "2026-11-24T10:00:05Z",
        "completedAt": "2026-11-24T10:30:00Z",
        "retentionExpiryTime": "2026-11-25T10:00:00Z",
        "conditions": [{
            "type": "WorkflowExecuting", "status": "True", "observedGeneration": 2,
            "lastTransitionTime": "2026-11-24T10:02:00Z", "reason": "WorkflowStarted", "message": "restart-deployment started",
        }],
        "phaseProgress": {
            "signalProcessingRef": object_ref("SignalProcessing", "sp-1"),
            "remediationProcessingRef": object_ref("RemediationProcessing", "rp-1"),
            "aiAnalysisRef": object_ref("AIAnalysis", "ai-1"),
            "workflowExecutionRef": object_ref("WorkflowExecution", "we-1"),
            "currentProcessingRef": object_ref("WorkflowExecution", "we-1"),
            "effectivenessAssessmentRef": object_ref("EffectivenessAssessment", "ea-1"),
            "processingStartTime": "2026-11-24T10:00:06Z",
            "analyzingStartTime": "2026-11-24T10:00:30Z",
            "executingStartTime": "2026-11-24T10:02:00Z",
            "verificationDeadline": "2026-11-24T10:40:00Z",
        },
        "routingStatus": {
            "duplicateOf": "rr-older-1", "duplicateCount": 3, "duplicateRefs": ["rr-dup-1", "rr-dup-2"],
            "blockReason": "ConsecutiveFailures", "blockMessage": "blocked after 3 failures",
            "blockedUntil": "2026-11-24T11:00:00Z", "blockingWorkflowExecution": "we-0",
            "nextAllowedExecution": "2026-11-24T11:30:00Z", "consecutiveFailureCount": 1,
            "deduplicatedByWE": "we-0", "skipReason": "RecentlyRemediated", "skipMessage": "remediated 5 minutes ago",
        },
        "completionStatus": {
            "outcome": "Inconclusive", "requiresManualReview": false, "approvalNotificationSent": true,
            "failurePhase": "Executing", "failureReason": "timeout waiting for rollout", "timeoutPhase": "Verifying",
            "timeoutTime": "2026-11-24T10:45:00Z", "notificationStatus": "Sent",
            "notificationRequestRefs": [object_ref("NotificationRequest", "nr-1")],
        },
        "operatorAudit": {
            "lastModifiedBy": "alice@example.com", "lastModifiedAt": "2026-11-24T10:10:00Z",
            "preRemediationSpecHash": "sha256:0f1e2d3c",
        },
        "timeoutConfig": {"global": "1h0m0s", "processing": "5m0s", "analyzing": "10m0s", "executing": "30m0s"},
        "workflowSelection": {
            "selectedWorkflowRef": {
                "workflowId": "restart-deployment", "version": "1.2.0",
                "executionBundle": "oci://registry.example/workflows/restart:1.2.0", "executionBundleDigest": "sha256:abcd",
            },
            "executionRef": object_ref("WorkflowExecution", "we-1"),
            "remediationTarget": {"kind": "Deployment", "name": "api", "namespace": "shop", "apiVersion": "apps/v1"},
            "confidence": "0.92", "signalTargetDisplay": "Pod shop/api-0", "targetDisplay": "Deployment shop/api",
            "workflowDisplayName": "Restart deployment",
        },
    })
}

/// The fingerprint of signals about Pod `pod` in `namespace` (no cluster id, no owner: the
/// tests' pods do not exist).
pub fn fp_of_pod(namespace: &str, pod: &str) -> String {
    signal_gateway::fingerprint::Fingerprint::of(
        "",
        &signal_gateway::crd::TargetResource {
            kind: "Pod".into(),
            name: pod.into(),
            namespace: namespace.into(),
            api_version: "v1".into(),
        },
    )
    .to_string()
}

/// The resident memory of process `pid` (this process: `None`), in bytes, from /proc.
pub fn rss_bytes(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(|| "/proc/self/status".to_owned(), |p| format!("/proc/{p}/status"));
    let status = std::fs::read_to_string(path).expect("the process runs");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}
