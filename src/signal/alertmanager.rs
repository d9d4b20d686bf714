//! Alertmanager webhook (payload version 4). Each alert of a group is one signal.

use std::collections::BTreeMap;

use serde::Deserialize;

use std::sync::Arc;

use super::{
    MAX_ALERTS_PER_REQUEST, ORIGINAL_PAYLOAD_MAX, ParseError, SEVERITY_MAX, Signal, Skip, Source, cut_chars, truncate,
    validate_target,
};
use crate::crd::TargetResource;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Webhook {
    #[serde(default)]
    version: Option<String>,
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
    // Every alert's RR keeps the whole notification as received, shared rather than copied;
    // a notification larger than an RR may keep gives each alert its own JSON instead.
    let whole: Option<Arc<str>> = (body.len() <= ORIGINAL_PAYLOAD_MAX).then(|| String::from_utf8_lossy(body).into());
    let mut alerts = Vec::with_capacity(hook.alerts.len());
    for (i, raw) in hook.alerts.iter().enumerate() {
        let alert: Alert = serde_json::from_value(raw.clone()).map_err(|e| ParseError(format!("alerts[{i}]: {e}")))?;
        let payload = whole
            .clone()
            .unwrap_or_else(|| truncate(raw.to_string(), ORIGINAL_PAYLOAD_MAX).into());
        alerts.push(to_signal(&hook, alert, payload)?);
    }
    Ok(Batch {
        alerts,
        truncated_alerts: hook.truncated_alerts.unwrap_or(0),
        group_key: hook.group_key,
    })
}

fn to_signal(hook: &Webhook, alert: Alert, payload: Arc<str>) -> Result<Result<Signal, Skip>, ParseError> {
    match alert.status.as_str() {
        "firing" => {}
        "resolved" => return Ok(Err(Skip::Ignored("resolved"))),
        other => {
            return Err(ParseError(format!(
                "alert status must be \"firing\" or \"resolved\", got {other:?}"
            )));
        }
    }
    let _ = (&alert.ends_at, &alert.generator_url, &alert.fingerprint);
    let Some(name) = alert.labels.get("alertname").filter(|n| !n.is_empty()).cloned() else {
        return Ok(Err(Skip::Rejected("missing_alertname".into())));
    };
    let Some((object, kind, api_version, cluster_scoped)) = target_of(&alert.labels) else {
        return Ok(Err(Skip::Rejected("no_target_resource".into())));
    };
    let namespace = if cluster_scoped {
        String::new()
    } else {
        label(&alert.labels, "exported_namespace")
            .or_else(|| label(&alert.labels, "namespace"))
            .unwrap_or_default()
            .to_owned()
    };
    let target = TargetResource {
        kind: kind.into(),
        name: object.to_owned(),
        namespace,
        api_version: api_version.into(),
    };
    if let Err(skip) = validate_target(&target, cluster_scoped) {
        return Ok(Err(skip));
    }
    // The sender's severity as sent, within the CRD's bounds (never empty).
    let severity =
        label(&alert.labels, "severity").map_or_else(|| "unknown".into(), |s| cut_chars(s.into(), SEVERITY_MAX));
    Ok(Ok(Signal {
        source: Source::Prometheus,
        // Found by fuzzing: spec.signalName admits 253 characters, as event reasons are cut.
        name: truncate(name, 253),
        severity,
        target,
        firing_time: alert.starts_at.clone().filter(|s| !s.starts_with("0001-")),
        observed_at: alert.starts_at.filter(|s| !s.starts_with("0001-")),
        cluster_id: hook.common_labels.get("cluster").filter(|c| !c.is_empty()).cloned(),
        labels: alert.labels,
        annotations: alert.annotations,
        payload,
    }))
}

