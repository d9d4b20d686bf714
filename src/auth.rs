//! Who may send signals. Every signals API request passes [`Authenticator::check`] before its body
//! is read:
//!
//! - `kubernetes`: the bearer token is checked with a TokenReview and the user it names is
//!   authorized with a SubjectAccessReview (configurable resource attributes). Verdicts are
//!   remembered for a short TTL keyed by the token's SHA-256 (the token itself is never stored or
//!   logged), and concurrent requests with one token share one review, so a storm costs one
//!   review pair per TTL, not two API calls per request. A failed review (API server down) is
//!   remembered for one second, so an outage does not turn every request into a slow API call.
//! - `static`: the token must be one of those in a file (compared as SHA-256 digests in constant
//!   time); the file is re-read when it changes.
//! - `none`: everyone is let in (a startup warning says so).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::bounded::{BoundedMap, HeapSize, Limits};
use crate::cluster::ApiError;
use crate::config::{AccessAttributes, Auth, AuthMode};
use crate::metrics::Metrics;
use crate::readcache::SingleFlight;

/// Who a TokenReview says the token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// The two review APIs of the Kubernetes API server.
#[async_trait]
pub trait Reviewer: Send + Sync + 'static {
    /// TokenReview: the user when the token is authenticated, `None` when it is not.
    async fn review_token(&self, token: &str, audiences: &[String]) -> Result<Option<UserInfo>, ApiError>;
    /// SubjectAccessReview: `Ok(())` when allowed, `Err(reason)` when not.
    async fn review_access(
        &self,
        user: &UserInfo,
        attributes: &AccessAttributes,
    ) -> Result<Result<(), String>, ApiError>;
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        user: String,
    },
    /// 401: no, malformed or unknown credentials.
    Unauthenticated(&'static str),
    /// 403: a known user without the permission.
    Forbidden {
        user: String,
        reason: String,
    },
}

impl Verdict {
    fn result_label(&self) -> &'static str {
        match self {
            Verdict::Allowed { .. } => "allowed",
            Verdict::Unauthenticated(_) => "unauthenticated",
            Verdict::Forbidden { .. } => "forbidden",
        }
    }
}

/// No verdict now: the request is answered 503, the sender retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    /// The review API failed (the reason is for the log, not for the caller).
    #[error("the token review failed: {0}")]
    ReviewFailed(String),
    /// The budget of reviews for tokens not known to be a sender's is used up (a flood).
    #[error("too many token reviews at once")]
    Limited,
}

impl Unavailable {
    fn result_label(&self) -> &'static str {
        match self {
            Unavailable::ReviewFailed(_) => "error",
            Unavailable::Limited => "limited",
        }
    }
}

pub struct Authenticator {
    mode: AuthMode,
    metrics: Metrics,
    inner: Inner,
}

enum Inner {
    None,
    Static(Arc<StaticTokens>),
    Kubernetes(Box<KubernetesAuth>),
}

