//! Kubernaut's suppression rules: which RemediationRequest of a fingerprint a new signal counts
//! into instead of opening a new one (KUBERNAUT.md, "When a signal counts into an existing
//! request"; ADR 0009). A request *absorbs* when
//!
//! 1. its `overallPhase` is not terminal (absent counts as active), or
//! 2. its `completionStatus.outcome` is `ManualReviewRequired` (a person must look first), or
//! 3. its `routingStatus.nextAllowedExecution` is in the future (the orchestrator's cooldown).
//!
//! Rule 3 changes with time alone: a request stops absorbing the moment its cooldown passes,
//! without any write to it. So every decision takes `now`, and nothing may cache "absorbs" as a
//! lasting fact: the hint cache keeps the objects and asks again at each use.

use jiff::Timestamp;

use crate::crd::{MANUAL_REVIEW_REQUIRED, RemediationRequest, phase_is_active};

/// Why a request absorbs signals, in the order a choice among several prefers them. On the wire
/// (forwarded answers) `{"rule": "active"}` or `{"rule": "cooldown", "until": "<RFC 3339>"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rule", content = "until", rename_all = "snake_case")]
pub enum Absorbs {
    /// Its phase is not terminal: the remediation is under way (or not yet picked up).
    Active,
    /// It ended needing a person's review.
    ManualReview,
    /// The orchestrator's cooldown runs until then.
    Cooldown(Timestamp),
}

impl Absorbs {
    /// Metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Absorbs::Active => "active",
            Absorbs::ManualReview => "manual_review",
            Absorbs::Cooldown(_) => "cooldown",
        }
    }
}

/// Whether `rr` absorbs a signal arriving at `now`, and why.
pub fn absorbs(rr: &RemediationRequest, now: Timestamp) -> Option<Absorbs> {
    let status = rr.status.as_ref();
    if phase_is_active(rr.phase()) {
        return Some(Absorbs::Active);
    }
    let status = status?;
    if status
        .completion_status
        .as_ref()
        .and_then(|c| c.outcome.as_deref())
        .is_some_and(|o| o == MANUAL_REVIEW_REQUIRED)
    {
        return Some(Absorbs::ManualReview);
    }
    cooldown_until(rr).filter(|until| *until > now).map(Absorbs::Cooldown)
}

/// `routingStatus.nextAllowedExecution`, when set and readable. The API server validates it as a
/// date-time; one this parser cannot read is logged and treated as no cooldown.
pub fn cooldown_until(rr: &RemediationRequest) -> Option<Timestamp> {
    let text = rr
        .status
        .as_ref()?
        .routing_status
        .as_ref()?
        .next_allowed_execution
        .as_deref()?;
    match text.parse::<Timestamp>() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(
                rr_name = rr.metadata.name.as_deref().unwrap_or_default(),
                next_allowed_execution = text,
                error = %e,
                "unreadable routingStatus.nextAllowedExecution; treated as no cooldown"
            );
            None
        }
    }
}

/// The request a signal arriving at `now` counts into, if any: an active one first (the oldest,
/// there should be only one), else one awaiting manual review (the newest), else the one whose
/// cooldown ends last. `None`: a new request is to be created.
pub fn pick<'a>(
    rrs: impl IntoIterator<Item = &'a RemediationRequest>,
    now: Timestamp,
) -> Option<&'a RemediationRequest> {
    let mut best: Option<(Absorbs, &RemediationRequest)> = None;
    for rr in rrs {
        let Some(why) = absorbs(rr, now) else { continue };
        let better = match &best {
            None => true,
            Some((have, current)) => match (why, *have) {
                (Absorbs::Active, Absorbs::Active) => created(rr) < created(current),
                (Absorbs::ManualReview, Absorbs::ManualReview) => created(rr) > created(current),
                (Absorbs::Cooldown(a), Absorbs::Cooldown(b)) => (a, created(rr)) > (b, created(current)),
                (a, b) => rank(a) < rank(b),
            },
        };
        if better {
            best = Some((why, rr));
        }
    }
    best.map(|(_, rr)| rr)
}

fn rank(a: Absorbs) -> u8 {
    match a {
        Absorbs::Active => 0,
        Absorbs::ManualReview => 1,
        Absorbs::Cooldown(_) => 2,
    }
}

