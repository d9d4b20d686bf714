//! The embedded backend: an in-process object store with the Kubernetes semantics the gateway
//! relies on (resourceVersion preconditions, Conflict, AlreadyExists, NotFound, field-selected
//! lists, status subresource, preconditioned delete). It is for trying the gateway out and for
//! fast tests; the contract tests hold it to the real API server's behaviour.
//!
//! What a write keeps and drops is the API server's too: a status write is a JSON merge patch
//! (RFC 7386) of the stored status, and the result is read back through the typed status, so a
//! field the CRD does not describe is pruned and every field it does is kept as written.
//!
//! Lease expiry is not enforced by the store (the API server does not either): holders decide it
//! from `renewTime` with the injected clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use tokio::sync::broadcast;

use crate::clock::SharedClock;
use crate::cluster::{
    ApiError, ApiKind, Call, Cluster, LeaseEvent, MetadataEvent, ObjectRef, RequestEvent, Result, WatchEvent,
};
use crate::crd::{Deduplication, RemediationRequest, RemediationRequestStatus};

type Key = (String, String);
/// (group, kind) of an object that is not a RemediationRequest or a Lease.
type KindKey = (String, String);

#[derive(Default)]
struct State {
    last_rv: u64,
    last_uid: u64,
    requests: BTreeMap<Key, RemediationRequest>,
    /// (namespace, fingerprint) -> RR names: the field-selected list without a scan (an API
    /// server's cost grows with the namespace; the embedded store should not slow down with it).
    by_fingerprint: HashMap<Key, Vec<String>>,
    leases: BTreeMap<Key, Lease>,
    /// Metadata of other objects by (group, kind, namespace, name): like the API server, one
    /// object whichever served version it is read at.
    objects: HashMap<(String, String, String, String), ObjectMeta>,
    /// Kinds of objects put that are not built in, for discovery.
    custom_kinds: Vec<ApiKind>,
}

/// Where `object` is kept: its version and resource do not matter.
fn object_key(object: &ObjectRef) -> (String, String, String, String) {
    (
        object.group().to_owned(),
        object.kind.clone(),
        object.namespace.clone(),
        object.name.clone(),
    )
}

pub struct EmbeddedStore {
    state: Mutex<State>,
    /// Change feed of RemediationRequests (the store's watch). Sent while the state lock is
    /// held, so every receiver sees changes in resourceVersion order.
    changes: broadcast::Sender<RequestEvent>,
    /// Change feed of the other objects' metadata, as ((group, kind), event), sent under the
    /// state lock like `changes`.
    object_changes: broadcast::Sender<(KindKey, MetadataEvent)>,
    /// Every change of a Lease, sent under the state lock like `changes`.
    lease_changes: broadcast::Sender<LeaseEvent>,
    clock: SharedClock,
    /// When set, every call fails as if the API server were unreachable (tests, demos).
    unavailable: AtomicBool,
}

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_owned(), name.to_owned())
}

impl State {
    fn next_rv(&mut self) -> String {
        self.last_rv += 1;
        self.last_rv.to_string()
    }

    /// Fills the server-owned metadata of a new object, like the API server's create.
    fn admit_new(&mut self, meta: &mut ObjectMeta, now: jiff::Timestamp) -> Result<Key> {
        let name = meta
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::Invalid("metadata.name: Required value".into()))?;
        let namespace = meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::Invalid("metadata.namespace: Required value".into()))?;
        if !crate::signal::is_valid_object_name(&name) {
            return Err(ApiError::Invalid(format!("metadata.name: Invalid value: {name:?}")));
        }
        if meta.resource_version.as_deref().is_some_and(|rv| !rv.is_empty()) {
            return Err(ApiError::Invalid(
                "metadata.resourceVersion: Invalid value: must not be set on create".into(),
            ));
        }
        self.last_uid += 1;
        meta.uid = Some(format!("00000000-0000-4000-8000-{:012x}", self.last_uid));
        meta.resource_version = Some(self.next_rv());
        meta.creation_timestamp = Some(Time(now));
        meta.generation = Some(1);
        Ok(key(&namespace, &name))
    }
}