impl Authenticator {
    /// Builds the authenticator `config` asks for. `reviewer` is required for `kubernetes`.
    pub fn new(
        config: &Auth,
        namespace: &str,
        reviewer: Option<Arc<dyn Reviewer>>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        for result in ["allowed", "unauthenticated", "forbidden", "error", "limited"] {
            metrics.auth_requests.with_label_values(&[config.mode.as_str(), result]);
        }
        let inner = match config.mode {
            AuthMode::None => {
                tracing::warn!(
                    "auth.mode is none: anyone who can reach the signals port can create RemediationRequests"
                );
                Inner::None
            }
            AuthMode::Static => {
                let path = config
                    .tokens_file
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("auth.mode static needs auth.tokensFile"))?;
                Inner::Static(Arc::new(StaticTokens::load(path, metrics.clone())?))
            }
            AuthMode::Kubernetes => {
                let reviewer = reviewer.ok_or_else(|| {
                    anyhow::anyhow!(
                        "auth.mode kubernetes needs the kubernetes backend (TokenReview); \
                         for a local trial on the embedded backend set auth.mode: none (--auth-mode none)"
                    )
                })?;
                let mut attributes = config.authorization.clone();
                if attributes.namespace.is_empty() {
                    attributes.namespace = namespace.to_owned();
                }
                Inner::Kubernetes(Box::new(KubernetesAuth::new(reviewer, attributes, config)))
            }
        };
        Ok(Authenticator {
            mode: config.mode,
            metrics,
            inner,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Starts re-reading the tokens file when it changes (static mode); the task ends with the
    /// authenticator.
    pub fn watch_files(self: &Arc<Self>) {
        if let Inner::Static(tokens) = &self.inner {
            let weak = Arc::downgrade(tokens);
            let path = tokens.path.clone();
            tokio::spawn(watch_file(path, move || match weak.upgrade() {
                Some(t) => {
                    t.reload();
                    true
                }
                None => false,
            }));
        }
    }

    /// The verdict for a request with these headers.
    pub async fn check(&self, headers: &HeaderMap) -> Result<Verdict, Unavailable> {
        let result = match &self.inner {
            Inner::None => Ok(Verdict::Allowed {
                user: "anonymous".into(),
            }),
            Inner::Static(tokens) => Ok(match bearer_token(headers) {
                Err(why) => Verdict::Unauthenticated(why),
                Ok(token) => tokens.verdict(token),
            }),
            Inner::Kubernetes(k) => match bearer_token(headers) {
                Err(why) => Ok(Verdict::Unauthenticated(why)),
                Ok(token) => k.verdict(token, &self.metrics).await,
            },
        };
        let label = match &result {
            Ok(v) => v.result_label(),
            Err(e) => e.result_label(),
        };
        self.metrics
            .auth_requests
            .with_label_values(&[self.mode.as_str(), label])
            .inc();
        result
    }
}

/// The token of an `Authorization: Bearer <token>` header, or why there is none.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, &'static str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or("missing bearer token")?;
    if values.next().is_some() {
        return Err("more than one Authorization header");
    }
    let text = value.to_str().map_err(|_| "malformed Authorization header")?;
    let (scheme, token) = text.split_once(' ').ok_or("malformed Authorization header")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("the Authorization scheme must be Bearer");
    }
    let token = token.trim();
    if token.is_empty() || token.len() > 8192 || token.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err("malformed bearer token");
    }
    Ok(token)
}

type Digest32 = [u8; 32];

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// Tokens from a file, one per line; blank lines and `#` comments ignored.
pub struct StaticTokens {
    path: PathBuf,
    digests: RwLock<Vec<Digest32>>,
    metrics: Metrics,
}

impl StaticTokens {
    pub fn load(path: PathBuf, metrics: Metrics) -> anyhow::Result<Self> {
        let digests = read_tokens(&path).map_err(|e| anyhow::anyhow!("tokens file: {e}"))?;
        tracing::info!(path = %path.display(), tokens = digests.len(), "loaded static tokens");
        Ok(StaticTokens {
            path,
            digests: RwLock::new(digests),
            metrics,
        })
    }

    /// Re-reads the file. A file that cannot be read or holds no token means no tokens at all
    /// (revocation must not fail open); a file that changes while being read is read again at
    /// its next change, the old tokens staying until then.
    pub fn reload(&self) {
        let (digests, result) = match read_tokens(&self.path) {
            Ok(d) => {
                tracing::info!(path = %self.path.display(), tokens = d.len(), "reloaded static tokens");
                (d, "ok")
            }
            Err(TokensError::Changing) => {
                tracing::warn!(path = %self.path.display(), "the tokens file changed while being read; reading it again when it settles");
                return;
            }
            Err(TokensError::Unusable(e)) => {
                tracing::error!(
                    error = %e,
                    "the tokens file cannot be used: NO static token is accepted until it holds tokens again"
                );
                (Vec::new(), "error")
            }
        };
        *self.digests.write().expect("tokens lock poisoned") = digests;
        self.metrics
            .file_reloads
            .with_label_values(&["auth_tokens", result])
            .inc();
    }

