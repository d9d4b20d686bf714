//! The signal model shared by every source, and the parsers that produce it.
//!
//! Parsers only validate and normalise; they never talk to the cluster. A payload that can never
//! succeed is a [`ParseError`] (answered 4xx); a well-formed signal that should not produce a
//! RemediationRequest is a [`Skip`] (answered 200 `ignored`/`rejected`, so senders stop retrying).

pub mod alertmanager;
pub mod event;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::crd::{RemediationRequestSpec, TargetResource};

/// `spec.signalType` of every signal, whatever its adapter (Kubernaut's adapter-specific values
/// are deprecated; older objects may carry them).
pub const SIGNAL_TYPE: &str = "alert";

/// Most bytes of the request body an RR keeps as `spec.originalPayload` (Kubernaut's gateway
/// limits a request to 256 KB). A larger notification keeps each alert's own JSON instead.
pub const ORIGINAL_PAYLOAD_MAX: usize = 256 * 1024;

/// Where a signal came from: `spec.signalSource` in the RR and the `source` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Prometheus,
    KubernetesEvent,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Prometheus => "prometheus",
            Source::KubernetesEvent => "kubernetes-event",
        }
    }

    /// The `spec.signalSource` value Kubernaut's gateway writes for this adapter.
    pub fn signal_source(self) -> &'static str {
        match self {
            Source::Prometheus => "prometheus",
            Source::KubernetesEvent => "kubernetes-events",
        }
    }

    /// The adapter that produced `spec`: from `signalSource`, or from the adapter-specific
    /// `signalType` objects written before `alert` carry.
    pub fn from_spec(spec: &RemediationRequestSpec) -> Option<Self> {
        [Source::Prometheus, Source::KubernetesEvent]
            .into_iter()
            .find(|s| s.signal_source() == spec.signal_source || s.legacy_signal_type() == spec.signal_type)
    }

    /// The `spec.signalType` older signal-gateway versions wrote.
    fn legacy_signal_type(self) -> &'static str {
        match self {
            Source::Prometheus => "prometheus-alert",
            Source::KubernetesEvent => "kubernetes-event",
        }
    }
}

/// One normalised signal, before owner resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub source: Source,
    /// Alert name or event reason.
    pub name: String,
    /// As sent; never empty (`unknown` when the sender gave none).
    pub severity: String,
    /// The resource the signal names (labels or involvedObject); owner resolution may climb from here.
    pub target: TargetResource,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// When the sender says the condition started, as sent (the pipeline falls back to the
    /// receive time when it is absent or unreadable).
    pub firing_time: Option<String>,
    /// When the sender last saw the condition (alert `startsAt`; the event's last occurrence),
    /// as sent; the freshness check parses it.
    pub observed_at: Option<String>,
    /// The cluster the sender names (Alertmanager `commonLabels.cluster`); a configured
    /// `backend.clusterID` takes precedence.
    pub cluster_id: Option<String>,
    /// `spec.originalPayload`: the request body as received, shared by every alert of one
    /// notification (bounded by [`ORIGINAL_PAYLOAD_MAX`]).
    pub payload: Arc<str>,
}

/// Most characters of a label value in `spec.signalLabels` (Kubernaut's bound).
pub const LABEL_VALUE_MAX: usize = 63;
/// Most characters of an annotation value in `spec.signalAnnotations` (Kubernaut's bound).
pub const ANNOTATION_VALUE_MAX: usize = 262_000;
/// Most characters of `spec.severity` (the CRD's bound).
pub const SEVERITY_MAX: usize = 50;

/// Cuts every value to at most `max` characters.
pub fn cut_values(map: BTreeMap<String, String>, max: usize) -> BTreeMap<String, String> {
    map.into_iter().map(|(k, v)| (k, cut_chars(v, max))).collect()
}

/// Truncates `s` to at most `max` characters (Unicode scalar values, as the API server counts
/// `maxLength`).
pub fn cut_chars(mut s: String, max: usize) -> String {
    if let Some((at, _)) = s.char_indices().nth(max) {
        s.truncate(at);
    }
    s
}

/// Why a well-formed signal produces no RemediationRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Nothing to remediate (resolved alert, Normal event).
    Ignored(&'static str),
    /// Cannot be acted on (no resolvable target, invalid names).
    Rejected(String),
}

impl Skip {
    pub fn status(&self) -> &'static str {
        match self {
            Skip::Ignored(_) => "ignored",
            Skip::Rejected(_) => "rejected",
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            Skip::Ignored(r) => r,
            Skip::Rejected(r) => r,
        }
    }
}

/// A payload that can never be processed; the message names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Most items one Alertmanager request may carry (Alertmanager truncates at `max_alerts`).
pub const MAX_ALERTS_PER_REQUEST: usize = 1000;

/// Truncates `s` to at most `max` bytes on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Kubernetes object names: DNS-1123 subdomain (lowercase alphanumerics, '-', '.'; <= 253).
pub fn is_valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// Namespaces: DNS-1123 label (<= 63, no dots).
pub fn is_valid_namespace(ns: &str) -> bool {
    ns.len() <= 63 && !ns.contains('.') && is_valid_object_name(ns)
}

/// An `apiVersion`: `version` or `group/version`, the group a DNS-1123 subdomain and the version a
/// DNS-1123 label. Owner resolution puts it into an API URL path, so nothing else may pass.
pub fn is_valid_api_version(v: &str) -> bool {
    let (group, version) = v.split_once('/').unwrap_or(("", v));
    (group.is_empty() || (group.len() <= 253 && group.split('.').all(is_valid_namespace)))
        && is_valid_namespace(version)
        && !v.starts_with('/')
}

/// Checks a target's names; `Err` carries the `rejected` reason.
pub fn validate_target(target: &TargetResource, cluster_scoped: bool) -> Result<(), Skip> {
    if !is_valid_object_name(&target.name) {
        return Err(Skip::Rejected("invalid_target_name".into()));
    }
    if cluster_scoped {
        return Ok(());
    }
    if target.namespace.is_empty() {
        return Err(Skip::Rejected("missing_namespace".into()));
    }
    if !is_valid_namespace(&target.namespace) {
        return Err(Skip::Rejected("invalid_namespace".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_is_found_again_from_a_spec_old_or_new() {
        for source in [Source::Prometheus, Source::KubernetesEvent] {
            let new = RemediationRequestSpec {
                signal_type: SIGNAL_TYPE.into(),
                signal_source: source.signal_source().into(),
                ..Default::default()
            };
            assert_eq!(Source::from_spec(&new), Some(source));
            let old = RemediationRequestSpec {
                signal_type: source.legacy_signal_type().into(),
                signal_source: "some-receiver".into(),
                ..Default::default()
            };
            assert_eq!(Source::from_spec(&old), Some(source));
        }
        assert_eq!(Source::from_spec(&RemediationRequestSpec::default()), None);
    }

    #[test]
    fn values_are_cut_by_characters_not_bytes() {
        assert_eq!(cut_chars("é".repeat(70), LABEL_VALUE_MAX).chars().count(), 63);
        assert_eq!(cut_chars("short".into(), LABEL_VALUE_MAX), "short");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }

    #[test]
    fn object_names_follow_dns_subdomain_rules() {
        assert!(is_valid_object_name("checkout-7d9f8b6c5-q8z1m"));
        assert!(is_valid_object_name("a.b"));
        for bad in ["", "-a", "a-", "A", "a/b", "../x", &"a".repeat(254)] {
            assert!(!is_valid_object_name(bad), "{bad:?}");
        }
        assert!(!is_valid_namespace("a.b"));
    }
}
