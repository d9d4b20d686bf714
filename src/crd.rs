//! The `RemediationRequest` custom resource (`kubernaut.ai/v1alpha1`, short name `rr`).
//!
//! These types are the wire contract with the rest of the Kubernaut platform (KUBERNAUT.md): every
//! spec and status path of Kubernaut's schema, with the same types and constraints, so installing
//! our CRD over Kubernaut's (or theirs over ours) prunes nothing the orchestrator writes.
//! `signal-gateway crd` prints the CRD generated from them; `deploy/crds/` holds that output and a
//! test fails when it drifts, another when it stops matching Kubernaut's schema facts.
//!
//! The gateway owns the spec (written once, at create) and `status.deduplication`; every other
//! status field belongs to the orchestrator. They are typed here so they are read, kept by the
//! embedded store exactly as the API server keeps them, and described in the CRD — the gateway
//! never writes them (its only status write is a merge patch of `status.deduplication`).
//!
//! Every optional field is an `Option`, so an object read and written back by the embedded store
//! keeps an explicit empty value apart from an absent one, as the API server does.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the RemediationRequest CRD.
pub const GROUP: &str = "kubernaut.ai";
/// Field selector path used to look up requests by fingerprint (a CRD `selectableFields` entry).
pub const FINGERPRINT_FIELD: &str = "spec.signalFingerprint";

/// What a signal asks the remediation pipeline to look at. Immutable once created.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "kubernaut.ai",
    version = "v1alpha1",
    kind = "RemediationRequest",
    plural = "remediationrequests",
    shortname = "rr",
    namespaced,
    status = "RemediationRequestStatus",
    doc = "A request to remediate one incident: created by the gateway from a signal, counted into by its duplicates, driven by the RemediationOrchestrator.",
    selectable = ".spec.signalFingerprint",
    selectable = ".spec.signalType",
    selectable = ".spec.severity",
    selectable = ".spec.clusterID",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.overallPhase"}"#,
    printcolumn = r#"{"name":"Outcome","type":"string","jsonPath":".status.completionStatus.outcome"}"#,
    printcolumn = r#"{"name":"Alert","type":"string","jsonPath":".spec.signalName"}"#,
    printcolumn = r#"{"name":"RCA Target","type":"string","jsonPath":".status.workflowSelection.targetDisplay"}"#,
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".status.workflowSelection.workflowDisplayName"}"#,
    printcolumn = r#"{"name":"Confidence","type":"string","jsonPath":".status.workflowSelection.confidence"}"#,
    printcolumn = r#"{"name":"Count","type":"integer","jsonPath":".status.deduplication.occurrenceCount","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterID","priority":1}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.signalSource","priority":1}"#,
    printcolumn = r#"{"name":"Signal NS","type":"string","jsonPath":".spec.targetResource.namespace","priority":1}"#,
    printcolumn = r#"{"name":"Signal Target","type":"string","jsonPath":".status.workflowSelection.signalTargetDisplay","priority":1}"#,
    printcolumn = r#"{"name":"RCA NS","type":"string","jsonPath":".status.workflowSelection.remediationTarget.namespace","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = spec_rules)]
pub struct RemediationRequestSpec {
    /// Lowercase hex SHA-256 of the target identity; the deduplication key.
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"), length(max = 64), transform = immutable)]
    pub signal_fingerprint: String,
    /// Alert name or event reason.
    #[schemars(length(max = 253))]
    pub signal_name: String,
    /// The sender's severity as sent (never empty).
    #[schemars(length(min = 1, max = 50))]
    pub severity: String,
    /// `alert` for every adapter (older objects carry `prometheus-alert` / `kubernetes-event`).
    pub signal_type: String,
    /// The adapter: `prometheus` (Alertmanager webhook) or `kubernetes-events`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 63))]
    pub signal_source: String,
    /// `kubernetes` for every target this gateway resolves.
    #[schemars(extend("enum" = ["kubernetes", "aws", "azure", "gcp", "datadog"]))]
    pub target_type: String,
    pub target_resource: TargetResource,
    #[serde(default, skip_serializing_if = "String::is_empty", rename = "clusterID")]
    #[schemars(length(max = 253))]
    pub cluster_id: String,
    /// When the signal started firing (the sender's start time; the receive time when it gave
    /// none). Required by the schema; read leniently so older objects without it still load.
    #[serde(default)]
    #[schemars(extend("format" = "date-time"))]
    pub firing_time: String,
    /// When this gateway received it.
    #[schemars(extend("format" = "date-time"))]
    pub received_time: String,
    /// Label values cut to 63 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signal_labels: BTreeMap<String, String>,
    /// Annotation values cut to 262 000 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signal_annotations: BTreeMap<String, String>,
    /// JSON text `{"namespace": ..., "labels": {...}}`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider_data: String,
    /// The request body as received, at most 256 KiB (a larger notification keeps each alert's
    /// own JSON); shared by every alert of one notification rather than copied per alert.
    #[serde(default, skip_serializing_if = "str_is_empty")]
    pub original_payload: std::sync::Arc<str>,
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

/// The status: `deduplication` is the gateway's, every other field the orchestrator's.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemediationRequestStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Lifecycle phase set by the orchestrator; absent means not picked up yet (active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = PHASES))]
    pub overall_phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub completed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub retention_expiry_time: Option<String>,
    /// The gateway's part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplication: Option<Deduplication>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_progress: Option<PhaseProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_status: Option<RoutingStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_status: Option<CompletionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_audit: Option<OperatorAudit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_config: Option<TimeoutConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_selection: Option<WorkflowSelection>,
}