    fn verdict(&self, token: &str) -> Verdict {
        let presented = digest(token);
        let digests = self.digests.read().expect("tokens lock poisoned");
        // Compare with every token in constant time, without stopping at a match.
        let (mut index, mut found) = (0u64, subtle::Choice::from(0));
        for (i, d) in digests.iter().enumerate() {
            let equal = d.ct_eq(&presented);
            index.conditional_assign(&(i as u64), equal);
            found |= equal;
        }
        match bool::from(found).then_some(index) {
            Some(i) => Verdict::Allowed {
                user: format!("static-token-{}", i + 1),
            },
            None => Verdict::Unauthenticated("unknown bearer token"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TokensError {
    #[error("the file changed while it was being read")]
    Changing,
    #[error("{0}")]
    Unusable(String),
}

fn read_tokens(path: &Path) -> Result<Vec<Digest32>, TokensError> {
    let text = read_whole(path).map_err(|e| match e {
        ReadError::Changing => TokensError::Changing,
        ReadError::Io(e) => TokensError::Unusable(format!("cannot read {}: {e}", path.display())),
    })?;
    let digests: Vec<Digest32> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(digest)
        .collect();
    if digests.is_empty() {
        return Err(TokensError::Unusable(format!("{} holds no token", path.display())));
    }
    Ok(digests)
}

pub(crate) enum ReadError {
    Changing,
    Io(std::io::Error),
}

/// Modification time and length: what [`watch_file`] compares.
type Stamp = Option<(Option<std::time::SystemTime>, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()))
}

/// The file's contents, read so that they are one version of it: unchanged (modification time
/// and length) from before the read to after it.
pub(crate) fn read_whole(path: &Path) -> Result<String, ReadError> {
    for _ in 0..3 {
        let before = stamp(path);
        let text = std::fs::read_to_string(path).map_err(ReadError::Io)?;
        if stamp(path) == before {
            return Ok(text);
        }
    }
    Err(ReadError::Changing)
}

/// How often watched files are checked.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Calls `changed` once the file's modification time or length has changed and then stayed the
/// same for one check (checked every [`WATCH_INTERVAL`]): a writer that is not atomic is not
/// read half-way. Stops when `changed` returns false.
pub async fn watch_file(path: PathBuf, mut changed: impl FnMut() -> bool + Send + 'static) {
    let mut last = stamp(&path);
    let mut settling = false;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now != last {
            last = now;
            settling = true;
        } else if settling {
            settling = false;
            if !changed() {
                return;
            }
        }
    }
}

/// A review's outcome: a verdict, or no verdict now.
type Reviewed = Result<Verdict, Unavailable>;

/// An allowed or forbidden verdict, fresh until `fresh_until`.
#[derive(Clone)]
struct Known {
    verdict: Verdict,
    fresh_until: Instant,
}

/// Why a token is refused without a review: unknown to the API server, or its review just failed.
#[derive(Clone)]
enum Refusal {
    Unknown,
    Failed(String),
}

/// Verdicts for the tokens of senders. Kept past their TTL for [`KNOWN_KEEP`] as the mark of a
/// sender seen before, whose re-review is not held up by a flood of bogus tokens.
const KNOWN_LIMITS: Limits = Limits {
    entries: 10_000,
    bytes: 8 * 1024 * 1024,
};
const KNOWN_KEEP: Duration = Duration::from_secs(3600);
/// Tokens the API server did not accept, and reviews that failed: small entries (a digest), many
/// of them, in a map of their own so that a flood of them never evicts a sender's verdict.
const REFUSED_LIMITS: Limits = Limits {
    entries: 100_000,
    bytes: 16 * 1024 * 1024,
};
const FAILURE_TTL: Duration = Duration::from_secs(1);
/// Reviews of known senders in flight at once, apart from those of unknown tokens.
pub const KNOWN_REVIEW_SLOTS: usize = 2;
/// How long a review may wait for a slot before the request is answered 503.
const SLOT_WAIT: Duration = Duration::from_secs(1);

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
struct Budget {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    fn new(rate: u32, burst: u32) -> Self {
        Budget {
            rate: f64::from(rate),
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    fn try_take(&self) -> bool {
        let mut state = self.state.lock().expect("budget poisoned");
        let now = Instant::now();
        let (tokens, at) = *state;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.burst);
        let taken = tokens >= 1.0;
        *state = (if taken { tokens - 1.0 } else { tokens }, now);
        taken
    }
}

struct KubernetesAuth {
    reviewer: Arc<dyn Reviewer>,
    attributes: AccessAttributes,
    audiences: Vec<String>,
    ttl: Duration,
    negative_ttl: Duration,
    known: Mutex<BoundedMap<Digest32, Known>>,
    refused: Mutex<BoundedMap<Digest32, Refusal>>,
    /// Concurrent requests with one token share one review.
    reviews: SingleFlight<Digest32, Reviewed>,
    /// Rate of reviews of tokens not known to be a sender's.
    new_tokens: Budget,
    new_slots: Semaphore,
    known_slots: Semaphore,
}

impl KubernetesAuth {
    fn new(reviewer: Arc<dyn Reviewer>, attributes: AccessAttributes, config: &Auth) -> Self {
        KubernetesAuth {
            reviewer,
            attributes,
            audiences: config.audiences.clone(),
            ttl: config.cache_ttl,
            negative_ttl: config.negative_cache_ttl,
            known: Mutex::new(BoundedMap::new(KNOWN_LIMITS)),
            refused: Mutex::new(BoundedMap::new(REFUSED_LIMITS)),
            reviews: SingleFlight::default(),
            new_tokens: Budget::new(config.review_rate, config.review_burst),
            new_slots: Semaphore::new(config.max_concurrent_reviews.max(1)),
            known_slots: Semaphore::new(KNOWN_REVIEW_SLOTS),
        }
    }

