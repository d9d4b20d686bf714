//! Observes every call that crosses the [`Cluster`] port (one call = one API request): a
//! `k8s.request` span per call and the tally behind "API calls per signal" ([`crate::cluster::Tally`], carried by each call).
//! Request counters and latency (verb, resource, code, like the API server's own metrics) are
//! recorded here for the embedded backend; the kubernetes backend records them in a tower layer
//! inside the kube client ([`ApiMetricsLayer`]), so requests that bypass the port (readiness,
//! permission reviews) are counted too. A drop guard records calls abandoned mid-flight
//! (deadline, cancellation) with code `<cancelled>`, so no request escapes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tracing::Instrument;

use crate::cluster::{
    ApiError, ApiKind, Call, Cluster, DISCOVERY_RESOURCE, LEASE_RESOURCE, LeaseEvent, MetadataEvent, ObjectRef,
    RR_RESOURCE, RR_STATUS_RESOURCE, RequestEvent, Result, WatchEvent, resource_of_kind, verb,
};
use crate::crd::{Deduplication, RemediationRequest};
use crate::metrics::Metrics;

/// Records one API request when dropped: counter by verb/resource/code and latency by verb/resource.
pub struct ApiCallTimer {
    metrics: Metrics,
    verb: &'static str,
    resource: String,
    start: Instant,
    /// Set when the answer arrives; still `None` on drop means the call was abandoned.
    code: Option<String>,
}

impl ApiCallTimer {
    pub fn start(metrics: &Metrics, verb: &'static str, resource: impl Into<String>) -> Self {
        ApiCallTimer {
            metrics: metrics.clone(),
            verb,
            resource: resource.into(),
            start: Instant::now(),
            code: None,
        }
    }

    /// Records the call with the answer's code.
    pub fn finish(mut self, code: impl Into<String>) {
        self.code = Some(code.into());
    }
}

impl Drop for ApiCallTimer {
    fn drop(&mut self) {
        let code = self.code.as_deref().unwrap_or("<cancelled>");
        self.metrics
            .api_requests
            .with_label_values(&[self.verb, &self.resource, code])
            .inc();
        self.metrics
            .api_duration
            .with_label_values(&[self.verb, &self.resource])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

pub struct Metered {
    inner: Arc<dyn Cluster>,
    /// None when the backend records its own requests.
    metrics: Option<Metrics>,
    /// API requests in flight (`backend.maxConcurrentRequests`); a call waits for a slot here,
    /// before it is sent, so the wait is visible to the call's send deadline and not part of its latency.
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Cluster>, metrics: Metrics) -> Self {
        let metrics = (!inner.counts_own_requests()).then_some(metrics);
        Metered {
            inner,
            metrics,
            slots: None,
        }
    }

    /// At most `n` calls in flight at once.
    pub fn with_slots(mut self, n: usize) -> Self {
        self.slots = Some(Arc::new(tokio::sync::Semaphore::new(n.max(1))));
        self
    }

    /// One request: waits for a slot (until the call's send deadline, if it has one), counts
    /// into the call's tally once it has one, and is traced and timed.
    async fn request<T>(
        &self,
        call: Call<'_>,
        verb: &'static str,
        resource: &'static str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let _permit = match &self.slots {
            None => None,
            Some(slots) => {
                let acquire = slots.clone().acquire_owned();
                let permit = match call.send_deadline() {
                    Some(by) => tokio::time::timeout_at(by, acquire)
                        .await
                        .map_err(|_| ApiError::NotSent)?,
                    None => acquire.await,
                };
                Some(permit.map_err(|_| ApiError::Unavailable("API request slots closed".into()))?)
            }
        };
        call.count();
        let span = tracing::info_span!("k8s.request", verb, resource, code = tracing::field::Empty);
        let timer = self.metrics.as_ref().map(|m| ApiCallTimer::start(m, verb, resource));
        let out = fut.instrument(span.clone()).await;
        let code = match &out {
            Ok(_) => success_code(verb),
            Err(e) => e.code(),
        };
        span.record("code", code);
        if let Some(t) = timer {
            t.finish(code);
        }
        out
    }
}