/// The gateway's count of the signals that opened and joined this request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deduplication {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(extend("format" = "date-time"))]
    pub first_seen_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(extend("format" = "date-time"))]
    pub last_seen_at: String,
    #[serde(default)]
    pub occurrence_count: i32,
}

/// A standard `metav1.Condition`, with its API validation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    #[schemars(
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
        ),
        length(max = 316)
    )]
    pub type_: String,
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    #[schemars(
        regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"),
        length(min = 1, max = 1024)
    )]
    pub reason: String,
    #[schemars(length(max = 32768))]
    pub message: String,
}

/// A reference to another Kubernaut object (a `corev1.ObjectReference`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// Where the orchestrator is in the remediation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseProgress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_processing_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation_processing_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai_analysis_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_execution_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_processing_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effectiveness_assessment_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub processing_start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub analyzing_start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub executing_start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub verification_deadline: Option<String>,
}

/// The orchestrator's routing decisions (duplicates it saw, blocks, cooldown).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "integer")]
    pub duplicate_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_refs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub blocked_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocking_workflow_execution: Option<String>,
    /// The orchestrator's cooldown: until then, signals for this fingerprint count into this
    /// request instead of opening a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub next_allowed_execution: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failure_count: Option<i32>,
    #[serde(default, rename = "deduplicatedByWE", skip_serializing_if = "Option::is_none")]
    pub deduplicated_by_we: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_message: Option<String>,
}

/// How the remediation ended.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompletionStatus {
    /// `ManualReviewRequired` keeps the request absorbing signals: a person must look first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Remediated", "NoActionRequired", "ManualReviewRequired", "VerificationTimedOut", "Inconclusive", "DryRun"]))]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires_manual_review: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_notification_sent: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = PHASES))]
    pub timeout_phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub timeout_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Pending", "InProgress", "Sent", "Failed", "Cancelled"]))]
    pub notification_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_request_refs: Option<Vec<ObjectReference>>,
}

/// Who last changed the request by hand.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperatorAudit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_modified_at: Option<String>,
    /// Set once: `oldSelf == '' || self == oldSelf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "oldSelf == '' || self == oldSelf", "message": "preRemediationSpecHash is set once"}]))]
    pub pre_remediation_spec_hash: Option<String>,
}

/// Per-phase timeouts (Go durations such as `1h30m`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "duration"))]
    pub global: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "duration"))]
    pub processing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "duration"))]
    pub analyzing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "duration"))]
    pub executing: Option<String>,
}

/// The workflow the analysis chose.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSelection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_workflow_ref: Option<WorkflowRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation_target: Option<RemediationTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_target_display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_display: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_display_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRef {
    pub workflow_id: String,
    pub version: String,
    pub execution_bundle: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_bundle_digest: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemediationTarget {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

/// Every `overallPhase` Kubernaut's schema admits.
pub const PHASES: [&str; 12] = [
    "Pending",
    "Processing",
    "Analyzing",
    "AwaitingApproval",
    "Executing",
    "Verifying",
    "Blocked",
    "Completed",
    "Failed",
    "TimedOut",
    "Skipped",
    "Cancelled",
];

/// Phases after which a request no longer counts signals by its phase alone (it may still by its
/// outcome or cooldown: [`crate::absorb`]).
pub const TERMINAL_PHASES: [&str; 5] = ["Completed", "Failed", "TimedOut", "Skipped", "Cancelled"];

/// The outcome that keeps a finished request absorbing its signals.
pub const MANUAL_REVIEW_REQUIRED: &str = "ManualReviewRequired";

/// True for every phase that is not terminal, including the empty phase.
pub fn phase_is_active(phase: &str) -> bool {
    !TERMINAL_PHASES.contains(&phase)
}

impl RemediationRequestStatus {
    /// `overallPhase`, empty when the orchestrator has not set one.
    pub fn phase(&self) -> &str {
        self.overall_phase.as_deref().unwrap_or_default()
    }
}

impl RemediationRequestSpec {
    /// A spec the CRD admits, for `fingerprint`, about Pod `demo/demo-0` (tests and examples).
    pub fn example(fingerprint: &str) -> Self {
        RemediationRequestSpec {
            signal_fingerprint: fingerprint.to_owned(),
            signal_name: "ExampleAlert".into(),
            severity: "warning".into(),
            signal_type: crate::signal::SIGNAL_TYPE.into(),
            signal_source: "prometheus".into(),
            target_type: "kubernetes".into(),
            target_resource: TargetResource {
                kind: "Pod".into(),
                name: "demo-0".into(),
                namespace: "demo".into(),
                api_version: "v1".into(),
            },
            firing_time: "2026-11-24T10:00:00Z".into(),
            received_time: "2026-11-24T10:00:01Z".into(),
            ..RemediationRequestSpec::default()
        }
    }
}

impl RemediationRequest {
    /// The phase (empty when no status or phase yet).
    pub fn phase(&self) -> &str {
        self.status.as_ref().map_or("", RemediationRequestStatus::phase)
    }

    /// The stored occurrence count (0 before the first count).
    pub fn occurrence_count(&self) -> i32 {
        self.status
            .as_ref()
            .and_then(|s| s.deduplication.as_ref())
            .map_or(0, |d| d.occurrence_count)
    }
}

fn str_is_empty(s: &std::sync::Arc<str>) -> bool {
    s.is_empty()
}

/// `integer` without a format (Kubernaut's `routingStatus.duplicateCount`).
fn integer(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer"})
}

/// Marks a field immutable, as Kubernaut's CRD does.
fn immutable(schema: &mut schemars::Schema) {
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{"rule": "self == oldSelf", "message": "signalFingerprint is immutable"}]),
    );
}