    async fn verdict(&self, token: &str, metrics: &Metrics) -> Reviewed {
        let key = digest(token);
        let now = Instant::now();
        let mut seen_before = false;
        if let Some(k) = self.known.lock().expect("auth cache poisoned").get(&key, now) {
            if k.fresh_until > now {
                metrics.auth_cache.with_label_values(&["hit"]).inc();
                return Ok(k.verdict.clone());
            }
            seen_before = true;
        }
        if let Some(refusal) = self.refused.lock().expect("auth cache poisoned").get(&key, now) {
            metrics.auth_cache.with_label_values(&["hit"]).inc();
            return match refusal {
                Refusal::Unknown => Ok(Verdict::Unauthenticated(NOT_ACCEPTED)),
                Refusal::Failed(why) => Err(Unavailable::ReviewFailed(why.clone())),
            };
        }
        let (result, ran) = self
            .reviews
            .run(&key, || self.review_within_budget(token, key, seen_before))
            .await;
        metrics
            .auth_cache
            .with_label_values(&[if ran { "miss" } else { "hit" }])
            .inc();
        result
    }

    /// Reviews the token if the budget allows, and remembers the outcome.
    async fn review_within_budget(&self, token: &str, key: Digest32, seen_before: bool) -> Reviewed {
        let slots = if seen_before {
            &self.known_slots
        } else {
            if !self.new_tokens.try_take() {
                return Err(Unavailable::Limited);
            }
            &self.new_slots
        };
        let Ok(Ok(_slot)) = tokio::time::timeout(SLOT_WAIT, slots.acquire()).await else {
            return Err(Unavailable::Limited);
        };
        let outcome = self.review(token).await;
        let now = Instant::now();
        match &outcome {
            Ok(Verdict::Unauthenticated(_)) => {
                self.known.lock().expect("auth cache poisoned").remove(&key);
                self.refused.lock().expect("auth cache poisoned").insert(
                    key,
                    Refusal::Unknown,
                    0,
                    now + self.negative_ttl,
                );
            }
            Ok(verdict) => {
                let cost = match verdict {
                    Verdict::Allowed { user } => user.heap_size(),
                    Verdict::Forbidden { user, reason } => user.heap_size() + reason.heap_size(),
                    Verdict::Unauthenticated(_) => 0,
                };
                let known = Known {
                    verdict: verdict.clone(),
                    fresh_until: now + self.ttl,
                };
                self.known.lock().expect("auth cache poisoned").insert(
                    key,
                    known,
                    cost,
                    now + self.ttl.max(KNOWN_KEEP),
                );
            }
            Err(Unavailable::ReviewFailed(why)) => {
                self.refused.lock().expect("auth cache poisoned").insert(
                    key,
                    Refusal::Failed(why.clone()),
                    why.heap_size(),
                    now + FAILURE_TTL,
                );
            }
            Err(Unavailable::Limited) => {}
        }
        outcome
    }

