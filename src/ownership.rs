//! Fingerprint ownership among the live replicas (ADR 0014), with Kubernetes Leases as the
//! coordination service.
//!
//! Fingerprints fall into a fixed number of shards. Every replica keeps a **member Lease**
//! (`gw-member-…`, label [`MEMBER_LABEL`]) renewed every `leaseDuration / 3`; its annotations
//! carry the replica's forwarding address, a per-process forwarding key and the shards it
//! **claims**. Each shard's rightful owner is the live member with the highest rendezvous score
//! `H(member, shard)`, so a member joining or leaving moves only the shards it wins or held.
//!
//! A claim is made only for a shard no other live member claims (as last listed), and becomes
//! **effective** only when a list read *after* the claim was stored shows no other live member
//! claiming it. Of two members claiming one shard, at most one can pass that check: whichever
//! listed first saw no competitor, so the competitor's claim was stored after that list, and the
//! competitor's own list, after its claim, sees the first claim. A member releases a shard (in its
//! next renewal) as soon as it sees a live member with a higher score for it, and takes nothing
//! over before the holder's claim is gone or its Lease has not changed for a whole lease duration
//! as observed locally — by which time the holder itself has stopped treating its claims as valid
//! (`valid_until`: the start of its last successful renewal plus the lease duration).
//!
//! An effective owner creates RRs of its shards without a per-fingerprint Lease (the
//! [`OwnerFence`] plays the Lease's part: the create must be sent early enough to land while
//! the ownership is valid); everyone else forwards to it, or falls back to the Lease-guarded path.
//! Ownership only makes conflicts and duplicate work rare; correctness never depends on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::SharedClock;
use crate::cluster::{ApiError, Call, Cluster, LeaseEvent, Result, WatchEvent};
use crate::fingerprint::Fingerprint;
use crate::lock::FenceError;
use crate::metrics::Metrics;

/// Label of every member Lease (the list selects on it).
pub const MEMBER_LABEL: (&str, &str) = ("signal-gateway.kubernaut.ai/member", "true");

/// Rounds run back to back, at most, while each one's list changes what the claims should be.
const MAX_ROUNDS_AT_ONCE: u32 = 3;
/// Annotation: where the member accepts forwarded signals (`http://<pod ip>:<port>`).
pub const ADDRESS_ANNOTATION: &str = "signal-gateway.kubernaut.ai/address";
/// Annotation: the key a forward to this member must carry (random per process).
pub const KEY_ANNOTATION: &str = "signal-gateway.kubernaut.ai/forward-key";
/// Annotation: with TLS, the SHA-256 (hex, of the DER) of the leaf certificate the member serves;
/// forwards to it accept that certificate and no other (ADR 0014).
pub const CERT_ANNOTATION: &str = "signal-gateway.kubernaut.ai/forward-cert-sha256";
/// Annotation: the shards the member claims (`3,17,40`), and how many shards there are.
pub const SHARDS_ANNOTATION: &str = "signal-gateway.kubernaut.ai/shards";
pub const SHARD_COUNT_ANNOTATION: &str = "signal-gateway.kubernaut.ai/shard-count";

pub struct Settings {
    pub namespace: String,
    /// The process identity (`<pod>_<8 hex>`, as the lock uses).
    pub identity: String,
    /// Where peers reach this replica's forwarding endpoint.
    pub address: String,
    /// With TLS: the fingerprint of the certificate served now (read at every renewal, so a
    /// renewed certificate is published with the next one).
    pub cert_sha256: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    pub lease_duration: Duration,
    pub shards: u32,
    /// How long before the end of its validity an owner stops sending creates
    /// (`backend.apiTimeout` + 1 s, as the lock's fence).
    pub write_grace: Duration,
}

/// Where a signal of a fingerprint goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Process it here (this replica owns its shard, or no other member claims it).
    Local,
    /// Forward it to the member claiming its shard.
    Forward(Peer),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: String,
    pub address: String,
    pub key: String,
    /// The certificate a TLS forward must find (empty: the member published none).
    pub cert_sha256: String,
}

/// The answer to a forwarded signal.
#[derive(Debug)]
pub enum Forwarded {
    /// The owner stored it (2xx).
    Stored(crate::coalesce::Ack),
    /// The owner answered that it is not stored (its 503).
    Failed(crate::dedup::DedupError),
    /// Certainly not processed by the owner (no connection, no forward slot, refused): the
    /// signal may take the local path. The reason is a metric label.
    NotSent(&'static str),
    /// Sent, and no answer in time: it may be stored.
    Unanswered,
}

/// Sends a signal to the replica that owns its shard (the HTTP client lives in http/forward.rs).
#[async_trait::async_trait]
pub trait Forwarder: Send + Sync + 'static {
    async fn forward(
        &self,
        peer: &Peer,
        fp: &Fingerprint,
        spec: &crate::crd::RemediationRequestSpec,
        deadline: Instant,
    ) -> Forwarded;
}

