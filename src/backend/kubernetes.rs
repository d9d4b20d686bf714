//! The kubernetes backend: the [`Cluster`] port on kube-rs. One method, one API request.
//! Reads that decide correctness are never served from a cache: lists carry no resourceVersion,
//! so the API server answers them from etcd (a consistent read).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use tokio::time::Instant;

use crate::backend::metered::ApiMetricsLayer;
use crate::cluster::{
    ApiError, ApiKind, Call, Cluster, LeaseEvent, MetadataEvent, ObjectRef, RequestEvent, Result, WatchEvent,
};
use crate::crd::{Deduplication, FINGERPRINT_FIELD, GROUP, RemediationRequest};
use crate::metrics::Metrics;

/// The permissions the gateway uses in its own namespace: (group, resource, verb).
/// deploy/ grants exactly these; `/readyz` reports any that is missing.
pub const REQUIRED_PERMISSIONS: &[(&str, &str, &str)] = &[
    (GROUP, "remediationrequests", "list"),
    (GROUP, "remediationrequests", "watch"),
    (GROUP, "remediationrequests", "get"),
    (GROUP, "remediationrequests", "create"),
    (GROUP, "remediationrequests/status", "patch"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "list"),
    ("coordination.k8s.io", "leases", "watch"),
    ("coordination.k8s.io", "leases", "update"),
    ("coordination.k8s.io", "leases", "delete"),
];

pub struct KubernetesCluster {
    client: Client,
    /// The reviews' own client (own connections and concurrency limit).
    review_client: Client,
    /// The watches' own client: a watch is silent while nothing changes, so the per-request
    /// read timeout of `client` would cut it (and a watch would hold one of its slots for good).
    watch_client: Client,
    /// The client carries the [`ApiMetricsLayer`] (false for clients built elsewhere).
    counts_requests: bool,
    /// Until when the last permission review holds; permissions are re-checked at most this often.
    ready_until: Mutex<Option<Instant>>,
}

const READY_CACHE: Duration = Duration::from_secs(30);

/// How long a watch (or a list page of a watcher) may send nothing: past kube's watch call
/// timeout (290 s, after which its own dead-connection check ends the call too).
const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(300);
/// Requests in flight on the watch client: the RR watch and the owner cache's (at most three).
const WATCH_SLOTS: usize = 8;

impl KubernetesCluster {
    /// Connects the standard way (in-cluster, then `KUBECONFIG` / ~/.kube/config), with request
    /// timeouts so a hung API server turns into errors, not hung signals.
    /// Selects rustls' ring provider for the process. rustls picks one by itself only when
    /// exactly one provider feature is compiled in, and feature unification (e.g. building with
    /// the load-test crate, whose HTTP client brings aws-lc-rs) can compile in both.
    pub fn install_crypto_provider() {
        // Err means a provider is already installed, which is all we need.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// `max_in_flight` requests at once on the client of the port (the headroom beyond is for
    /// the readiness probe, which bypasses the port), `max_reviews` on a client of its own for
    /// the token and access reviews: a flood of bogus tokens queues there and never takes a
    /// connection or a slot of the lease renewals and RemediationRequest writes. (On the API
    /// server the reviews have their own APF priority level: deploy/apf.) The watches have a
    /// client of their own too, whose read timeout outlasts a quiet watch.
    pub async fn connect(
        api_timeout: Duration,
        max_in_flight: usize,
        max_reviews: usize,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        Self::install_crypto_provider();
        let mut config = Config::infer().await?;
        config.connect_timeout = Some(api_timeout.min(Duration::from_secs(5)));
        config.read_timeout = Some(api_timeout);
        config.write_timeout = Some(api_timeout);
        // The read timeout counts from a request's send, not from when its pooled connection went
        // idle: otherwise a request handed a connection idle for most of apiTimeout times out after
        // what is left (tests/testenv_idle_connection.rs). Every client here sends and then reads.
        config.reset_reader_on_write = true;
        let mut watch_config = config.clone();
        watch_config.read_timeout = Some(WATCH_READ_TIMEOUT);
        Ok(KubernetesCluster {
            client: metered_client(config.clone(), max_in_flight.max(1) + 8, &metrics)?,
            review_client: metered_client(config, max_reviews, &metrics)?,
            watch_client: metered_client(watch_config, WATCH_SLOTS, &metrics)?,
            counts_requests: true,
            ready_until: Mutex::new(None),
        })
    }

    /// Wraps an existing client (tests with a kubeconfig of their own).
    pub fn from_client(client: Client) -> Self {
        KubernetesCluster {
            review_client: client.clone(),
            watch_client: client.clone(),
            client,
            counts_requests: false,
            ready_until: Mutex::new(None),
        }
    }

    /// The client of the token and access reviews.
    pub fn review_client(&self) -> Client {
        self.review_client.clone()
    }

    fn requests(&self, namespace: &str) -> Api<RemediationRequest> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn leases(&self, namespace: &str) -> Api<Lease> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// A client counted by the [`ApiMetricsLayer`] with at most `concurrency` requests in flight
/// (each client has its own connection pool). A storm queues in it instead of opening hundreds
/// of TLS connections (HTTP/1.1).
fn metered_client(config: Config, concurrency: usize, metrics: &Metrics) -> anyhow::Result<Client> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        // Innermost: metrics see each request as the API server does (queueing excluded).
        .with_layer(&ApiMetricsLayer::new(metrics.clone()))
        .with_layer(&tower::limit::ConcurrencyLimitLayer::new(concurrency.max(1)))
        .build())
}

