//! What the parsers promise the rest of the pipeline, checked on every input. Shared by the fuzz
//! targets and `tests/fuzz_regressions.rs` (included there with `#[path]`), so a seed or a minimised
//! crash is checked by `cargo test` exactly as the fuzzer checked it. Each check panics with the
//! input's outcome in the message; a panic is what libFuzzer reports as a crash.

use signal_gateway::crd::TargetResource;
use signal_gateway::fingerprint::Fingerprint;
use signal_gateway::signal::{
    MAX_ALERTS_PER_REQUEST, ORIGINAL_PAYLOAD_MAX, ParseError, SEVERITY_MAX, Signal, Skip, Source, alertmanager, event,
    is_valid_namespace, is_valid_object_name,
};

/// Any non-empty cluster id: fingerprints are also checked with one.
pub const CLUSTER_ID: &str = "fuzz-east";

/// Longest `spec.signalName` the CRD admits (`maxLength: 253`, counted in characters).
pub const SIGNAL_NAME_MAX_CHARS: usize = 253;

/// Longest event message kept in the `message` annotation (bytes).
pub const EVENT_MESSAGE_MAX: usize = 4096;

/// The kinds an Alertmanager label can name, with their apiVersion and whether they are cluster-scoped.
const ALERT_KINDS: &[(&str, &str, bool)] = &[
    ("Pod", "v1", false),
    ("Deployment", "apps/v1", false),
    ("StatefulSet", "apps/v1", false),
    ("DaemonSet", "apps/v1", false),
    ("ReplicaSet", "apps/v1", false),
    ("Job", "batch/v1", false),
    ("CronJob", "batch/v1", false),
    ("HorizontalPodAutoscaler", "autoscaling/v2", false),
    ("PersistentVolumeClaim", "v1", false),
    ("Node", "v1", true),
    ("PersistentVolume", "v1", true),
];

/// Event kinds without a namespace.
const EVENT_CLUSTER_SCOPED: &[&str] = &["Node", "PersistentVolume", "Namespace", "ClusterRole", "StorageClass"];

/// An `apiVersion` as a URL path segment pair may safely carry it: `version` or `group/version`,
/// the group a DNS-1123 subdomain and the version a DNS-1123 label. Written independently of the
/// gateway's own check on purpose.
pub fn api_version_is_well_formed(v: &str) -> bool {
    let (group, version) = match v.split_once('/') {
        Some((g, ver)) => (Some(g), ver),
        None => (None, v),
    };
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    group.is_none_or(|g| g.len() <= 253 && g.split('.').all(label)) && label(version)
}

/// The reasons of a `Skip` are machine-readable codes (they go into responses and logs), never
/// sender input.
pub fn check_skip(skip: &Skip) {
    let reason = skip.reason();
    assert!(
        !reason.is_empty() && reason.len() <= 64 && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "skip reason is not a code: {skip:?}"
    );
    assert!(matches!(skip.status(), "ignored" | "rejected"), "{skip:?}");
}

/// A resolved or parsed target names one object the API server could hold, and its fingerprint
/// is a stable 64-character lowercase hex string whose preimage `namespace:Kind:name` is
/// unambiguous.
pub fn check_target(target: &TargetResource) {
    assert!(is_valid_object_name(&target.name), "invalid target name: {target:?}");
    assert!(
        target.namespace.is_empty() || is_valid_namespace(&target.namespace),
        "invalid target namespace: {target:?}"
    );
    assert!(
        !target.kind.is_empty() && target.kind.len() <= 63 && target.kind.bytes().all(|b| b.is_ascii_alphanumeric()),
        "invalid target kind: {target:?}"
    );
    assert!(
        target.api_version.is_empty() || api_version_is_well_formed(&target.api_version),
        "invalid target apiVersion: {target:?}"
    );
    for part in [&target.namespace, &target.kind, &target.name] {
        assert!(
            !part.contains(':'),
            "':' makes the fingerprint preimage ambiguous: {target:?}"
        );
    }
    check_fingerprint(target);
}

/// `Fingerprint::of` is deterministic, well-formed, round-trips through `parse`, ignores the
/// apiVersion and depends on the cluster id.
pub fn check_fingerprint(target: &TargetResource) {
    let fp = Fingerprint::of("", target);
    assert_eq!(
        fp,
        Fingerprint::of("", &target.clone()),
        "fingerprint not deterministic"
    );
    let hex = fp.as_str();
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "fingerprint not 64 lowercase hex: {hex}"
    );
    assert_eq!(
        Fingerprint::parse(hex).as_ref(),
        Some(&fp),
        "fingerprint does not round-trip"
    );
    assert!(hex.starts_with(fp.short()) && fp.short().len() == 16);
    let mut other_version = target.clone();
    other_version.api_version = "x/v9".into();
    assert_eq!(
        fp,
        Fingerprint::of("", &other_version),
        "apiVersion entered the fingerprint"
    );
    let with_cluster = Fingerprint::of(CLUSTER_ID, target);
    assert_eq!(with_cluster, Fingerprint::of(CLUSTER_ID, target));
    assert_ne!(fp, with_cluster, "the cluster id did not enter the fingerprint");
}

