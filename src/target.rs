//! Owner resolution: climbs controller ownerReferences from the labelled object
//! (Pod -> ReplicaSet -> Deployment, Pod -> Job -> CronJob, ...) so all pods of one workload
//! share one fingerprint. An object's owner comes from the watch-fed owner cache when its kind is
//! watched and synced ([`crate::ownercache`]: no read); otherwise from a read of its metadata
//! (one read per object at a time: concurrent signals share it), whose answer is cached for a
//! short TTL. An object that is gone (NotFound) ends the climb there; any other failed read is an
//! error the caller answers 503 — never a fallback to a shallower object, which would give the
//! incident a second fingerprint (a second RR).

use std::sync::Arc;
use std::time::Duration;

use crate::bounded::Limits;
use crate::cluster::{ApiError, Call, Cluster, ObjectRef};
use crate::crd::TargetResource;
use crate::ownercache::{Lookup, OwnerCache, OwnerCacheMetrics, OwnerWatches};
use crate::readcache::ReadCache;

/// Kinds whose controller owner we follow, and the owner kinds we accept.
const FOLLOW: &[(&str, &[&str])] = &[
    ("Pod", &["ReplicaSet", "StatefulSet", "DaemonSet", "Job"]),
    ("ReplicaSet", &["Deployment"]),
    ("Job", &["CronJob"]),
];

/// The owner kinds followed from `kind` (none: `kind` is the top of its chain).
pub fn accepted_owners(kind: &str) -> &'static [&'static str] {
    FOLLOW.iter().find(|(k, _)| *k == kind).map_or(&[], |(_, o)| o)
}

/// (kind, namespace, name) -> controller owner (None: it has none or does not exist).
type OwnerAnswers = ReadCache<(String, String, String), Option<TargetResource>>;

#[derive(Clone)]
pub struct OwnerResolver {
    cluster: Arc<dyn Cluster>,
    enabled: bool,
    max_depth: usize,
    cache: Arc<OwnerAnswers>,
    /// The watch-fed owners of the watched kinds, when configured.
    watched: Option<OwnerCache>,
}

/// Owner answers remembered (keys are sender-chosen: bounded in entries and bytes).
const CACHE_LIMITS: Limits = Limits {
    entries: 50_000,
    bytes: 16 * 1024 * 1024,
};

impl OwnerResolver {
    pub fn new(cluster: Arc<dyn Cluster>, enabled: bool, max_depth: usize, ttl: Duration) -> Self {
        OwnerResolver {
            cluster,
            enabled,
            max_depth,
            cache: Arc::new(ReadCache::new(ttl, CACHE_LIMITS)),
            watched: None,
        }
    }

    /// Answers the owners of `kinds` (of [`crate::ownercache::WATCHABLE`]) from metadata watches
    /// through this resolver's cluster, bounded by `limits`; the watches run while the returned
    /// handle is held.
    pub fn with_owner_cache(
        mut self,
        kinds: &[&str],
        limits: Limits,
        metrics: OwnerCacheMetrics,
    ) -> (Self, OwnerWatches) {
        let answers = Arc::downgrade(&self.cache);
        // A deleted object's TTL answer (read before the watch synced, or on a miss) goes too.
        let cache = OwnerCache::new(kinds, limits, metrics, move |kind, ns, name| {
            if let Some(answers) = answers.upgrade() {
                answers.forget(&(kind.to_owned(), ns.to_owned(), name.to_owned()));
            }
        });
        let watches = cache.spawn_watches(self.cluster.clone());
        self.watched = Some(cache);
        (self, watches)
    }

    /// The owner cache, when configured.
    pub fn owner_cache(&self) -> Option<&OwnerCache> {
        self.watched.as_ref()
    }

    /// The top controller of `target` (the object itself when it has none or is gone). Errors
    /// other than NotFound are errors: the fingerprint must not depend on whether a read worked.
    #[tracing::instrument(skip_all, fields(kind = %target.kind, name = %target.name))]
    pub async fn resolve(&self, target: TargetResource, call: Call<'_>) -> Result<TargetResource, ApiError> {
        let target = normalise(target);
        if !self.enabled {
            return Ok(target);
        }
        let mut current = target;
        for _ in 0..self.max_depth {
            if accepted_owners(&current.kind).is_empty() {
                break;
            }
            match self.owner_of(&current, call).await? {
                Some(owner) => current = owner,
                None => break,
            }
        }
        Ok(current)
    }

