//! Alertmanager webhook (payload version 4). Each alert of a group is one signal.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{MAX_ALERTS_PER_REQUEST, ParseError, Signal, Skip, Source, truncate, validate_target};
use crate::crd::{ORIGINAL_PAYLOAD_MAX, TargetResource};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Webhook {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    receiver: String,
    #[serde(default)]
    status: Option<String>,
    alerts: Vec<serde_json::Value>,
    #[serde(default)]
    group_key: Option<String>,
    #[serde(default)]
    truncated_alerts: Option<u64>,
    #[serde(default)]
    common_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alert {
    status: String,
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
    #[serde(default)]
    generator_url: Option<String>,
    #[serde(default)]
    fingerprint: Option<String>,
}

/// A parsed webhook: one entry per alert, in order.
#[derive(Debug)]
pub struct Batch {
    pub alerts: Vec<Result<Signal, Skip>>,
    /// Alerts Alertmanager dropped because of `max_alerts`; they will not be redelivered.
    pub truncated_alerts: u64,
    pub group_key: Option<String>,
}

/// Label names that identify the alert's Kubernetes object, most specific first, with the kind,
/// apiVersion and whether the kind is cluster-scoped. (`job` is the scrape job in Prometheus, so
/// Jobs come from kube-state-metrics' `job_name`.)
const TARGET_LABELS: &[(&str, &str, &str, bool)] = &[
    ("pod", "Pod", "v1", false),
    ("deployment", "Deployment", "apps/v1", false),
    ("statefulset", "StatefulSet", "apps/v1", false),
    ("daemonset", "DaemonSet", "apps/v1", false),
    ("replicaset", "ReplicaSet", "apps/v1", false),
    ("job_name", "Job", "batch/v1", false),
    ("cronjob", "CronJob", "batch/v1", false),
    (
        "horizontalpodautoscaler",
        "HorizontalPodAutoscaler",
        "autoscaling/v2",
        false,
    ),
    ("persistentvolumeclaim", "PersistentVolumeClaim", "v1", false),
    ("node", "Node", "v1", true),
    ("persistentvolume", "PersistentVolume", "v1", true),
];

pub fn parse(body: &[u8]) -> Result<Batch, ParseError> {
    let hook: Webhook =
        serde_json::from_slice(body).map_err(|e| ParseError(format!("invalid Alertmanager webhook payload: {e}")))?;
    if let Some(v) = &hook.version
        && v != "4"
    {
        return Err(ParseError(format!("unsupported webhook version {v:?}; expected \"4\"")));
    }
    if let Some(s) = &hook.status
        && s != "firing"
        && s != "resolved"
    {
        return Err(ParseError(format!(
            "status must be \"firing\" or \"resolved\", got {s:?}"
        )));
    }
    if hook.alerts.is_empty() {
        return Err(ParseError("alerts must contain at least one alert".into()));
    }
    if hook.alerts.len() > MAX_ALERTS_PER_REQUEST {
        return Err(ParseError(format!(
            "{} alerts in one request; at most {MAX_ALERTS_PER_REQUEST} are accepted",
            hook.alerts.len()
        )));
    }
    let mut alerts = Vec::with_capacity(hook.alerts.len());
    for (i, raw) in hook.alerts.iter().enumerate() {
        let alert: Alert = serde_json::from_value(raw.clone()).map_err(|e| ParseError(format!("alerts[{i}]: {e}")))?;
        alerts.push(to_signal(&hook, alert, raw)?);
    }
    Ok(Batch {
        alerts,
        truncated_alerts: hook.truncated_alerts.unwrap_or(0),
        group_key: hook.group_key,
    })
}

fn to_signal(hook: &Webhook, alert: Alert, raw: &serde_json::Value) -> Result<Result<Signal, Skip>, ParseError> {
    match alert.status.as_str() {
        "firing" => {}
        "resolved" => return Ok(Err(Skip::Ignored("resolved"))),
        other => {
            return Err(ParseError(format!(
                "alert status must be \"firing\" or \"resolved\", got {other:?}"
            )));
        }
    }
    let _ = (
        &alert.ends_at,
        &alert.generator_url,
        &alert.fingerprint,
        &hook.common_labels,
    );
    let Some(name) = alert.labels.get("alertname").filter(|n| !n.is_empty()).cloned() else {
        return Ok(Err(Skip::Rejected("missing_alertname".into())));
    };
    let Some(&(label, kind, api_version, cluster_scoped)) = TARGET_LABELS
        .iter()
        .find(|(label, ..)| alert.labels.get(*label).is_some_and(|v| !v.is_empty()))
    else {
        return Ok(Err(Skip::Rejected("no_target_resource".into())));
    };
    let namespace = if cluster_scoped {
        String::new()
    } else {
        ["exported_namespace", "namespace"]
            .iter()
            .find_map(|k| alert.labels.get(*k).filter(|v| !v.is_empty()))
            .cloned()
            .unwrap_or_default()
    };
    let target = TargetResource {
        kind: kind.into(),
        name: alert.labels[label].clone(),
        namespace,
        api_version: api_version.into(),
    };
    if let Err(skip) = validate_target(&target, cluster_scoped) {
        return Ok(Err(skip));
    }
    let severity = alert
        .labels
        .get("severity")
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    Ok(Ok(Signal {
        source: Source::Prometheus,
        // Found by fuzzing: spec.signalName admits 253 characters, as event reasons are cut.
        name: truncate(name, 253),
        severity,
        sender: hook.receiver.clone(),
        target,
        firing_time: alert.starts_at.clone().filter(|s| !s.starts_with("0001-")),
        observed_at: alert.starts_at.filter(|s| !s.starts_with("0001-")),
        labels: alert.labels,
        annotations: alert.annotations,
        payload: truncate(raw.to_string(), ORIGINAL_PAYLOAD_MAX),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(labels: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"status": "firing", "labels": labels, "annotations": {}, "startsAt": "2026-11-23T12:00:00Z"})
    }

    fn one(labels: serde_json::Value) -> Result<Signal, Skip> {
        let body = serde_json::json!({"version": "4", "receiver": "r", "status": "firing", "alerts": [alert(labels)]});
        parse(body.to_string().as_bytes()).unwrap().alerts.remove(0)
    }

    #[test]
    fn pod_label_wins_over_controller_labels_and_exported_namespace_over_namespace() {
        let s = one(serde_json::json!({"alertname": "A", "pod": "p-1", "deployment": "d",
            "namespace": "monitoring", "exported_namespace": "shop", "severity": "critical"}))
        .unwrap();
        assert_eq!(
            (
                s.target.kind.as_str(),
                s.target.name.as_str(),
                s.target.namespace.as_str()
            ),
            ("Pod", "p-1", "shop")
        );
        assert_eq!(s.severity, "critical");
    }

    #[test]
    fn scrape_job_label_is_not_a_kubernetes_job() {
        let s = one(serde_json::json!({"alertname": "A", "job": "kube-state-metrics", "namespace": "x"}));
        assert_eq!(s, Err(Skip::Rejected("no_target_resource".into())));
        let s =
            one(serde_json::json!({"alertname": "A", "job": "ksm", "job_name": "backup", "namespace": "x"})).unwrap();
        assert_eq!((s.target.kind.as_str(), s.target.name.as_str()), ("Job", "backup"));
    }

    #[test]
    fn nodes_are_cluster_scoped_and_namespaced_kinds_need_a_namespace() {
        let s = one(serde_json::json!({"alertname": "A", "node": "worker-3", "namespace": "ignored"})).unwrap();
        assert_eq!(s.target.namespace, "");
        assert_eq!(
            one(serde_json::json!({"alertname": "A", "pod": "p"})),
            Err(Skip::Rejected("missing_namespace".into()))
        );
    }

    #[test]
    fn hostile_names_are_rejected_not_used() {
        let s = one(serde_json::json!({"alertname": "A", "pod": "../../etc", "namespace": "x"}));
        assert_eq!(s, Err(Skip::Rejected("invalid_target_name".into())));
        let s = one(serde_json::json!({"alertname": "A", "pod": "p", "namespace": "UPPER"}));
        assert_eq!(s, Err(Skip::Rejected("invalid_namespace".into())));
    }

    #[test]
    fn missing_alertname_is_rejected() {
        assert_eq!(
            one(serde_json::json!({"pod": "p", "namespace": "x"})),
            Err(Skip::Rejected("missing_alertname".into()))
        );
    }

    #[test]
    fn malformed_payloads_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("{", "invalid Alertmanager webhook payload"),
            (r#"{"alerts": []}"#, "at least one alert"),
            (r#"{"version": "3", "alerts": [{}]}"#, "unsupported webhook version"),
            (
                r#"{"alerts": [{"status": "firing"}]}"#,
                "alerts[0]: missing field `labels`",
            ),
            (
                r#"{"alerts": [{"status": "weird", "labels": {}}]}"#,
                "alert status must be",
            ),
            (
                r#"{"alerts": [{"status": "firing", "labels": {"a": 1}}]}"#,
                "alerts[0]: invalid type",
            ),
            (r#"[]"#, "invalid Alertmanager webhook payload"),
        ];
        for (body, want) in cases {
            let err = parse(body.as_bytes()).unwrap_err();
            assert!(err.0.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn resolved_alerts_are_ignored() {
        let body = serde_json::json!({"alerts": [{"status": "resolved", "labels": {"alertname": "A", "pod": "p", "namespace": "n"}}]});
        let batch = parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(batch.alerts[0], Err(Skip::Ignored("resolved")));
    }

    #[test]
    fn original_payload_is_bounded() {
        let big = "x".repeat(ORIGINAL_PAYLOAD_MAX * 2);
        let body = serde_json::json!({"alerts": [{"status": "firing", "labels": {"alertname": "A", "pod": "p", "namespace": "n"}, "annotations": {"d": big}}]});
        let s = parse(body.to_string().as_bytes()).unwrap().alerts.remove(0).unwrap();
        assert!(s.payload.len() <= ORIGINAL_PAYLOAD_MAX);
    }
}