/// The preconditions of an update, as the API server applies them: a uid, when sent, must match;
/// the resourceVersion must match unless empty (unconditional update).
fn check_rv(sent: &ObjectMeta, stored: &ObjectMeta, what: &str) -> Result<()> {
    if let Some(uid) = sent.uid.as_deref().filter(|u| !u.is_empty())
        && Some(uid) != stored.uid.as_deref()
    {
        return Err(ApiError::Conflict(format!(
            "Operation cannot be fulfilled on {what}: Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
            stored.uid.as_deref().unwrap_or_default()
        )));
    }
    match sent.resource_version.as_deref() {
        None | Some("") => Ok(()),
        Some(rv) if Some(rv) == stored.resource_version.as_deref() => Ok(()),
        Some(_) => Err(ApiError::Conflict(format!(
            "Operation cannot be fulfilled on {what}: the object has been modified; please apply your changes to the latest version and try again"
        ))),
    }
}

/// `status` with a JSON merge patch applied, read back through the typed status: fields the
/// CRD does not describe are pruned, a value of the wrong type is refused, as the API server does.
fn merged_status(
    status: Option<&RemediationRequestStatus>,
    patch: &serde_json::Value,
) -> Result<RemediationRequestStatus> {
    let mut value = serde_json::to_value(status.cloned().unwrap_or_default())
        .map_err(|e| ApiError::Invalid(format!("status: {e}")))?;
    merge_patch(&mut value, patch);
    super::schema::validate_status(&value).map_err(ApiError::Invalid)?;
    serde_json::from_value(value).map_err(|e| ApiError::Invalid(format!("status: Invalid value: {e}")))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("made an object above")
    };
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Changes a watcher may fall behind by before its watch breaks (and it lists again), like an
/// API server dropping a slow watcher.
const WATCH_BUFFER: usize = 4096;

impl EmbeddedStore {
    pub fn new(clock: SharedClock) -> Self {
        EmbeddedStore {
            state: Mutex::default(),
            changes: broadcast::channel(WATCH_BUFFER).0,
            object_changes: broadcast::channel(WATCH_BUFFER).0,
            lease_changes: broadcast::channel(WATCH_BUFFER).0,
            clock,
            unavailable: AtomicBool::new(false),
        }
    }

