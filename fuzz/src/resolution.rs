//! Owner resolution on a store built from fuzz bytes: Pods, ReplicaSets, Deployments, Jobs,
//! CronJobs, ... with arbitrary (dangling, hostile, cross-namespace, non-controller) ownerReferences,
//! resolved from a valid target with an arbitrary `max_depth`, with or without a failing read.
//!
//! Input layout (see [`Scenario::decode`]): max_depth, the target, the injected fault, then the
//! objects, each with up to three ownerReferences. Names come from small pools (so chains link up)
//! plus hostile entries and raw bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::{ApiError, Call, ObjectRef};
use signal_gateway::crd::TargetResource;
use signal_gateway::target::OwnerResolver;

use crate::bytes::Bytes;
use crate::invariants::check_target;

/// Names that link objects together; the signal's target takes one of these.
const VALID_NAMES: &[&str] = &[
    "api-0",
    "api-7d9f",
    "api",
    "backup-28000",
    "backup",
    "nightly",
    "web",
    "x",
];
/// Names an ownerReference may carry that no object could have.
const HOSTILE_NAMES: &[&str] = &["", "../etc", "Api", "a:b", "a/b", "-x", "a?watch=1", "x."];
const VALID_NAMESPACES: &[&str] = &["shop", "payments"];
const STORE_NAMESPACES: &[&str] = &["shop", "payments", "kube-system", "", "Shop"];
const KINDS: &[&str] = &[
    "Pod",
    "ReplicaSet",
    "Deployment",
    "Job",
    "CronJob",
    "StatefulSet",
    "DaemonSet",
    "Node",
];
const OWNER_KINDS: &[&str] = &[
    "ReplicaSet",
    "Deployment",
    "Job",
    "CronJob",
    "StatefulSet",
    "DaemonSet",
    "Pod",
    "replicaset",
    "",
];
/// Kinds owner resolution may climb to.
const CONTROLLER_KINDS: &[&str] = &["ReplicaSet", "Deployment", "Job", "CronJob", "StatefulSet", "DaemonSet"];
const TARGET_API_VERSIONS: &[&str] = &["", "v1", "apps/v1", "batch/v1"];
const API_VERSIONS: &[&str] = &[
    "",
    "v1",
    "apps/v1",
    "batch/v1",
    "apps/v1beta2",
    "v1/../../secrets",
    "apps/v1?watch=1",
    "a/b/c",
    "V1",
];

/// The owner cache TTL: long enough never to expire during one input.
const TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct Scenario {
    pub max_depth: usize,
    pub target: TargetResource,
    /// Fail this read (0-based) of the resolver, with this error.
    pub fault: Option<(usize, ApiError)>,
    pub objects: Vec<(ObjectRef, ObjectMeta)>,
}

impl Scenario {
    pub fn decode(data: &[u8]) -> Self {
        let mut b = Bytes::new(data);
        let max_depth = usize::from(b.byte() % 8);
        let target = TargetResource {
            kind: b.pick(KINDS).into(),
            name: b.pick(VALID_NAMES).into(),
            namespace: b.pick(VALID_NAMESPACES).into(),
            api_version: b.pick(TARGET_API_VERSIONS).into(),
        };
        let fault_at = b.byte();
        let error = b.pick(&[
            ApiError::Forbidden("pods is forbidden".into()),
            ApiError::Unavailable("connection refused".into()),
            ApiError::Timeout,
            ApiError::NotFound,
            ApiError::Throttled { retry_after: None },
        ]);
        let fault = (fault_at < 8).then_some((usize::from(fault_at), error));
        let long = "a".repeat(254);
        let mut names: Vec<&str> = VALID_NAMES.to_vec();
        names.extend_from_slice(HOSTILE_NAMES);
        names.push(&long);
        let count = usize::from(b.byte() % 9);
        let mut objects = Vec::with_capacity(count);
        for _ in 0..count {
            let object = ObjectRef {
                api_version: b.pick(API_VERSIONS).into(),
                kind: b.pick(KINDS).into(),
                resource: String::new(),
                namespace: b.pick(STORE_NAMESPACES).into(),
                name: b.string(&names),
            };
            let owners: Vec<OwnerReference> = (0..b.byte() % 4)
                .map(|_| OwnerReference {
                    api_version: b.pick(API_VERSIONS).into(),
                    kind: b.pick(OWNER_KINDS).into(),
                    name: b.string(&names),
                    controller: b.pick(&[Some(true), Some(false), None]),
                    uid: "00000000-0000-4000-8000-000000000001".into(),
                    ..Default::default()
                })
                .collect();
            let meta = ObjectMeta {
                owner_references: (!owners.is_empty()).then_some(owners),
                ..Default::default()
            };
            objects.push((object, meta));
        }
        Scenario {
            max_depth,
            target,
            fault,
            objects,
        }
    }

    fn store(&self) -> Arc<EmbeddedStore> {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        for (object, meta) in &self.objects {
            store.put_object(object.clone(), meta.clone());
        }
        store
    }

    /// Whether some stored object named like `from` has a controller ownerReference naming `to`.
    fn links(&self, from: &TargetResource, to: &TargetResource) -> bool {
        self.objects.iter().any(|(o, meta)| {
            (o.kind.as_str(), o.namespace.as_str(), o.name.as_str())
                == (from.kind.as_str(), from.namespace.as_str(), from.name.as_str())
                && meta.owner_references.iter().flatten().any(|r| {
                    // The owner as resolution names it: built-in kinds at their served version.
                    let owner = signal_gateway::target::normalise(TargetResource {
                        kind: r.kind.clone(),
                        name: r.name.clone(),
                        namespace: to.namespace.clone(),
                        api_version: r.api_version.clone(),
                    });
                    r.controller == Some(true) && owner == *to
                })
        })
    }
}

