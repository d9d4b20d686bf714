//! The owner cache: metadata-only watches (cluster-wide) of the kinds owner resolution reads
//! ([`crate::target`]: ReplicaSets, Jobs, Pods when configured), holding per object only what a
//! climb needs — its accepted controller owner. A lookup in a synced watch answers without a
//! read, so owner reads cost one watch per kind instead of reads per target, replica and TTL
//! (issue 15, item 4; ADR 0015).
//!
//! What it answers, and what it leaves to a read:
//! - **hit**: the object is held and its kind's watch is synced: its owner (or none), no read.
//! - **miss_read**: the synced watch does not hold it (not delivered yet, evicted, or absent):
//!   the resolver reads it as without the cache — "the watch has not seen it" is never taken
//!   for "it does not exist", because the object may be newer than the watch.
//! - **not_synced**: the kind's watch has not completed a list, or broke and has not delivered
//!   since: the resolver reads, as without the cache.
//!
//! A deleted object leaves on the watch's delete event (and the resolver's TTL answer for it
//! goes with it); a failed watch is started over with a fresh list, and each list starts the
//! kind over, so an object deleted while the watch was down is not held either. Memory is bounded in objects and bytes ([`BoundedMap`], least
//! recently used forgotten first: a forgotten object is simply a miss) and reported.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bounded::{BoundedMap, HeapSize, Limits};
use crate::cluster::{ApiKind, Cluster, MetadataEvent, WatchEvent};
use crate::crd::TargetResource;
use crate::lock::backoff;
use crate::metrics::{Reg, counter, counter_vec, gauge};

/// The kinds the cache can watch: the kinds whose controller owner resolution reads.
pub const WATCHABLE: &[&str] = &["Pod", "ReplicaSet", "Job"];

/// The lookup results (`result` of `gateway_owner_cache_lookups_total`).
pub const LOOKUP_RESULTS: [&str; 3] = ["hit", "miss_read", "not_synced"];

/// A watch that failed after running this long restarts with the shortest backoff again.
const HEALTHY_WATCH: Duration = Duration::from_secs(60);

/// Watch-fed entries do not expire (the watch keeps them current); far enough not to matter.
const NEVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What the cache holds of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// It has no controller owner that resolution follows.
    NoOwner,
    /// Its controller owner (a built-in kind at its served version, in the object's namespace).
    Owner { kind: &'static str, name: String },
    /// An owner the cache does not hold in short (another group's kind of that name): read it.
    Unusual,
}

impl HeapSize for Known {
    fn heap_size(&self) -> usize {
        match self {
            Known::Owner { name, .. } => name.heap_size(),
            Known::NoOwner | Known::Unusual => 0,
        }
    }
}

/// Told (kind, namespace, name) of each object seen deleted.
type OnDelete = dyn Fn(&str, &str, &str) + Send + Sync;

/// (index of the kind in the watched kinds, namespace, name).
type Key = (u8, String, String);

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// From a synced watch: the object's accepted controller owner, or none.
    Hit(Option<TargetResource>),
    /// The synced watch does not hold it: read it.
    Miss,
    /// The kind's watch is not synced: read it.
    NotSynced,
    /// The kind (at that apiVersion) is not watched.
    NotWatched,
}

#[derive(Default, Clone, Copy)]
struct KindState {
    /// A complete list has been applied and the watch has not failed since its last event.
    synced: bool,
    /// A complete list has been applied since the watch last started over.
    listed: bool,
    objects: usize,
}

struct State {
    entries: BoundedMap<Key, Known>,
    kinds: Vec<KindState>,
}

/// The cache (a cheap clone around its shared state); its watches run while the
/// [`OwnerWatches`] returned by [`OwnerCache::spawn_watches`] is held.
#[derive(Clone)]
pub struct OwnerCache {
    shared: Arc<Shared>,
}

struct Shared {
    kinds: Vec<ApiKind>,
    state: Mutex<State>,
    metrics: OwnerCacheMetrics,
    /// Bumped after every watch event (tests and callers wait on it instead of sleeping).
    events: tokio::sync::watch::Sender<u64>,
    /// Called with (kind, namespace, name) of each deleted object (the resolver forgets its TTL
    /// answer for it).
    on_delete: Box<OnDelete>,
}