#[derive(Clone)]
pub struct Ownership {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Arc<dyn Cluster>,
    clock: SharedClock,
    metrics: Metrics,
    settings: Settings,
    lease_name: String,
    key: String,
    state: Mutex<State>,
    /// One round at a time (the loop and tests; stop waits for a round in flight).
    round: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Our Lease as last stored (None: not yet created, or lost).
    lease: Option<Lease>,
    /// Shards our stored Lease claims.
    claims: BTreeSet<u32>,
    /// Claims that passed the check after they were stored.
    effective: BTreeSet<u32>,
    /// Until when our claims are ours (start of the last stored renewal + lease duration).
    valid_until: Option<Instant>,
    /// Other members, by Lease name, as last listed.
    members: BTreeMap<String, Member>,
    /// Whether a list has completed since start (no claim before it).
    listed: bool,
    stopped: bool,
    /// Shards still to claim, release or confirm, as of the last report (end of each round).
    pending: usize,
    /// Of those, the shards the stored claims should gain or lose: the list of the last round
    /// changed the view it stored them from.
    due: usize,
}

#[derive(Debug, Clone)]
struct Member {
    identity: String,
    address: String,
    key: String,
    cert_sha256: String,
    claims: BTreeSet<u32>,
    resource_version: String,
    /// When we saw this version first (local clock): the Lease is live until `seen_at + duration`.
    seen_at: Instant,
    duration: Duration,
}

impl Member {
    fn live(&self, now: Instant) -> bool {
        now < self.seen_at + self.duration
    }
}

/// The shard of a fingerprint (its first 8 hex digits, modulo the shard count).
pub fn shard_of(fp: &Fingerprint, shards: u32) -> u32 {
    let head = fp.as_str().get(..8).unwrap_or("0");
    u32::from_str_radix(head, 16).unwrap_or(0) % shards.max(1)
}