    async fn review(&self, token: &str) -> Reviewed {
        let outcome = async {
            let Some(user) = self.reviewer.review_token(token, &self.audiences).await? else {
                return Ok(Verdict::Unauthenticated(NOT_ACCEPTED));
            };
            Ok(match self.reviewer.review_access(&user, &self.attributes).await? {
                Ok(()) => Verdict::Allowed { user: user.username },
                Err(reason) => Verdict::Forbidden {
                    user: user.username,
                    reason,
                },
            })
        }
        .await;
        outcome.map_err(|e: ApiError| {
            tracing::warn!(error = %e, "token or access review failed; answering 503");
            Unavailable::ReviewFailed(e.to_string())
        })
    }
}

const NOT_ACCEPTED: &str = "the API server does not accept this token";

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts reviews; knows one good token, one token of a user without permission.
    #[derive(Default)]
    struct Counting {
        tokens: AtomicUsize,
        /// Reviews of the token "good".
        good: AtomicUsize,
        access: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Reviewer for Counting {
        async fn review_token(&self, token: &str, _: &[String]) -> Result<Option<UserInfo>, ApiError> {
            self.tokens.fetch_add(1, Ordering::SeqCst);
            if token == "good" {
                self.good.fetch_add(1, Ordering::SeqCst);
            }
            tokio::task::yield_now().await;
            if self.down.load(Ordering::SeqCst) {
                return Err(ApiError::Unavailable("connection refused".into()));
            }
            Ok(match token {
                "good" => Some(UserInfo {
                    username: "system:serviceaccount:monitoring:alertmanager".into(),
                    ..UserInfo::default()
                }),
                "weak" => Some(UserInfo {
                    username: "system:serviceaccount:default:nobody".into(),
                    ..UserInfo::default()
                }),
                _ => None,
            })
        }
        async fn review_access(&self, user: &UserInfo, a: &AccessAttributes) -> Result<Result<(), String>, ApiError> {
            self.access.fetch_add(1, Ordering::SeqCst);
            assert_eq!((a.verb.as_str(), a.resource.as_str()), ("create", "services"));
            assert_eq!(a.namespace, "gw", "an empty namespace means the gateway's own");
            Ok(if user.username.ends_with("alertmanager") {
                Ok(())
            } else {
                Err("no RBAC rule".into())
            })
        }
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn kubernetes(reviewer: Arc<Counting>) -> (Authenticator, Metrics) {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let auth = Authenticator::new(&Auth::default(), "gw", Some(reviewer), metrics.clone()).unwrap();
        (auth, metrics)
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token(&headers(Some("Bearer abc"))), Ok("abc"));
        assert_eq!(bearer_token(&headers(Some("bearer abc"))), Ok("abc"));
        assert!(bearer_token(&headers(None)).is_err());
        assert!(bearer_token(&headers(Some("Basic YTpi"))).is_err());
        assert!(bearer_token(&headers(Some("Bearer "))).is_err());
        assert!(bearer_token(&headers(Some("Bearer a b"))).is_err());
        let mut two = headers(Some("Bearer a"));
        two.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert!(bearer_token(&two).is_err(), "two Authorization headers are ambiguous");
    }

