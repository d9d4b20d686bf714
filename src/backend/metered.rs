//! Counts and times every call that crosses the [`Cluster`] port (one call = one API request),
//! labelled like the API server's own metrics (verb, resource, code). A drop guard records calls
//! abandoned mid-flight (deadline, cancellation) with code `<cancelled>`, so no request escapes.
//!
//! It also feeds a per-task tally ([`tallied`]) so the pipeline can report API calls per signal.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::cluster::{
    Cluster, LEASE_RESOURCE, ObjectRef, RR_RESOURCE, RR_STATUS_RESOURCE, Result, resource_of_kind, verb,
};
use crate::crd::RemediationRequest;
use crate::metrics::Metrics;

tokio::task_local! {
    static TALLY: Arc<AtomicU32>;
}

/// Runs `fut` and returns how many API calls it made (calls made by tasks it spawns excluded).
pub async fn tallied<F: Future>(fut: F) -> (F::Output, u32) {
    let tally = Arc::new(AtomicU32::new(0));
    let out = TALLY.scope(tally.clone(), fut).await;
    (out, tally.load(Ordering::Relaxed))
}

pub struct Metered {
    inner: Arc<dyn Cluster>,
    metrics: Metrics,
}

impl Metered {
    pub fn new(inner: Arc<dyn Cluster>, metrics: Metrics) -> Self {
        Metered { inner, metrics }
    }

    async fn call<T>(
        &self,
        verb: &'static str,
        resource: &'static str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let _ = TALLY.try_with(|t| t.fetch_add(1, Ordering::Relaxed));
        let mut timer = CallTimer {
            metrics: &self.metrics,
            verb,
            resource,
            start: Instant::now(),
            code: None,
        };
        let out = fut.await;
        timer.code = Some(match &out {
            Ok(_) => success_code(verb),
            Err(e) => e.code(),
        });
        out
    }
}

fn success_code(verb: &str) -> &'static str {
    if verb == verb::CREATE { "201" } else { "200" }
}

struct CallTimer<'a> {
    metrics: &'a Metrics,
    verb: &'static str,
    resource: &'static str,
    start: Instant,
    code: Option<&'static str>,
}

impl Drop for CallTimer<'_> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or("<cancelled>");
        self.metrics
            .api_requests
            .with_label_values(&[self.verb, self.resource, code])
            .inc();
        self.metrics
            .api_duration
            .with_label_values(&[self.verb, self.resource])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl Cluster for Metered {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    async fn list_requests(&self, namespace: &str, fingerprint: &str) -> Result<Vec<RemediationRequest>> {
        self.call(
            verb::LIST,
            RR_RESOURCE,
            self.inner.list_requests(namespace, fingerprint),
        )
        .await
    }
    async fn get_request(&self, namespace: &str, name: &str) -> Result<RemediationRequest> {
        self.call(verb::GET, RR_RESOURCE, self.inner.get_request(namespace, name))
            .await
    }
    async fn create_request(&self, rr: &RemediationRequest) -> Result<RemediationRequest> {
        self.call(verb::CREATE, RR_RESOURCE, self.inner.create_request(rr))
            .await
    }
    async fn update_request_status(&self, rr: &RemediationRequest) -> Result<RemediationRequest> {
        self.call(verb::UPDATE, RR_STATUS_RESOURCE, self.inner.update_request_status(rr))
            .await
    }
    async fn create_lease(&self, lease: &Lease) -> Result<Lease> {
        self.call(verb::CREATE, LEASE_RESOURCE, self.inner.create_lease(lease))
            .await
    }
    async fn get_lease(&self, namespace: &str, name: &str) -> Result<Lease> {
        self.call(verb::GET, LEASE_RESOURCE, self.inner.get_lease(namespace, name))
            .await
    }
    async fn update_lease(&self, lease: &Lease) -> Result<Lease> {
        self.call(verb::UPDATE, LEASE_RESOURCE, self.inner.update_lease(lease))
            .await
    }
    async fn delete_lease(&self, namespace: &str, name: &str, resource_version: &str) -> Result<()> {
        self.call(
            verb::DELETE,
            LEASE_RESOURCE,
            self.inner.delete_lease(namespace, name, resource_version),
        )
        .await
    }
    async fn get_metadata(&self, object: &ObjectRef) -> Result<ObjectMeta> {
        self.call(
            verb::GET,
            resource_of_kind(&object.kind),
            self.inner.get_metadata(object),
        )
        .await
    }
    async fn check_ready(&self, namespace: &str) -> std::result::Result<(), String> {
        self.inner.check_ready(namespace).await
    }
}
