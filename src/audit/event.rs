//! The audit event Kubernaut's DataStorage stores, and the four events a signal's decision gives
//! (KUBERNAUT.md, "Audit events to DataStorage"): a new incident `gateway.signal.received` and
//! `gateway.crd.created`, a duplicate `gateway.signal.deduplicated`, a signal that could not be
//! stored `gateway.crd.failed`. Built on the signal path from values the pipeline already has;
//! turned into JSON only by the sender, off that path.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

use crate::crd::{RemediationRequestSpec, TargetResource};

/// DataStorage's bound on `correlation_id`.
pub const CORRELATION_ID_MAX: usize = 255;

/// The event types, as DataStorage knows them; also the `type` label of the audit metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    SignalReceived,
    SignalDeduplicated,
    CrdCreated,
    CrdFailed,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::SignalReceived,
        EventType::SignalDeduplicated,
        EventType::CrdCreated,
        EventType::CrdFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::SignalReceived => "gateway.signal.received",
            EventType::SignalDeduplicated => "gateway.signal.deduplicated",
            EventType::CrdCreated => "gateway.crd.created",
            EventType::CrdFailed => "gateway.crd.failed",
        }
    }

    fn action(self) -> &'static str {
        match self {
            EventType::SignalReceived => "received",
            EventType::SignalDeduplicated => "deduplicated",
            EventType::CrdCreated => "created",
            EventType::CrdFailed => "failed",
        }
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One audit event (DataStorage's `AuditEventRequest` for the gateway category).
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub version: &'static str,
    pub event_type: EventType,
    pub event_timestamp: String,
    pub event_category: &'static str,
    pub event_action: &'static str,
    /// `success` or `failure`.
    pub event_outcome: &'static str,
    pub actor_type: &'static str,
    pub actor_id: String,
    pub resource_type: &'static str,
    pub resource_id: String,
    pub correlation_id: String,
    /// The signal's namespace (absent for cluster-scoped targets such as Nodes).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    pub severity: String,
    pub duration_ms: u64,
    pub event_data: EventData,
}

/// The gateway payload of an event (`event_data`).
#[derive(Debug, Clone, Serialize)]
pub struct EventData {
    pub event_type: EventType,
    pub signal_type: &'static str,
    pub signal_name: String,
    pub namespace: String,
    pub fingerprint: String,
    pub severity: String,
    pub resource_kind: String,
    pub resource_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remediation_request: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deduplication_status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurrence_count: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_payload: Option<Payload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal_labels: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal_annotations: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_details: Option<ErrorDetails>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetails {
    pub message: String,
    pub code: String,
    pub component: &'static str,
    pub retry_possible: bool,
}

/// The sender's JSON (the RR's `originalPayload`: the request body, shared by the alerts of one
/// notification), kept as text until the sender serializes the batch. It is written as the JSON
/// object it is; text that is not a whole JSON object (a body cut at the RemediationRequest's
/// bound) is written as `{"truncated": true, "text": "..."}`, so `original_payload` is an
/// object either way.
#[derive(Debug, Clone)]
pub struct Payload(pub std::sync::Arc<str>);

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<&serde_json::value::RawValue>(&self.0) {
            Ok(raw) if raw.get().starts_with('{') => raw.serialize(s),
            _ => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("truncated", &true)?;
                m.serialize_entry("text", &*self.0)?;
                m.end()
            }
        }
    }
}

/// What the events of one signal say: the sender as authentication knows it and the RR spec the
/// signal produced (so the trail carries exactly the RR's values and bounds).
#[derive(Debug, Clone)]
pub struct SignalFacts {
    /// The authenticated user (`auth.mode` kubernetes or static); `None` when auth knows none.
    pub user: Option<String>,
    /// Where the signal came from when no user is known (`spec.signalSource`).
    pub source: String,
    pub signal_name: String,
    pub severity: String,
    pub fingerprint: String,
    pub target: TargetResource,
    pub cluster_id: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub payload: std::sync::Arc<str>,
}

impl SignalFacts {
    pub fn new(user: Option<&str>, spec: &RemediationRequestSpec) -> Self {
        SignalFacts {
            user: user.map(str::to_owned),
            source: spec.signal_source.clone(),
            signal_name: spec.signal_name.clone(),
            severity: spec.severity.clone(),
            fingerprint: spec.signal_fingerprint.clone(),
            target: spec.target_resource.clone(),
            cluster_id: spec.cluster_id.clone(),
            labels: spec.signal_labels.clone(),
            annotations: spec.signal_annotations.clone(),
            payload: spec.original_payload.clone(),
        }
    }

    /// `gateway.signal.received` and `gateway.crd.created` for a signal that created RR
    /// `namespace/name`.
    pub fn created(self, namespace: &str, name: &str, at: &str, duration_ms: u64) -> [AuditEvent; 2] {
        let rr = format!("{namespace}/{name}");
        let mut created = self.event(EventType::CrdCreated, name, at, duration_ms);
        created.resource_id = rr.clone();
        created.event_data.remediation_request = Some(rr.clone());
        created.event_data.occurrence_count = Some(1);

        let mut received = self.event(EventType::SignalReceived, name, at, duration_ms);
        received.actor_type_and_id(self.sender());
        received.resource_type = "Signal";
        received.resource_id = self.fingerprint.clone();
        received.event_data.remediation_request = Some(rr);
        received.event_data.deduplication_status = Some("new");
        self.into_signal(&mut received.event_data);
        [received, created]
    }