/// A watch as the API server would count it. A watch is not part of any signal's tally; the
/// embedded store's (re)list counts as one list and its change feed as one watch request.
fn counted_watch<T: Send + 'static>(
    inner: BoxStream<'static, Result<WatchEvent<T>>>,
    metrics: Metrics,
    resource: &'static str,
) -> BoxStream<'static, Result<WatchEvent<T>>> {
    inner
        .inspect(move |item| match item {
            Ok(WatchEvent::Init) => ApiCallTimer::start(&metrics, verb::LIST, resource).finish("200"),
            Ok(WatchEvent::Synced) => ApiCallTimer::start(&metrics, verb::WATCH, resource).finish("200"),
            Err(e) => ApiCallTimer::start(&metrics, verb::WATCH, resource).finish(e.code()),
            Ok(_) => {}
        })
        .boxed()
}

fn success_code(verb: &str) -> &'static str {
    if verb == verb::CREATE { "201" } else { "200" }
}

#[async_trait]
impl Cluster for Metered {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    async fn list_requests(
        &self,
        call: Call<'_>,
        namespace: &str,
        fingerprint: &str,
    ) -> Result<Vec<RemediationRequest>> {
        self.request(
            call,
            verb::LIST,
            RR_RESOURCE,
            self.inner.list_requests(call, namespace, fingerprint),
        )
        .await
    }
    async fn get_request(&self, call: Call<'_>, namespace: &str, name: &str) -> Result<RemediationRequest> {
        self.request(
            call,
            verb::GET,
            RR_RESOURCE,
            self.inner.get_request(call, namespace, name),
        )
        .await
    }
    async fn create_request(&self, call: Call<'_>, rr: &RemediationRequest) -> Result<RemediationRequest> {
        self.request(call, verb::CREATE, RR_RESOURCE, self.inner.create_request(call, rr))
            .await
    }
    async fn update_deduplication(
        &self,
        call: Call<'_>,
        namespace: &str,
        name: &str,
        resource_version: &str,
        deduplication: &Deduplication,
    ) -> Result<RemediationRequest> {
        self.request(
            call,
            verb::PATCH,
            RR_STATUS_RESOURCE,
            self.inner
                .update_deduplication(call, namespace, name, resource_version, deduplication),
        )
        .await
    }
    fn watch_requests(&self, namespace: &str) -> BoxStream<'static, Result<RequestEvent>> {
        let inner = self.inner.watch_requests(namespace);
        let Some(metrics) = self.metrics.clone() else {
            return inner;
        };
        counted_watch(inner, metrics, RR_RESOURCE)
    }
    fn watch_metadata(&self, kind: &ApiKind) -> BoxStream<'static, Result<MetadataEvent>> {
        let inner = self.inner.watch_metadata(kind);
        match self.metrics.clone() {
            Some(metrics) => counted_watch(inner, metrics, resource_of_kind(&kind.kind)),
            None => inner,
        }
    }
    async fn create_lease(&self, call: Call<'_>, lease: &Lease) -> Result<Lease> {
        self.request(call, verb::CREATE, LEASE_RESOURCE, self.inner.create_lease(call, lease))
            .await
    }
    async fn get_lease(&self, call: Call<'_>, namespace: &str, name: &str) -> Result<Lease> {
        self.request(
            call,
            verb::GET,
            LEASE_RESOURCE,
            self.inner.get_lease(call, namespace, name),
        )
        .await
    }
    async fn list_leases(&self, call: Call<'_>, namespace: &str, label: (&str, &str)) -> Result<Vec<Lease>> {
        self.request(
            call,
            verb::LIST,
            LEASE_RESOURCE,
            self.inner.list_leases(call, namespace, label),
        )
        .await
    }
    async fn update_lease(&self, call: Call<'_>, lease: &Lease) -> Result<Lease> {
        self.request(call, verb::UPDATE, LEASE_RESOURCE, self.inner.update_lease(call, lease))
            .await
    }
    async fn delete_lease(&self, call: Call<'_>, namespace: &str, name: &str, resource_version: &str) -> Result<()> {
        self.request(
            call,
            verb::DELETE,
            LEASE_RESOURCE,
            self.inner.delete_lease(call, namespace, name, resource_version),
        )
        .await
    }
    fn watch_leases(&self, namespace: &str, label: (&str, &str)) -> BoxStream<'static, Result<LeaseEvent>> {
        let inner = self.inner.watch_leases(namespace, label);
        match self.metrics.clone() {
            Some(metrics) => counted_watch(inner, metrics, LEASE_RESOURCE),
            None => inner,
        }
    }
    async fn get_metadata(&self, call: Call<'_>, object: &ObjectRef) -> Result<ObjectMeta> {
        self.request(
            call,
            verb::GET,
            resource_of_kind(&object.kind),
            self.inner.get_metadata(call, object),
        )
        .await
    }
    async fn list_api_kinds(&self, call: Call<'_>, core: bool) -> Result<Vec<ApiKind>> {
        self.request(
            call,
            verb::GET,
            DISCOVERY_RESOURCE,
            self.inner.list_api_kinds(call, core),
        )
        .await
    }
    async fn check_ready(&self, namespace: &str) -> std::result::Result<(), String> {
        self.inner.check_ready(namespace).await
    }
}