/// Stops the cache's watches when dropped.
pub struct OwnerWatches(Vec<JoinHandle<()>>);

impl Drop for OwnerWatches {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The accepted controller owner in `meta` of an object of `kind` in `namespace`, as owner
/// resolution follows it: `accepted` names the owner kinds followed from `kind`.
pub fn controller_owner(namespace: &str, accepted: &[&str], meta: &ObjectMeta) -> Option<TargetResource> {
    meta.owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find_map(|o| {
            // Found by fuzzing: an ownerReference's name and apiVersion are only required to be
            // non-empty, and they become the target's identity and an API URL path.
            let usable = crate::signal::is_valid_object_name(&o.name)
                && (o.api_version.is_empty() || crate::signal::is_valid_api_version(&o.api_version));
            // Found by fuzzing: an owner written without its apiVersion is named as the signal's own
            // target would be (normalised), so one climb gives one answer.
            (o.controller == Some(true) && accepted.contains(&o.kind.as_str()) && usable).then(|| {
                crate::target::normalise(TargetResource {
                    kind: o.kind.clone(),
                    name: o.name.clone(),
                    namespace: namespace.to_owned(),
                    api_version: o.api_version.clone(),
                })
            })
        })
}

impl OwnerCache {
    /// A cache of `kinds` (each one of [`WATCHABLE`]), bounded by `limits`. `on_delete` is
    /// called with (kind, namespace, name) of every object the watches see deleted.
    pub fn new(
        kinds: &[&str],
        limits: Limits,
        metrics: OwnerCacheMetrics,
        on_delete: impl Fn(&str, &str, &str) + Send + Sync + 'static,
    ) -> Self {
        let kinds: Vec<ApiKind> = kinds
            .iter()
            .filter(|k| WATCHABLE.contains(k))
            .filter_map(|k| crate::discovery::builtin(k))
            .collect();
        let state = State {
            entries: BoundedMap::new(limits),
            kinds: vec![KindState::default(); kinds.len()],
        };
        OwnerCache {
            shared: Arc::new(Shared {
                kinds,
                state: Mutex::new(state),
                metrics,
                events: tokio::sync::watch::Sender::new(0),
                on_delete: Box::new(on_delete),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("owner cache poisoned")
    }

    /// Starts one watch per kind through `cluster`; they stop when the handle is dropped.
    pub fn spawn_watches(&self, cluster: Arc<dyn Cluster>) -> OwnerWatches {
        OwnerWatches(
            (0..self.shared.kinds.len())
                .map(|ix| tokio::spawn(self.clone().watch_loop(cluster.clone(), ix)))
                .collect(),
        )
    }

    async fn watch_loop(self, cluster: Arc<dyn Cluster>, ix: usize) {
        let kind = self.shared.kinds[ix].clone();
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let mut events = cluster.watch_metadata(&kind);
            while let Some(item) = events.next().await {
                match item {
                    Ok(event) => self.apply(ix, event),
                    Err(e) => {
                        // kube's watcher would resume from the last version it delivered, and then
                        // say nothing until the kind next changes somewhere: the cache could not
                        // tell it is current again. So a failed watch is dropped and started over
                        // with a fresh (paginated) list after a backoff.
                        self.shared.metrics.watch_errors.with_label_values(&[&kind.kind]).inc();
                        tracing::warn!(kind = %kind.kind, error = %e, "owner cache watch failed; owners are read until it has listed again");
                        break;
                    }
                }
            }
            drop(events);
            // The watch failed or its stream ended (the embedded store's feed after it fell
            // behind): a new one lists.
            self.set_synced(ix, |k| {
                k.synced = false;
                k.listed = false;
            });
            if started.elapsed() >= HEALTHY_WATCH {
                failures = 0;
            }
            let pause = backoff(failures, Duration::from_millis(200), Duration::from_secs(30));
            failures = failures.saturating_add(1);
            tokio::time::sleep(pause).await;
        }
    }

    fn set_synced(&self, ix: usize, change: impl FnOnce(&mut KindState)) {
        let synced = {
            let mut st = self.state();
            change(&mut st.kinds[ix]);
            st.kinds[ix].synced
        };
        self.shared
            .metrics
            .synced
            .with_label_values(&[&self.shared.kinds[ix].kind])
            .set(i64::from(synced));
        self.shared.events.send_modify(|n| *n += 1);
    }

    /// Applies one event of kind `ix`'s watch.
    fn apply(&self, ix: usize, event: MetadataEvent) {
        let kind = &self.shared.kinds[ix];
        let accepted = crate::target::accepted_owners(&kind.kind);
        let mut deleted = None;
        {
            let mut guard = self.state();
            let st = &mut *guard;
            match event {
                WatchEvent::Init => {
                    // The list that follows is the whole kind: start it over (the kind is not
                    // synced meanwhile, so nothing is answered from it).
                    self.shared.metrics.watch_relists.with_label_values(&[&kind.kind]).inc();
                    st.kinds[ix] = KindState::default();
                    st.entries.retain(|k, _| usize::from(k.0) != ix);
                }
                WatchEvent::Listed(meta) | WatchEvent::Applied(meta) => {
                    if let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) {
                        let known = match controller_owner(ns, accepted, &meta) {
                            None => Known::NoOwner,
                            Some(owner) => match crate::discovery::builtin(&owner.kind) {
                                Some(k) if k.api_version() == owner.api_version => Known::Owner {
                                    kind: static_kind(&owner.kind).unwrap_or_default(),
                                    name: owner.name,
                                },
                                _ => Known::Unusual,
                            },
                        };
                        let key: Key = (ix as u8, ns.to_owned(), name.to_owned());
                        let cost = key.heap_size() + known.heap_size();
                        let held = st.entries.contains(&key, Instant::now());
                        let kinds = &mut st.kinds;
                        let stored = st
                            .entries
                            .insert_evicting(key, known, cost, Instant::now() + NEVER, |k, _| {
                                kinds[usize::from(k.0)].objects -= 1;
                                self.shared.metrics.evictions.inc();
                            });
                        kinds[ix].objects = kinds[ix].objects + usize::from(stored) - usize::from(held);
                    }
                    st.kinds[ix].synced = st.kinds[ix].listed;
                }
                WatchEvent::Synced => {
                    st.kinds[ix].listed = true;
                    st.kinds[ix].synced = true;
                }
                WatchEvent::Deleted(meta) => {
                    if let (Some(ns), Some(name)) = (meta.namespace, meta.name) {
                        let key: Key = (ix as u8, ns, name);
                        if st.entries.remove(&key).is_some() {
                            st.kinds[ix].objects -= 1;
                        }
                        deleted = Some(key);
                    }
                    st.kinds[ix].synced = st.kinds[ix].listed;
                }
            }
            let m = &self.shared.metrics;
            for (i, k) in self.shared.kinds.iter().enumerate() {
                m.objects.with_label_values(&[&k.kind]).set(st.kinds[i].objects as i64);
            }
            m.synced
                .with_label_values(&[&kind.kind])
                .set(i64::from(st.kinds[ix].synced));
            m.bytes.set(st.entries.bytes() as i64);
        }
        if let Some((_, ns, name)) = deleted {
            (self.shared.on_delete)(&kind.kind, &ns, &name);
        }
        self.shared.events.send_modify(|n| *n += 1);
    }

    /// What the cache knows of the object `kind`/`name` in `namespace` (a normalised target),
    /// counted in `gateway_owner_cache_lookups_total` unless its kind is not watched.
    pub fn lookup(&self, kind: &str, api_version: &str, namespace: &str, name: &str) -> Lookup {
        let Some(ix) = self
            .shared
            .kinds
            .iter()
            .position(|k| k.kind == kind && k.api_version() == api_version)
        else {
            return Lookup::NotWatched;
        };
        let found = {
            let mut st = self.state();
            if !st.kinds[ix].synced {
                Lookup::NotSynced
            } else {
                let key: Key = (ix as u8, namespace.to_owned(), name.to_owned());
                match st.entries.get(&key, Instant::now()) {
                    None | Some(Known::Unusual) => Lookup::Miss,
                    Some(Known::NoOwner) => Lookup::Hit(None),
                    Some(Known::Owner { kind, name }) => Lookup::Hit(Some(TargetResource {
                        kind: (*kind).to_owned(),
                        name: name.clone(),
                        namespace: namespace.to_owned(),
                        api_version: crate::discovery::builtin(kind)
                            .map(|k| k.api_version())
                            .unwrap_or_default(),
                    })),
                }
            }
        };
        let result = match found {
            Lookup::Hit(_) => "hit",
            Lookup::Miss => "miss_read",
            Lookup::NotSynced | Lookup::NotWatched => "not_synced",
        };
        self.shared.metrics.lookups.with_label_values(&[result]).inc();
        found
    }

    /// The index of the watched kind `kind` (any API version).
    fn kind_ix(&self, kind: &str) -> Option<usize> {
        self.shared.kinds.iter().position(|k| k.kind == kind)
    }

    /// Whether the watch of `kind` has a complete list and is running.
    pub fn is_synced(&self, kind: &str) -> bool {
        self.kind_ix(kind).is_some_and(|ix| self.state().kinds[ix].synced)
    }

    /// Objects of `kind` held.
    pub fn objects(&self, kind: &str) -> usize {
        self.kind_ix(kind).map_or(0, |ix| self.state().kinds[ix].objects)
    }

    /// Bytes held, as counted against the limit.
    pub fn bytes(&self) -> usize {
        self.state().entries.bytes()
    }

    /// Waits until `ready` holds (checked after every watch event) or `deadline` passes; returns
    /// whether it holds.
    pub async fn wait_for(&self, deadline: Instant, ready: impl Fn(&OwnerCache) -> bool) -> bool {
        let mut events = self.shared.events.subscribe();
        loop {
            if ready(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, events.changed()).await.is_err() {
                return ready(self);
            }
        }
    }
}

/// The `&'static` spelling of a built-in kind.
fn static_kind(kind: &str) -> Option<&'static str> {
    crate::discovery::BUILT_IN
        .iter()
        .find(|(_, _, k, _, _)| *k == kind)
        .map(|(_, _, k, _, _)| *k)
}

/// The owner cache's metrics (registered with the gateway's others, served at zero while off).
#[derive(Clone)]
pub struct OwnerCacheMetrics {
    pub objects: IntGaugeVec,
    pub bytes: IntGauge,
    pub synced: IntGaugeVec,
    pub watch_relists: IntCounterVec,
    pub watch_errors: IntCounterVec,
    pub evictions: IntCounter,
    pub lookups: IntCounterVec,
}

impl OwnerCacheMetrics {
    pub(crate) fn register(r: &Reg) -> prometheus::Result<Self> {
        let m = OwnerCacheMetrics {
            objects: crate::metrics::gauge_vec(
                r,
                "gateway_owner_cache_objects",
                "Objects whose controller owner the owner cache holds, by kind.",
                &["kind"],
            )?,
            bytes: gauge(
                r,
                "gateway_owner_cache_bytes",
                "Bytes the owner cache holds, as counted against ownerResolution.metadataCache.maxBytes.",
            )?,
            synced: crate::metrics::gauge_vec(
                r,
                "gateway_owner_cache_synced",
                "1 while the owner cache's watch of a kind has a complete list and is running, else 0.",
                &["kind"],
            )?,
            watch_relists: counter_vec(
                r,
                "gateway_owner_cache_watch_relists_total",
                "Lists the owner cache's watches started, by kind (the first, and one after every restart).",
                &["kind"],
            )?,
            watch_errors: counter_vec(
                r,
                "gateway_owner_cache_watch_errors_total",
                "Owner cache watch failures by kind (owners of that kind are read until it delivers again).",
                &["kind"],
            )?,
            evictions: counter(
                r,
                "gateway_owner_cache_evictions_total",
                "Objects the owner cache forgot to stay within maxObjects or maxBytes (they are read when asked for).",
            )?,
            lookups: counter_vec(
                r,
                "gateway_owner_cache_lookups_total",
                "Owner lookups of watched kinds by result: hit (answered without a read), miss_read (not in the synced cache: read), not_synced (the watch has no complete list: read).",
                &["result"],
            )?,
        };
        for kind in WATCHABLE {
            m.objects.with_label_values(&[kind]);
            m.synced.with_label_values(&[kind]);
            m.watch_relists.with_label_values(&[kind]);
            m.watch_errors.with_label_values(&[kind]);
        }
        for result in LOOKUP_RESULTS {
            m.lookups.with_label_values(&[result]);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn cache(limits: Limits) -> (OwnerCache, OwnerCacheMetrics) {
        let metrics = crate::metrics::Metrics::register(&prometheus::Registry::new())
            .unwrap()
            .owner_cache;
        (
            OwnerCache::new(&["ReplicaSet"], limits, metrics.clone(), |_, _, _| {}),
            metrics,
        )
    }

    fn replicaset(name: &str, deployment: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: deployment.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn owner(c: &OwnerCache, name: &str) -> Lookup {
        c.lookup("ReplicaSet", "apps/v1", "shop", name)
    }

    fn deployment(name: &str) -> Lookup {
        Lookup::Hit(Some(TargetResource {
            kind: "Deployment".into(),
            name: name.into(),
            namespace: "shop".into(),
            api_version: "apps/v1".into(),
        }))
    }

    #[test]
    fn a_relist_forgets_objects_deleted_while_the_watch_was_down_and_answers_nothing_meanwhile() {
        let (c, metrics) = cache(Limits {
            entries: 100,
            bytes: usize::MAX,
        });
        assert_eq!(owner(&c, "a-1"), Lookup::NotSynced);
        c.apply(0, WatchEvent::Init);
        c.apply(0, WatchEvent::Listed(replicaset("a-1", "a")));
        c.apply(0, WatchEvent::Listed(replicaset("b-1", "b")));
        assert_eq!(
            owner(&c, "a-1"),
            Lookup::NotSynced,
            "a list in progress vouches for nothing"
        );
        c.apply(0, WatchEvent::Synced);
        assert_eq!(owner(&c, "a-1"), deployment("a"));
        assert_eq!(owner(&c, "c-1"), Lookup::Miss);
        assert_eq!(
            c.lookup("ReplicaSet", "example.com/v1", "shop", "a-1"),
            Lookup::NotWatched,
            "another group's kind of that name"
        );

        // The watch broke; b-1 was deleted meanwhile; the relist does not have it.
        c.apply(0, WatchEvent::Init);
        c.apply(0, WatchEvent::Listed(replicaset("a-1", "a")));
        c.apply(0, WatchEvent::Synced);
        assert_eq!(owner(&c, "b-1"), Lookup::Miss);
        assert_eq!(c.objects("ReplicaSet"), 1);
        assert_eq!(metrics.objects.with_label_values(&["ReplicaSet"]).get(), 1);
        assert_eq!(metrics.watch_relists.with_label_values(&["ReplicaSet"]).get(), 2);

        c.apply(0, WatchEvent::Deleted(replicaset("a-1", "a")));
        assert_eq!(owner(&c, "a-1"), Lookup::Miss);
        assert_eq!((c.objects("ReplicaSet"), c.bytes()), (0, 0));
        assert_eq!(metrics.lookups.with_label_values(&["hit"]).get(), 1);
        assert_eq!(metrics.lookups.with_label_values(&["miss_read"]).get(), 3);
        assert_eq!(metrics.lookups.with_label_values(&["not_synced"]).get(), 2);
    }

    #[test]
    fn a_cluster_larger_than_the_bounds_costs_reads_never_memory() {
        let limit = 256 * 1024;
        let (c, metrics) = cache(Limits {
            entries: 100_000,
            bytes: limit,
        });
        c.apply(0, WatchEvent::Init);
        for i in 0..20_000 {
            let name = format!("{i}-{}", "x".repeat(200));
            c.apply(0, WatchEvent::Listed(replicaset(&name, &name)));
            assert!(c.bytes() <= limit);
        }
        c.apply(0, WatchEvent::Synced);
        let held = c.objects("ReplicaSet");
        assert!(held > 100 && held < 20_000, "{held}");
        assert_eq!(metrics.objects.with_label_values(&["ReplicaSet"]).get(), held as i64);
        assert_eq!(metrics.bytes.get(), c.bytes() as i64);
        assert_eq!(metrics.evictions.get(), 20_000 - held as u64);
        let newest = format!("19999-{}", "x".repeat(200));
        assert_eq!(owner(&c, &newest), deployment(&newest));
        assert_eq!(
            owner(&c, &format!("0-{}", "x".repeat(200))),
            Lookup::Miss,
            "forgotten: read"
        );
    }

    #[tokio::test]
    async fn a_failed_watch_lists_again_and_loses_nothing() {
        use crate::backend::embedded::EmbeddedStore;
        use crate::backend::faults::{Fault, Faulty, Op};
        use crate::cluster::ObjectRef;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let store = Arc::new(EmbeddedStore::new(Arc::new(crate::clock::SystemClock)));
        let rs = |name: &str| ObjectRef {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            resource: String::new(),
            namespace: "shop".into(),
            name: name.into(),
        };
        store.put_object(rs("a-1"), replicaset("a-1", "a"));
        // The 4th item (after Init, Listed a-1, Synced) breaks the watch instead of arriving.
        let items = Arc::new(AtomicUsize::new(0));
        let i = items.clone();
        let faulty = Arc::new(Faulty::new(store.clone(), move |op| match op {
            Op::MetadataEvent if i.fetch_add(1, Ordering::SeqCst) == 3 => {
                Fault::Fail(crate::cluster::ApiError::Unavailable("connection reset".into()))
            }
            _ => Fault::Pass,
        }));
        let (c, metrics) = cache(Limits {
            entries: 100,
            bytes: usize::MAX,
        });
        let _watches = c.spawn_watches(faulty);
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(c.wait_for(deadline, |c| c.is_synced("ReplicaSet")).await);
        store.put_object(rs("b-1"), replicaset("b-1", "b"));
        let relisted = |c: &OwnerCache| c.is_synced("ReplicaSet") && c.objects("ReplicaSet") == 2;
        assert!(
            c.wait_for(deadline, relisted).await,
            "synced again, with b-1 from the list"
        );
        assert_eq!(owner(&c, "b-1"), deployment("b"));
        assert_eq!(metrics.watch_errors.with_label_values(&["ReplicaSet"]).get(), 1);
        assert_eq!(metrics.watch_relists.with_label_values(&["ReplicaSet"]).get(), 2);
    }

    #[test]
    fn lookups_of_sender_chosen_names_hold_nothing() {
        let (c, _) = cache(Limits {
            entries: 100,
            bytes: usize::MAX,
        });
        c.apply(0, WatchEvent::Init);
        c.apply(0, WatchEvent::Synced);
        for i in 0..10_000 {
            assert_eq!(owner(&c, &format!("invented-{i}")), Lookup::Miss);
        }
        assert_eq!(
            (c.objects("ReplicaSet"), c.bytes()),
            (0, 0),
            "only the watch adds objects"
        );
    }

    #[test]
    fn only_a_controller_owner_resolution_follows_is_held() {
        let (c, _) = cache(Limits {
            entries: 100,
            bytes: usize::MAX,
        });
        let mut not_controller = replicaset("loose", "d");
        not_controller.owner_references.as_mut().unwrap()[0].controller = None;
        let mut other_kind = replicaset("odd", "d");
        other_kind.owner_references.as_mut().unwrap()[0].kind = "StatefulSet".into();
        let mut other_group = replicaset("custom", "d");
        other_group.owner_references.as_mut().unwrap()[0].api_version = "example.com/v1".into();
        c.apply(0, WatchEvent::Init);
        for meta in [not_controller, other_kind, other_group] {
            c.apply(0, WatchEvent::Listed(meta));
        }
        c.apply(0, WatchEvent::Synced);
        assert_eq!(owner(&c, "loose"), Lookup::Hit(None));
        assert_eq!(owner(&c, "odd"), Lookup::Hit(None));
        assert_eq!(
            owner(&c, "custom"),
            Lookup::Miss,
            "held in short only for built-in owners: read"
        );
    }
}
