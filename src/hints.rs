//! Hints for the duplicate path: per fingerprint, the newest absorbing RemediationRequest this
//! replica has seen — from a watch of the namespace's RRs (so other replicas' writes arrive
//! before our next write conflicts with them) and from this replica's own reads and writes.
//!
//! "Absorbing" is Kubernaut's rule ([`crate::absorb`]) and depends on the time: a request in its
//! cooldown stops absorbing when the cooldown passes, without a write. So the cache holds every
//! request that absorbed when it was last seen and asks the rule again, with the clock, at each
//! use; what it holds is a slim copy (metadata, fingerprint and status: all a conditional write
//! needs), never the sender-sized spec.
//!
//! Everything here is a hint (ADR 0002, ADR 0007): an RR taken from it is only ever the base of a
//! status update conditioned on its resourceVersion, and "the watch knows no active RR for this
//! fingerprint" only lets the creator skip the list *before* the lease lock — the fresh list
//! under the lock still decides whether to create. A stale or wrong cache costs API calls, never
//! a duplicate or a lost count.
//!
//! The watch restarts (and lists again) after any error, with jittered backoff (kube-runtime's
//! on the kubernetes backend); until a list has completed it is *unsynced* and the gateway
//! behaves as without it (fresh list on a miss, GET after a conflict).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::absorb;
use crate::clock::SharedClock;
use crate::cluster::{Cluster, RequestEvent};
use crate::crd::{RemediationRequest, RemediationRequestSpec};
use crate::fingerprint::Fingerprint;
use crate::lock::backoff;
use crate::metrics::Metrics;

/// Most RR names remembered, and most absorbing RRs held (as the per-replica hints were
/// before the watch). Beyond either the cache is cleared and stops vouching for absence until the
/// next complete list fits (a namespace this large should not be watched whole). Not the
/// gateway's bounded-cache policy ([`crate::bounded`], least recently used evicted one by one):
/// its keys are not sender-chosen (they are the namespace's RRs, bounded by the ResourceQuota of
/// the production overlay), and a cache missing *some* RRs could no longer say "none" for any
/// fingerprint, which is what it is for — so it keeps all or says nothing.
const MAX_OBJECTS: usize = 100_000;
const MAX_ACTIVE: usize = 20_000;

/// Versions remembered by their `deduplication` marker (for telling whether an unanswered write
/// landed): about a minute of writes at a few hundred per second.
const MAX_MARKERS: usize = 16_384;

/// A watch that failed after running this long restarts with the shortest backoff again.
const HEALTHY_WATCH: Duration = Duration::from_secs(60);

/// What the cache knows about one RR name.
struct Known {
    rv: String,
    fingerprint: String,
    /// A slim copy while it absorbed when last seen; `None` once it did not (a tombstone, so an
    /// older copy of it arriving late cannot make it look absorbing again). Whether a held copy
    /// still absorbs is asked again at each use (a cooldown passes with time alone).
    active: Option<Arc<RemediationRequest>>,
}

#[derive(Default)]
struct PerFingerprint {
    /// Names of this fingerprint's held (absorbing when last seen) RRs (normally one).
    active: Vec<String>,
    /// When an RR of this fingerprint last changed, as far as we saw (own writes or the watch).
    changed_at: Option<Instant>,
    /// Woken on every change of this fingerprint's RRs.
    changed: Arc<Notify>,
    /// The highest generation (`rr-<fp16>-<n>`) of this fingerprint's RRs seen (a guess of the
    /// next name; the list under the lock decides).
    highest: u64,
}

#[derive(Default)]
struct State {
    /// A complete list has been applied and the watch has not failed since its last event.
    synced: bool,
    /// A complete list has been applied since the watch last started over.
    listed: bool,
    /// False after an overflow, until the next list that fits.
    complete: bool,
    /// The list in progress overflowed (then it cannot vouch for absence either).
    overflowed_in_list: bool,
    objects: HashMap<String, Known>,
    /// How many of `objects` are active.
    active_total: usize,
    fingerprints: HashMap<String, PerFingerprint>,
    /// Names seen by the list in progress (between `Init` and `Synced`).
    listing: Option<HashMap<String, String>>,
    /// Versions seen, as (name, lastSeenAt, occurrenceCount) of their `deduplication`, oldest first.
    markers: std::collections::VecDeque<(String, String, i32)>,
    marker_set: std::collections::HashSet<(String, String, i32)>,
    /// Every version with a resourceVersion above this came through the watch since its last list
    /// (versions up to it may have been skipped by a list). `None` while not synced.
    history_from: Option<u64>,
    /// Highest resourceVersion the watch delivered since its last list.
    applied_rv: u64,
}