/// Rendezvous score of `identity` for `shard`: the highest among the live members owns it.
pub fn score(identity: &str, shard: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    h.update(b"/");
    h.update(shard.to_be_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// A valid Lease name for a member identity (`<pod>_<hex>` -> `gw-member-<pod>-<hex>`).
pub fn member_lease_name(identity: &str) -> String {
    let mut name: String = identity
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    name.truncate(200);
    format!("gw-member-{}", name.trim_matches(|c| c == '-' || c == '.'))
}

fn format_shards(shards: &BTreeSet<u32>) -> String {
    shards.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn parse_shards(s: &str, shards: u32) -> BTreeSet<u32> {
    s.split(',')
        .filter_map(|p| p.trim().parse::<u32>().ok())
        .filter(|&p| p < shards)
        .collect()
}

/// 32 random bytes from the operating system, hex: the forwarding key of this process.
fn random_key() -> String {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).expect("the operating system's random source");
    crate::fingerprint::hex(&buf)
}

impl Ownership {
    pub fn new(cluster: Arc<dyn Cluster>, clock: SharedClock, metrics: Metrics, settings: Settings) -> Self {
        let lease_name = member_lease_name(&settings.identity);
        Ownership {
            inner: Arc::new(Inner {
                cluster,
                clock,
                metrics,
                lease_name,
                key: random_key(),
                settings,
                state: Mutex::new(State::default()),
                round: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn identity(&self) -> &str {
        &self.inner.settings.identity
    }

    /// The key forwards to this replica must carry.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    pub fn shard_of(&self, fp: &Fingerprint) -> u32 {
        shard_of(fp, self.inner.settings.shards)
    }

    /// Once the backend is ready, rounds every `leaseDuration / 3` until `stop`, then ends the
    /// membership (deletes the Lease, so the shards move at once).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let period = self.inner.settings.lease_duration / 3;
        // A replica joins only once it could serve what it would own: one whose backend is not
        // ready (the CRD not served, a permission missing) would be sent its shards' signals and
        // fail them all, where the others can take them.
        let mut waited = false;
        loop {
            let check = self.inner.cluster.check_ready(&self.inner.settings.namespace);
            match tokio::time::timeout(period, check).await {
                Ok(Ok(())) => break,
                Ok(Err(reason)) if !waited => tracing::warn!(%reason, "not joining the ring until ready"),
                Err(_) if !waited => tracing::warn!("not joining the ring until ready: the readiness check hung"),
                _ => {}
            }
            waited = true;
            tokio::select! {
                _ = tokio::time::sleep(period / 4) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        if waited {
            tracing::info!("ready: joining the ring");
        }
        // Another member joining, leaving or changing its claims starts a round at once, so a
        // handover takes a round trip per step instead of a period. The rounds do not depend on
        // the watch: while it is broken (it restarts itself) they run on their period alone.
        let mut changes = self
            .inner
            .cluster
            .watch_leases(&self.inner.settings.namespace, MEMBER_LABEL);
        let mut watching = true;
        let mut at_once = 0;
        'rounds: loop {
            let ok = match self.round().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "ownership round failed; claims lapse unless the next one succeeds");
                    false
                }
            };
            // A round whose list changed what the claims should be stores them again at once (a
            // few times in a row at most); one that waits for claims to become effective runs
            // again soon, to confirm or hand over quickly.
            let (due, settling) = self.settling();
            at_once = if ok && due && at_once < MAX_ROUNDS_AT_ONCE {
                at_once + 1
            } else {
                0
            };
            let next = if at_once > 0 {
                Duration::ZERO
            } else if settling {
                period / 4
            } else {
                period
            };
            let pause = tokio::time::sleep(next);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    _ = stop.wait_for(|s| *s) => break 'rounds,
                    item = changes.next(), if watching => match item {
                        Some(Ok(event)) if self.moves_anything(&event) => break,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::debug!(error = %e, "member Lease watch failed; it restarts"),
                        None => watching = false,
                    },
                }
            }
        }
        self.leave().await;
    }

    /// Whether a member Lease change the watch delivered can change what this replica claims or
    /// may make effective: another member appearing (or coming back to life), leaving, or changing
    /// its claims; or how forwards reach it (a renewed TLS certificate). A renewal that changes
    /// none of that does not.
    fn moves_anything(&self, event: &LeaseEvent) -> bool {
        // A (re)list's items count too: they may carry changes made since this replica's last
        // round listed the members (the watch's first list comes after the first round).
        let (lease, deleted) = match event {
            WatchEvent::Applied(lease) | WatchEvent::Listed(lease) => (lease, false),
            WatchEvent::Deleted(lease) => (lease, true),
            WatchEvent::Init | WatchEvent::Synced => return false,
        };
        let Some(name) = lease.metadata.name.as_deref() else {
            return false;
        };
        if name == self.inner.lease_name {
            return false;
        }
        let now = Instant::now();
        let st = self.inner.state.lock().unwrap();
        match (st.members.get(name), deleted) {
            (None, deleted) => !deleted,
            (Some(_), true) => true,
            (Some(known), false) => {
                !known.live(now)
                    || self
                        .member_of(lease, Some(known), now)
                        .is_none_or(|m| m.claims != known.claims || m.cert_sha256 != known.cert_sha256)
            }
        }
    }

    /// As the round just ended saw it (its report): whether the stored claims should change,
    /// and whether any claim is waiting to become effective or shards to be claimed or released.
    fn settling(&self) -> (bool, bool) {
        let st = self.inner.state.lock().unwrap();
        (st.due > 0, st.pending > 0)
    }

    /// Shards this replica should hold given its view: those it wins, and no other live member
    /// still claims (a claim held elsewhere is waited out, never overlapped).
    fn desired_claims(&self, st: &State, now: Instant) -> BTreeSet<u32> {
        let me = self.inner.settings.identity.as_str();
        let live: Vec<&Member> = st.members.values().filter(|m| m.live(now)).collect();
        (0..self.inner.settings.shards)
            .filter(|&s| {
                let mine = score(me, s);
                let beaten = live
                    .iter()
                    .any(|m| (score(&m.identity, s), m.identity.as_str()) > (mine, me));
                let held_elsewhere = live.iter().any(|m| m.claims.contains(&s));
                !beaten && (st.claims.contains(&s) || !held_elsewhere)
            })
            .collect()
    }

    /// One round: store the claims the current view asks for (renewing the Lease), list the
    /// members, and make effective the claims no other live member shares.
    pub async fn round(&self) -> Result<()> {
        let _round = self.inner.round.lock().await;
        let result = self.round_once().await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.inner.metrics.ownership_rounds.with_label_values(&[label]).inc();
        result
    }

    async fn round_once(&self) -> Result<()> {
        let inner = &self.inner;
        let started = Instant::now();
        let (claims, current) = {
            let mut st = inner.state.lock().unwrap();
            if st.stopped {
                return Ok(());
            }
            // Nothing is claimed before the members have been listed once.
            let claims = if st.listed {
                self.desired_claims(&st, started)
            } else {
                BTreeSet::new()
            };
            // A shard being released stops being ours before the release is stored: once it
            // is, a peer may take it at any moment.
            let releasing: Vec<u32> = st.effective.difference(&claims).copied().collect();
            for s in releasing {
                st.effective.remove(&s);
            }
            (claims, st.lease.clone())
        };
        let lease = self.lease_with(current, &claims);
        let stored = match lease.metadata.resource_version {
            Some(_) => inner.cluster.update_lease(Call::UNCOUNTED, &lease).await,
            None => match inner.cluster.create_lease(Call::UNCOUNTED, &lease).await {
                // A leftover of ours from a lost answer: adopt it with a read.
                Err(ApiError::AlreadyExists) => {
                    let theirs = inner
                        .cluster
                        .get_lease(Call::UNCOUNTED, &inner.settings.namespace, &inner.lease_name)
                        .await?;
                    inner
                        .cluster
                        .update_lease(Call::UNCOUNTED, &self.lease_with(Some(theirs), &claims))
                        .await
                }
                other => other,
            },
        };
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                let mut st = inner.state.lock().unwrap();
                if matches!(e, ApiError::Conflict(_) | ApiError::NotFound) {
                    // Someone else changed or removed our Lease: start over from nothing.
                    st.lease = None;
                    st.claims.clear();
                    st.effective.clear();
                    st.valid_until = None;
                }
                self.report(&mut st);
                return Err(e);
            }
        };
        {
            let mut st = inner.state.lock().unwrap();
            let released = st.claims.difference(&claims).count();
            if released > 0 {
                inner
                    .metrics
                    .ownership_handovers
                    .with_label_values(&["released"])
                    .inc_by(released as u64);
            }
            st.lease = Some(stored);
            st.claims = claims;
            st.valid_until = Some(started + inner.settings.lease_duration);
        }
        // The list after our claims were stored decides which become effective.
        let listed = inner
            .cluster
            .list_leases(Call::UNCOUNTED, &inner.settings.namespace, MEMBER_LABEL)
            .await;
        let listed = match listed {
            Ok(listed) => listed,
            Err(e) => {
                self.report(&mut inner.state.lock().unwrap());
                return Err(e);
            }
        };
        let expired = self.observe(listed);
        for (name, rv) in expired {
            match inner
                .cluster
                .delete_lease(Call::UNCOUNTED, &inner.settings.namespace, &name, &rv)
                .await
            {
                Ok(()) | Err(ApiError::NotFound | ApiError::Conflict(_)) => {}
                Err(e) => tracing::debug!(lease = %name, error = %e, "could not remove an expired member Lease"),
            }
        }
        Ok(())
    }

    /// Takes a fresh list of the member Leases: who is live, and which of our claims nobody else
    /// shares (those become effective). Returns the Leases expired long enough to remove.
    fn observe(&self, listed: Vec<Lease>) -> Vec<(String, String)> {
        let inner = &self.inner;
        let mut st = inner.state.lock().unwrap();
        let now = Instant::now();
        let mut members = BTreeMap::new();
        let mut expired = Vec::new();
        for lease in listed {
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            if name == inner.lease_name {
                continue;
            }
            let Some(member) = self.member_of(&lease, st.members.get(&name), now) else {
                continue;
            };
            // Gone for two lease durations: a crashed member's Lease, removed (conditionally).
            if now >= member.seen_at + member.duration * 2 {
                expired.push((name.clone(), member.resource_version.clone()));
            }
            members.insert(name, member);
        }
        st.members = members;
        st.listed = true;
        let contested: BTreeSet<u32> = st
            .members
            .values()
            .filter(|m| m.live(now))
            .flat_map(|m| m.claims.iter().copied())
            .collect();
        let gained: Vec<u32> = st
            .claims
            .iter()
            .copied()
            .filter(|s| !st.effective.contains(s) && !contested.contains(s))
            .collect();
        if !gained.is_empty() {
            inner
                .metrics
                .ownership_handovers
                .with_label_values(&["acquired"])
                .inc_by(gained.len() as u64);
        }
        st.effective.extend(gained);
        self.report(&mut st);
        expired
    }

    fn member_of(&self, lease: &Lease, known: Option<&Member>, now: Instant) -> Option<Member> {
        let ann = lease.metadata.annotations.as_ref();
        let get = |k: &str| ann.and_then(|a| a.get(k)).cloned().unwrap_or_default();
        if get(SHARD_COUNT_ANNOTATION) != self.inner.settings.shards.to_string() {
            // Another shard layout (a rolling update changing the count): not a peer we can
            // share shards with; its signals take the Lease-guarded path.
            return None;
        }
        let spec = lease.spec.as_ref()?;
        let identity = spec.holder_identity.clone()?;
        let resource_version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen_at = match known {
            Some(k) if k.resource_version == resource_version => k.seen_at,
            _ => now,
        };
        let duration =
            Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15).max(1)).unwrap_or(15));
        Some(Member {
            identity,
            address: get(ADDRESS_ANNOTATION),
            key: get(KEY_ANNOTATION),
            cert_sha256: get(CERT_ANNOTATION),
            claims: parse_shards(&get(SHARDS_ANNOTATION), self.inner.settings.shards),
            resource_version,
            seen_at,
            duration,
        })
    }

    fn lease_with(&self, current: Option<Lease>, claims: &BTreeSet<u32>) -> Lease {
        let s = &self.inner.settings;
        let now = self.inner.clock.now();
        let mut lease = current.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.inner.lease_name.clone()),
                namespace: Some(s.namespace.clone()),
                labels: Some([(MEMBER_LABEL.0.to_owned(), MEMBER_LABEL.1.to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(s.identity.clone()),
                acquire_time: Some(MicroTime(now)),
                ..LeaseSpec::default()
            }),
        });
        let ann = lease.metadata.annotations.get_or_insert_with(Default::default);
        ann.insert(ADDRESS_ANNOTATION.into(), s.address.clone());
        ann.insert(KEY_ANNOTATION.into(), self.inner.key.clone());
        match &s.cert_sha256 {
            Some(cert) => ann.insert(CERT_ANNOTATION.into(), cert()),
            None => ann.remove(CERT_ANNOTATION),
        };
        ann.insert(SHARDS_ANNOTATION.into(), format_shards(claims));
        ann.insert(SHARD_COUNT_ANNOTATION.into(), s.shards.to_string());
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(s.identity.clone());
        spec.lease_duration_seconds = Some(i32::try_from(s.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX));
        spec.renew_time = Some(MicroTime(now));
        lease
    }

    fn report(&self, st: &mut State) {
        let m = &self.inner.metrics;
        let now = Instant::now();
        let valid = st.valid_until.is_some_and(|v| now < v);
        m.ownership_shards_owned
            .set(if valid { st.effective.len() as i64 } else { 0 });
        m.ownership_members
            .set(1 + st.members.values().filter(|m| m.live(now)).count() as i64);
        let (mut here, mut peer) = (0, 0);
        for s in 0..self.inner.settings.shards {
            if valid && st.effective.contains(&s) {
                here += 1;
            } else if st
                .members
                .values()
                .filter(|m| m.live(now) && m.claims.contains(&s))
                .count()
                == 1
            {
                peer += 1;
            }
        }
        let none = i64::from(self.inner.settings.shards) - here - peer;
        for (to, n) in [("self", here), ("peer", peer), ("none", none)] {
            m.ownership_shards_routed.with_label_values(&[to]).set(n);
        }
        let desired = self.desired_claims(st, now);
        st.due = st.claims.symmetric_difference(&desired).count();
        st.pending = st.due + st.claims.difference(&st.effective).count();
        m.ownership_shards_pending.set(st.pending as i64);
    }

    /// Ends the membership: no more claims, the Lease deleted (conditionally), so peers take the
    /// shards over at their next round instead of after a lease duration.
    pub async fn leave(&self) {
        let _round = self.inner.round.lock().await;
        let lease = {
            let mut st = self.inner.state.lock().unwrap();
            st.stopped = true;
            st.effective.clear();
            st.claims.clear();
            st.valid_until = None;
            self.report(&mut st);
            st.lease.take()
        };
        if let Some(rv) = lease.and_then(|l| l.metadata.resource_version) {
            let s = &self.inner.settings;
            if let Err(e) = self
                .inner
                .cluster
                .delete_lease(Call::UNCOUNTED, &s.namespace, &self.inner.lease_name, &rv)
                .await
            {
                tracing::warn!(error = %e, "could not delete the member Lease; it expires");
            }
        }
    }

    /// Where a signal of `fp` goes now.
    pub fn route(&self, fp: &Fingerprint) -> Route {
        let shard = self.shard_of(fp);
        let now = Instant::now();
        let st = self.inner.state.lock().unwrap();
        if st.stopped || self.effective(&st, shard, now) {
            return Route::Local;
        }
        let mut claimants = st
            .members
            .values()
            .filter(|m| m.live(now) && m.claims.contains(&shard) && !m.address.is_empty() && !m.key.is_empty());
        match (claimants.next(), claimants.next()) {
            (Some(owner), None) => Route::Forward(Peer {
                identity: owner.identity.clone(),
                address: owner.address.clone(),
                key: owner.key.clone(),
                cert_sha256: owner.cert_sha256.clone(),
            }),
            // Nobody claims it (a handover under way), or a moment of two claims: here, under
            // the Lease-guarded path.
            _ => Route::Local,
        }
    }

    fn effective(&self, st: &State, shard: u32, now: Instant) -> bool {
        st.effective.contains(&shard) && st.valid_until.is_some_and(|v| now < v)
    }

    /// A fence for creating an RR of `fp` without a per-fingerprint Lease: `Some` while this
    /// replica's ownership of its shard is effective.
    pub fn fence(&self, fp: &Fingerprint) -> Option<OwnerFence> {
        let shard = self.shard_of(fp);
        let st = self.inner.state.lock().unwrap();
        self.effective(&st, shard, Instant::now()).then(|| OwnerFence {
            ownership: self.clone(),
            shard,
        })
    }

    /// Shards whose ownership is effective now (tests and the debug endpoint).
    pub fn owned(&self) -> BTreeSet<u32> {
        let now = Instant::now();
        let st = self.inner.state.lock().unwrap();
        st.effective
            .iter()
            .copied()
            .filter(|&s| self.effective(&st, s, now))
            .collect()
    }
}

