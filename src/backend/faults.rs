//! A `Cluster` wrapper that injects faults per operation: fail with a given error, hang, hide
//! list results, wait at a gate — or let the call through and then fail or hang, as an API
//! server does that stores a write and loses the answer. For tests and demos of failure
//! handling; never configured in production.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::Semaphore;

use crate::cluster::{ApiError, ApiKind, Call, Cluster, LeaseEvent, MetadataEvent, ObjectRef, RequestEvent, Result};
use crate::crd::{Deduplication, RemediationRequest};

/// The operations of the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    ListRequests,
    GetRequest,
    CreateRequest,
    /// The status write of `status.deduplication`.
    UpdateDeduplication,
    /// Starting a RemediationRequest watch (Fail: it breaks at once; Hang: it never lists).
    WatchRequests,
    /// Each item a watch delivers (Fail: the watch breaks there; Hang: it stalls for good;
    /// Gate: it stalls until a permit, i.e. a lagging watch).
    WatchEvent,
    CreateLease,
    GetLease,
    ListLeases,
    UpdateLease,
    DeleteLease,
    GetMetadata,
    /// Starting a metadata watch of one kind (Fail: it breaks at once; Hang: it never lists).
    WatchMetadata,
    /// Each item a metadata watch delivers (as [`Op::WatchEvent`] for the RemediationRequest
    /// watch, apart from it so a test can break one without the other).
    MetadataEvent,
    /// The readiness check (Fail: not ready with that error as the reason).
    CheckReady,
    /// A read of the discovery documents.
    ListApiKinds,
}

/// What to do with one call.
#[derive(Debug, Clone)]
pub enum Fault {
    Pass,
    Fail(ApiError),
    /// Never answer (the caller's deadline must save it).
    Hang,
    /// Answer a list as empty (a stale cache would); other operations pass.
    HideResults,
    /// Wait for a permit of this gate, then pass.
    Gate(Arc<Semaphore>),
    /// Take this long, then pass (a slow API server).
    Delay(std::time::Duration),
    /// Make the call (it is stored), then answer this error instead of its result.
    StoreThenFail(ApiError),
    /// Make the call (it is stored), then never answer.
    StoreThenHang,
}

/// What to do once the call itself has been made.
enum After {
    Answer,
    Fail(ApiError),
    Hang,
}

type Hook = dyn Fn(Op) -> Fault + Send + Sync;

pub struct Faulty {
    inner: Arc<dyn Cluster>,
    hook: Arc<Hook>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Cluster>, hook: impl Fn(Op) -> Fault + Send + Sync + 'static) -> Self {
        Faulty {
            inner,
            hook: Arc::new(hook),
        }
    }

    async fn apply(&self, op: Op) -> Result<bool> {
        apply(&*self.hook, op).await
    }

    /// Runs `call` under the hook's fault for `op`.
    async fn run<T>(&self, op: Op, call: impl Future<Output = Result<T>>) -> Result<T> {
        let after = match (self.hook)(op) {
            Fault::StoreThenFail(e) => After::Fail(e),
            Fault::StoreThenHang => After::Hang,
            other => {
                before(other).await?;
                After::Answer
            }
        };
        let answer = call.await;
        match after {
            After::Answer => answer,
            After::Fail(e) => Err(e),
            After::Hang => futures::future::pending().await,
        }
    }
}

/// Applies the hook's fault for `op` before the call; `Ok(true)` means "hide the results".
/// (The store-then faults act after the call: [`Faulty::run`]; here they pass.)
async fn apply(hook: &Hook, op: Op) -> Result<bool> {
    before(hook(op)).await
}

async fn before(fault: Fault) -> Result<bool> {
    match fault {
        Fault::StoreThenFail(_) | Fault::StoreThenHang => Ok(false),
        Fault::Pass => Ok(false),
        Fault::Fail(e) => Err(e),
        Fault::Hang => futures::future::pending().await,
        Fault::HideResults => Ok(true),
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(false)
        }
        Fault::Gate(gate) => {
            let permit = gate
                .acquire()
                .await
                .map_err(|_| ApiError::Unavailable("gate closed".into()))?;
            permit.forget();
            Ok(false)
        }
    }
}

