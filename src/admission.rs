//! Checks a parsed signal must pass before it may produce a RemediationRequest:
//!
//! - **freshness**: a signal timestamped implausibly far in the future (`future_timestamp`), or,
//!   when `freshness.maxAge` is set, older than that (`stale_signal`), or with a timestamp that is
//!   not RFC 3339 (`invalid_timestamp`) is answered `rejected` — never dropped silently;
//! - **scope** (`scope.requireManagedLabel`): the gateway acts only on targets opted in with the
//!   Kubernaut label `kubernaut.ai/managed=true`, on the (resolved) target or on its namespace;
//!   `kubernaut.ai/managed=false` on the target opts it out of a managed namespace. Others are
//!   answered `rejected` with reason `unmanaged_resource`. The label is read where the cluster
//!   serves the target's kind ([`crate::discovery`]); a target whose label cannot be known (a kind
//!   the cluster does not serve, a read that is forbidden) is not acted on. Label reads are cached
//!   for a short TTL (one read per object at a time, as owner reads: [`crate::readcache`]).

use std::sync::Arc;
use std::time::Duration;

use crate::bounded::Limits;
use crate::cluster::{ApiError, Call, Cluster, ObjectRef};
use crate::config;
use crate::crd::TargetResource;
use crate::discovery::Discovery;
use crate::readcache::ReadCache;
use crate::signal::{Signal, Skip};

pub const MANAGED_LABEL: &str = "kubernaut.ai/managed";

pub const FUTURE_TIMESTAMP: &str = "future_timestamp";
pub const STALE_SIGNAL: &str = "stale_signal";
pub const INVALID_TIMESTAMP: &str = "invalid_timestamp";
pub const UNMANAGED_RESOURCE: &str = "unmanaged_resource";

#[derive(Debug, Clone)]
pub struct Freshness {
    max_future_skew: Duration,
    max_age: Duration,
}

impl Freshness {
    pub fn new(config: &config::Freshness) -> Self {
        Freshness {
            max_future_skew: config.max_future_skew,
            max_age: config.max_age,
        }
    }

    /// `Err(rejection)` when the signal's timestamp is implausible at `now`.
    pub fn check(&self, signal: &Signal, now: jiff::Timestamp) -> Result<(), Skip> {
        let Some(text) = signal.observed_at.as_deref() else {
            return Ok(());
        };
        let Ok(at) = text.parse::<jiff::Timestamp>() else {
            return Err(Skip::Rejected(INVALID_TIMESTAMP.into()));
        };
        let ahead = at.duration_since(now);
        if ahead > jiff::SignedDuration::try_from(self.max_future_skew).unwrap_or(jiff::SignedDuration::MAX) {
            return Err(Skip::Rejected(FUTURE_TIMESTAMP.into()));
        }
        if !self.max_age.is_zero()
            && now.duration_since(at)
                > jiff::SignedDuration::try_from(self.max_age).unwrap_or(jiff::SignedDuration::MAX)
        {
            return Err(Skip::Rejected(STALE_SIGNAL.into()));
        }
        Ok(())
    }
}

/// The value of the managed label on one object: `Some(true|false)` when set to `true`/`false`.
type Label = Option<bool>;

#[derive(Clone)]
pub struct Scope {
    cluster: Arc<dyn Cluster>,
    discovery: Discovery,
    enabled: bool,
    cache: Arc<ReadCache<ObjectRef, Label>>,
}

/// Label answers remembered (keys are sender-chosen: bounded in entries and bytes).
const SCOPE_CACHE_LIMITS: Limits = Limits {
    entries: 50_000,
    bytes: 16 * 1024 * 1024,
};