/// Whether an unanswered write landed, as far as the watch can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    Yes,
    No,
    Unknown,
}

/// The newest version of an RR, as far as the cache knows.
pub enum Newer {
    Active(Box<RemediationRequest>),
    /// It turned terminal (or was deleted) at a version newer than the one asked about.
    Closed,
}

pub struct HintCache {
    state: Mutex<State>,
    metrics: Metrics,
    /// Wall-clock time for Kubernaut's cooldown rule.
    clock: SharedClock,
}

/// Compares resourceVersions. The API server's are etcd revisions (integers); anything else is
/// compared as "different means newer", which is always safe for a hint.
fn newer(candidate: &str, than: &str) -> bool {
    match (candidate.parse::<u64>(), than.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => candidate != than,
    }
}

fn rv_of(rr: &RemediationRequest) -> &str {
    rr.metadata.resource_version.as_deref().unwrap_or_default()
}

/// What the cache keeps of an absorbing RR: everything but the sender-sized parts of the spec.
fn slim(rr: &RemediationRequest) -> RemediationRequest {
    RemediationRequest {
        metadata: rr.metadata.clone(),
        spec: RemediationRequestSpec {
            signal_fingerprint: rr.spec.signal_fingerprint.clone(),
            signal_name: rr.spec.signal_name.clone(),
            target_resource: rr.spec.target_resource.clone(),
            ..RemediationRequestSpec::default()
        },
        status: rr.status.clone(),
    }
}

impl State {
    /// Records `rr` if it is newer than what we hold; returns whether anything changed.
    fn observe(&mut self, rr: &RemediationRequest, now: Instant, wall: jiff::Timestamp) -> bool {
        let Some(name) = rr.metadata.name.as_deref() else {
            return false;
        };
        self.remember_marker(name, rr);
        let rv = rv_of(rr);
        if let Some(known) = self.objects.get(name)
            && !newer(rv, &known.rv)
        {
            return false;
        }
        let holds = absorb::absorbs(rr, wall).is_some();
        let adds_active = holds && self.objects.get(name).is_none_or(|k| k.active.is_none());
        if (!self.objects.contains_key(name) && self.objects.len() >= MAX_OBJECTS)
            || (adds_active && self.active_total >= MAX_ACTIVE)
        {
            self.objects.clear();
            self.active_total = 0;
            self.fingerprints.retain(|_, f| Arc::strong_count(&f.changed) > 1);
            for f in self.fingerprints.values_mut() {
                f.active.clear();
            }
            self.complete = false;
            self.overflowed_in_list = true;
        }
        let fingerprint = rr.spec.signal_fingerprint.clone();
        let active = holds.then(|| Arc::new(slim(rr)));
        let previous = self.objects.insert(
            name.to_owned(),
            Known {
                rv: rv.to_owned(),
                fingerprint: fingerprint.clone(),
                active: active.clone(),
            },
        );
        self.active_total += usize::from(active.is_some());
        if let Some(prev) = previous {
            self.active_total -= usize::from(prev.active.is_some());
            if prev.fingerprint != fingerprint {
                self.unindex(&prev.fingerprint, name);
            }
        }
        let generation = Fingerprint::parse(&fingerprint).and_then(|f| crate::dedup::generation_of(&f, name));
        let per = self.fingerprints.entry(fingerprint).or_default();
        per.highest = per.highest.max(generation.unwrap_or(0));
        match active {
            Some(_) if !per.active.iter().any(|n| n == name) => per.active.push(name.to_owned()),
            Some(_) => {}
            None => per.active.retain(|n| n != name),
        }
        per.changed_at = Some(now);
        per.changed.notify_waiters();
        true
    }

    fn remember_marker(&mut self, name: &str, rr: &RemediationRequest) {
        let Some(d) = rr.status.as_ref().and_then(|s| s.deduplication.as_ref()) else {
            return;
        };
        let marker = (name.to_owned(), d.last_seen_at.clone(), d.occurrence_count);
        if self.marker_set.insert(marker.clone()) {
            self.markers.push_back(marker);
            if self.markers.len() > MAX_MARKERS
                && let Some(old) = self.markers.pop_front()
            {
                self.marker_set.remove(&old);
            }
        }
    }