/// Tower layer for the kube client: counts and times every HTTP request it sends.
#[derive(Clone)]
pub struct ApiMetricsLayer {
    metrics: Metrics,
}

impl ApiMetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        ApiMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ApiMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, RB> tower::Service<http::Request<B>> for ApiMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verb = verb_of(&req);
        let resource = resource_of_path(req.uri().path());
        let timer = ApiCallTimer::start(&self.metrics, verb, resource);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let out = fut.await;
            timer.finish(match &out {
                Ok(resp) => resp.status().as_u16().to_string(),
                Err(_) => "<error>".to_owned(),
            });
            out
        })
    }
}

/// The API server's verb for a kube-rs request (kube tags each request with its operation).
fn verb_of<B>(req: &http::Request<B>) -> &'static str {
    let op = req.extensions().get::<&'static str>().copied().unwrap_or("");
    match op {
        "list" | "list_metadata" => verb::LIST,
        "watch" | "watch_metadata" => verb::WATCH,
        "delete_collection" => "deletecollection",
        "delete" => verb::DELETE,
        o if o.starts_with("create") => verb::CREATE,
        o if o.starts_with("replace") => verb::UPDATE,
        o if o.starts_with("patch") => "patch",
        o if o.starts_with("get") => verb::GET,
        _ => match *req.method() {
            http::Method::POST => verb::CREATE,
            http::Method::PUT => verb::UPDATE,
            http::Method::PATCH => "patch",
            http::Method::DELETE => verb::DELETE,
            _ => verb::GET,
        },
    }
}

/// The resources whose name a metric label may carry: the ones the gateway itself uses. Any
/// other path (an owner or label read of a kind a sender named, with a plural of the sender's
/// choosing) is `other`, so the label's values stay a fixed set however many kinds arrive.
const LABELLED_RESOURCES: &[&str] = &[
    "remediationrequests",
    "remediationrequests/status",
    "leases",
    "tokenreviews",
    "subjectaccessreviews",
    "selfsubjectaccessreviews",
    "namespaces",
    "pods",
    "replicasets",
    "deployments",
    "statefulsets",
    "daemonsets",
    "jobs",
    "cronjobs",
];

/// `resource` or `resource/subresource` from an API path such as
/// `/apis/kubernaut.ai/v1alpha1/namespaces/ns/remediationrequests/name/status`, when it is one
/// of the [`LABELLED_RESOURCES`]; `discovery` for the discovery documents; else `other`.
pub fn resource_of_path(path: &str) -> String {
    let resource = path_resource(path);
    if LABELLED_RESOURCES.contains(&resource.as_str()) {
        resource
    } else if matches!(path.trim_end_matches('/'), "/api" | "/apis") {
        DISCOVERY_RESOURCE.into()
    } else {
        "other".into()
    }
}

fn path_resource(path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match parts.first() {
        Some(&"api") => parts.get(2..).unwrap_or(&[]),
        Some(&"apis") => parts.get(3..).unwrap_or(&[]),
        _ => return "other".into(),
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        &rest[2..]
    } else {
        rest
    };
    match rest {
        [] => "other".into(),
        [resource] | [resource, _] => (*resource).into(),
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
    }
}

#[cfg(test)]
mod tests {
    use super::resource_of_path;