    /// Every call yields to the scheduler first, as a network round trip would, so concurrent
    /// callers interleave in tests as they do against a real API server.
    async fn state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        tokio::task::yield_now().await;
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable("embedded store switched off".into()));
        }
        Ok(self.state.lock().expect("embedded store poisoned"))
    }

    /// Makes every call fail with `Unavailable` (true) or work again (false).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Every RemediationRequest, sorted by namespace and name.
    pub fn all_requests(&self) -> Vec<RemediationRequest> {
        self.state
            .lock()
            .expect("embedded store poisoned")
            .requests
            .values()
            .cloned()
            .collect()
    }

    /// Every Lease.
    pub fn all_leases(&self) -> Vec<Lease> {
        self.state
            .lock()
            .expect("embedded store poisoned")
            .leases
            .values()
            .cloned()
            .collect()
    }

    /// The current resourceVersion of the store, as a list would report it.
    pub fn resource_version(&self) -> String {
        self.state.lock().expect("embedded store poisoned").last_rv.to_string()
    }

    /// Applies a JSON merge patch to the status of RR `name`, as the orchestrator would through
    /// the status subresource (no precondition). `Invalid` when the result is not a status the CRD
    /// admits.
    pub fn patch_status(&self, namespace: &str, name: &str, patch: &serde_json::Value) -> Result<RemediationRequest> {
        let mut st = self.state.lock().expect("embedded store poisoned");
        let stored = st.requests.get(&key(namespace, name)).ok_or(ApiError::NotFound)?;
        let status = merged_status(stored.status.as_ref(), patch)?;
        let rv = st.next_rv();
        let rr = st.requests.get_mut(&key(namespace, name)).expect("checked above");
        rr.status = Some(status);
        rr.metadata.resource_version = Some(rv);
        let rr = rr.clone();
        // No receiver is not an error: nobody watches.
        let _ = self.changes.send(RequestEvent::Applied(rr.clone()));
        Ok(rr)
    }

    /// Sets `status.overallPhase` (empty: removes it), as the orchestrator would.
    pub fn set_phase(&self, namespace: &str, name: &str, phase: &str) -> Result<RemediationRequest> {
        let phase = (!phase.is_empty()).then_some(phase);
        self.patch_status(namespace, name, &serde_json::json!({ "overallPhase": phase }))
    }

    /// Deletes RR `name`, as a retention controller (or a person) would.
    pub fn delete_request(&self, namespace: &str, name: &str) -> Result<RemediationRequest> {
        let mut st = self.state.lock().expect("embedded store poisoned");
        let k = key(namespace, name);
        let rr = st.requests.remove(&k).ok_or(ApiError::NotFound)?;
        if let Some(names) = st.by_fingerprint.get_mut(&key(namespace, &rr.spec.signal_fingerprint)) {
            names.retain(|n| n != name);
        }
        st.next_rv();
        let _ = self.changes.send(RequestEvent::Deleted(rr.clone()));
        Ok(rr)
    }

    /// Stores an object's metadata (the owner chain and labels of test scenarios), as a create
    /// or an update would: a new resourceVersion, the name and namespace of `object`, and a
    /// change on the metadata watches of its kind. A kind that is not built in is served from
    /// then on (discovery), as the resource `object.resource`.
    pub fn put_object(&self, object: ObjectRef, mut meta: ObjectMeta) {
        let mut state = self.state.lock().expect("embedded store poisoned");
        if crate::discovery::builtin(&object.kind).is_none()
            && !state
                .custom_kinds
                .iter()
                .any(|k| k.kind == object.kind && k.group == object.group())
        {
            let version = object.api_version.rsplit('/').next().unwrap_or_default().to_owned();
            let resource = if object.resource.is_empty() {
                format!("{}s", object.kind.to_ascii_lowercase())
            } else {
                object.resource.clone()
            };
            state.custom_kinds.push(ApiKind {
                group: object.group().to_owned(),
                version,
                kind: object.kind.clone(),
                resource,
                namespaced: !object.namespace.is_empty(),
            });
        }
        meta.name = Some(object.name.clone());
        meta.namespace = (!object.namespace.is_empty()).then(|| object.namespace.clone());
        meta.resource_version = Some(state.next_rv());
        let kind = (object.group().to_owned(), object.kind.clone());
        state.objects.insert(object_key(&object), meta.clone());
        // No receiver is not an error: nobody watches.
        let _ = self.object_changes.send((kind, WatchEvent::Applied(meta)));
    }

    /// Deletes an object put with [`EmbeddedStore::put_object`], as a controller (or a person)
    /// would: its metadata watches see it go.
    pub fn delete_object(&self, object: &ObjectRef) -> Result<ObjectMeta> {
        let mut state = self.state.lock().expect("embedded store poisoned");
        let mut meta = state.objects.remove(&object_key(object)).ok_or(ApiError::NotFound)?;
        meta.resource_version = Some(state.next_rv());
        let kind = (object.group().to_owned(), object.kind.clone());
        let _ = self.object_changes.send((kind, WatchEvent::Deleted(meta.clone())));
        Ok(meta)
    }
}