    async fn owner_of(&self, obj: &TargetResource, call: Call<'_>) -> Result<Option<TargetResource>, ApiError> {
        if let Some(watched) = &self.watched
            && let Lookup::Hit(owner) = watched.lookup(&obj.kind, &obj.api_version, &obj.namespace, &obj.name)
        {
            return Ok(owner);
        }
        // Not watched, not synced, or not in the synced watch (it may be newer than the watch):
        // read. A storm about an object not cached yet: one read, the other signals wait for it.
        let key = (obj.kind.clone(), obj.namespace.clone(), obj.name.clone());
        self.cache.get_or_read(&key, || self.read_owner(obj, call)).await
    }

    /// Reads `obj`'s metadata: its accepted controller owner.
    async fn read_owner(&self, obj: &TargetResource, call: Call<'_>) -> Result<Option<TargetResource>, ApiError> {
        match self.cluster.get_metadata(call, &object_ref(obj)).await {
            Ok(meta) => Ok(crate::ownercache::controller_owner(
                &obj.namespace,
                accepted_owners(&obj.kind),
                &meta,
            )),
            // The object is gone (or never existed): nothing to climb, remember that briefly.
            Err(ApiError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A target as the signal named it, with a built-in kind written as Kubernetes writes it (`POD`
/// and `pod` are `Pod`: one fingerprint, and the owner chain is climbed) at the version the
/// cluster serves it (`apps/v1beta2` Deployments are `apps/v1`). Other kinds are kept as sent:
/// a fingerprint never depends on what the API server answers.
pub fn normalise(mut target: TargetResource) -> TargetResource {
    if let Some(k) = crate::discovery::builtin(&target.kind) {
        let group = target.api_version.split_once('/').map_or("", |(g, _)| g);
        if target.api_version.is_empty() || group == k.group {
            target.kind = k.kind.clone();
            target.api_version = k.api_version();
        }
    }
    target
}

/// The object a normalised target names, to read its metadata.
fn object_ref(obj: &TargetResource) -> ObjectRef {
    let builtin = crate::discovery::builtin(&obj.kind).filter(|k| k.kind == obj.kind);
    ObjectRef {
        api_version: if obj.api_version.is_empty() {
            builtin.as_ref().map_or_else(|| "v1".to_owned(), |k| k.api_version())
        } else {
            obj.api_version.clone()
        },
        kind: obj.kind.clone(),
        resource: builtin.map(|k| k.resource).unwrap_or_default(),
        namespace: obj.namespace.clone(),
        name: obj.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::backend::faults::{Fault, Faulty, Op};
    use crate::clock::SystemClock;

    fn owned_by(kind: &str, name: &str, api_version: &str) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                api_version: api_version.into(),
                kind: kind.into(),
                name: name.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn obj(kind: &str, name: &str, api_version: &str) -> ObjectRef {
        ObjectRef {
            api_version: api_version.into(),
            kind: kind.into(),
            resource: String::new(),
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn pod(name: &str) -> TargetResource {
        TargetResource {
            kind: "Pod".into(),
            name: name.into(),
            namespace: "shop".into(),
            api_version: "v1".into(),
        }
    }

    fn store_with_deployment() -> Arc<EmbeddedStore> {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        store.put_object(
            obj("Pod", "api-7d9f-x1", "v1"),
            owned_by("ReplicaSet", "api-7d9f", "apps/v1"),
        );
        store.put_object(
            obj("ReplicaSet", "api-7d9f", "apps/v1"),
            owned_by("Deployment", "api", "apps/v1"),
        );
        store.put_object(obj("Deployment", "api", "apps/v1"), ObjectMeta::default());
        store
    }

    #[tokio::test]
    async fn pods_resolve_through_their_replicaset_to_the_deployment_and_answers_are_cached() {
        let store = store_with_deployment();
        let reads = Arc::new(AtomicUsize::new(0));
        let r = reads.clone();
        let counting = Arc::new(Faulty::new(store, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            Fault::Pass
        }));
        let resolver = OwnerResolver::new(counting, true, 5, Duration::from_secs(30));
        let top = resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await.unwrap();
        assert_eq!(
            (top.kind.as_str(), top.name.as_str(), top.namespace.as_str()),
            ("Deployment", "api", "shop")
        );
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "Pod and ReplicaSet metadata; Deployments are not climbed"
        );
        resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await.unwrap();
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "second resolution comes from the cache"
        );
    }

    #[tokio::test]
    async fn concurrent_signals_about_one_uncached_pod_share_its_reads() {
        let store = store_with_deployment();
        let reads = Arc::new(AtomicUsize::new(0));
        let r = reads.clone();
        let slow = Arc::new(Faulty::new(store, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            Fault::Delay(Duration::from_millis(30))
        }));
        let resolver = OwnerResolver::new(slow, true, 5, Duration::from_secs(30));
        let tops =
            futures::future::join_all((0..20).map(|_| resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED))).await;
        assert!(
            tops.iter()
                .all(|t| t.as_ref().is_ok_and(|t| t.kind == "Deployment" && t.name == "api"))
        );
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "one Pod read and one ReplicaSet read for all 20"
        );
        assert_eq!(resolver.cache.reads_in_flight(), 0, "nothing left in flight");
    }

    #[tokio::test]
    async fn a_failed_owner_read_is_an_error_never_a_shallower_target() {
        // Issue 13, path 2: a throttled ReplicaSet read used to fall back to the pod, i.e. a
        // second fingerprint (and a second RR) for the incident the Deployment's RR stands for.
        for error in [
            ApiError::Throttled { retry_after: None },
            ApiError::Timeout,
            ApiError::Unavailable("503".into()),
            ApiError::Forbidden("replicasets is forbidden".into()),
        ] {
            let reads = Arc::new(AtomicUsize::new(0));
            let r = reads.clone();
            let e = error.clone();
            let second_fails = Arc::new(Faulty::new(store_with_deployment(), move |op| match op {
                Op::GetMetadata if r.fetch_add(1, Ordering::SeqCst) == 1 => Fault::Fail(e.clone()),
                _ => Fault::Pass,
            }));
            let resolver = OwnerResolver::new(second_fails, true, 5, Duration::from_secs(30));
            assert_eq!(
                resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await,
                Err(error.clone())
            );
            assert_eq!(
                resolver
                    .resolve(pod("api-7d9f-x1"), Call::UNCOUNTED)
                    .await
                    .unwrap()
                    .kind,
                "Deployment",
                "the error was not cached: the next read resolves ({error:?})"
            );
        }
    }

    #[tokio::test]
    async fn missing_objects_and_disabled_resolution_keep_the_labelled_target() {
        let store = store_with_deployment();
        let resolver = OwnerResolver::new(store.clone(), true, 5, Duration::from_secs(30));
        assert_eq!(resolver.resolve(pod("gone"), Call::UNCOUNTED).await, Ok(pod("gone")));
        let off = OwnerResolver::new(store, false, 5, Duration::from_secs(30));
        assert_eq!(
            off.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await,
            Ok(pod("api-7d9f-x1"))
        );
    }

    #[tokio::test]
    async fn kinds_in_any_case_or_an_old_version_resolve_and_fingerprint_as_one() {
        let store = store_with_deployment();
        let resolver = OwnerResolver::new(store, true, 5, Duration::from_secs(30));
        let sent = |kind: &str, api_version: &str| TargetResource {
            kind: kind.into(),
            name: "api-7d9f-x1".into(),
            namespace: "shop".into(),
            api_version: api_version.into(),
        };
        let top = resolver.resolve(sent("Pod", "v1"), Call::UNCOUNTED).await.unwrap();
        assert_eq!((top.kind.as_str(), top.name.as_str()), ("Deployment", "api"));
        for (kind, api_version) in [("POD", "v1"), ("pod", ""), ("Pod", "")] {
            let t = resolver
                .resolve(sent(kind, api_version), Call::UNCOUNTED)
                .await
                .unwrap();
            assert_eq!(t, top, "{kind} {api_version:?}");
            let f = crate::fingerprint::Fingerprint::of("", &t);
            assert_eq!(f, crate::fingerprint::Fingerprint::of("", &top));
        }
        let rs = TargetResource {
            kind: "replicaset".into(),
            name: "api-7d9f".into(),
            namespace: "shop".into(),
            api_version: "apps/v1beta2".into(),
        };
        assert_eq!(
            resolver.resolve(rs, Call::UNCOUNTED).await,
            Ok(top),
            "an unserved version still climbs"
        );
        let custom = TargetResource {
            kind: "pod".into(),
            name: "x".into(),
            namespace: "shop".into(),
            api_version: "example.com/v1".into(),
        };
        assert_eq!(
            normalise(custom.clone()),
            custom,
            "another group's kind is kept as sent"
        );
    }

    #[tokio::test]
    async fn depth_is_bounded() {
        let store = store_with_deployment();
        let resolver = OwnerResolver::new(store, true, 1, Duration::from_secs(30));
        assert_eq!(
            resolver
                .resolve(pod("api-7d9f-x1"), Call::UNCOUNTED)
                .await
                .unwrap()
                .kind,
            "ReplicaSet"
        );
    }

    // The watch-fed owner cache (ownercache.rs): hits need no read, misses and an unsynced
    // watch read as before, a failed read stays an error, a deletion is seen.

    const LIMITS: Limits = Limits {
        entries: 1000,
        bytes: 1024 * 1024,
    };

    /// Counts the metadata reads through `hook`'s faults (the watches are not reads).
    fn reads_counted(
        store: Arc<EmbeddedStore>,
        hook: impl Fn(Op) -> Fault + Send + Sync + 'static,
    ) -> (Arc<Faulty>, Arc<AtomicUsize>) {
        let reads = Arc::new(AtomicUsize::new(0));
        let r = reads.clone();
        let faulty = Arc::new(Faulty::new(store, move |op| {
            if op == Op::GetMetadata {
                r.fetch_add(1, Ordering::SeqCst);
            }
            hook(op)
        }));
        (faulty, reads)
    }

    fn cached(cluster: Arc<Faulty>, kinds: &[&str]) -> (OwnerResolver, OwnerWatches, OwnerCacheMetrics) {
        let metrics = crate::metrics::Metrics::register(&prometheus::Registry::new())
            .unwrap()
            .owner_cache;
        let (resolver, watches) = OwnerResolver::new(cluster, true, 5, Duration::from_secs(30)).with_owner_cache(
            kinds,
            LIMITS,
            metrics.clone(),
        );
        (resolver, watches, metrics)
    }

    async fn until(resolver: &OwnerResolver, what: &str, ready: impl Fn(&OwnerCache) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let cache = resolver.owner_cache().expect("configured");
        assert!(cache.wait_for(deadline, ready).await, "{what} within 10 s");
    }

    fn lookups(metrics: &OwnerCacheMetrics, result: &str) -> u64 {
        metrics.lookups.with_label_values(&[result]).get()
    }

    #[tokio::test]
    async fn a_synced_owner_cache_answers_without_a_read() {
        let (counting, reads) = reads_counted(store_with_deployment(), |_| Fault::Pass);
        let (resolver, _watches, metrics) = cached(counting.clone(), &["ReplicaSet"]);
        until(&resolver, "ReplicaSets synced", |c| c.is_synced("ReplicaSet")).await;
        for _ in 0..3 {
            let top = resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await.unwrap();
            assert_eq!((top.kind.as_str(), top.name.as_str()), ("Deployment", "api"));
        }
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "the Pod is read once (TTL); the ReplicaSet never"
        );
        assert_eq!(lookups(&metrics, "hit"), 3);

        let (with_pods, _watches, metrics) = cached(counting, &["Pod", "ReplicaSet"]);
        until(&with_pods, "Pods and ReplicaSets synced", |c| {
            c.is_synced("Pod") && c.is_synced("ReplicaSet")
        })
        .await;
        let top = with_pods.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await.unwrap();
        assert_eq!((top.kind.as_str(), top.name.as_str()), ("Deployment", "api"));
        assert_eq!(reads.load(Ordering::SeqCst), 1, "no read at all with Pods watched");
        assert_eq!(lookups(&metrics, "hit"), 2);
    }

    #[tokio::test]
    async fn an_object_the_synced_watch_has_not_delivered_is_read_and_a_failed_read_is_an_error() {
        let store = store_with_deployment();
        // The watch delivers its list (Init, one ReplicaSet, Synced), then stalls: it lags.
        let gate = Arc::new(tokio::sync::Semaphore::new(3));
        let g = gate.clone();
        let fail_rs = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fail_rs.clone();
        let (counting, reads) = reads_counted(store.clone(), move |op| match op {
            Op::MetadataEvent => Fault::Gate(g.clone()),
            Op::GetMetadata if f.load(Ordering::SeqCst) => Fault::Fail(ApiError::Unavailable("503".into())),
            _ => Fault::Pass,
        });
        let (resolver, _watches, metrics) = cached(counting, &["ReplicaSet"]);
        until(&resolver, "ReplicaSets synced", |c| c.is_synced("ReplicaSet")).await;
        store.put_object(
            obj("Pod", "web-5c4b-q2", "v1"),
            owned_by("ReplicaSet", "web-5c4b", "apps/v1"),
        );
        store.put_object(
            obj("ReplicaSet", "web-5c4b", "apps/v1"),
            owned_by("Deployment", "web", "apps/v1"),
        );
        let top = resolver.resolve(pod("web-5c4b-q2"), Call::UNCOUNTED).await.unwrap();
        assert_eq!(
            (top.kind.as_str(), top.name.as_str()),
            ("Deployment", "web"),
            "newer than the watch: read, never taken for absent"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 2, "the Pod and the ReplicaSet");
        assert_eq!(lookups(&metrics, "miss_read"), 1);

        store.put_object(
            obj("Pod", "db-77aa-z9", "v1"),
            owned_by("ReplicaSet", "db-77aa", "apps/v1"),
        );
        fail_rs.store(true, Ordering::SeqCst);
        assert_eq!(
            resolver.resolve(pod("db-77aa-z9"), Call::UNCOUNTED).await,
            Err(ApiError::Unavailable("503".into())),
            "a failed read on a miss is an error, never a shallower target"
        );
        assert_eq!(gate.available_permits(), 0, "the watch was stalled throughout");
    }

    #[tokio::test]
    async fn before_its_watch_syncs_owners_are_read_and_errors_stay_errors() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let (counting, reads) = reads_counted(store_with_deployment(), move |op| match op {
            Op::WatchMetadata => Fault::Hang,
            Op::GetMetadata if f.load(Ordering::SeqCst) => Fault::Fail(ApiError::Timeout),
            _ => Fault::Pass,
        });
        let (resolver, _watches, metrics) = cached(counting, &["ReplicaSet"]);
        assert_eq!(
            resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await,
            Err(ApiError::Timeout)
        );
        fail.store(false, Ordering::SeqCst);
        let top = resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await.unwrap();
        assert_eq!((top.kind.as_str(), top.name.as_str()), ("Deployment", "api"));
        assert_eq!(
            reads.load(Ordering::SeqCst),
            3,
            "failed Pod read, then Pod and ReplicaSet"
        );
        assert_eq!(lookups(&metrics, "not_synced"), 1);
        assert_eq!(lookups(&metrics, "hit") + lookups(&metrics, "miss_read"), 0);
    }