#[async_trait]
impl Cluster for Faulty {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    async fn list_requests(
        &self,
        call: Call<'_>,
        namespace: &str,
        fingerprint: &str,
    ) -> Result<Vec<RemediationRequest>> {
        if self.apply(Op::ListRequests).await? {
            return Ok(Vec::new());
        }
        self.inner.list_requests(call, namespace, fingerprint).await
    }
    async fn get_request(&self, call: Call<'_>, namespace: &str, name: &str) -> Result<RemediationRequest> {
        self.run(Op::GetRequest, self.inner.get_request(call, namespace, name))
            .await
    }
    async fn create_request(&self, call: Call<'_>, rr: &RemediationRequest) -> Result<RemediationRequest> {
        self.run(Op::CreateRequest, self.inner.create_request(call, rr)).await
    }
    async fn update_deduplication(
        &self,
        call: Call<'_>,
        namespace: &str,
        name: &str,
        resource_version: &str,
        deduplication: &Deduplication,
    ) -> Result<RemediationRequest> {
        self.run(
            Op::UpdateDeduplication,
            self.inner
                .update_deduplication(call, namespace, name, resource_version, deduplication),
        )
        .await
    }
    fn watch_requests(&self, namespace: &str) -> BoxStream<'static, Result<RequestEvent>> {
        let (hook, inner, namespace) = (self.hook.clone(), self.inner.clone(), namespace.to_owned());
        futures::stream::once(async move {
            if let Err(e) = apply(&*hook, Op::WatchRequests).await {
                return futures::stream::iter([Err(e)]).boxed();
            }
            inner
                .watch_requests(&namespace)
                .then(move |item| {
                    let hook = hook.clone();
                    async move { apply(&*hook, Op::WatchEvent).await.and(item) }
                })
                .boxed()
        })
        .flatten()
        .boxed()
    }
    fn watch_metadata(&self, kind: &ApiKind) -> BoxStream<'static, Result<MetadataEvent>> {
        let (hook, inner, kind) = (self.hook.clone(), self.inner.clone(), kind.clone());
        futures::stream::once(async move {
            if let Err(e) = apply(&*hook, Op::WatchMetadata).await {
                return futures::stream::iter([Err(e)]).boxed();
            }
            inner
                .watch_metadata(&kind)
                .then(move |item| {
                    let hook = hook.clone();
                    async move { apply(&*hook, Op::MetadataEvent).await.and(item) }
                })
                .boxed()
        })
        .flatten()
        .boxed()
    }
    async fn create_lease(&self, call: Call<'_>, lease: &Lease) -> Result<Lease> {
        self.run(Op::CreateLease, self.inner.create_lease(call, lease)).await
    }
    async fn get_lease(&self, call: Call<'_>, namespace: &str, name: &str) -> Result<Lease> {
        self.run(Op::GetLease, self.inner.get_lease(call, namespace, name))
            .await
    }
    async fn list_leases(&self, call: Call<'_>, namespace: &str, label: (&str, &str)) -> Result<Vec<Lease>> {
        self.run(Op::ListLeases, self.inner.list_leases(call, namespace, label))
            .await
    }
    async fn update_lease(&self, call: Call<'_>, lease: &Lease) -> Result<Lease> {
        self.run(Op::UpdateLease, self.inner.update_lease(call, lease)).await
    }
    async fn delete_lease(&self, call: Call<'_>, namespace: &str, name: &str, resource_version: &str) -> Result<()> {
        self.run(
            Op::DeleteLease,
            self.inner.delete_lease(call, namespace, name, resource_version),
        )
        .await
    }
    fn watch_leases(&self, namespace: &str, label: (&str, &str)) -> BoxStream<'static, Result<LeaseEvent>> {
        self.inner.watch_leases(namespace, label)
    }
    async fn get_metadata(&self, call: Call<'_>, object: &ObjectRef) -> Result<ObjectMeta> {
        self.run(Op::GetMetadata, self.inner.get_metadata(call, object)).await
    }
    async fn list_api_kinds(&self, call: Call<'_>, core: bool) -> Result<Vec<ApiKind>> {
        self.run(Op::ListApiKinds, self.inner.list_api_kinds(call, core)).await
    }
    async fn check_ready(&self, namespace: &str) -> std::result::Result<(), String> {
        self.apply(Op::CheckReady).await.map_err(|e| e.to_string())?;
        self.inner.check_ready(namespace).await
    }
}