/// Maps a watcher error (list, watch start, watch stream) like any other API error.
fn map_watch_error(e: watcher::Error) -> ApiError {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            map_error(e)
        }
        watcher::Error::WatchError(status) => map_error(kube::Error::Api(status)),
        watcher::Error::NoResourceVersion => ApiError::Unavailable("watch result without a resourceVersion".into()),
    }
}

/// Maps a kube error to what the domain decides on. Only 404 is absence.
pub fn map_error(e: kube::Error) -> ApiError {
    match e {
        kube::Error::Api(s) => {
            let msg = if s.message.is_empty() {
                s.reason.clone()
            } else {
                s.message.clone()
            };
            match s.code {
                404 => ApiError::NotFound,
                409 if s.reason == "AlreadyExists" => ApiError::AlreadyExists,
                409 => ApiError::Conflict(msg),
                403 => ApiError::Forbidden(msg),
                429 => ApiError::Throttled {
                    retry_after: s.details.as_ref().and_then(|d| {
                        (d.retry_after_seconds > 0).then(|| Duration::from_secs(d.retry_after_seconds.into()))
                    }),
                },
                400 | 422 => ApiError::Invalid(msg),
                504 => ApiError::Timeout,
                code => ApiError::Unavailable(format!("{code}: {msg}")),
            }
        }
        other => {
            // The transport's own reason is in the source chain ("connection reset", ...).
            let mut text = other.to_string();
            let mut source = std::error::Error::source(&other);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            if text.to_ascii_lowercase().contains("timed out") || text.to_ascii_lowercase().contains("timeout") {
                ApiError::Timeout
            } else {
                ApiError::Unavailable(text)
            }
        }
    }
}

fn api_resource(object: &ObjectRef) -> ApiResource {
    let (group, version) = match object.api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", object.api_version.as_str()),
    };
    let plural = if object.resource.is_empty() {
        format!("{}s", object.kind.to_ascii_lowercase())
    } else {
        object.resource.clone()
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, &object.kind), &plural)
}

/// The kinds of an aggregated discovery document, groups and versions in its order.
fn kinds_of(list: kube::core::discovery::v2::APIGroupDiscoveryList) -> Vec<ApiKind> {
    let mut kinds = Vec::new();
    for group in list.items {
        let name = group.metadata.and_then(|m| m.name).unwrap_or_default();
        for version in group.versions {
            let Some(v) = version.version else { continue };
            for r in version.resources {
                let (Some(resource), Some(kind)) = (r.resource, r.response_kind.and_then(|k| k.kind)) else {
                    continue;
                };
                kinds.push(ApiKind {
                    group: name.clone(),
                    version: v.clone(),
                    kind,
                    resource,
                    namespaced: r.scope.as_deref() == Some("Namespaced"),
                });
            }
        }
    }
    kinds
}