    #[tokio::test]
    async fn a_deleted_object_leaves_the_cache_and_its_owner_is_not_answered_any_more() {
        let store = store_with_deployment();
        // The watch starts only when let: first the resolver reads (and remembers for its TTL).
        let start = Arc::new(tokio::sync::Semaphore::new(0));
        let s = start.clone();
        let (counting, reads) = reads_counted(store.clone(), move |op| match op {
            Op::WatchMetadata => Fault::Gate(s.clone()),
            _ => Fault::Pass,
        });
        let (resolver, _watches, _metrics) = cached(counting, &["ReplicaSet"]);
        assert_eq!(
            resolver
                .resolve(pod("api-7d9f-x1"), Call::UNCOUNTED)
                .await
                .unwrap()
                .kind,
            "Deployment"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        start.add_permits(1);
        until(&resolver, "ReplicaSets synced", |c| {
            c.objects("ReplicaSet") == 1 && c.is_synced("ReplicaSet")
        })
        .await;

        store.delete_object(&obj("ReplicaSet", "api-7d9f", "apps/v1")).unwrap();
        until(&resolver, "the deletion seen", |c| c.objects("ReplicaSet") == 0).await;
        let top = resolver.resolve(pod("api-7d9f-x1"), Call::UNCOUNTED).await.unwrap();
        assert_eq!(
            (top.kind.as_str(), top.name.as_str()),
            ("ReplicaSet", "api-7d9f"),
            "the ReplicaSet is gone: the climb ends there (read fresh, not its remembered owner)"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 3, "one read of the ReplicaSet: NotFound");
    }
}