    #[test]
    fn resources_are_named_like_the_api_server_names_them() {
        for (path, want) in [
            (
                "/apis/kubernaut.ai/v1alpha1/namespaces/sg/remediationrequests",
                "remediationrequests",
            ),
            (
                "/apis/kubernaut.ai/v1alpha1/namespaces/sg/remediationrequests/rr-1/status",
                "remediationrequests/status",
            ),
            ("/apis/coordination.k8s.io/v1/namespaces/sg/leases/gw-lock-1", "leases"),
            ("/api/v1/namespaces/shop/pods/p", "pods"),
            (
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                "selfsubjectaccessreviews",
            ),
            ("/api/v1/namespaces", "namespaces"),
            ("/version", "other"),
            ("/apis", "discovery"),
        ] {
            assert_eq!(resource_of_path(path), want, "{path}");
        }
    }

    #[test]
    fn resource_labels_stay_a_fixed_set_whatever_kinds_senders_name() {
        let mut labels = std::collections::HashSet::new();
        for i in 0..10_000 {
            for path in [
                format!("/api/v1/namespaces/shop/kind{i}s/web-1"),
                format!("/apis/group{i}.example/v1/namespaces/shop/widget{i}s/w"),
                format!("/apis/apps/v1beta{i}/namespaces/shop/deployment{i}/api/status"),
                format!("/api/v1/nodes{i}/n"),
            ] {
                labels.insert(resource_of_path(&path));
            }
        }
        assert_eq!(labels.into_iter().collect::<Vec<_>>(), ["other"]);
    }

    use super::Metered;
    use crate::backend::embedded::EmbeddedStore;
    use crate::backend::faults::{Fault, Faulty, Op};
    use crate::clock::SystemClock;
    use crate::cluster::{ApiError, Call, Cluster, ObjectRef, Tally};
    use crate::crd::{RemediationRequest, RemediationRequestSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::Semaphore;
    use tokio::time::Instant;

    fn rr(name: &str) -> RemediationRequest {
        RemediationRequest {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("sg".into()),
                ..ObjectMeta::default()
            },
            spec: RemediationRequestSpec::example(&"f".repeat(64)),
            status: None,
        }
    }

    #[tokio::test]
    async fn a_write_without_a_slot_by_its_send_deadline_is_not_sent_nor_counted_and_a_sent_one_is_not_abandoned() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        let gate = Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let faulty = Faulty::new(store.clone(), move |op| match op {
            Op::GetMetadata => Fault::Hang,
            Op::CreateRequest => Fault::Gate(g.clone()),
            _ => Fault::Pass,
        });
        let metrics = crate::metrics::Metrics::register(&prometheus::Registry::new()).unwrap();
        let metered = Arc::new(Metered::new(Arc::new(faulty), metrics).with_slots(1));

        // The only slot is taken by a request that never answers.
        let busy = metered.clone();
        let hog = tokio::spawn(async move {
            let object = ObjectRef {
                api_version: "v1".into(),
                kind: "Pod".into(),
                resource: String::new(),
                namespace: "shop".into(),
                name: "p".into(),
            };
            busy.get_metadata(Call::UNCOUNTED, &object).await
        });
        tokio::task::yield_now().await;
        let by = Instant::now() + Duration::from_millis(50);
        let tally = Tally::new();
        let queued = metered
            .create_request(Call::counted(&tally).send_by(by), &rr("rr-queued"))
            .await;
        assert_eq!(queued.unwrap_err(), ApiError::NotSent);
        assert_eq!(tally.get(), 0, "a request never sent costs the API server nothing");
        assert!(Instant::now() >= by);
        assert!(store.all_requests().is_empty(), "never sent, so certainly not stored");

        // With the slot free, a write sent before its send deadline is awaited past it.
        hog.abort();
        let _ = hog.await;
        let by = Instant::now() + Duration::from_millis(20);
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            gate.add_permits(1);
        });
        let sent = metered
            .create_request(Call::counted(&tally).send_by(by), &rr("rr-sent"))
            .await;
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(tally.get(), 1, "the request sent is counted once");
        assert!(Instant::now() > by, "answered after its send deadline");
        assert_eq!(store.all_requests().len(), 1);
        opener.await.unwrap();
    }
}