    fn forget(&mut self, rr: &RemediationRequest, now: Instant) {
        let Some(name) = rr.metadata.name.as_deref() else {
            return;
        };
        if let Some(known) = self.objects.remove(name) {
            self.active_total -= usize::from(known.active.is_some());
            let fingerprint = known.fingerprint;
            self.unindex(&fingerprint, name);
            if let Some(per) = self.fingerprints.get_mut(&fingerprint) {
                per.changed_at = Some(now);
                per.changed.notify_waiters();
            }
        }
    }

    fn unindex(&mut self, fingerprint: &str, name: &str) {
        if let Some(per) = self.fingerprints.get_mut(fingerprint) {
            per.active.retain(|n| n != name);
            if per.active.is_empty() && Arc::strong_count(&per.changed) == 1 {
                // Keep the entry while it is recently changed (hotness) — it is small; drop it
                // otherwise so terminal fingerprints do not accumulate.
                if per.changed_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    self.fingerprints.remove(fingerprint);
                }
            }
        }
    }

    /// The RR of `fp` that absorbs a signal at `wall`, chosen as from a fresh list.
    fn active(&self, fp: &str, wall: jiff::Timestamp) -> Option<Arc<RemediationRequest>> {
        let per = self.fingerprints.get(fp)?;
        let held: Vec<&Arc<RemediationRequest>> = per
            .active
            .iter()
            .filter_map(|n| self.objects.get(n)?.active.as_ref())
            .collect();
        let chosen = absorb::pick(held.iter().map(|rr| rr.as_ref()), wall)?
            .metadata
            .name
            .clone();
        held.into_iter().find(|rr| rr.metadata.name == chosen).cloned()
    }
}