    /// `gateway.signal.deduplicated` for a signal counted into RR `namespace/name` as its
    /// `count`-th occurrence.
    pub fn deduplicated(self, namespace: &str, name: &str, count: i64, at: &str, duration_ms: u64) -> AuditEvent {
        let mut e = self.event(EventType::SignalDeduplicated, name, at, duration_ms);
        e.actor_type_and_id(self.sender());
        e.resource_type = "Signal";
        e.resource_id = self.fingerprint.clone();
        e.event_data.remediation_request = Some(format!("{namespace}/{name}"));
        e.event_data.deduplication_status = Some("duplicate");
        e.event_data.occurrence_count = Some(i32::try_from(count).unwrap_or(i32::MAX));
        self.into_signal(&mut e.event_data);
        e
    }

    /// `gateway.crd.failed` for a signal whose outcome could not be stored (answered 503). No
    /// RR name is known, so the correlation id is `signalName:namespace:Kind:name`, as
    /// Kubernaut's gateway writes it.
    pub fn failed(self, code: &str, message: &str, at: &str, duration_ms: u64) -> AuditEvent {
        let t = &self.target;
        let id = cut(
            format!("{}:{}:{}:{}", self.signal_name, t.namespace, t.kind, t.name),
            CORRELATION_ID_MAX,
        );
        let mut e = self.event(EventType::CrdFailed, &id, at, duration_ms);
        e.event_outcome = "failure";
        e.resource_id = id;
        e.event_data.error_details = Some(ErrorDetails {
            message: message.to_owned(),
            code: code.to_owned(),
            component: "gateway",
            retry_possible: true,
        });
        e
    }

    /// `external` + the source when authentication knows no user.
    fn sender(&self) -> (&'static str, String) {
        match &self.user {
            Some(user) => ("authenticated-service", user.clone()),
            None => ("external", self.source.clone()),
        }
    }

    /// Moves the signal's payload, labels and annotations into `d` (no copies on the signal path).
    fn into_signal(self, d: &mut EventData) {
        d.original_payload = Some(Payload(self.payload));
        d.signal_labels = Some(self.labels);
        d.signal_annotations = Some(self.annotations);
    }

    /// The fields every event has; actor `gateway`/`crd-creator` and resource
    /// `RemediationRequest` until a caller says otherwise.
    fn event(&self, kind: EventType, correlation_id: &str, at: &str, duration_ms: u64) -> AuditEvent {
        AuditEvent {
            version: "1.0",
            event_type: kind,
            event_timestamp: at.to_owned(),
            event_category: "gateway",
            event_action: kind.action(),
            event_outcome: "success",
            actor_type: "gateway",
            actor_id: "crd-creator".into(),
            resource_type: "RemediationRequest",
            resource_id: String::new(),
            correlation_id: cut(correlation_id.to_owned(), CORRELATION_ID_MAX),
            namespace: self.target.namespace.clone(),
            cluster_id: self.cluster_id.clone(),
            severity: self.severity.clone(),
            duration_ms,
            event_data: EventData {
                event_type: kind,
                signal_type: "alert",
                signal_name: self.signal_name.clone(),
                namespace: self.target.namespace.clone(),
                fingerprint: self.fingerprint.clone(),
                severity: self.severity.clone(),
                resource_kind: self.target.kind.clone(),
                resource_name: self.target.name.clone(),
                remediation_request: None,
                deduplication_status: None,
                occurrence_count: None,
                original_payload: None,
                signal_labels: None,
                signal_annotations: None,
                error_details: None,
            },
        }
    }
}

