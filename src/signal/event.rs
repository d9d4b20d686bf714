//! Kubernetes Events (core/v1 `Event`; the events.k8s.io/v1 field names are accepted too).
//! `Warning` and `Error` events become signals about their involved object; `Normal` events are
//! ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ORIGINAL_PAYLOAD_MAX, ParseError, Signal, Skip, Source, is_valid_api_version, truncate, validate_target};
use crate::crd::TargetResource;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    #[serde(default)]
    involved_object: Option<ObjectReference>,
    /// events.k8s.io/v1 name for involvedObject.
    #[serde(default)]
    regarding: Option<ObjectReference>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
    /// events.k8s.io/v1 name for message.
    #[serde(default)]
    note: Option<String>,
    #[serde(rename = "type", default)]
    event_type: Option<String>,
    #[serde(default)]
    first_timestamp: Option<String>,
    #[serde(default)]
    event_time: Option<String>,
    #[serde(default)]
    last_timestamp: Option<String>,
    /// events.k8s.io/v1 and core/v1 event series (repeated events).
    #[serde(default)]
    series: Option<EventSeries>,
    #[serde(default)]
    metadata: Option<Metadata>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectReference {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    api_version: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventSeries {
    #[serde(default)]
    last_observed_time: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Kinds without a namespace; every other kind needs one.
const CLUSTER_SCOPED: &[&str] = &["Node", "PersistentVolume", "Namespace", "ClusterRole", "StorageClass"];

pub fn parse(body: &[u8]) -> Result<Result<Signal, Skip>, ParseError> {
    let ev: Event =
        serde_json::from_slice(body).map_err(|e| ParseError(format!("invalid Kubernetes Event payload: {e}")))?;
    let object = ev
        .involved_object
        .or(ev.regarding)
        .ok_or_else(|| ParseError("involvedObject is required".into()))?;
    if object.kind.is_empty() || object.name.is_empty() {
        return Err(ParseError(
            "involvedObject.kind and involvedObject.name are required".into(),
        ));
    }
    let reason = ev
        .reason
        .filter(|r| !r.is_empty())
        .ok_or_else(|| ParseError("reason is required".into()))?;
    let severity = match ev.event_type.as_deref() {
        Some("Warning") => "warning",
        Some("Error") => "error",
        Some("Normal") => return Ok(Err(Skip::Ignored("normal_event"))),
        Some(other) => {
            return Err(ParseError(format!(
                "type must be \"Warning\", \"Error\" or \"Normal\", got {other:?}"
            )));
        }
        None => {
            return Err(ParseError(
                "type is required (\"Warning\", \"Error\" or \"Normal\")".into(),
            ));
        }
    };
    if !object.kind.bytes().all(|b| b.is_ascii_alphanumeric()) || object.kind.len() > 63 {
        return Ok(Err(Skip::Rejected("invalid_target_kind".into())));
    }
    // Found by fuzzing: any string passed, and owner resolution builds an API URL from it.
    if !object.api_version.is_empty() && !is_valid_api_version(&object.api_version) {
        return Ok(Err(Skip::Rejected("invalid_target_api_version".into())));
    }
    let cluster_scoped = CLUSTER_SCOPED.contains(&object.kind.as_str());
    let target = TargetResource {
        namespace: if cluster_scoped {
            String::new()
        } else {
            object.namespace
        },
        kind: object.kind,
        name: object.name,
        api_version: object.api_version,
    };
    if let Err(skip) = validate_target(&target, cluster_scoped) {
        return Ok(Err(skip));
    }
    let (labels, mut annotations) = ev.metadata.map(|m| (m.labels, m.annotations)).unwrap_or_default();
    if let Some(msg) = ev.message.or(ev.note) {
        annotations.insert("message".into(), truncate(msg, 4096));
    }
    Ok(Ok(Signal {
        source: Source::KubernetesEvent,
        name: truncate(reason, 253),
        severity: severity.into(),
        target,
        labels,
        annotations,
        observed_at: ev
            .series
            .and_then(|s| s.last_observed_time)
            .or(ev.last_timestamp)
            .or_else(|| ev.event_time.clone())
            .or_else(|| ev.first_timestamp.clone()),
        firing_time: ev.first_timestamp.or(ev.event_time),
        cluster_id: None,
        payload: truncate(String::from_utf8_lossy(body).into_owned(), ORIGINAL_PAYLOAD_MAX).into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, ty: &str) -> String {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "x.1", "namespace": "shop"},
            "involvedObject": {"kind": kind, "name": "api-0", "namespace": "shop", "apiVersion": "v1"},
            "reason": "BackOff", "message": "Back-off restarting failed container", "type": ty,
            "source": {"component": "kubelet"}, "firstTimestamp": "2026-11-23T12:00:00Z", "count": 3
        })
        .to_string()
    }

    #[test]
    fn warning_event_becomes_a_signal_about_its_involved_object() {
        let s = parse(event("Pod", "Warning").as_bytes()).unwrap().unwrap();
        assert_eq!((s.name.as_str(), s.severity.as_str()), ("BackOff", "warning"));
        assert_eq!(
            s.target,
            TargetResource {
                kind: "Pod".into(),
                name: "api-0".into(),
                namespace: "shop".into(),
                api_version: "v1".into()
            }
        );
        assert_eq!(s.annotations["message"], "Back-off restarting failed container");
    }

    #[test]
    fn error_events_are_signals_too() {
        let s = parse(event("Pod", "Error").as_bytes()).unwrap().unwrap();
        assert_eq!((s.name.as_str(), s.severity.as_str()), ("BackOff", "error"));
    }

    #[test]
    fn normal_event_is_ignored_and_node_event_is_cluster_scoped() {
        assert_eq!(
            parse(event("Pod", "Normal").as_bytes()).unwrap(),
            Err(Skip::Ignored("normal_event"))
        );
        let s = parse(event("Node", "Warning").as_bytes()).unwrap().unwrap();
        assert_eq!(s.target.namespace, "");
    }

    #[test]
    fn events_missing_required_fields_are_malformed() {
        for (body, want) in [
            (r#"{"reason": "X", "type": "Warning"}"#, "involvedObject is required"),
            (
                r#"{"involvedObject": {"kind": "Pod"}, "reason": "X", "type": "Warning"}"#,
                "involvedObject.kind and",
            ),
            (
                r#"{"involvedObject": {"kind": "Pod", "name": "p", "namespace": "n"}, "type": "Warning"}"#,
                "reason is required",
            ),
            (
                r#"{"involvedObject": {"kind": "Pod", "name": "p", "namespace": "n"}, "reason": "X", "type": "Odd"}"#,
                "type must be",
            ),
            ("not json", "invalid Kubernetes Event payload"),
        ] {
            let err = parse(body.as_bytes()).unwrap_err();
            assert!(err.0.contains(want), "{body}: {err}");
        }
    }
}
