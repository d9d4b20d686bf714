//! The port between the domain (dedup, lock, owner resolution) and the Kubernetes API.
//!
//! Each method is exactly one API request, so counting calls at this boundary counts API
//! requests. Two adapters implement it: `backend::kubernetes` (kube-rs against a real API server)
//! and `backend::embedded` (an in-process store with the same semantics). The shared contract
//! tests in `tests/contract.rs` hold both to the same behaviour.
//!
//! Every request made on behalf of signals carries a [`Call`]: the latest moment it may still be
//! sent, and the [`Tally`] its signals' "API requests per signal" count it into. Both travel as
//! arguments, so a method's signature shows what bounds and counts it; adapters that neither
//! queue nor count ignore them.
//!
//! Only [`ApiError::NotFound`] means absence; every other error is an error.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{Deduplication, RemediationRequest};

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// What the API server (or the embedded store) answered, reduced to what callers decide on.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    /// resourceVersion precondition failed (optimistic concurrency).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("throttled by the API server")]
    Throttled { retry_after: Option<Duration> },
    #[error("the API server rejected the object: {0}")]
    Invalid(String),
    #[error("request timed out")]
    Timeout,
    /// Transport errors, 5xx, API server unreachable.
    #[error("API server unavailable: {0}")]
    Unavailable(String),
    /// The request waited for an API request slot until its send deadline and was never sent.
    #[error("no API request slot before the deadline; not sent")]
    NotSent,
}

/// API requests made for one piece of work (a batch, an owner resolution), counted where they
/// cross the port (the metering decorator, one per request sent).
#[derive(Debug, Default)]
pub struct Tally(AtomicU32);

impl Tally {
    pub fn new() -> Self {
        Tally::default()
    }

    /// The requests counted so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    fn add_one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one request carries across the port besides its arguments.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The latest moment the request may still be sent: a request that waits for an API request
    /// slot until then is not sent at all ([`ApiError::NotSent`], certainly not stored); one that
    /// got a slot is sent at once and answered, never abandoned while queued-then-sent late.
    /// `None`: it waits for a slot as long as it takes.
    send_by: Option<tokio::time::Instant>,
    /// Where the request is counted; `None` for background work no signal pays for (membership,
    /// renewals, sweeps, the contract tests).
    tally: Option<&'a Tally>,
}

impl Call<'static> {
    /// Neither bounded nor counted.
    pub const UNCOUNTED: Call<'static> = Call {
        send_by: None,
        tally: None,
    };
}

impl<'a> Call<'a> {
    /// Counted into `tally`, waiting for a slot as long as it takes.
    pub fn counted(tally: &'a Tally) -> Self {
        Call {
            send_by: None,
            tally: Some(tally),
        }
    }

    /// The same call, sent only if it can be sent by `by`.
    pub fn send_by(self, by: tokio::time::Instant) -> Self {
        Call {
            send_by: Some(by),
            ..self
        }
    }

    pub fn send_deadline(&self) -> Option<tokio::time::Instant> {
        self.send_by
    }

    /// Counts one request sent (the metering decorator calls this once per request).
    pub fn count(&self) {
        if let Some(tally) = self.tally {
            tally.add_one();
        }
    }
}

impl ApiError {
    /// The HTTP status the API server answered, as used in the `code` metric label
    /// (`<error>` for transport failures, like client-go).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound => "404",
            ApiError::AlreadyExists | ApiError::Conflict(_) => "409",
            ApiError::Forbidden(_) => "403",
            ApiError::Throttled { .. } => "429",
            ApiError::Invalid(_) => "422",
            ApiError::Timeout => "<timeout>",
            ApiError::Unavailable(_) => "<error>",
            ApiError::NotSent => "<not_sent>",
        }
    }
}

/// A reference to an object whose metadata the owner resolver or the scope check reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    /// The resource (plural) the API server serves the kind as, from discovery
    /// ([`crate::discovery`]); empty: the lowercase kind plus `s`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// The (cluster-scoped) Namespace `name`.
    pub fn namespace(name: &str) -> Self {
        ObjectRef {
            api_version: "v1".into(),
            kind: "Namespace".into(),
            resource: "namespaces".into(),
            namespace: String::new(),
            name: name.into(),
        }
    }

    /// The API group (`apps` of `apps/v1`, empty for the core group).
    pub fn group(&self) -> &str {
        self.api_version.split_once('/').map_or("", |(g, _)| g)
    }
}

/// A kind as the API server serves it (one entry of its discovery documents).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiKind {
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The resource (plural) in request paths.
    pub resource: String,
    pub namespaced: bool,
}

impl ApiKind {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// One item of a watch ([`Cluster::watch_requests`], [`Cluster::watch_metadata`]), shaped like
/// kube-runtime's watcher events: every (re)start is a complete list (`Init`, one `Listed` per
/// object, `Synced`), then changes in resourceVersion order.
#[derive(Debug, Clone)]
pub enum WatchEvent<T> {
    /// A (re)list begins; the `Listed` objects that follow up to `Synced` are all there are.
    Init,
    Listed(T),
    /// The list is complete; changes follow.
    Synced,
    /// Created or modified.
    Applied(T),
    /// Deleted (the object as last stored).
    Deleted(T),
}

/// An item of the RemediationRequest watch of one namespace.
pub type RequestEvent = WatchEvent<RemediationRequest>;
/// An item of a metadata-only watch of one kind: the objects' metadata, nothing else.
pub type MetadataEvent = WatchEvent<ObjectMeta>;
/// An item of a watch of Leases (the member Leases of shard ownership).
pub type LeaseEvent = WatchEvent<Lease>;

/// Verbs and resources as the API server names them; metric labels use these.
pub mod verb {
    pub const GET: &str = "get";
    pub const LIST: &str = "list";
    pub const CREATE: &str = "create";
    pub const UPDATE: &str = "update";
    pub const PATCH: &str = "patch";
    pub const DELETE: &str = "delete";
    pub const WATCH: &str = "watch";
}

pub const RR_RESOURCE: &str = "remediationrequests";
pub const RR_STATUS_RESOURCE: &str = "remediationrequests/status";
pub const LEASE_RESOURCE: &str = "leases";
/// The metric resource label of the discovery documents (`/api`, `/apis`).
pub const DISCOVERY_RESOURCE: &str = "discovery";

#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// `embedded` or `kubernetes`.
    fn backend_name(&self) -> &'static str;