/// Stops the watch task when dropped.
pub struct WatchTask(JoinHandle<()>);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl HintCache {
    pub fn new(metrics: Metrics, clock: SharedClock) -> Arc<Self> {
        Arc::new(HintCache {
            state: Mutex::new(State {
                complete: true,
                ..State::default()
            }),
            metrics,
            clock,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("hint cache poisoned")
    }

    /// Starts watching `namespace` through `cluster`; the watch stops when the handle is dropped.
    pub fn spawn_watch(self: &Arc<Self>, cluster: Arc<dyn Cluster>, namespace: String) -> WatchTask {
        WatchTask(tokio::spawn(self.clone().watch_loop(cluster, namespace)))
    }

    async fn watch_loop(self: Arc<Self>, cluster: Arc<dyn Cluster>, namespace: String) {
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let mut events = cluster.watch_requests(&namespace);
            while let Some(item) = events.next().await {
                match item {
                    Ok(event) => {
                        self.apply(event);
                    }
                    Err(e) => {
                        // The kubernetes backend's watcher resumes after its own backoff (from the
                        // last version, or with a fresh list); until it delivers, no claims.
                        self.metrics.watch_errors.inc();
                        self.broken();
                        tracing::warn!(error = %e, "RemediationRequest watch failed; listing again after a backoff");
                    }
                }
            }
            // The stream ended (the embedded store's feed after its consumer fell behind): start a
            // new one. Only a watch that ran for a while resets the backoff.
            self.unsync();
            if started.elapsed() >= HEALTHY_WATCH {
                failures = 0;
            }
            let pause = backoff(failures, Duration::from_millis(200), Duration::from_secs(30));
            failures = failures.saturating_add(1);
            tokio::time::sleep(pause).await;
        }
    }

    /// Applies one watch event.
    fn apply(&self, event: RequestEvent) {
        let now = Instant::now();
        let wall = self.clock.now();
        let mut st = self.state();
        match event {
            RequestEvent::Init => {
                self.metrics.watch_relists.inc();
                st.synced = false;
                st.listed = false;
                st.history_from = None;
                st.applied_rv = 0;
                st.overflowed_in_list = false;
                st.listing = Some(HashMap::new());
                self.metrics.watch_synced.set(0);
            }
            RequestEvent::Listed(rr) => {
                self.metrics.watch_events.with_label_values(&["listed"]).inc();
                if let (Some(listing), Some(name)) = (st.listing.as_mut(), rr.metadata.name.clone()) {
                    listing.insert(name, rv_of(&rr).to_owned());
                }
                st.observe(&rr, now, wall);
            }
            RequestEvent::Synced => {
                let listing = st.listing.take().unwrap_or_default();
                // Names we hold that the list did not return were deleted while we were not
                // watching — unless we learnt of them (our own write) after the list was taken.
                let listed_max = listing.values().filter_map(|rv| rv.parse::<u64>().ok()).max();
                let gone: Vec<String> = st
                    .objects
                    .iter()
                    .filter(|(name, known)| {
                        !listing.contains_key(*name)
                            && match (known.rv.parse::<u64>().ok(), listed_max) {
                                (Some(rv), Some(max)) => rv <= max,
                                _ => true,
                            }
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in gone {
                    if let Some(known) = st.objects.remove(&name) {
                        st.active_total -= usize::from(known.active.is_some());
                        st.unindex(&known.fingerprint, &name);
                    }
                }
                st.complete = !st.overflowed_in_list;
                st.synced = true;
                st.listed = true;
                st.history_from = Some(listed_max.unwrap_or(0));
                st.applied_rv = listed_max.unwrap_or(0);
                self.metrics.watch_synced.set(1);
            }
            RequestEvent::Applied(rr) => {
                self.metrics.watch_events.with_label_values(&["applied"]).inc();
                if let Ok(rv) = rv_of(&rr).parse::<u64>() {
                    st.applied_rv = st.applied_rv.max(rv);
                }
                st.synced = st.listed; // the watch delivers again
                st.observe(&rr, now, wall);
            }
            RequestEvent::Deleted(rr) => {
                self.metrics.watch_events.with_label_values(&["deleted"]).inc();
                if let Ok(rv) = rv_of(&rr).parse::<u64>() {
                    st.applied_rv = st.applied_rv.max(rv);
                }
                st.synced = st.listed;
                st.forget(&rr, now);
            }
        }
        self.metrics.watch_synced.set(i64::from(st.synced));
        self.metrics.watch_cached.set(st.active_total as i64);
    }

    /// The watch failed. It resumes from the last version it delivered (nothing is missed) or
    /// starts over with a list; until it delivers again, nothing is vouched for.
    fn broken(&self) {
        self.state().synced = false;
        self.metrics.watch_synced.set(0);
    }

    /// The watch stream ended: a new one lists again.
    fn unsync(&self) {
        let mut st = self.state();
        st.synced = false;
        st.listed = false;
        st.history_from = None;
        st.listing = None;
        self.metrics.watch_synced.set(0);
    }

    /// A complete list has been applied and the watch is running.
    pub fn is_synced(&self) -> bool {
        self.state().synced
    }

    /// Records an RR this replica read or wrote (kept if newer than what the cache holds).
    pub fn observe(&self, rr: &RemediationRequest) {
        let wall = self.clock.now();
        let mut st = self.state();
        if st.observe(rr, Instant::now(), wall) {
            self.metrics.watch_cached.set(st.active_total as i64);
        }
    }

    /// The RR known to absorb a signal of `fp` now: a hint for a conditional write.
    pub fn active(&self, fp: &Fingerprint) -> Option<RemediationRequest> {
        let wall = self.clock.now();
        self.state().active(fp.as_str(), wall).map(|rr| (*rr).clone())
    }

    /// Whether an RR known to absorb a signal of `fp` now exists (a write would only count).
    pub fn knows_active(&self, fp: &Fingerprint) -> bool {
        let wall = self.clock.now();
        self.state().active(fp.as_str(), wall).is_some()
    }

    /// True only when the synced watch knows no RR of `fp` that absorbs now. Lets a creator skip
    /// the list before the lock; the list under the lock still decides.
    pub fn knows_none_active(&self, fp: &Fingerprint) -> bool {
        let wall = self.clock.now();
        let st = self.state();
        st.synced && st.complete && st.active(fp.as_str(), wall).is_none()
    }

    /// The highest generation of `fp`'s RRs this replica has seen, if any.
    pub fn highest_generation(&self, fp: &Fingerprint) -> Option<u64> {
        self.state()
            .fingerprints
            .get(fp.as_str())
            .map(|p| p.highest)
            .filter(|h| *h > 0)
    }

    /// Whether a write of RR `name` based on version `base_rv`, carrying `marker` (its
    /// `lastSeenAt` and `occurrenceCount`), landed, given the RR is now at `current_rv`: yes when
    /// a version with that marker was seen; no when the watch has delivered every version from
    /// `base_rv` through `current_rv` and none carried it; waits up to `until` for the watch to
    /// catch up, then unknown.
    pub async fn landed(
        &self,
        fp: &Fingerprint,
        name: &str,
        base_rv: &str,
        marker: (&str, i32),
        current_rv: &str,
        until: Instant,
    ) -> Landed {
        let key = (name.to_owned(), marker.0.to_owned(), marker.1);
        let (Ok(base), Ok(current)) = (base_rv.parse::<u64>(), current_rv.parse::<u64>()) else {
            return Landed::Unknown;
        };
        loop {
            let changed = {
                let mut st = self.state();
                if st.marker_set.contains(&key) {
                    return Landed::Yes;
                }
                match st.history_from {
                    Some(from) if st.synced && base >= from => {
                        if st.applied_rv >= current {
                            return Landed::No;
                        }
                    }
                    _ => return Landed::Unknown,
                }
                st.fingerprints
                    .entry(fp.as_str().to_owned())
                    .or_default()
                    .changed
                    .clone()
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.state();
                if st.marker_set.contains(&key) || st.applied_rv >= current {
                    continue;
                }
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return Landed::Unknown;
            }
        }
    }

    /// Whether an RR of `fp` changed (any writer) within `window`.
    pub fn changed_within(&self, fp: &Fingerprint, window: Duration) -> bool {
        self.state()
            .fingerprints
            .get(fp.as_str())
            .and_then(|p| p.changed_at)
            .is_some_and(|t| t.elapsed() <= window)
    }

    /// Waits until the cache holds a version of RR `name` newer than `than_rv`, up to `until`.
    /// `None` when none arrived in time or the watch is not synced (then ask the API server).
    pub async fn newer_than(&self, fp: &Fingerprint, name: &str, than_rv: &str, until: Instant) -> Option<Newer> {
        loop {
            let changed = {
                let mut st = self.state();
                if !st.synced {
                    return None;
                }
                match st.objects.get(name) {
                    Some(known) if newer(&known.rv, than_rv) => {
                        let wall = self.clock.now();
                        return Some(match &known.active {
                            Some(rr) if absorb::absorbs(rr, wall).is_some() => Newer::Active(Box::new((**rr).clone())),
                            _ => Newer::Closed,
                        });
                    }
                    _ => {}
                }
                st.fingerprints
                    .entry(fp.as_str().to_owned())
                    .or_default()
                    .changed
                    .clone()
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after registering, so a change between the check and here is not missed.
            {
                let st = self.state();
                if st.objects.get(name).is_some_and(|k| newer(&k.rv, than_rv)) {
                    continue;
                }
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Waits up to `until` for an absorbing RR of `fp` to appear (the lock holder's), returning it.
    pub async fn wait_active(&self, fp: &Fingerprint, until: Instant) -> Option<RemediationRequest> {
        loop {
            let changed = {
                let wall = self.clock.now();
                let mut st = self.state();
                if let Some(rr) = st.active(fp.as_str(), wall) {
                    return Some((*rr).clone());
                }
                st.fingerprints
                    .entry(fp.as_str().to_owned())
                    .or_default()
                    .changed
                    .clone()
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state().active(fp.as_str(), self.clock.now()).is_some() {
                continue;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::crd::{Deduplication, RemediationRequestSpec, RemediationRequestStatus};

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::parse(&format!("{:064x}", n)).unwrap()
    }

    fn rr(name: &str, f: &Fingerprint, rv: u64, phase: &str, count: i32) -> RemediationRequest {
        RemediationRequest {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.to_string()),
                ..Default::default()
            },
            spec: RemediationRequestSpec {
                signal_fingerprint: f.to_string(),
                ..Default::default()
            },
            status: Some(RemediationRequestStatus {
                deduplication: Some(Deduplication {
                    occurrence_count: count,
                    ..Default::default()
                }),
                overall_phase: (!phase.is_empty()).then(|| phase.into()),
                ..Default::default()
            }),
        }
    }

    fn cache() -> Arc<HintCache> {
        HintCache::new(
            Metrics::register(&prometheus::Registry::new()).unwrap(),
            Arc::new(crate::clock::SystemClock),
        )
    }

    fn count(rr: &RemediationRequest) -> i32 {
        rr.occurrence_count()
    }

    #[test]
    fn an_older_copy_never_replaces_a_newer_one_and_a_terminal_rr_stays_closed() {
        let c = cache();
        let f = fp(1);
        c.observe(&rr("a", &f, 10, "", 5));
        c.observe(&rr("a", &f, 7, "", 3));
        assert_eq!(count(&c.active(&f).unwrap()), 5);
        c.observe(&rr("a", &f, 11, "Completed", 5));
        assert!(c.active(&f).is_none());
        c.observe(&rr("a", &f, 10, "", 5)); // our own write result, arriving late
        assert!(c.active(&f).is_none(), "a late older copy must not reopen a closed RR");
    }

    #[test]
    fn absence_is_only_vouched_for_by_a_synced_watch() {
        let c = cache();
        let f = fp(2);
        assert!(!c.knows_none_active(&f), "not synced: no claim");
        c.apply(RequestEvent::Init);
        c.apply(RequestEvent::Listed(rr("b", &fp(3), 4, "", 1)));
        assert!(!c.knows_none_active(&f), "list not complete: no claim");
        c.apply(RequestEvent::Synced);
        assert!(c.knows_none_active(&f));
        assert!(!c.knows_none_active(&fp(3)));
        c.unsync();
        assert!(!c.knows_none_active(&f), "a broken watch vouches for nothing");
    }

    #[test]
    fn a_relist_drops_what_was_deleted_meanwhile_but_keeps_newer_own_writes() {
        let c = cache();
        let (f1, f2, f3) = (fp(4), fp(5), fp(6));
        c.apply(RequestEvent::Init);
        c.apply(RequestEvent::Listed(rr("x", &f1, 5, "", 1)));
        c.apply(RequestEvent::Listed(rr("y", &f2, 6, "", 1)));
        c.apply(RequestEvent::Synced);
        c.unsync();
        c.observe(&rr("z", &f3, 40, "", 1)); // our own write after the next list was taken
        c.apply(RequestEvent::Init);
        c.apply(RequestEvent::Listed(rr("x", &f1, 9, "", 2)));
        c.apply(RequestEvent::Synced);
        assert_eq!(count(&c.active(&f1).unwrap()), 2);
        assert!(c.active(&f2).is_none(), "y was deleted while the watch was down");
        assert!(c.active(&f3).is_some(), "z is newer than anything listed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflicting_writer_waits_for_the_watch_but_never_past_its_bound() {
        let c = cache();
        let f = fp(7);
        c.apply(RequestEvent::Init);
        c.apply(RequestEvent::Listed(rr("r", &f, 5, "", 1)));
        c.apply(RequestEvent::Synced);
        // Nothing newer arrives: the wait ends at its bound.
        let started = Instant::now();
        let until = started + Duration::from_millis(30);
        assert!(c.newer_than(&f, "r", "5", until).await.is_none());
        assert_eq!(Instant::now(), until);
        // A newer version arrives while waiting: returned at once.
        let c2 = c.clone();
        let f2 = f.clone();
        let waiter = tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(1);
            match c2.newer_than(&f2, "r", "5", until).await {
                Some(Newer::Active(rr)) => (count(&rr), Instant::now()),
                _ => panic!("expected the newer version"),
            }
        });
        tokio::time::sleep(Duration::from_millis(3)).await;
        let delivered = Instant::now();
        c.apply(RequestEvent::Applied(rr("r", &f, 8, "", 4)));
        let (n, at) = waiter.await.unwrap();
        assert_eq!(n, 4);
        assert_eq!(at, delivered);
        // It turned terminal: the answer says so.
        c.apply(RequestEvent::Applied(rr("r", &f, 9, "Failed", 4)));
        assert!(matches!(
            c.newer_than(&f, "r", "8", Instant::now()).await,
            Some(Newer::Closed)
        ));
    }

    #[test]
    fn a_namespace_too_large_to_hold_is_never_vouched_for() {
        let c = cache();
        c.apply(RequestEvent::Init);
        for i in 0..=MAX_ACTIVE as u64 {
            let f = Fingerprint::parse(&format!("{:064x}", 1_000_000 + i)).unwrap();
            c.apply(RequestEvent::Listed(rr(&format!("rr-{i}"), &f, i + 1, "", 1)));
        }
        c.apply(RequestEvent::Synced);
        assert!(c.is_synced());
        // The cache had to drop RRs it listed: it cannot say that any fingerprint has none.
        assert!(!c.knows_none_active(&fp(9)));
    }
}