/// Stands in for the creation Lease while a shard is owned.
pub struct OwnerFence {
    ownership: Ownership,
    shard: u32,
}

impl OwnerFence {
    /// The instant by which a create must be sent so that it lands while the ownership is valid;
    /// `Lost` when the shard is no longer ours, `Expiring` when too little validity is left
    /// (the caller takes the Lease-guarded path then).
    pub fn send_by(&self) -> std::result::Result<Instant, FenceError> {
        let inner = &self.ownership.inner;
        let st = inner.state.lock().unwrap();
        let now = Instant::now();
        if !st.effective.contains(&self.shard) || st.stopped {
            return Err(FenceError::Lost);
        }
        match st.valid_until {
            Some(v) if now + inner.settings.write_grace < v => Ok(v - inner.settings.write_grace),
            _ => Err(FenceError::Expiring),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::clock::TokioClock;

    const LEASE: Duration = Duration::from_secs(15);

    fn member(store: &Arc<EmbeddedStore>, clock: &SharedClock, name: &str) -> Ownership {
        member_on(store.clone(), clock, name)
    }

    fn member_on(cluster: Arc<dyn Cluster>, clock: &SharedClock, name: &str) -> Ownership {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        Ownership::new(
            cluster,
            clock.clone(),
            metrics,
            Settings {
                namespace: "ns".into(),
                identity: format!("{name}_0000000{}", name.len()),
                address: format!("http://{name}:8080"),
                cert_sha256: None,
                lease_duration: LEASE,
                shards: 16,
                write_grace: Duration::from_secs(5),
            },
        )
    }

    /// Every member runs a round, in order, `n` times, checking after each round that no shard
    /// has two effective owners.
    async fn rounds(members: &[&Ownership], n: usize) {
        for _ in 0..n {
            for m in members {
                let _ = m.round().await;
                assert_no_shard_owned_twice(members);
            }
            tokio::time::advance(LEASE / 3).await;
        }
    }

    fn assert_no_shard_owned_twice(members: &[&Ownership]) {
        let mut seen = BTreeMap::new();
        for m in members {
            for s in m.owned() {
                if let Some(other) = seen.insert(s, m.identity().to_owned()) {
                    panic!("shard {s} owned by {other} and {}", m.identity());
                }
            }
        }
    }

    fn owned_by_all(members: &[&Ownership]) -> usize {
        members.iter().map(|m| m.owned().len()).sum()
    }

    fn setup() -> (Arc<EmbeddedStore>, SharedClock) {
        let clock: SharedClock = Arc::new(TokioClock::new());
        (Arc::new(EmbeddedStore::new(clock.clone())), clock)
    }

    #[test]
    fn a_fingerprint_always_falls_in_the_same_shard_and_scores_differ_per_member() {
        let fp = Fingerprint::of(
            "",
            &crate::crd::TargetResource {
                kind: "Pod".into(),
                name: "p".into(),
                namespace: "n".into(),
                api_version: String::new(),
            },
        );
        assert_eq!(shard_of(&fp, 64), shard_of(&fp.clone(), 64));
        assert!(shard_of(&fp, 64) < 64);
        assert_ne!(score("a", 1), score("b", 1));
        assert_eq!(member_lease_name("Pod-0_1a2b3c4d"), "gw-member-pod-0-1a2b3c4d");
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_joins_the_ring_only_once_its_backend_is_ready() {
        use crate::backend::faults::{Fault, Faulty, Op};
        use std::sync::atomic::{AtomicBool, Ordering};
        let (store, clock) = setup();
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let cluster = Arc::new(Faulty::new(store.clone(), move |op| match op {
            Op::CheckReady if !r.load(Ordering::SeqCst) => Fault::Fail(ApiError::Forbidden("no CRD".into())),
            _ => Fault::Pass,
        }));
        let a = member_on(cluster, &clock, "a");
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(a.clone().run(stopped));
        // Three lease durations of virtual time: a member would have joined and owned every shard.
        tokio::time::sleep(LEASE * 3).await;
        assert!(store.all_leases().is_empty(), "no member Lease while not ready");
        assert!(a.owned().is_empty());
        ready.store(true, Ordering::SeqCst);
        let until = Instant::now() + LEASE * 3;
        while a.owned().len() < 16 {
            assert!(Instant::now() < until, "never joined once ready");
            tokio::time::sleep(LEASE / 12).await;
        }
        assert_eq!(store.all_leases().len(), 1);
        stop.send(true).unwrap();
        running.await.unwrap();
        assert!(store.all_leases().is_empty(), "left the ring on stop");
    }

    fn rounds_of(m: &Ownership) -> u64 {
        m.inner.metrics.ownership_rounds.with_label_values(&["ok"]).get()
    }

    /// Polls (virtual time) until `ready` holds; returns how long it took.
    async fn until(what: &str, within: Duration, ready: impl Fn() -> bool) -> Duration {
        let started = Instant::now();
        while !ready() {
            assert!(started.elapsed() < within, "{what}: not within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_joining_member_gets_its_shards_without_waiting_for_the_owners_next_round() {
        let (store, clock) = setup();
        let (a, b) = (member(&store, &clock, "a"), member(&store, &clock, "b"));
        let (stop, stopped) = watch::channel(false);
        let run_a = tokio::spawn(a.clone().run(stopped.clone()));
        until("a owns every shard", LEASE * 2, || a.owned().len() == 16).await;
        // Let a settle into its period, then start b right after one of a's rounds: a's next
        // periodic round is a whole period (LEASE / 3) away.
        tokio::time::sleep(LEASE).await;
        let done = rounds_of(&a);
        until("a's next round", LEASE, || rounds_of(&a) > done).await;
        let run_b = tokio::spawn(b.clone().run(stopped));
        let took = until("b owns its shards", LEASE, || {
            !b.owned().is_empty() && a.owned().len() + b.owned().len() == 16
        })
        .await;
        assert!(
            took < LEASE / 12,
            "the handover took {took:?}: a released b's shards when it saw b's Lease, not at its next round"
        );
        assert!(a.owned().is_disjoint(&b.owned()));
        stop.send(true).unwrap();
        run_a.await.unwrap();
        run_b.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_item_starts_a_round_only_when_it_changes_a_peers_claims_including_a_relists() {
        let (store, clock) = setup();
        let (a, b) = (member(&store, &clock, "a"), member(&store, &clock, "b"));
        rounds(&[&a, &b], 4).await;
        let theirs = store
            .all_leases()
            .into_iter()
            .find(|l| l.metadata.name.as_deref() == Some(b.inner.lease_name.as_str()))
            .unwrap();
        let ours = store
            .all_leases()
            .into_iter()
            .find(|l| l.metadata.name.as_deref() == Some(a.inner.lease_name.as_str()))
            .unwrap();
        // A renewal as a already knows it, and a's own Lease: nothing to do.
        assert!(!a.moves_anything(&WatchEvent::Applied(theirs.clone())));
        assert!(!a.moves_anything(&WatchEvent::Listed(theirs.clone())));
        assert!(!a.moves_anything(&WatchEvent::Applied(ours)));
        // b's claims changed since a's last round listed them: delivered as a change, or by a
        // (re)list that the watch made after that round.
        let mut changed = theirs.clone();
        changed
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(SHARDS_ANNOTATION.into(), format_shards(&BTreeSet::new()));
        assert!(a.moves_anything(&WatchEvent::Applied(changed.clone())));
        assert!(a.moves_anything(&WatchEvent::Listed(changed)));
        // b renewed the certificate it serves: forwards must check the new one at once.
        let mut renewed = theirs.clone();
        renewed
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(CERT_ANNOTATION.into(), "ab".repeat(32));
        assert!(a.moves_anything(&WatchEvent::Applied(renewed)));
        // b gone, or a member a has never seen.
        assert!(a.moves_anything(&WatchEvent::Deleted(theirs.clone())));
        let mut stranger = theirs;
        stranger.metadata.name = Some("gw-member-c-00000000".into());
        assert!(a.moves_anything(&WatchEvent::Applied(stranger)));
    }

    #[tokio::test(start_paused = true)]
    async fn three_members_split_every_shard_with_no_shard_owned_twice() {
        let (store, clock) = setup();
        let (a, b, c) = (
            member(&store, &clock, "a"),
            member(&store, &clock, "b"),
            member(&store, &clock, "c"),
        );
        rounds(&[&a, &b, &c], 4).await;
        assert_eq!(owned_by_all(&[&a, &b, &c]), 16, "every shard has an owner");
        for m in [&a, &b, &c] {
            assert!(!m.owned().is_empty(), "{} owns some shards", m.identity());
            for s in m.owned() {
                let winner = [&a, &b, &c].into_iter().max_by_key(|o| score(o.identity(), s)).unwrap();
                assert_eq!(winner.identity(), m.identity(), "shard {s} is its rendezvous winner's");
            }
        }
        // Routing: the owner keeps it, the others forward to the owner.
        let fp = Fingerprint::parse(&"00000003".repeat(8)).unwrap();
        let owner = [&a, &b, &c].into_iter().find(|m| m.owned().contains(&3)).unwrap();
        for m in [&a, &b, &c] {
            let route = m.route(&fp);
            if m.identity() == owner.identity() {
                assert_eq!(route, Route::Local);
                assert!(m.fence(&fp).unwrap().send_by().is_ok());
            } else {
                assert!(
                    matches!(route, Route::Forward(ref p) if p.identity == owner.identity() && p.key == owner.key())
                );
                assert!(m.fence(&fp).is_none());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_joining_member_takes_only_the_shards_it_wins_and_never_overlaps_the_old_owner() {
        let (store, clock) = setup();
        let (a, b) = (member(&store, &clock, "a"), member(&store, &clock, "b"));
        rounds(&[&a, &b], 4).await;
        let before: Vec<_> = [&a, &b].iter().map(|m| m.owned()).collect();
        assert_eq!(owned_by_all(&[&a, &b]), 16);
        let c = member(&store, &clock, "c");
        rounds(&[&a, &b, &c], 4).await;
        assert_eq!(owned_by_all(&[&a, &b, &c]), 16);
        // What a and b still own is a subset of what they owned: only c's shards moved.
        assert!(a.owned().is_subset(&before[0]));
        assert!(b.owned().is_subset(&before[1]));
        for s in c.owned() {
            assert!(score(c.identity(), s) > score(a.identity(), s).max(score(b.identity(), s)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_member_s_shards_move_after_a_lease_duration_and_a_leaver_s_at_once() {
        let (store, clock) = setup();
        let (a, b, c) = (
            member(&store, &clock, "a"),
            member(&store, &clock, "b"),
            member(&store, &clock, "c"),
        );
        rounds(&[&a, &b, &c], 4).await;
        let crashed = c.owned();
        assert!(!crashed.is_empty());
        // c stops renewing (SIGKILL): its claims stay in its Lease, so a and b wait them out.
        rounds(&[&a, &b], 2).await;
        assert!(c.owned().len() <= crashed.len());
        // Meanwhile a shard may have no owner (its signals take the Lease-guarded path).
        assert!(owned_by_all(&[&a, &b]) + c.owned().len() <= 16);
        rounds(&[&a, &b], 3).await;
        assert!(c.owned().is_empty(), "c's own claims lapsed with its validity");
        assert_eq!(
            owned_by_all(&[&a, &b]),
            16,
            "within about a lease duration a and b own all"
        );
        // b leaves cleanly: a owns everything at its next rounds, without waiting.
        let leaving = b.owned();
        b.leave().await;
        for _ in 0..2 {
            a.round().await.unwrap();
        }
        assert!(leaving.is_subset(&a.owned()));
        assert_eq!(a.owned().len(), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_whose_renewals_fail_stops_owning_before_anyone_else_may_start() {
        let (store, clock) = setup();
        let (a, b) = (member(&store, &clock, "a"), member(&store, &clock, "b"));
        rounds(&[&a, &b], 4).await;
        let a_owned = a.owned();
        assert!(!a_owned.is_empty());
        // a is partitioned from the API server: no round of a succeeds any more. b must not own
        // any of a's shards while a still believes it does.
        for _ in 0..12 {
            let _ = b.round().await;
            let overlap: Vec<_> = a.owned().intersection(&b.owned()).copied().collect();
            assert!(overlap.is_empty(), "both own {overlap:?}");
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        assert!(a.owned().is_empty());
        assert_eq!(b.owned().len(), 16);
    }
}