    #[tokio::test]
    async fn kubernetes_mode_allows_denies_and_rejects() {
        let reviewer = Arc::new(Counting::default());
        let (auth, _) = kubernetes(reviewer.clone());
        assert!(matches!(
            auth.check(&headers(Some("Bearer good"))).await.unwrap(),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            auth.check(&headers(Some("Bearer weak"))).await.unwrap(),
            Verdict::Forbidden { .. }
        ));
        assert!(matches!(
            auth.check(&headers(Some("Bearer bogus"))).await.unwrap(),
            Verdict::Unauthenticated(_)
        ));
        assert!(matches!(
            auth.check(&headers(None)).await.unwrap(),
            Verdict::Unauthenticated(_)
        ));
        assert_eq!(reviewer.tokens.load(Ordering::SeqCst), 3, "no review without a token");
        assert_eq!(
            reviewer.access.load(Ordering::SeqCst),
            2,
            "no access review for an unknown token"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_with_one_token_costs_one_review_per_ttl() {
        let reviewer = Arc::new(Counting::default());
        let (auth, metrics) = kubernetes(reviewer.clone());
        let auth = Arc::new(auth);
        let storm = || {
            futures::future::join_all((0..200).map(|_| {
                let auth = auth.clone();
                async move { auth.check(&headers(Some("Bearer good"))).await.unwrap() }
            }))
        };
        for v in storm().await {
            assert!(matches!(v, Verdict::Allowed { .. }));
        }
        assert_eq!(
            reviewer.tokens.load(Ordering::SeqCst),
            1,
            "concurrent requests share one review"
        );
        assert_eq!(reviewer.access.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.auth_cache.with_label_values(&["hit"]).get(), 199);
        tokio::time::advance(Duration::from_secs(29)).await;
        storm().await;
        assert_eq!(reviewer.tokens.load(Ordering::SeqCst), 1, "still within the TTL");
        tokio::time::advance(Duration::from_secs(2)).await;
        storm().await;
        assert_eq!(
            reviewer.tokens.load(Ordering::SeqCst),
            2,
            "reviewed again once the TTL passed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn review_api_down_is_unavailable_remembered_briefly_then_retried() {
        let reviewer = Arc::new(Counting::default());
        reviewer.down.store(true, Ordering::SeqCst);
        let (auth, metrics) = kubernetes(reviewer.clone());
        let auth = Arc::new(auth);
        let answers = futures::future::join_all((0..50).map(|_| {
            let auth = auth.clone();
            async move { auth.check(&headers(Some("Bearer good"))).await }
        }))
        .await;
        assert!(answers.iter().all(Result::is_err), "no verdict while the API is down");
        assert_eq!(
            reviewer.tokens.load(Ordering::SeqCst),
            1,
            "an outage is not a review per request"
        );
        assert_eq!(
            metrics.auth_requests.with_label_values(&["kubernetes", "error"]).get(),
            50
        );
        reviewer.down.store(false, Ordering::SeqCst);
        tokio::time::advance(FAILURE_TTL + Duration::from_millis(1)).await;
        assert!(matches!(
            auth.check(&headers(Some("Bearer good"))).await.unwrap(),
            Verdict::Allowed { .. }
        ));
    }

    /// `n` requests with distinct tokens nobody issued, all at once.
    async fn flood(auth: &Arc<Authenticator>, from: usize, n: usize) -> Vec<Result<Verdict, Unavailable>> {
        futures::future::join_all((from..from + n).map(|i| {
            let auth = auth.clone();
            async move { auth.check(&headers(Some(&format!("Bearer random-{i}")))).await }
        }))
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_unknown_tokens_costs_reviews_at_the_configured_rate_only() {
        let reviewer = Arc::new(Counting::default());
        let (auth, metrics) = kubernetes(reviewer.clone());
        let auth = Arc::new(auth);
        let config = Auth::default();
        let answers = flood(&auth, 0, 10_000).await;
        let reviews = reviewer.tokens.load(Ordering::SeqCst);
        assert!(
            reviews <= config.review_burst as usize,
            "10 000 bogus tokens at once: {reviews} TokenReviews (burst {})",
            config.review_burst
        );
        assert!(reviews > 0);
        let limited = answers
            .iter()
            .filter(|a| matches!(a, Err(Unavailable::Limited)))
            .count();
        assert_eq!(
            limited + reviews,
            10_000,
            "the others are 503 (retry later), never let in"
        );
        assert!(answers.iter().all(|a| !matches!(a, Ok(Verdict::Allowed { .. }))));
        assert_eq!(
            metrics
                .auth_requests
                .with_label_values(&["kubernetes", "limited"])
                .get(),
            limited as u64
        );
        // A second later the budget has grown by the rate, not more.
        tokio::time::advance(Duration::from_secs(1)).await;
        flood(&auth, 10_000, 10_000).await;
        let more = reviewer.tokens.load(Ordering::SeqCst) - reviews;
        assert!(
            more <= config.review_rate as usize + 1,
            "{more} reviews in the next second (rate {})",
            config.review_rate
        );
    }

    #[tokio::test(start_paused = true)]
    async fn known_senders_keep_their_verdict_through_a_flood_of_reviewed_unknown_tokens() {
        let reviewer = Arc::new(Counting::default());
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        // A budget so large that every bogus token is reviewed and remembered as unknown.
        let config = Auth {
            review_rate: 1_000_000,
            review_burst: 1_000_000,
            max_concurrent_reviews: 1024,
            ..Auth::default()
        };
        let auth = Arc::new(Authenticator::new(&config, "gw", Some(reviewer.clone()), metrics).unwrap());
        let good = || async { auth.check(&headers(Some("Bearer good"))).await };
        assert!(matches!(good().await, Ok(Verdict::Allowed { .. })));
        // More than the whole verdict cache held (and was cleared at) before: 10 000.
        for wave in 0..2 {
            flood(&auth, wave * 6_000, 6_000).await;
            assert!(matches!(good().await, Ok(Verdict::Allowed { .. })), "wave {wave}");
        }
        assert!(
            reviewer.tokens.load(Ordering::SeqCst) > 12_000,
            "every bogus token was reviewed"
        );
        assert_eq!(
            reviewer.good.load(Ordering::SeqCst),
            1,
            "the sender's verdict stayed cached"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_sender_is_reviewed_again_while_a_flood_uses_up_the_budget() {
        let reviewer = Arc::new(Counting::default());
        let (auth, _) = kubernetes(reviewer.clone());
        let auth = Arc::new(auth);
        let good = || async { auth.check(&headers(Some("Bearer good"))).await };
        assert!(matches!(good().await, Ok(Verdict::Allowed { .. })));
        // Its TTL passes while a flood has used up the budget of new tokens: the known sender is
        // reviewed again anyway, and let in.
        tokio::time::advance(Auth::default().cache_ttl).await;
        flood(&auth, 0, 10_000).await;
        assert!(
            matches!(
                auth.check(&headers(Some("Bearer never-seen"))).await,
                Err(Unavailable::Limited)
            ),
            "the budget for new tokens is used up"
        );
        assert!(matches!(good().await, Ok(Verdict::Allowed { .. })));
        assert_eq!(reviewer.good.load(Ordering::SeqCst), 2, "reviewed again after its TTL");
    }

    #[test]
    fn kubernetes_mode_needs_a_reviewer() {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let err = Authenticator::new(&Auth::default(), "gw", None, metrics)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("auth.mode: none"), "{err}");
    }

    #[tokio::test]
    async fn static_tokens_match_exactly_and_reload() {
        let dir = std::env::temp_dir().join(format!("sg-tokens-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# senders\nalpha-token\n\n  beta-token  \n").unwrap();
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let config = Auth {
            mode: AuthMode::Static,
            tokens_file: Some(path.clone()),
            ..Auth::default()
        };
        let auth = Authenticator::new(&config, "gw", None, metrics.clone()).unwrap();
        let ok = |v: Verdict| matches!(v, Verdict::Allowed { .. });
        assert!(ok(auth.check(&headers(Some("Bearer alpha-token"))).await.unwrap()));
        assert!(ok(auth.check(&headers(Some("Bearer beta-token"))).await.unwrap()));
        assert!(!ok(auth.check(&headers(Some("Bearer alpha-toke"))).await.unwrap()));
        assert!(!ok(auth.check(&headers(Some("Bearer alpha-tokenx"))).await.unwrap()));
        assert!(!ok(auth.check(&headers(Some("Bearer # senders"))).await.unwrap()));
        assert!(!ok(auth.check(&headers(None)).await.unwrap()));

        let Inner::Static(tokens) = &auth.inner else {
            unreachable!()
        };
        std::fs::write(&path, "gamma-token\n").unwrap();
        tokens.reload();
        assert!(ok(auth.check(&headers(Some("Bearer gamma-token"))).await.unwrap()));
        assert!(!ok(auth.check(&headers(Some("Bearer alpha-token"))).await.unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_emptied_or_deleted_tokens_file_lets_no_one_in() {
        let dir = std::env::temp_dir().join(format!("sg-revoke-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "alpha-token\n").unwrap();
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let tokens = StaticTokens::load(path.clone(), metrics.clone()).unwrap();
        let ok = |t: &StaticTokens, token| matches!(t.verdict(token), Verdict::Allowed { .. });
        assert!(ok(&tokens, "alpha-token"));

        // Revoking by emptying the file (or commenting every token out) revokes.
        std::fs::write(&path, "# revoked\n").unwrap();
        tokens.reload();
        assert!(!ok(&tokens, "alpha-token"), "an emptied file means no tokens");
        assert_eq!(
            metrics.file_reloads.with_label_values(&["auth_tokens", "error"]).get(),
            1
        );
        std::fs::write(&path, "alpha-token\n").unwrap();
        tokens.reload();
        assert!(ok(&tokens, "alpha-token"));
        // Deleting the file (a Secret removed, a mount gone) revokes as well.
        std::fs::remove_file(&path).unwrap();
        tokens.reload();
        assert!(!ok(&tokens, "alpha-token"), "an unreadable file means no tokens");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Lets the watcher task run until it waits on its next tick.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_file_is_read_only_once_it_has_stopped_changing() {
        let dir = std::env::temp_dir().join(format!("sg-settle-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "alpha-token\n").unwrap();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let (s, p) = (seen.clone(), path.clone());
        let watcher = tokio::spawn(watch_file(path.clone(), move || {
            s.lock().unwrap().push(std::fs::read_to_string(&p).unwrap_or_default());
            true
        }));
        settle().await;
        // A writer that is not atomic: first a prefix of the new token...
        std::fs::write(&path, "beta-tok").unwrap();
        tokio::time::advance(WATCH_INTERVAL).await;
        settle().await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "read while still being written: {:?}",
            seen.lock().unwrap()
        );
        // ... then the rest.
        std::fs::write(&path, "beta-token\n").unwrap();
        for _ in 0..3 {
            tokio::time::advance(WATCH_INTERVAL).await;
            settle().await;
        }
        assert_eq!(*seen.lock().unwrap(), ["beta-token\n"], "read once, whole");
        watcher.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