    /// True when the adapter records API request metrics itself (the kube client layer);
    /// otherwise the port decorator records one request per call.
    fn counts_own_requests(&self) -> bool {
        false
    }

    /// RemediationRequests in `namespace` whose `spec.signalFingerprint` equals `fingerprint`,
    /// read fresh (server-side field selector, no cache).
    async fn list_requests(
        &self,
        call: Call<'_>,
        namespace: &str,
        fingerprint: &str,
    ) -> Result<Vec<RemediationRequest>>;
    async fn get_request(&self, call: Call<'_>, namespace: &str, name: &str) -> Result<RemediationRequest>;
    /// Creates the object (status is ignored, as with a status subresource).
    async fn create_request(&self, call: Call<'_>, rr: &RemediationRequest) -> Result<RemediationRequest>;
    /// Sets `status.deduplication` of RR `name` and nothing else — every other status field
    /// belongs to the orchestrator and stays as stored — conditioned on `resource_version` (a JSON
    /// merge patch of the status subresource carrying `metadata.resourceVersion`): Conflict unless
    /// the RR is still at that version. `resource_version` must not be empty.
    async fn update_deduplication(
        &self,
        call: Call<'_>,
        namespace: &str,
        name: &str,
        resource_version: &str,
        deduplication: &Deduplication,
    ) -> Result<RemediationRequest>;
    /// Watches every RemediationRequest in `namespace`: a list first, then changes. An error
    /// (the watch broke, or fell too far behind) is yielded; then the stream either restarts
    /// itself with a fresh list (`Init` ...) after a backoff, or ends and the caller starts a new
    /// one. A cache fed by it is a hint only, never a correctness decision (ADR 0007).
    fn watch_requests(&self, namespace: &str) -> BoxStream<'static, Result<RequestEvent>>;

    async fn create_lease(&self, call: Call<'_>, lease: &Lease) -> Result<Lease>;
    async fn get_lease(&self, call: Call<'_>, namespace: &str, name: &str) -> Result<Lease>;
    /// Leases in `namespace` carrying the label `key=value` (for the sweep of orphaned locks).
    async fn list_leases(&self, call: Call<'_>, namespace: &str, label: (&str, &str)) -> Result<Vec<Lease>>;
    /// Replaces the lease; fails with Conflict unless `metadata.resourceVersion` is current.
    /// Like the API server, an update of a lease that does not exist creates it.
    async fn update_lease(&self, call: Call<'_>, lease: &Lease) -> Result<Lease>;
    /// Deletes the lease only if its resourceVersion is still `resource_version`.
    async fn delete_lease(&self, call: Call<'_>, namespace: &str, name: &str, resource_version: &str) -> Result<()>;
    /// The Leases in `namespace` labelled `key=value`: a list first, then changes, restarted like
    /// [`Cluster::watch_requests`]. Tells shard ownership at once when another member joins,
    /// leaves or changes its claims (ADR 0014); its periodic rounds do not depend on it.
    fn watch_leases(&self, namespace: &str, label: (&str, &str)) -> BoxStream<'static, Result<LeaseEvent>>;

    /// Metadata of an arbitrary object (for the controller owner chain and the scope check).
    async fn get_metadata(&self, call: Call<'_>, object: &ObjectRef) -> Result<ObjectMeta>;
    /// Watches the metadata (only: `PartialObjectMetadata`) of every object of `kind` in every
    /// namespace: a list first, then changes, restarted like [`Cluster::watch_requests`] (an
    /// error is yielded; then the stream restarts itself with a fresh list after a backoff, or
    /// ends and the caller starts a new one). Feeds the owner cache ([`crate::ownercache`]).
    fn watch_metadata(&self, kind: &ApiKind) -> BoxStream<'static, Result<MetadataEvent>>;

    /// Every kind the API server serves, in its order of preference (groups, then the versions
    /// of each, preferred first): the core group (`core`) or all named groups. One request
    /// (aggregated discovery).
    async fn list_api_kinds(&self, call: Call<'_>, core: bool) -> Result<Vec<ApiKind>>;

    /// Whether the backend answers and serves the CRD with the permissions the gateway needs;
    /// the error names what is missing.
    async fn check_ready(&self, namespace: &str) -> std::result::Result<(), String>;
}

/// Metric resource label for an owner-resolution read.
pub fn resource_of_kind(kind: &str) -> &'static str {
    match kind {
        "Pod" => "pods",
        "ReplicaSet" => "replicasets",
        "Deployment" => "deployments",
        "StatefulSet" => "statefulsets",
        "DaemonSet" => "daemonsets",
        "Job" => "jobs",
        "CronJob" => "cronjobs",
        _ => "other",
    }
}