/// A resolver over `store` that counts its reads and fails the `fault`'s one.
fn resolver(
    store: &Arc<EmbeddedStore>,
    enabled: bool,
    max_depth: usize,
    fault: Option<(usize, ApiError)>,
) -> (OwnerResolver, Arc<AtomicUsize>) {
    let reads = Arc::new(AtomicUsize::new(0));
    let counter = reads.clone();
    let cluster = Faulty::new(store.clone(), move |op| {
        assert_eq!(op, Op::GetMetadata, "owner resolution only reads metadata");
        let n = counter.fetch_add(1, Ordering::SeqCst);
        match &fault {
            Some((at, error)) if *at == n => Fault::Fail(error.clone()),
            _ => Fault::Pass,
        }
    });
    (OwnerResolver::new(Arc::new(cluster), enabled, max_depth, TTL), reads)
}

/// Resolves `target` with a fresh resolver; the result and the number of reads.
async fn resolve(
    store: &Arc<EmbeddedStore>,
    target: &TargetResource,
    max_depth: usize,
    fault: Option<(usize, ApiError)>,
) -> (Result<TargetResource, ApiError>, usize) {
    let (r, reads) = resolver(store, true, max_depth, fault);
    let top = r.resolve(target.clone(), Call::UNCOUNTED).await;
    (top, reads.load(Ordering::SeqCst))
}

/// [`resolve`] without a fault, which never fails.
async fn resolve_ok(store: &Arc<EmbeddedStore>, target: &TargetResource, max_depth: usize) -> (TargetResource, usize) {
    let (top, reads) = resolve(store, target, max_depth, None).await;
    (
        top.expect("only NotFound happens without a fault, and it is no error"),
        reads,
    )
}

/// Every invariant of owner resolution on one decoded scenario.
pub async fn check_scenario(s: &Scenario) {
    let store = s.store();
    let n = s.max_depth;
    check_target(&s.target);

    // Terminates within max_depth reads, stays in the signal's namespace, names a valid object.
    let (r, reads) = resolve_ok(&store, &s.target, n).await;
    assert!(reads <= n, "{reads} reads with max_depth {n}");
    assert_eq!(
        r.namespace, s.target.namespace,
        "resolution left the signal's namespace"
    );
    check_target(&r);
    // The target as resolution starts from it: its built-in kind and version as served.
    let start = signal_gateway::target::normalise(s.target.clone());
    assert!(
        r == start || CONTROLLER_KINDS.contains(&r.kind.as_str()),
        "resolved to a kind that is no controller: {r:?}"
    );

    // Depth n is n single steps, and each step follows a stored controller ownerReference.
    let mut step = start;
    for _ in 0..n {
        let (next, reads) = resolve_ok(&store, &step, 1).await;
        assert!(reads <= 1);
        if next != step {
            assert!(
                s.links(&step, &next),
                "{step:?} -> {next:?} follows no controller ownerReference"
            );
        }
        step = next;
    }
    assert_eq!(r, step, "max_depth {n} is not {n} single steps");

    // Deterministic, and a second resolution on the same resolver comes from the cache.
    let (cached, reads_before) = resolver(&store, true, n, None);
    let first = cached
        .resolve(s.target.clone(), Call::UNCOUNTED)
        .await
        .expect("no fault");
    let used = reads_before.load(Ordering::SeqCst);
    assert_eq!(first, r, "two fresh resolvers disagree");
    assert_eq!(
        cached.resolve(s.target.clone(), Call::UNCOUNTED).await,
        Ok(r.clone()),
        "the cache changed the answer"
    );
    assert_eq!(
        reads_before.load(Ordering::SeqCst),
        used,
        "a cached resolution read again"
    );

    // Disabled or depth 0: the labelled target (normalised), no read.
    let start = signal_gateway::target::normalise(s.target.clone());
    let (off, off_reads) = resolver(&store, false, n, None);
    assert_eq!(off.resolve(s.target.clone(), Call::UNCOUNTED).await, Ok(start.clone()));
    assert_eq!(off_reads.load(Ordering::SeqCst), 0);
    assert_eq!(resolve_ok(&store, &s.target, 0).await, (start, 0));

    // A failing read k: NotFound ends the climb at the object that is gone (what depth k
    // reaches); any other error is the answer, never a shallower target (another fingerprint).
    if let Some((k, error)) = &s.fault {
        let (failed, _) = resolve(&store, &s.target, n, Some((*k, error.clone()))).await;
        if *k >= reads {
            assert_eq!(failed, Ok(r.clone()), "read {k} never happens");
        } else if *error == ApiError::NotFound {
            assert_eq!(
                failed,
                Ok(resolve_ok(&store, &s.target, *k).await.0),
                "NotFound at read {k}"
            );
        } else {
            assert_eq!(failed, Err(error.clone()), "read {k} failing with {error:?}");
        }
    }
}

/// Decodes `data` and checks it on `rt`.
pub fn check_resolution(rt: &tokio::runtime::Runtime, data: &[u8]) {
    let scenario = Scenario::decode(data);
    rt.block_on(check_scenario(&scenario));
}