impl Scope {
    pub fn new(cluster: Arc<dyn Cluster>, discovery: Discovery, config: &config::Scope) -> Self {
        Scope {
            cluster,
            discovery,
            enabled: config.require_managed_label,
            cache: Arc::new(ReadCache::new(config.cache_ttl, SCOPE_CACHE_LIMITS)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the gateway may act on `target`. The target's own label decides, read where the
    /// cluster serves its kind (discovery: the resource and version as served, not as sent);
    /// only a target that does not exist, or carries no such label, is judged by its namespace.
    /// A kind the cluster does not serve, or a target the gateway may not read, is not acted on:
    /// its label, which might opt it out, cannot be known. Errors reading are errors (the sender
    /// retries).
    pub async fn is_managed(&self, target: &TargetResource, call: Call<'_>) -> Result<bool, ApiError> {
        if !self.enabled {
            return Ok(true);
        }
        let Some(kind) = self.discovery.resolve(&target.api_version, &target.kind, call).await? else {
            tracing::info!(kind = %target.kind, api_version = %target.api_version, "the cluster serves no such kind; not acting on it");
            return Ok(false);
        };
        let object = ObjectRef {
            api_version: kind.api_version(),
            kind: kind.kind.clone(),
            resource: kind.resource.clone(),
            namespace: if kind.namespaced {
                target.namespace.clone()
            } else {
                String::new()
            },
            name: target.name.clone(),
        };
        match self.label(object, call).await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(ApiError::Forbidden(why)) => {
                tracing::warn!(
                    kind = %kind.kind, resource = %kind.resource, group = %kind.group, reason = %why,
                    "may not read the target's labels (grant get on it): not acting on it"
                );
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        if !kind.namespaced || target.namespace.is_empty() {
            return Ok(false);
        }
        Ok(self.label(ObjectRef::namespace(&target.namespace), call).await? == Some(true))
    }

    async fn label(&self, object: ObjectRef, call: Call<'_>) -> Result<Label, ApiError> {
        self.cache.get_or_read(&object, || self.read_label(&object, call)).await
    }

    async fn read_label(&self, object: &ObjectRef, call: Call<'_>) -> Result<Label, ApiError> {
        Ok(match self.cluster.get_metadata(call, object).await {
            Ok(meta) => match meta.labels.unwrap_or_default().get(MANAGED_LABEL).map(String::as_str) {
                Some("true") => Some(true),
                Some("false") => Some(false),
                _ => None,
            },
            Err(ApiError::NotFound) => None,
            Err(e) => return Err(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::backend::faults::Faulty;
    use crate::clock::SystemClock;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn signal(observed_at: Option<&str>) -> Signal {
        Signal {
            source: crate::signal::Source::Prometheus,
            name: "KubePodCrashLooping".into(),
            severity: "critical".into(),
            target: TargetResource {
                kind: "Pod".into(),
                name: "web-1".into(),
                namespace: "shop".into(),
                api_version: String::new(),
            },
            labels: Default::default(),
            annotations: Default::default(),
            firing_time: None,
            observed_at: observed_at.map(str::to_owned),
            cluster_id: None,
            payload: "{}".into(),
        }
    }

    fn rejected(reason: &str) -> Result<(), Skip> {
        Err(Skip::Rejected(reason.into()))
    }

    #[test]
    fn freshness_rejects_future_stale_and_invalid_timestamps_with_a_reason() {
        let now: jiff::Timestamp = "2026-11-25T12:00:00Z".parse().unwrap();
        let default = Freshness::new(&config::Freshness::default());
        assert_eq!(
            default.check(&signal(None), now),
            Ok(()),
            "no timestamp, nothing to judge"
        );
        assert_eq!(default.check(&signal(Some("2026-11-25T12:04:59Z")), now), Ok(()));
        assert_eq!(
            default.check(&signal(Some("2026-11-25T12:05:01Z")), now),
            rejected(FUTURE_TIMESTAMP)
        );
        assert_eq!(
            default.check(&signal(Some("2020-01-01T00:00:00Z")), now),
            Ok(()),
            "no age limit by default (long-firing alerts keep their startsAt)"
        );
        assert_eq!(
            default.check(&signal(Some("yesterday")), now),
            rejected(INVALID_TIMESTAMP)
        );
        let aged = Freshness::new(&config::Freshness {
            max_age: Duration::from_secs(3600),
            ..config::Freshness::default()
        });
        assert_eq!(aged.check(&signal(Some("2026-11-25T11:00:01Z")), now), Ok(()));
        assert_eq!(
            aged.check(&signal(Some("2026-11-25T10:59:59Z")), now),
            rejected(STALE_SIGNAL)
        );
        assert_eq!(
            aged.check(&signal(Some("2026-11-25T11:30:00.123456+01:00")), now),
            rejected(STALE_SIGNAL),
            "offsets are honoured"
        );
    }

    fn labelled(value: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            labels: value.map(|v| [(MANAGED_LABEL.to_owned(), v.to_owned())].into()),
            ..ObjectMeta::default()
        }
    }

    fn deployment(ns: &str, name: &str) -> (ObjectRef, TargetResource) {
        (
            ObjectRef {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                resource: "deployments".into(),
                namespace: ns.into(),
                name: name.into(),
            },
            TargetResource {
                kind: "Deployment".into(),
                name: name.into(),
                namespace: ns.into(),
                api_version: "apps/v1".into(),
            },
        )
    }

    fn scope_on(cluster: Arc<dyn Cluster>, config: &config::Scope) -> Scope {
        Scope::new(cluster.clone(), Discovery::new(cluster), config)
    }

    fn enabled() -> config::Scope {
        config::Scope {
            require_managed_label: true,
            ..config::Scope::default()
        }
    }

    #[tokio::test]
    async fn scope_follows_the_target_label_then_the_namespace_label() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        store.put_object(ObjectRef::namespace("managed"), labelled(Some("true")));
        store.put_object(ObjectRef::namespace("plain"), labelled(None));
        let cases = [
            ("managed", "inherits", None, true),
            ("managed", "opted-out", Some("false"), false),
            ("plain", "opted-in", Some("true"), true),
            ("plain", "unlabelled", None, false),
            ("plain", "other-value", Some("yes"), false),
            ("missing-namespace", "lonely", None, false),
        ];
        for (ns, name, label, _) in cases {
            let (obj, _) = deployment(ns, name);
            store.put_object(obj, labelled(label));
        }
        let scope = scope_on(store.clone(), &enabled());
        for (ns, name, _, expected) in cases {
            let (_, target) = deployment(ns, name);
            assert_eq!(
                scope.is_managed(&target, Call::UNCOUNTED).await,
                Ok(expected),
                "{ns}/{name}"
            );
        }
        let (_, absent) = deployment("managed", "not-created-yet");
        assert_eq!(
            scope.is_managed(&absent, Call::UNCOUNTED).await,
            Ok(true),
            "a target that does not exist (yet) is judged by its namespace"
        );
        let disabled = scope_on(store.clone(), &config::Scope::default());
        let (_, target) = deployment("plain", "unlabelled");
        assert_eq!(
            disabled.is_managed(&target, Call::UNCOUNTED).await,
            Ok(true),
            "off by default"
        );
    }

    #[tokio::test]
    async fn scope_reads_are_cached_and_errors_are_not_absence() {
        use crate::backend::faults::{Fault, Op};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        store.put_object(ObjectRef::namespace("managed"), labelled(Some("true")));
        let reads = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (r, d) = (reads.clone(), down.clone());
        let faulty = Arc::new(Faulty::new(store.clone(), move |op| {
            if op == Op::GetMetadata {
                r.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    return Fault::Fail(ApiError::Unavailable("connection refused".into()));
                }
            }
            Fault::Pass
        }));
        let scope = scope_on(faulty, &enabled());
        let (_, target) = deployment("managed", "web");
        assert_eq!(scope.is_managed(&target, Call::UNCOUNTED).await, Ok(true));
        let after_first = reads.load(Ordering::SeqCst);
        assert_eq!(after_first, 2, "the target, then its namespace");
        assert_eq!(scope.is_managed(&target, Call::UNCOUNTED).await, Ok(true));
        assert_eq!(reads.load(Ordering::SeqCst), after_first, "answered from the cache");

        down.store(true, Ordering::SeqCst);
        let (_, other) = deployment("managed", "api");
        assert!(
            matches!(
                scope.is_managed(&other, Call::UNCOUNTED).await,
                Err(ApiError::Unavailable(_))
            ),
            "an unreadable label is an error, not 'unmanaged'"
        );
        let forbidden = Arc::new(Faulty::new(store.clone(), |op| match op {
            Op::GetMetadata => Fault::Fail(ApiError::Forbidden("deployments is forbidden".into())),
            _ => Fault::Pass,
        }));
        let scope = scope_on(forbidden, &enabled());
        assert_eq!(
            scope.is_managed(&other, Call::UNCOUNTED).await,
            Ok(false),
            "a target whose label may not be read is not judged by its namespace"
        );
    }

    #[tokio::test]
    async fn an_opted_out_object_stays_out_however_its_kind_and_version_are_written() {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        store.put_object(ObjectRef::namespace("managed"), labelled(Some("true")));
        let (obj, _) = deployment("managed", "payments");
        store.put_object(obj, labelled(Some("false")));
        let scope = scope_on(store.clone(), &enabled());
        for (api_version, kind) in [
            ("apps/v1", "Deployment"),
            ("apps/v1beta2", "Deployment"),
            ("apps/v1beta1", "deployment"),
            ("", "DEPLOYMENT"),
        ] {
            let target = TargetResource {
                kind: kind.into(),
                name: "payments".into(),
                namespace: "managed".into(),
                api_version: api_version.into(),
            };
            assert_eq!(
                scope.is_managed(&target, Call::UNCOUNTED).await,
                Ok(false),
                "{api_version} {kind}"
            );
        }
        // A kind the cluster does not serve names no object: its label cannot be known.
        let invented = TargetResource {
            kind: "Deploymentt".into(),
            name: "payments".into(),
            namespace: "managed".into(),
            api_version: "apps/v1".into(),
        };
        assert_eq!(scope.is_managed(&invented, Call::UNCOUNTED).await, Ok(false));
    }
}