/// Creation order: timestamp, then name (deterministic names sort by generation within a second
/// only up to 9; the timestamp decides first).
fn created(rr: &RemediationRequest) -> (Option<Timestamp>, &str) {
    (
        rr.metadata.creation_timestamp.as_ref().map(|t| t.0),
        rr.metadata.name.as_deref().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CompletionStatus, RemediationRequestStatus, RoutingStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn rr(
        name: &str,
        created: &str,
        phase: Option<&str>,
        outcome: Option<&str>,
        cooldown: Option<&str>,
    ) -> RemediationRequest {
        RemediationRequest {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(at(created))),
                ..Default::default()
            },
            spec: Default::default(),
            status: Some(RemediationRequestStatus {
                overall_phase: phase.map(Into::into),
                completion_status: outcome.map(|o| CompletionStatus {
                    outcome: Some(o.into()),
                    ..Default::default()
                }),
                routing_status: cooldown.map(|c| RoutingStatus {
                    next_allowed_execution: Some(c.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    const NOW: &str = "2026-11-24T12:00:00Z";

    #[test]
    fn each_rule_absorbs_and_a_finished_request_without_one_does_not() {
        let now = at(NOW);
        assert_eq!(absorbs(&rr("a", NOW, None, None, None), now), Some(Absorbs::Active));
        assert_eq!(
            absorbs(&rr("a", NOW, Some("Executing"), None, None), now),
            Some(Absorbs::Active)
        );
        assert_eq!(
            absorbs(
                &rr("a", NOW, Some("Completed"), Some("ManualReviewRequired"), None),
                now
            ),
            Some(Absorbs::ManualReview)
        );
        assert_eq!(
            absorbs(
                &rr(
                    "a",
                    NOW,
                    Some("Completed"),
                    Some("Remediated"),
                    Some("2026-11-24T12:00:01Z")
                ),
                now
            ),
            Some(Absorbs::Cooldown(at("2026-11-24T12:00:01Z")))
        );
        for phase in crate::crd::TERMINAL_PHASES {
            assert_eq!(
                absorbs(&rr("a", NOW, Some(phase), Some("Remediated"), None), now),
                None,
                "{phase}"
            );
        }
    }

    #[test]
    fn a_cooldown_ends_with_time_alone() {
        let r = rr(
            "a",
            NOW,
            Some("Completed"),
            Some("Remediated"),
            Some("2026-11-24T12:00:05Z"),
        );
        assert!(absorbs(&r, at("2026-11-24T12:00:04.999Z")).is_some());
        assert_eq!(
            absorbs(&r, at("2026-11-24T12:00:05Z")),
            None,
            "the cooldown's own instant is allowed"
        );
        assert_eq!(absorbs(&r, at("2026-11-24T12:00:06Z")), None);
    }

    #[test]
    fn the_choice_prefers_active_then_manual_review_then_the_latest_cooldown() {
        let now = at(NOW);
        let old_cool = rr(
            "c1",
            "2026-11-24T10:00:00Z",
            Some("Completed"),
            None,
            Some("2026-11-24T13:00:00Z"),
        );
        let late_cool = rr(
            "c2",
            "2026-11-24T09:00:00Z",
            Some("Failed"),
            None,
            Some("2026-11-24T14:00:00Z"),
        );
        let review = rr(
            "m",
            "2026-11-24T08:00:00Z",
            Some("Completed"),
            Some("ManualReviewRequired"),
            None,
        );
        let active = rr("a", "2026-11-24T11:00:00Z", Some("Pending"), None, None);
        let done = rr(
            "d",
            "2026-11-24T11:30:00Z",
            Some("Completed"),
            None,
            Some("2026-11-24T11:59:59Z"),
        );
        let name = |p: Option<&RemediationRequest>| p.and_then(|r| r.metadata.name.clone());
        assert_eq!(name(pick([&old_cool, &late_cool], now)), Some("c2".into()));
        assert_eq!(name(pick([&old_cool, &review, &late_cool], now)), Some("m".into()));
        assert_eq!(name(pick([&review, &active, &late_cool], now)), Some("a".into()));
        assert_eq!(name(pick([&done], now)), None);
        assert_eq!(
            name(pick([&old_cool, &late_cool], at("2026-11-24T13:30:00Z"))),
            Some("c2".into())
        );
        assert_eq!(name(pick([&old_cool, &late_cool], at("2026-11-24T14:00:00Z"))), None);
    }
}
