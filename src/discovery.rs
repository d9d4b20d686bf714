//! Which kinds the cluster serves, and as what: the resource (plural) of a request path, the
//! version to ask for, whether it is namespaced. A sender names a target's kind and apiVersion;
//! both are only claims. Reading a label at a guessed path (`kind + "s"`, a version the cluster
//! no longer serves such as `apps/v1beta2`) reads nothing, and "nothing" must not let a signal
//! about an opted-out object through (issue 13, 14). So the scope check resolves kinds here:
//!
//! - [`Discovery`] holds the cluster's discovery documents (the core group and the named groups,
//!   two requests of aggregated discovery), refreshed every [`MAX_AGE`], and on a kind it does
//!   not know at most every [`MIN_REFRESH`] (a CRD installed meanwhile). Its size is the
//!   cluster's, never the senders': looking up invented kinds adds nothing and costs no request
//!   beyond that rate.
//! - [`builtin`] knows the built-in kinds without asking, for what must not depend on the API
//!   server: a fingerprint's kind (`POD` and `pod` are `Pod`) and the owner chain.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{ApiError, ApiKind, Call, Cluster};
use crate::readcache::SingleFlight;

/// How long the discovery documents are used before they are read again.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// The least time between two reads, however many unknown kinds are asked for.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

/// A built-in kind: (group, version, kind, resource, namespaced).
type BuiltIn = (&'static str, &'static str, &'static str, &'static str, bool);

/// The built-in kinds signals are about, with the version Kubernetes serves them at.
pub const BUILT_IN: &[BuiltIn] = &[
    ("", "v1", "Pod", "pods", true),
    ("", "v1", "Node", "nodes", false),
    ("", "v1", "Namespace", "namespaces", false),
    ("", "v1", "Service", "services", true),
    ("", "v1", "Endpoints", "endpoints", true),
    ("", "v1", "ConfigMap", "configmaps", true),
    ("", "v1", "Secret", "secrets", true),
    ("", "v1", "ServiceAccount", "serviceaccounts", true),
    ("", "v1", "PersistentVolume", "persistentvolumes", false),
    ("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", true),
    ("", "v1", "ReplicationController", "replicationcontrollers", true),
    ("", "v1", "ResourceQuota", "resourcequotas", true),
    ("", "v1", "LimitRange", "limitranges", true),
    ("", "v1", "Event", "events", true),
    ("apps", "v1", "Deployment", "deployments", true),
    ("apps", "v1", "ReplicaSet", "replicasets", true),
    ("apps", "v1", "StatefulSet", "statefulsets", true),
    ("apps", "v1", "DaemonSet", "daemonsets", true),
    ("apps", "v1", "ControllerRevision", "controllerrevisions", true),
    ("batch", "v1", "Job", "jobs", true),
    ("batch", "v1", "CronJob", "cronjobs", true),
    (
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        true,
    ),
    ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true),
    ("networking.k8s.io", "v1", "Ingress", "ingresses", true),
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", true),
    ("storage.k8s.io", "v1", "StorageClass", "storageclasses", false),
];

/// The built-in kind spelled `kind` in any letter case (`POD`, `deployment`).
pub fn builtin(kind: &str) -> Option<ApiKind> {
    BUILT_IN
        .iter()
        .find(|(_, _, k, _, _)| k.eq_ignore_ascii_case(kind))
        .map(|&(group, version, kind, resource, namespaced)| ApiKind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            resource: resource.into(),
            namespaced,
        })
}

/// The built-in kinds as discovery would list them (for the embedded backend).
pub fn builtin_kinds(core: bool) -> Vec<ApiKind> {
    BUILT_IN
        .iter()
        .filter(|(group, ..)| group.is_empty() == core)
        .filter_map(|(_, _, kind, _, _)| builtin(kind))
        .collect()
}

/// The discovery documents read at one time.
struct Table {
    read_at: Instant,
    /// Core group first, then the named groups, each in the server's order of preference.
    kinds: Vec<ApiKind>,
}

impl Table {
    /// The kind a target's (apiVersion, kind) names: the same group (any group when the
    /// apiVersion is empty, the core group first), the kind in any letter case, at the most
    /// preferred version that serves it — whatever version the sender wrote.
    fn find(&self, api_version: &str, kind: &str) -> Option<ApiKind> {
        let group = match api_version.split_once('/') {
            Some((group, _)) => Some(group),
            None if api_version.is_empty() => None,
            None => Some(""),
        };
        self.kinds
            .iter()
            .filter(|k| !k.resource.contains('/'))
            .find(|k| group.is_none_or(|g| k.group == g) && k.kind.eq_ignore_ascii_case(kind))
            .cloned()
    }
}

