//! Owner resolution: climbs controller ownerReferences from the labelled object
//! (Pod -> ReplicaSet -> Deployment, Pod -> Job -> CronJob, ...) so all pods of one workload
//! share one fingerprint. Reads only metadata (one read per object at a time: concurrent signals
//! share it) and caches answers for a short TTL. An object that is gone (NotFound) ends the
//! climb there; any other failed read is an error the caller answers 503 — never a fallback to
//! a shallower object, which would give the incident a second fingerprint (a second RR).

use std::sync::Arc;
use std::time::Duration;

use crate::bounded::Limits;
use crate::cluster::{ApiError, Cluster, ObjectRef};
use crate::crd::TargetResource;
use crate::readcache::ReadCache;
use crate::signal::{is_valid_api_version, is_valid_object_name};

/// Kinds whose controller owner we follow, and the owner kinds we accept.
const FOLLOW: &[(&str, &[&str])] = &[
    ("Pod", &["ReplicaSet", "StatefulSet", "DaemonSet", "Job"]),
    ("ReplicaSet", &["Deployment"]),
    ("Job", &["CronJob"]),
];

/// (kind, namespace, name) -> controller owner (None: it has none or does not exist).
type OwnerCache = ReadCache<(String, String, String), Option<TargetResource>>;

#[derive(Clone)]
pub struct OwnerResolver {
    cluster: Arc<dyn Cluster>,
    enabled: bool,
    max_depth: usize,
    cache: Arc<OwnerCache>,
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
        }
    }

    /// The top controller of `target` (the object itself when it has none or is gone). Errors
    /// other than NotFound are errors: the fingerprint must not depend on whether a read worked.
    #[tracing::instrument(skip_all, fields(kind = %target.kind, name = %target.name))]
    pub async fn resolve(&self, target: TargetResource) -> Result<TargetResource, ApiError> {
        let target = normalise(target);
        if !self.enabled {
            return Ok(target);
        }
        let mut current = target;
        for _ in 0..self.max_depth {
            if !FOLLOW.iter().any(|(k, _)| *k == current.kind) {
                break;
            }
            match self.owner_of(&current).await? {
                Some(owner) => current = owner,
                None => break,
            }
        }
        Ok(current)
    }

    async fn owner_of(&self, obj: &TargetResource) -> Result<Option<TargetResource>, ApiError> {
        let key = (obj.kind.clone(), obj.namespace.clone(), obj.name.clone());
        // A storm about an object not cached yet: one read, the other signals wait for it.
        self.cache.get_or_read(&key, || self.read_owner(obj)).await
    }

    /// Reads `obj`'s metadata: its accepted controller owner.
    async fn read_owner(&self, obj: &TargetResource) -> Result<Option<TargetResource>, ApiError> {
        let reference = object_ref(obj);
        let owner = match self.cluster.get_metadata(&reference).await {
            Ok(meta) => {
                let accepted = FOLLOW
                    .iter()
                    .find(|(k, _)| *k == obj.kind)
                    .map(|(_, o)| *o)
                    .unwrap_or(&[]);
                meta.owner_references.unwrap_or_default().into_iter().find_map(|o| {
                    // Found by fuzzing: an ownerReference's name and apiVersion are only required
                    // to be non-empty, and they become the target's identity and an API URL path.
                    let usable = is_valid_object_name(&o.name)
                        && (o.api_version.is_empty() || is_valid_api_version(&o.api_version));
                    // Found by fuzzing: an owner written without its apiVersion is named as the
                    // signal's own target would be (normalised), so one climb gives one answer.
                    (o.controller == Some(true) && accepted.contains(&o.kind.as_str()) && usable).then(|| {
                        normalise(TargetResource {
                            kind: o.kind,
                            name: o.name,
                            namespace: obj.namespace.clone(),
                            api_version: o.api_version,
                        })
                    })
                })
            }
            // The object is gone (or never existed): nothing to climb, remember that briefly.
            Err(ApiError::NotFound) => None,
            Err(e) => return Err(e),
        };
        Ok(owner)
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
        let top = resolver.resolve(pod("api-7d9f-x1")).await.unwrap();
        assert_eq!(
            (top.kind.as_str(), top.name.as_str(), top.namespace.as_str()),
            ("Deployment", "api", "shop")
        );
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "Pod and ReplicaSet metadata; Deployments are not climbed"
        );
        resolver.resolve(pod("api-7d9f-x1")).await.unwrap();
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
        let tops = futures::future::join_all((0..20).map(|_| resolver.resolve(pod("api-7d9f-x1")))).await;
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
            assert_eq!(resolver.resolve(pod("api-7d9f-x1")).await, Err(error.clone()));
            assert_eq!(
                resolver.resolve(pod("api-7d9f-x1")).await.unwrap().kind,
                "Deployment",
                "the error was not cached: the next read resolves ({error:?})"
            );
        }
    }

    #[tokio::test]
    async fn missing_objects_and_disabled_resolution_keep_the_labelled_target() {
        let store = store_with_deployment();
        let resolver = OwnerResolver::new(store.clone(), true, 5, Duration::from_secs(30));
        assert_eq!(resolver.resolve(pod("gone")).await, Ok(pod("gone")));
        let off = OwnerResolver::new(store, false, 5, Duration::from_secs(30));
        assert_eq!(off.resolve(pod("api-7d9f-x1")).await, Ok(pod("api-7d9f-x1")));
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
        let top = resolver.resolve(sent("Pod", "v1")).await.unwrap();
        assert_eq!((top.kind.as_str(), top.name.as_str()), ("Deployment", "api"));
        for (kind, api_version) in [("POD", "v1"), ("pod", ""), ("Pod", "")] {
            let t = resolver.resolve(sent(kind, api_version)).await.unwrap();
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
        assert_eq!(resolver.resolve(rs).await, Ok(top), "an unserved version still climbs");
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
        assert_eq!(resolver.resolve(pod("api-7d9f-x1")).await.unwrap().kind, "ReplicaSet");
    }
}