/// What every parsed signal promises, whatever its source.
fn check_signal(signal: &Signal, source: Source) {
    assert_eq!(signal.source, source);
    assert!(
        !signal.name.is_empty() && signal.name.chars().count() <= SIGNAL_NAME_MAX_CHARS,
        "signal name does not fit spec.signalName (1..=253 characters): {} bytes",
        signal.name.len()
    );
    assert!(
        !signal.severity.is_empty() && signal.severity.chars().count() <= SEVERITY_MAX,
        "severity does not fit spec.severity (1..=50 characters): {:?}",
        signal.severity
    );
    assert!(
        signal.payload.len() <= ORIGINAL_PAYLOAD_MAX,
        "payload of {} bytes exceeds {ORIGINAL_PAYLOAD_MAX}",
        signal.payload.len()
    );
    assert!(!signal.payload.is_empty(), "empty original payload");
    check_target(&signal.target);
}

/// One Alertmanager body: the parser never panics, is deterministic, and every result keeps the
/// promises above.
pub fn check_alertmanager(body: &[u8]) {
    let first = alertmanager::parse(body);
    let second = alertmanager::parse(body);
    match (&first, &second) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.alerts, b.alerts, "parse is not deterministic");
            assert_eq!((a.truncated_alerts, &a.group_key), (b.truncated_alerts, &b.group_key));
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "parse is not deterministic"),
        _ => panic!("parse is not deterministic: {first:?} vs {second:?}"),
    }
    let batch = match first {
        Ok(batch) => batch,
        Err(e) => return check_parse_error(&e),
    };
    assert!(
        (1..=MAX_ALERTS_PER_REQUEST).contains(&batch.alerts.len()),
        "{} alerts accepted",
        batch.alerts.len()
    );
    // serde_json skips fields the webhook does not know without validating their bytes or
    // escapes, so an accepted body may not be strict JSON (harmless: nothing reads those fields).
    // The one-result-per-alert check needs the whole document, so it runs when it parses.
    let json: serde_json::Value =
        serde_json::from_str(&String::from_utf8_lossy(body)).unwrap_or(serde_json::Value::Null);
    if !json.is_null() {
        assert_eq!(
            json["alerts"].as_array().map(Vec::len),
            Some(batch.alerts.len()),
            "one result per alert, in order"
        );
    }
    for (i, item) in batch.alerts.iter().enumerate() {
        match item {
            Ok(signal) => {
                check_signal(signal, Source::Prometheus);
                let (_, api_version, cluster_scoped) = ALERT_KINDS
                    .iter()
                    .find(|(k, ..)| *k == signal.target.kind)
                    .unwrap_or_else(|| panic!("alerts[{i}]: unexpected kind {:?}", signal.target.kind));
                assert_eq!(signal.target.api_version, *api_version, "alerts[{i}]");
                assert_eq!(
                    signal.target.namespace.is_empty(),
                    *cluster_scoped,
                    "alerts[{i}]: namespace present exactly for namespaced kinds: {:?}",
                    signal.target
                );
                if !json.is_null() {
                    assert_eq!(json["alerts"][i]["status"], "firing", "alerts[{i}] became a signal");
                }
            }
            Err(skip) => check_skip(skip),
        }
    }
}

/// One Kubernetes Event body: as [`check_alertmanager`].
pub fn check_event(body: &[u8]) {
    let first = event::parse(body);
    assert_eq!(first, event::parse(body), "parse is not deterministic");
    let signal = match first {
        Err(e) => return check_parse_error(&e),
        Ok(Err(skip)) => return check_skip(&skip),
        Ok(Ok(signal)) => signal,
    };
    check_signal(&signal, Source::KubernetesEvent);
    assert_eq!(
        signal.target.namespace.is_empty(),
        EVENT_CLUSTER_SCOPED.contains(&signal.target.kind.as_str()),
        "namespace present exactly for namespaced kinds: {:?}",
        signal.target
    );
    assert!(
        ["warning", "error"].contains(&signal.severity.as_str()),
        "severity {}",
        signal.severity
    );
    if let Some(message) = signal.annotations.get("message") {
        assert!(message.len() <= EVENT_MESSAGE_MAX, "message of {} bytes", message.len());
    }
    assert!(
        String::from_utf8_lossy(body).starts_with(&*signal.payload),
        "the original payload is a prefix of the body"
    );
}

fn check_parse_error(e: &ParseError) {
    assert!(!e.0.is_empty(), "a parse error names the problem");
}