/// The spec's required fields as Kubernaut's schema lists them (`firingTime` among them, though
/// the Rust type reads objects without it), and the whole spec immutable.
fn spec_rules(schema: &mut schemars::Schema) {
    schema.insert(
        "required".into(),
        serde_json::json!([
            "firingTime",
            "receivedTime",
            "severity",
            "signalFingerprint",
            "signalName",
            "signalType",
            "targetResource",
            "targetType"
        ]),
    );
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{"rule": "self == oldSelf", "message": "spec is immutable"}]),
    );
}

/// The CRD generated from these types, in Kubernaut's terms: no `nullable` (an absent field is
/// how an unset one is written) and no schema `default` (the API server would write it into
/// objects; `serde(default)` here only makes reading lenient).
pub fn crd() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(RemediationRequest::crd()).expect("the CRD always serialises");
    for version in crd["spec"]["versions"].as_array_mut().into_iter().flatten() {
        strip_schema(&mut version["schema"]["openAPIV3Schema"]);
    }
    serde_json::from_value(crd).expect("a stripped CRD is still a CRD")
}

/// Removes `nullable` and `default` from a schema and every schema nested in it.
fn strip_schema(schema: &mut serde_json::Value) {
    let Some(object) = schema.as_object_mut() else { return };
    object.remove("nullable");
    object.remove("default");
    if let Some(properties) = object.get_mut("properties").and_then(|p| p.as_object_mut()) {
        properties.values_mut().for_each(strip_schema);
    }
    for nested in ["items", "additionalProperties"] {
        if let Some(inner) = object.get_mut(nested) {
            strip_schema(inner);
        }
    }
}

/// The CRD as YAML, exactly as `signal-gateway crd` prints it.
pub fn crd_yaml() -> String {
    let body = serde_saphyr::to_string(&crd()).expect("the CRD always serialises");
    format!("# Generated by `signal-gateway crd`; do not edit.\n---\n{body}")
}

/// Labels and annotations of a request the gateway creates, as Kubernaut's gateway sets them.
pub fn creation_metadata(name: &str, namespace: &str, now: jiff::Timestamp) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(
            [
                ("app.kubernetes.io/managed-by".to_owned(), "gateway-service".to_owned()),
                ("app.kubernetes.io/component".to_owned(), "remediation".to_owned()),
            ]
            .into(),
        ),
        annotations: Some([("kubernaut.ai/created-at".to_owned(), crate::clock::rfc3339(now))].into()),
        ..ObjectMeta::default()
    }
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
            assert!(PHASES.contains(&p));
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

    #[test]
    fn an_orchestrator_status_reads_and_writes_back_unchanged() {
        let status = serde_json::json!({
            "overallPhase": "Executing", "message": "running workflow", "observedGeneration": 1,
            "deduplication": {"firstSeenAt": "2026-11-24T10:00:00Z", "lastSeenAt": "2026-11-24T10:05:00Z", "occurrenceCount": 4},
            "conditions": [{"type": "Ready", "status": "False", "reason": "Executing", "message": "", "lastTransitionTime": "2026-11-24T10:01:00Z"}],
            "phaseProgress": {"workflowExecutionRef": {"kind": "WorkflowExecution", "name": "we-1", "namespace": "kubernaut-system"}},
            "routingStatus": {"duplicateRefs": [], "nextAllowedExecution": "2026-11-24T11:00:00Z", "consecutiveFailureCount": 0, "deduplicatedByWE": ""},
            "completionStatus": {"requiresManualReview": false},
        });
        let typed: RemediationRequestStatus = serde_json::from_value(status.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&typed).unwrap(),
            status,
            "explicit empty values survive"
        );
    }
}
