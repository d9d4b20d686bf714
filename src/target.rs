//! Owner resolution: climbs controller ownerReferences from the labelled object
//! (Pod -> ReplicaSet -> Deployment, Pod -> Job -> CronJob, ...) so all pods of one workload
//! share one fingerprint. Reads only metadata, caches answers for a short TTL, and falls back
//! to the deepest object it could identify when a read fails: a signal is never dropped here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{ApiError, Cluster, ObjectRef};
use crate::crd::TargetResource;

/// Kinds whose controller owner we follow, and the owner kinds we accept.
const FOLLOW: &[(&str, &[&str])] = &[
    ("Pod", &["ReplicaSet", "StatefulSet", "DaemonSet", "Job"]),
    ("ReplicaSet", &["Deployment"]),
    ("Job", &["CronJob"]),
];

/// (kind, namespace, name) -> (when read, controller owner; None: it has none or does not exist).
type OwnerCache = HashMap<(String, String, String), (Instant, Option<TargetResource>)>;

#[derive(Clone)]
pub struct OwnerResolver {
    cluster: Arc<dyn Cluster>,
    enabled: bool,
    max_depth: usize,
    ttl: Duration,
    cache: Arc<Mutex<OwnerCache>>,
}

const CACHE_MAX_ENTRIES: usize = 50_000;

impl OwnerResolver {
    pub fn new(cluster: Arc<dyn Cluster>, enabled: bool, max_depth: usize, ttl: Duration) -> Self {
        OwnerResolver {
            cluster,
            enabled,
            max_depth,
            ttl,
            cache: Default::default(),
        }
    }

    /// The top controller of `target`, or the deepest object known when a read fails.
    #[tracing::instrument(skip_all, fields(kind = %target.kind, name = %target.name))]
    pub async fn resolve(&self, target: TargetResource) -> TargetResource {
        if !self.enabled {
            return target;
        }
        let mut current = target;
        for _ in 0..self.max_depth {
            if !FOLLOW.iter().any(|(k, _)| *k == current.kind) {
                break;
            }
            match self.owner_of(&current).await {
                Ok(Some(owner)) => current = owner,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "owner read failed; using the deepest resolved object");
                    break;
                }
            }
        }
        current
    }

    async fn owner_of(&self, obj: &TargetResource) -> Result<Option<TargetResource>, ApiError> {
        let key = (obj.kind.clone(), obj.namespace.clone(), obj.name.clone());
        if let Some((at, owner)) = self.cache.lock().expect("owner cache poisoned").get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(owner.clone());
        }
        let reference = ObjectRef {
            api_version: if obj.api_version.is_empty() {
                default_api_version(&obj.kind).into()
            } else {
                obj.api_version.clone()
            },
            kind: obj.kind.clone(),
            namespace: obj.namespace.clone(),
            name: obj.name.clone(),
        };
        let owner = match self.cluster.get_metadata(&reference).await {
            Ok(meta) => {
                let accepted = FOLLOW
                    .iter()
                    .find(|(k, _)| *k == obj.kind)
                    .map(|(_, o)| *o)
                    .unwrap_or(&[]);
                meta.owner_references.unwrap_or_default().into_iter().find_map(|o| {
                    (o.controller == Some(true) && accepted.contains(&o.kind.as_str())).then(|| TargetResource {
                        kind: o.kind,
                        name: o.name,
                        namespace: obj.namespace.clone(),
                        api_version: o.api_version,
                    })
                })
            }
            // The object is gone (or never existed): nothing to climb, remember that briefly.
            Err(ApiError::NotFound) => None,
            Err(e) => return Err(e),
        };
        let mut cache = self.cache.lock().expect("owner cache poisoned");
        if cache.len() >= CACHE_MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), owner.clone()));
        Ok(owner)
    }
}

fn default_api_version(kind: &str) -> &'static str {
    match kind {
        "ReplicaSet" | "Deployment" | "StatefulSet" | "DaemonSet" => "apps/v1",
        "Job" | "CronJob" => "batch/v1",
        _ => "v1",
    }
}