#[async_trait]
impl Cluster for KubernetesCluster {
    fn backend_name(&self) -> &'static str {
        "kubernetes"
    }

    fn counts_own_requests(&self) -> bool {
        self.counts_requests
    }

    async fn list_requests(
        &self,
        _call: Call<'_>,
        namespace: &str,
        fingerprint: &str,
    ) -> Result<Vec<RemediationRequest>> {
        let lp = ListParams::default().fields(&format!("{FINGERPRINT_FIELD}={fingerprint}"));
        Ok(self.requests(namespace).list(&lp).await.map_err(map_error)?.items)
    }

    async fn get_request(&self, _call: Call<'_>, namespace: &str, name: &str) -> Result<RemediationRequest> {
        self.requests(namespace).get(name).await.map_err(map_error)
    }

    async fn create_request(&self, _call: Call<'_>, rr: &RemediationRequest) -> Result<RemediationRequest> {
        let ns = rr.metadata.namespace.as_deref().unwrap_or_default();
        self.requests(ns)
            .create(&PostParams::default(), rr)
            .await
            .map_err(map_error)
    }

    async fn update_deduplication(
        &self,
        _call: Call<'_>,
        namespace: &str,
        name: &str,
        resource_version: &str,
        deduplication: &Deduplication,
    ) -> Result<RemediationRequest> {
        // A merge patch names only the gateway's field, so every other status field stays as the
        // orchestrator wrote it; the resourceVersion in it makes the API server refuse the patch
        // with 409 unless the object is still at that version (optimistic concurrency).
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": resource_version },
            "status": { "deduplication": deduplication },
        });
        self.requests(namespace)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(map_error)
    }

    fn watch_requests(&self, namespace: &str) -> BoxStream<'static, Result<RequestEvent>> {
        // kube-runtime's watcher: a paginated list (served from the API server's watch cache:
        // this feeds hints, so "any" semantics are enough and cheapest), then a watch with
        // bookmarks that it resumes after the server's timeout. After an error (403, 410 Gone,
        // connection lost) kube's default backoff (jittered, exponential to 30 s, reset after a
        // healthy stretch) restarts it with a fresh list; the error is yielded first.
        let config = watcher::Config::default().any_semantic();
        watcher(Api::namespaced(self.watch_client.clone(), namespace), config)
            .default_backoff()
            .map(|item| {
                item.map(|event| match event {
                    watcher::Event::Init => RequestEvent::Init,
                    watcher::Event::InitApply(rr) => RequestEvent::Listed(rr),
                    watcher::Event::InitDone => RequestEvent::Synced,
                    watcher::Event::Apply(rr) => RequestEvent::Applied(rr),
                    watcher::Event::Delete(rr) => RequestEvent::Deleted(rr),
                })
                .map_err(map_watch_error)
            })
            .boxed()
    }

    async fn create_lease(&self, _call: Call<'_>, lease: &Lease) -> Result<Lease> {
        let ns = lease.metadata.namespace.as_deref().unwrap_or_default();
        self.leases(ns)
            .create(&PostParams::default(), lease)
            .await
            .map_err(map_error)
    }

    async fn get_lease(&self, _call: Call<'_>, namespace: &str, name: &str) -> Result<Lease> {
        self.leases(namespace).get(name).await.map_err(map_error)
    }

    async fn list_leases(&self, _call: Call<'_>, namespace: &str, label: (&str, &str)) -> Result<Vec<Lease>> {
        let lp = ListParams::default().labels(&format!("{}={}", label.0, label.1));
        self.leases(namespace)
            .list(&lp)
            .await
            .map(|l| l.items)
            .map_err(map_error)
    }

    async fn update_lease(&self, _call: Call<'_>, lease: &Lease) -> Result<Lease> {
        let ns = lease.metadata.namespace.as_deref().unwrap_or_default();
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        self.leases(ns)
            .replace(name, &PostParams::default(), lease)
            .await
            .map_err(map_error)
    }

    async fn delete_lease(&self, _call: Call<'_>, namespace: &str, name: &str, resource_version: &str) -> Result<()> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(resource_version.to_owned()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        self.leases(namespace)
            .delete(name, &dp)
            .await
            .map(|_| ())
            .map_err(map_error)
    }

    fn watch_leases(&self, namespace: &str, label: (&str, &str)) -> BoxStream<'static, Result<LeaseEvent>> {
        // A handful of member Leases, label-selected: "any" semantics (the watch cache) is enough,
        // as for the RemediationRequest watch; bookmarks and kube's default backoff.
        let config = watcher::Config::default()
            .labels(&format!("{}={}", label.0, label.1))
            .any_semantic();
        let api: Api<Lease> = Api::namespaced(self.watch_client.clone(), namespace);
        watcher(api, config)
            .default_backoff()
            .map(|item| {
                item.map(|event| match event {
                    watcher::Event::Init => WatchEvent::Init,
                    watcher::Event::InitApply(l) => WatchEvent::Listed(l),
                    watcher::Event::InitDone => WatchEvent::Synced,
                    watcher::Event::Apply(l) => WatchEvent::Applied(l),
                    watcher::Event::Delete(l) => WatchEvent::Deleted(l),
                })
                .map_err(map_watch_error)
            })
            .boxed()
    }

    async fn get_metadata(&self, _call: Call<'_>, object: &ObjectRef) -> Result<ObjectMeta> {
        // Cluster-scoped objects (Namespaces, for the scope check) have no namespace.
        let api: Api<DynamicObject> = if object.namespace.is_empty() {
            Api::all_with(self.client.clone(), &api_resource(object))
        } else {
            Api::namespaced_with(self.client.clone(), &object.namespace, &api_resource(object))
        };
        api.get_metadata(&object.name)
            .await
            .map(|m| m.metadata)
            .map_err(map_error)
    }

    fn watch_metadata(&self, kind: &ApiKind) -> BoxStream<'static, Result<MetadataEvent>> {
        // `PartialObjectMetadata` only: the API server sends no spec or status, so the cost is
        // the objects' metadata, in every namespace. Unlike the RemediationRequest watch (one
        // namespace, bounded by its quota) the list is not "any" semantics: the API server's
        // watch cache answers that in one unpaginated response, and a whole cluster's ReplicaSets
        // in one response is a memory spike in this process. A consistent list comes in pages
        // of 500 objects. Bookmarks, and kube's default backoff after an error.
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&kind.group, &kind.version, &kind.kind),
            &kind.resource,
        );
        let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(self.watch_client.clone(), &resource);
        watcher(api, watcher::Config::default().page_size(500))
            .default_backoff()
            .map(|item| {
                item.map(|event| match event {
                    watcher::Event::Init => WatchEvent::Init,
                    watcher::Event::InitApply(o) => WatchEvent::Listed(o.metadata),
                    watcher::Event::InitDone => WatchEvent::Synced,
                    watcher::Event::Apply(o) => WatchEvent::Applied(o.metadata),
                    watcher::Event::Delete(o) => WatchEvent::Deleted(o.metadata),
                })
                .map_err(map_watch_error)
            })
            .boxed()
    }

    async fn list_api_kinds(&self, _call: Call<'_>, core: bool) -> Result<Vec<ApiKind>> {
        let list = if core {
            self.client.list_core_api_versions_aggregated().await
        } else {
            self.client.list_api_groups_aggregated().await
        };
        Ok(kinds_of(list.map_err(map_error)?))
    }

    async fn check_ready(&self, namespace: &str) -> std::result::Result<(), String> {
        // Every probe reaches the API server (and proves the CRD is served); the permission
        // review below is repeated at most every READY_CACHE.
        self.requests(namespace)
            .list(&ListParams::default().limit(1))
            .await
            .map_err(|e| {
                format!(
                    "cannot list remediationrequests.{GROUP} in namespace {namespace:?} (is the CRD installed?): {e}"
                )
            })?;
        if self
            .ready_until
            .lock()
            .expect("ready cache poisoned")
            .is_some_and(|t| t > Instant::now())
        {
            return Ok(());
        }
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let mut missing = Vec::new();
        for (group, resource, verb) in REQUIRED_PERMISSIONS {
            let (resource, subresource) = resource
                .split_once('/')
                .map_or((*resource, None), |(r, s)| (r, Some(s.to_owned())));
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some((*group).to_owned()),
                        resource: Some(resource.to_owned()),
                        subresource: subresource.clone(),
                        verb: Some((*verb).to_owned()),
                        namespace: Some(namespace.to_owned()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = reviews
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("cannot check permissions (selfsubjectaccessreviews): {e}"))?;
            if !answer.status.is_some_and(|s| s.allowed) {
                let res = subresource.map_or(resource.to_owned(), |s| format!("{resource}/{s}"));
                missing.push(format!("{verb} {res}.{group}"));
            }
        }
        if !missing.is_empty() {
            return Err(format!(
                "missing RBAC permission in namespace {namespace:?}: {}",
                missing.join(", ")
            ));
        }
        *self.ready_until.lock().expect("ready cache poisoned") = Some(Instant::now() + READY_CACHE);
        Ok(())
    }
}