/// The cluster's kinds, cached (see the module documentation). A cheap clone.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Arc<dyn Cluster>,
    table: Mutex<Option<Arc<Table>>>,
    reading: SingleFlight<(), Result<Arc<Table>, ApiError>>,
}

impl Discovery {
    pub fn new(cluster: Arc<dyn Cluster>) -> Self {
        Discovery {
            inner: Arc::new(Inner {
                cluster,
                table: Mutex::new(None),
                reading: SingleFlight::default(),
            }),
        }
    }

    /// The kind `(api_version, kind)` names, as the cluster serves it; `None` when the cluster
    /// serves no such kind (after a fresh enough read). Errors reading discovery are errors.
    pub async fn resolve(&self, api_version: &str, kind: &str, call: Call<'_>) -> Result<Option<ApiKind>, ApiError> {
        let now = Instant::now();
        let current = self.inner.table.lock().expect("discovery poisoned").clone();
        let table = match current {
            Some(t) if now.duration_since(t.read_at) < MAX_AGE => t,
            _ => self.read(call).await?,
        };
        if let Some(found) = table.find(api_version, kind) {
            return Ok(Some(found));
        }
        if now.duration_since(table.read_at) < MIN_REFRESH {
            return Ok(None);
        }
        // Perhaps a kind installed since the last read.
        Ok(self.read(call).await?.find(api_version, kind))
    }

    /// Reads the discovery documents (one read at a time, shared: counted into the call of the
    /// caller that reads).
    async fn read(&self, call: Call<'_>) -> Result<Arc<Table>, ApiError> {
        let inner = &self.inner;
        let (table, _) = inner
            .reading
            .run(&(), || async {
                // Another caller's read may have just finished.
                if let Some(t) = inner.table.lock().expect("discovery poisoned").clone()
                    && t.read_at.elapsed() < MIN_REFRESH
                {
                    return Ok(t);
                }
                let mut kinds = inner.cluster.list_api_kinds(call, true).await?;
                kinds.extend(inner.cluster.list_api_kinds(call, false).await?);
                let table = Arc::new(Table {
                    read_at: Instant::now(),
                    kinds,
                });
                *inner.table.lock().expect("discovery poisoned") = Some(table.clone());
                Ok(table)
            })
            .await;
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::backend::faults::{Fault, Faulty, Op};
    use crate::clock::SystemClock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counted() -> (Discovery, Arc<AtomicUsize>) {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
        let reads = Arc::new(AtomicUsize::new(0));
        let r = reads.clone();
        let faulty = Faulty::new(store, move |op| {
            if op == Op::ListApiKinds {
                r.fetch_add(1, Ordering::SeqCst);
            }
            Fault::Pass
        });
        (Discovery::new(Arc::new(faulty)), reads)
    }

    #[tokio::test]
    async fn kinds_resolve_to_what_the_cluster_serves_whatever_version_or_case_was_sent() {
        let (d, _) = counted();
        for (api_version, kind, want_version, want_kind, resource) in [
            ("apps/v1beta2", "Deployment", "apps/v1", "Deployment", "deployments"),
            ("", "deployment", "apps/v1", "Deployment", "deployments"),
            ("v1", "POD", "v1", "Pod", "pods"),
            (
                "networking.k8s.io/v1beta1",
                "Ingress",
                "networking.k8s.io/v1",
                "Ingress",
                "ingresses",
            ),
            ("v1", "Endpoints", "v1", "Endpoints", "endpoints"),
        ] {
            let k = d
                .resolve(api_version, kind, Call::UNCOUNTED)
                .await
                .unwrap()
                .expect(kind);
            assert_eq!(
                (k.api_version().as_str(), k.kind.as_str(), k.resource.as_str()),
                (want_version, want_kind, resource),
                "{api_version} {kind}"
            );
        }
        assert_eq!(
            d.resolve("v1", "Deployment", Call::UNCOUNTED).await,
            Ok(None),
            "not in the core group"
        );
        assert_eq!(d.resolve("apps/v1", "Widget", Call::UNCOUNTED).await, Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn invented_kinds_cost_no_more_than_a_read_every_min_refresh() {
        let (d, reads) = counted();
        for i in 0..100_000 {
            assert_eq!(
                d.resolve("example.com/v1", &format!("Kind{i}"), Call::UNCOUNTED).await,
                Ok(None)
            );
        }
        assert_eq!(reads.load(Ordering::SeqCst), 2, "one read of each document");
        tokio::time::advance(MIN_REFRESH).await;
        for i in 0..1000 {
            d.resolve("", &format!("Other{i}"), Call::UNCOUNTED).await.unwrap();
        }
        assert_eq!(reads.load(Ordering::SeqCst), 4, "one more read after MIN_REFRESH");
    }
}
