//! The `RemediationRequest` custom resource (`kubernaut.ai/v1alpha1`, short name `rr`).
//!
//! These types are the wire contract with the rest of the Kubernaut pipeline: field names and
//! shapes must stay compatible with the Kubernaut Gateway. `signal-gateway crd` prints the CRD
//! generated from them; `deploy/crds/` holds that output and a test fails when it drifts.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the RemediationRequest CRD.
pub const GROUP: &str = "kubernaut.ai";
/// Field selector path used to look up requests by fingerprint (a CRD `selectableFields` entry).
pub const FINGERPRINT_FIELD: &str = "spec.signalFingerprint";
/// Upper bound on the bytes of `spec.originalPayload`; longer payloads are truncated.
pub const ORIGINAL_PAYLOAD_MAX: usize = 16 * 1024;

/// What a signal asks the remediation pipeline to look at.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "kubernaut.ai",
    version = "v1alpha1",
    kind = "RemediationRequest",
    plural = "remediationrequests",
    shortname = "rr",
    namespaced,
    status = "RemediationRequestStatus",
    doc = "A request to remediate one incident, created and deduplicated by signal-gateway.",
    selectable = ".spec.signalFingerprint",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.overallPhase"}"#,
    printcolumn = r#"{"name":"Signal","type":"string","jsonPath":".spec.signalName"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetResource.name"}"#,
    printcolumn = r#"{"name":"Count","type":"integer","jsonPath":".status.deduplication.occurrenceCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RemediationRequestSpec {
    /// Lowercase hex SHA-256 of the target identity; the deduplication key.
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub signal_fingerprint: String,
    /// Alert name or event reason.
    #[schemars(length(min = 1, max = 253))]
    pub signal_name: String,
    pub severity: String,
    /// `prometheus-alert` or `kubernetes-event`.
    pub signal_type: String,
    /// The adapter or sender that produced the signal (e.g. the Alertmanager receiver).
    pub signal_source: String,
    /// `kubernetes` for every target this gateway resolves.
    pub target_type: String,
    pub target_resource: TargetResource,
    #[serde(default, skip_serializing_if = "String::is_empty", rename = "clusterID")]
    pub cluster_id: String,
    /// When the signal started firing (RFC 3339), as reported by the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firing_time: Option<String>,
    /// When this gateway first received it (RFC 3339).
    pub received_time: String,
    #[serde(default)]
    pub signal_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub signal_annotations: BTreeMap<String, String>,
    /// The sender's JSON for this signal, truncated to 16 KiB.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 16384))]
    pub original_payload: String,
}

/// The Kubernetes object a signal is about, after owner resolution.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct TargetResource {
    pub kind: String,
    pub name: String,
    /// Empty for cluster-scoped kinds such as Node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
}

/// Written by the gateway (deduplication) and by the orchestrator (phase).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemediationRequestStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplication: Option<Deduplication>,
    /// Lifecycle phase set by the orchestrator; empty means not picked up yet (active).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub overall_phase: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deduplication {
    pub first_seen_at: String,
    pub last_seen_at: String,
    #[schemars(range(min = 0))]
    pub occurrence_count: i64,
}

/// Phases after which a request no longer absorbs duplicates: the next signal opens a new one.
pub const TERMINAL_PHASES: [&str; 5] = ["Completed", "Failed", "TimedOut", "Skipped", "Cancelled"];

/// True for every phase that is not terminal, including the empty phase.
pub fn phase_is_active(phase: &str) -> bool {
    !TERMINAL_PHASES.contains(&phase)
}

/// The CRD as YAML, exactly as `signal-gateway crd` prints it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = RemediationRequest::crd();
    let body = serde_saphyr::to_string(&crd).expect("the CRD always serialises");
    format!("# Generated by `signal-gateway crd`; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_in_progress_phases_are_active_terminal_ones_are_not() {
        for p in ["", "Pending", "Processing", "Analyzing", "Executing"] {
            assert!(phase_is_active(p), "{p} should be active");
        }
        for p in TERMINAL_PHASES {
            assert!(!phase_is_active(p), "{p} should be terminal");
        }
    }

    #[test]
    fn crd_declares_fingerprint_as_selectable_field_and_short_name() {
        let yaml = crd_yaml();
        assert!(yaml.contains("selectableFields"), "{yaml}");
        assert!(yaml.contains("jsonPath: .spec.signalFingerprint"), "{yaml}");
        assert!(yaml.contains("- rr"), "{yaml}");
        assert!(yaml.contains("status: {}"), "status subresource missing: {yaml}");
    }
}