/// A label's value, when set and not empty.
fn label<'a>(labels: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    labels.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// The object the alert is about: its name and the kind, apiVersion and scope of its label.
///
/// When Prometheus scraped the metric without `honor_labels` (kube-state-metrics behind a
/// ServiceMonitor), the metric's own `namespace` and `pod` clash with the scrape target's and are
/// renamed `exported_namespace` / `exported_pod`: then the plain `pod` is the exporter's pod, not
/// the object, and every object label is taken from its `exported_` form first.
fn target_of(labels: &BTreeMap<String, String>) -> Option<(&str, &'static str, &'static str, bool)> {
    let exported = label(labels, "exported_namespace").is_some();
    TARGET_LABELS
        .iter()
        .find_map(|&(name, kind, api_version, cluster_scoped)| {
            let value = if exported {
                label(labels, &format!("exported_{name}"))
                    .or_else(|| (name != "pod").then(|| label(labels, name)).flatten())
            } else {
                label(labels, name)
            };
            value.map(|v| (v, kind, api_version, cluster_scoped))
        })
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
    fn a_scrape_time_pod_label_never_names_the_target_when_the_alerts_own_labels_are_exported() {
        // kube-state-metrics scraped without honor_labels: `pod`/`namespace` are the exporter's.
        let s = one(
            serde_json::json!({"alertname": "A", "pod": "kube-state-metrics-0", "deployment": "d",
            "namespace": "monitoring", "exported_namespace": "shop", "severity": "critical"}),
        )
        .unwrap();
        assert_eq!(
            (
                s.target.kind.as_str(),
                s.target.name.as_str(),
                s.target.namespace.as_str()
            ),
            ("Deployment", "d", "shop")
        );
        let s = one(
            serde_json::json!({"alertname": "A", "pod": "kube-state-metrics-0", "exported_pod": "api-0",
            "namespace": "monitoring", "exported_namespace": "shop"}),
        )
        .unwrap();
        assert_eq!(
            (
                s.target.kind.as_str(),
                s.target.name.as_str(),
                s.target.namespace.as_str()
            ),
            ("Pod", "api-0", "shop")
        );
    }

    #[test]
    fn pod_label_wins_over_controller_labels() {
        let s = one(serde_json::json!({"alertname": "A", "pod": "p-1", "deployment": "d",
            "namespace": "shop", "severity": "critical"}))
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
    fn original_payload_is_the_whole_body_shared_by_its_alerts_and_bounded() {
        let body = serde_json::json!({"version": "4", "receiver": "r", "alerts": [
            {"status": "firing", "labels": {"alertname": "A", "pod": "p", "namespace": "n"}},
            {"status": "firing", "labels": {"alertname": "B", "pod": "q", "namespace": "n"}}]})
        .to_string();
        let batch = parse(body.as_bytes()).unwrap();
        let (a, b) = (batch.alerts[0].as_ref().unwrap(), batch.alerts[1].as_ref().unwrap());
        assert_eq!(&*a.payload, body.as_str(), "the notification as received");
        assert!(
            Arc::ptr_eq(&a.payload, &b.payload),
            "one copy for the whole notification"
        );

        let big = "x".repeat(ORIGINAL_PAYLOAD_MAX * 2);
        let body = serde_json::json!({"alerts": [{"status": "firing", "labels": {"alertname": "A", "pod": "p", "namespace": "n"}, "annotations": {"d": big}}]});
        let s = parse(body.to_string().as_bytes()).unwrap().alerts.remove(0).unwrap();
        assert!(s.payload.len() <= ORIGINAL_PAYLOAD_MAX);
    }

    #[test]
    fn severity_is_the_senders_within_bounds_and_never_empty() {
        let s =
            one(serde_json::json!({"alertname": "A", "pod": "p", "namespace": "n", "severity": "P1-Page"})).unwrap();
        assert_eq!(s.severity, "P1-Page", "unnormalised");
        for labels in [
            serde_json::json!({"alertname": "A", "pod": "p", "namespace": "n"}),
            serde_json::json!({"alertname": "A", "pod": "p", "namespace": "n", "severity": ""}),
        ] {
            assert_eq!(one(labels).unwrap().severity, "unknown");
        }
        let long = one(serde_json::json!({"alertname": "A", "pod": "p", "namespace": "n", "severity": "s".repeat(80)}))
            .unwrap();
        assert_eq!(long.severity.chars().count(), SEVERITY_MAX);
    }

    #[test]
    fn common_label_cluster_names_the_cluster() {
        let body = serde_json::json!({"version": "4", "commonLabels": {"cluster": "eu-1"}, "alerts": [alert(
            serde_json::json!({"alertname": "A", "pod": "p", "namespace": "n", "cluster": "eu-1"}))]});
        let s = parse(body.to_string().as_bytes()).unwrap().alerts.remove(0).unwrap();
        assert_eq!(s.cluster_id.as_deref(), Some("eu-1"));
        assert_eq!(
            one(serde_json::json!({"alertname": "A", "pod": "p", "namespace": "n"}))
                .unwrap()
                .cluster_id,
            None
        );
    }
}