#[async_trait]
impl Cluster for EmbeddedStore {
    fn backend_name(&self) -> &'static str {
        "embedded"
    }

    async fn list_requests(
        &self,
        _call: Call<'_>,
        namespace: &str,
        fingerprint: &str,
    ) -> Result<Vec<RemediationRequest>> {
        let st = self.state().await?;
        let Some(names) = st.by_fingerprint.get(&key(namespace, fingerprint)) else {
            return Ok(Vec::new());
        };
        let mut names = names.clone();
        names.sort();
        Ok(names
            .iter()
            .filter_map(|n| st.requests.get(&key(namespace, n)))
            .filter(|rr| rr.spec.signal_fingerprint == fingerprint)
            .cloned()
            .collect())
    }

    async fn get_request(&self, _call: Call<'_>, namespace: &str, name: &str) -> Result<RemediationRequest> {
        self.state()
            .await?
            .requests
            .get(&key(namespace, name))
            .cloned()
            .ok_or(ApiError::NotFound)
    }

    async fn create_request(&self, _call: Call<'_>, rr: &RemediationRequest) -> Result<RemediationRequest> {
        let spec = serde_json::to_value(&rr.spec).map_err(|e| ApiError::Invalid(format!("spec: {e}")))?;
        super::schema::validate_spec(&spec).map_err(ApiError::Invalid)?;
        let now = self.clock.now();
        let mut st = self.state().await?;
        let mut new = rr.clone();
        let k = st.admit_new(&mut new.metadata, now)?;
        if st.requests.contains_key(&k) {
            st.last_rv -= 1;
            return Err(ApiError::AlreadyExists);
        }
        // Status is a subresource: a create never sets it.
        new.status = None;
        st.by_fingerprint
            .entry(key(&k.0, &new.spec.signal_fingerprint))
            .or_default()
            .push(k.1.clone());
        st.requests.insert(k, new.clone());
        let _ = self.changes.send(RequestEvent::Applied(new.clone()));
        Ok(new)
    }

    async fn update_deduplication(
        &self,
        _call: Call<'_>,
        namespace: &str,
        name: &str,
        resource_version: &str,
        deduplication: &Deduplication,
    ) -> Result<RemediationRequest> {
        let patch = serde_json::json!({ "deduplication": deduplication });
        let mut st = self.state().await?;
        let k = key(namespace, name);
        let stored = st.requests.get(&k).ok_or(ApiError::NotFound)?;
        let sent = ObjectMeta {
            resource_version: Some(resource_version.to_owned()),
            ..ObjectMeta::default()
        };
        check_rv(&sent, &stored.metadata, "remediationrequests.kubernaut.ai")?;
        let status = merged_status(stored.status.as_ref(), &patch)?;
        let rv = st.next_rv();
        let stored = st.requests.get_mut(&k).expect("checked above");
        stored.status = Some(status);
        stored.metadata.resource_version = Some(rv);
        let updated = stored.clone();
        let _ = self.changes.send(RequestEvent::Applied(updated.clone()));
        Ok(updated)
    }

    fn watch_requests(&self, namespace: &str) -> BoxStream<'static, Result<RequestEvent>> {
        if self.unavailable.load(Ordering::SeqCst) {
            let e = ApiError::Unavailable("embedded store switched off".into());
            return futures::stream::iter([Err(e)]).boxed();
        }
        // Subscribe and take the snapshot under one lock: every change after the snapshot is
        // in the feed (changes are sent under the same lock).
        let (listed, rx) = {
            let st = self.state.lock().expect("embedded store poisoned");
            let listed: Vec<RemediationRequest> = st
                .requests
                .iter()
                .filter(|((ns, _), _)| ns == namespace)
                .map(|(_, rr)| rr.clone())
                .collect();
            (listed, self.changes.subscribe())
        };
        let namespace = namespace.to_owned();
        feed(listed, rx, move |event: RequestEvent| match &event {
            WatchEvent::Applied(rr) | WatchEvent::Deleted(rr)
                if rr.metadata.namespace.as_deref() != Some(namespace.as_str()) =>
            {
                None
            }
            _ => Some(event),
        })
    }

    async fn create_lease(&self, _call: Call<'_>, lease: &Lease) -> Result<Lease> {
        let now = self.clock.now();
        let mut st = self.state().await?;
        let mut new = lease.clone();
        let k = st.admit_new(&mut new.metadata, now)?;
        if st.leases.contains_key(&k) {
            st.last_rv -= 1;
            return Err(ApiError::AlreadyExists);
        }
        st.leases.insert(k, new.clone());
        // No receiver is not an error: nobody watches.
        let _ = self.lease_changes.send(WatchEvent::Applied(new.clone()));
        Ok(new)
    }

    async fn get_lease(&self, _call: Call<'_>, namespace: &str, name: &str) -> Result<Lease> {
        self.state()
            .await?
            .leases
            .get(&key(namespace, name))
            .cloned()
            .ok_or(ApiError::NotFound)
    }

    async fn list_leases(&self, _call: Call<'_>, namespace: &str, label: (&str, &str)) -> Result<Vec<Lease>> {
        let st = self.state().await?;
        Ok(st
            .leases
            .values()
            .filter(|l| l.metadata.namespace.as_deref() == Some(namespace))
            .filter(|l| {
                l.metadata
                    .labels
                    .as_ref()
                    .and_then(|m| m.get(label.0))
                    .is_some_and(|v| v == label.1)
            })
            .cloned()
            .collect())
    }

    async fn update_lease(&self, _call: Call<'_>, lease: &Lease) -> Result<Lease> {
        let now = self.clock.now();
        let mut st = self.state().await?;
        let k = key(
            lease.metadata.namespace.as_deref().unwrap_or_default(),
            lease.metadata.name.as_deref().unwrap_or_default(),
        );
        let Some(stored) = st.leases.get(&k) else {
            // Leases allow create-on-update: a PUT to a missing name creates it, whatever
            // resourceVersion was sent (as the API server does).
            let mut new = Lease {
                metadata: lease.metadata.clone(),
                spec: lease.spec.clone(),
            };
            new.metadata.resource_version = None;
            new.metadata.uid = None;
            st.admit_new(&mut new.metadata, now)?;
            st.leases.insert(k, new.clone());
            let _ = self.lease_changes.send(WatchEvent::Applied(new.clone()));
            return Ok(new);
        };
        check_rv(&lease.metadata, &stored.metadata, "leases.coordination.k8s.io")?;
        // An update replaces what the client owns (labels, annotations, spec) and keeps what the
        // server owns.
        let mut meta = stored.metadata.clone();
        meta.labels = lease.metadata.labels.clone();
        meta.annotations = lease.metadata.annotations.clone();
        meta.resource_version = Some(st.next_rv());
        let updated = Lease {
            metadata: meta,
            spec: lease.spec.clone(),
        };
        st.leases.insert(k, updated.clone());
        let _ = self.lease_changes.send(WatchEvent::Applied(updated.clone()));
        Ok(updated)
    }

    async fn delete_lease(&self, _call: Call<'_>, namespace: &str, name: &str, resource_version: &str) -> Result<()> {
        let mut st = self.state().await?;
        let k = key(namespace, name);
        let stored = st.leases.get(&k).ok_or(ApiError::NotFound)?;
        if stored.metadata.resource_version.as_deref() != Some(resource_version) {
            return Err(ApiError::Conflict(format!(
                "Precondition failed: ResourceVersion in precondition: {resource_version}, ResourceVersion in object meta: {}",
                stored.metadata.resource_version.as_deref().unwrap_or_default()
            )));
        }
        if let Some(gone) = st.leases.remove(&k) {
            let _ = self.lease_changes.send(WatchEvent::Deleted(gone));
        }
        st.next_rv();
        Ok(())
    }

    fn watch_leases(&self, namespace: &str, label: (&str, &str)) -> BoxStream<'static, Result<LeaseEvent>> {
        if self.unavailable.load(Ordering::SeqCst) {
            let e = ApiError::Unavailable("embedded store switched off".into());
            return futures::stream::iter([Err(e)]).boxed();
        }
        let (namespace, key, value) = (namespace.to_owned(), label.0.to_owned(), label.1.to_owned());
        let wanted = move |l: &Lease| {
            l.metadata.namespace.as_deref() == Some(namespace.as_str())
                && l.metadata.labels.as_ref().and_then(|m| m.get(&key)) == Some(&value)
        };
        // As watch_requests: the snapshot and the subscription under one lock.
        let (listed, rx) = {
            let st = self.state.lock().expect("embedded store poisoned");
            let listed: Vec<Lease> = st.leases.values().filter(|l| wanted(l)).cloned().collect();
            (listed, self.lease_changes.subscribe())
        };
        feed(listed, rx, move |event: LeaseEvent| match &event {
            WatchEvent::Applied(l) | WatchEvent::Deleted(l) if wanted(l) => Some(event),
            _ => None,
        })
    }

    async fn get_metadata(&self, _call: Call<'_>, object: &ObjectRef) -> Result<ObjectMeta> {
        self.state()
            .await?
            .objects
            .get(&object_key(object))
            .cloned()
            .ok_or(ApiError::NotFound)
    }

    fn watch_metadata(&self, kind: &ApiKind) -> BoxStream<'static, Result<MetadataEvent>> {
        if self.unavailable.load(Ordering::SeqCst) {
            let e = ApiError::Unavailable("embedded store switched off".into());
            return futures::stream::iter([Err(e)]).boxed();
        }
        let wanted: KindKey = (kind.group.clone(), kind.kind.clone());
        // As watch_requests: the snapshot and the subscription under one lock.
        let (listed, rx) = {
            let st = self.state.lock().expect("embedded store poisoned");
            let listed: Vec<ObjectMeta> = st
                .objects
                .iter()
                .filter(|((group, kind, _, _), _)| *group == wanted.0 && *kind == wanted.1)
                .map(|(_, meta)| meta.clone())
                .collect();
            (listed, self.object_changes.subscribe())
        };
        feed(listed, rx, move |(kind, event): (KindKey, MetadataEvent)| {
            (kind == wanted).then_some(event)
        })
    }

    async fn list_api_kinds(&self, _call: Call<'_>, core: bool) -> Result<Vec<ApiKind>> {
        let state = self.state().await?;
        let mut kinds = crate::discovery::builtin_kinds(core);
        kinds.extend(
            state
                .custom_kinds
                .iter()
                .filter(|k| k.group.is_empty() == core)
                .cloned(),
        );
        Ok(kinds)
    }

    async fn check_ready(&self, _namespace: &str) -> std::result::Result<(), String> {
        self.state().await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// A watch of the store: `Init`, the snapshot `listed`, `Synced`, then the changes `pick` keeps
/// from `rx` (subscribed under the same lock as the snapshot, so none is missed). A receiver
/// that falls behind ends it with an error, and its watcher lists again.
fn feed<T, E>(
    listed: Vec<T>,
    rx: broadcast::Receiver<E>,
    pick: impl Fn(E) -> Option<WatchEvent<T>> + Send + Sync + 'static,
) -> BoxStream<'static, Result<WatchEvent<T>>>
where
    T: Send + 'static,
    E: Clone + Send + 'static,
{
    let head = std::iter::once(WatchEvent::Init)
        .chain(listed.into_iter().map(WatchEvent::Listed))
        .chain(std::iter::once(WatchEvent::Synced))
        .map(Ok);
    let pick = Arc::new(pick);
    let tail = futures::stream::unfold(Some(rx), move |rx| {
        let pick = pick.clone();
        async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(event) => match pick(event) {
                        Some(event) => return Some((Ok(event), Some(rx))),
                        None => continue,
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let e = ApiError::Unavailable(format!("watch fell {n} changes behind"));
                        return Some((Err(e), None));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    futures::stream::iter(head).chain(tail).boxed()
}