impl AuditEvent {
    fn actor_type_and_id(&mut self, (kind, id): (&'static str, String)) {
        self.actor_type = kind;
        self.actor_id = id;
    }

    /// Bytes this event holds in the buffer: its text plus a fixed allowance for the structure.
    /// The buffer's byte bound is counted in these.
    pub fn held_bytes(&self) -> usize {
        const FIXED: usize = 1024;
        let map = |m: &Option<BTreeMap<String, String>>| {
            m.as_ref()
                .map_or(0, |m| m.iter().map(|(k, v)| k.len() + v.len() + 64).sum::<usize>())
        };
        let d = &self.event_data;
        FIXED
            + self.event_timestamp.len()
            + self.actor_id.len()
            + self.resource_id.len()
            + self.correlation_id.len()
            + self.namespace.len()
            + self.cluster_id.len()
            + 2 * self.severity.len()
            + d.signal_name.len()
            + d.namespace.len()
            + d.fingerprint.len()
            + d.resource_kind.len()
            + d.resource_name.len()
            + d.remediation_request.as_ref().map_or(0, String::len)
            + d.original_payload.as_ref().map_or(0, |p| p.0.len())
            + map(&d.signal_labels)
            + map(&d.signal_annotations)
            + d.error_details.as_ref().map_or(0, |e| e.message.len() + e.code.len())
    }
}

/// `s` cut to at most `max` characters.
fn cut(s: String, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => s[..at].to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn facts(user: Option<&str>) -> SignalFacts {
        let target = TargetResource {
            kind: "Deployment".into(),
            name: "checkout".into(),
            namespace: "shop".into(),
            api_version: "apps/v1".into(),
        };
        let spec = RemediationRequestSpec {
            signal_fingerprint: crate::fingerprint::Fingerprint::of("", &target).to_string(),
            signal_name: "KubePodCrashLooping".into(),
            severity: "critical".into(),
            signal_source: "prometheus".into(),
            target_resource: target,
            cluster_id: "east".into(),
            signal_labels: BTreeMap::from([("alertname".into(), "A".into())]),
            signal_annotations: BTreeMap::from([("summary".into(), "s".into())]),
            original_payload: r#"{"labels":{"alertname":"A"}}"#.into(),
            ..Default::default()
        };
        SignalFacts::new(user, &spec)
    }

    fn json_of(e: &AuditEvent) -> Value {
        serde_json::to_value(e).unwrap()
    }

    #[test]
    fn a_new_incident_gives_received_by_the_sender_and_created_by_the_gateway() {
        let [received, created] = facts(Some("system:serviceaccount:monitoring:alertmanager")).created(
            "kubernaut",
            "rr-abc-1",
            "2026-11-24T10:00:00Z",
            12,
        );
        let r = json_of(&received);
        assert_eq!(r["event_type"], "gateway.signal.received");
        assert_eq!(r["event_action"], "received");
        assert_eq!(r["actor_type"], "authenticated-service");
        assert_eq!(r["actor_id"], "system:serviceaccount:monitoring:alertmanager");
        assert_eq!(r["resource_type"], "Signal");
        assert_eq!(r["resource_id"], r["event_data"]["fingerprint"]);
        assert_eq!(r["correlation_id"], "rr-abc-1");
        assert_eq!(r["event_data"]["deduplication_status"], "new");
        assert_eq!(r["event_data"]["remediation_request"], "kubernaut/rr-abc-1");
        assert_eq!(
            r["event_data"]["original_payload"],
            json!({"labels": {"alertname": "A"}})
        );
        let c = json_of(&created);
        assert_eq!(c["event_type"], "gateway.crd.created");
        assert_eq!(
            (c["actor_type"].as_str(), c["actor_id"].as_str()),
            (Some("gateway"), Some("crd-creator"))
        );
        assert_eq!(c["resource_type"], "RemediationRequest");
        assert_eq!(c["resource_id"], "kubernaut/rr-abc-1");
        assert_eq!(c["event_data"]["occurrence_count"], 1);
        assert_eq!(c["cluster_id"], "east");
    }

    #[test]
    fn without_a_user_the_actor_is_the_external_source() {
        let d = json_of(&facts(None).deduplicated("kubernaut", "rr-abc-1", 7, "2026-11-24T10:00:00Z", 1));
        assert_eq!(
            (d["actor_type"].as_str(), d["actor_id"].as_str()),
            (Some("external"), Some("prometheus"))
        );
        assert_eq!(d["event_data"]["occurrence_count"], 7);
        assert_eq!(d["event_data"]["deduplication_status"], "duplicate");
    }

    #[test]
    fn a_failed_creation_carries_error_details_and_a_readable_correlation_id() {
        let f = json_of(&facts(None).failed("api_timeout", "the API server did not answer", "t", 4000));
        assert_eq!(f["event_outcome"], "failure");
        assert_eq!(f["correlation_id"], "KubePodCrashLooping:shop:Deployment:checkout");
        assert_eq!(
            f["event_data"]["error_details"],
            json!({"message": "the API server did not answer", "code": "api_timeout", "component": "gateway", "retry_possible": true})
        );
        let mut long = facts(None);
        long.signal_name = "n".repeat(300);
        let id = long.failed("x", "y", "t", 1).correlation_id;
        assert_eq!(id.len(), CORRELATION_ID_MAX);
    }

    #[test]
    fn a_payload_that_is_not_a_whole_object_is_still_written_as_an_object() {
        let mut f = facts(None);
        f.payload = r#"{"labels":{"alertname":"A"#.into();
        let d = json_of(&f.deduplicated("ns", "rr", 2, "t", 1));
        assert_eq!(
            d["event_data"]["original_payload"],
            json!({"truncated": true, "text": "{\"labels\":{\"alertname\":\"A"})
        );
    }

    #[test]
    fn held_bytes_grow_with_the_events_text() {
        let small = facts(None).deduplicated("ns", "rr", 2, "t", 1);
        let mut f = facts(None);
        f.payload = "x".repeat(100_000).into();
        let large = f.deduplicated("ns", "rr", 2, "t", 1);
        assert!(large.held_bytes() >= small.held_bytes() + 99_000);
        assert!(small.held_bytes() >= serde_json::to_vec(&small).unwrap().len() / 2);
    }
}
