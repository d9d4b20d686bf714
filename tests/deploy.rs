//! The kustomize overlays in deploy/ render, and the real API server accepts every object of both
//! (server-side apply, dry run): schema, admission and the CRD included.

mod common;

use std::process::Command;

use common::testenv::testenv;
use serde_json::Value;

/// `kubectl apply --server-side --dry-run=server -k deploy/overlays/<overlay> -o json`: the objects
/// as the API server would store them.
fn dry_run(overlay: &str) -> Vec<Value> {
    let env = testenv();
    let kubectl = env.repo.join("target/testenv/bin/kubectl");
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&env.admin_kubeconfig)
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-o",
            "json",
            "-k",
        ])
        .arg(env.repo.join("deploy/overlays").join(overlay))
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "server-side dry run of {overlay} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).expect("a JSON List");
    list["items"].as_array().expect("items").clone()
}

fn find<'a>(items: &'a [Value], kind: &str, name: &str) -> &'a Value {
    items
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

fn seconds(duration: &str) -> u64 {
    duration.trim_end_matches('s').parse().expect("a duration in seconds")
}

fn check_common(overlay: &str, items: &[Value]) -> Value {
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "FlowSchema",
        "PriorityLevelConfiguration",
    ] {
        assert!(items.iter().any(|o| o["kind"] == kind), "{overlay}: no {kind}");
    }
    assert_eq!(
        items.iter().filter(|o| o["kind"] == "Service").count(),
        2,
        "{overlay}: signals + metrics Services"
    );
    // Token reviews (every distinct token a stranger sends may cost one) have a priority level
    // of their own, chosen before the gateway's schema for its other requests.
    let (main, reviews) = (
        find(items, "FlowSchema", "signal-gateway"),
        find(items, "FlowSchema", "signal-gateway-reviews"),
    );
    assert_ne!(
        reviews["spec"]["priorityLevelConfiguration"]["name"], main["spec"]["priorityLevelConfiguration"]["name"],
        "{overlay}: reviews share the RR writes' priority level"
    );
    assert!(
        reviews["spec"]["matchingPrecedence"].as_u64() < main["spec"]["matchingPrecedence"].as_u64(),
        "{overlay}: the reviews' schema must match first"
    );
    let deployment = find(items, "Deployment", "signal-gateway").clone();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "signal-gateway");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}: non-root");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(env.contains(&("POD_NAME", "metadata.name")), "{overlay}: {env:?}");
    assert!(
        env.contains(&("POD_NAMESPACE", "metadata.namespace")),
        "{overlay}: {env:?}"
    );
    // The grace period outlasts the drain deadline in the mounted config, so leases are released.
    let config: Value = serde_saphyr::from_str(
        find(items, "ConfigMap", "signal-gateway")["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let drain = seconds(config["server"]["shutdownTimeout"].as_str().unwrap());
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > drain,
        "{overlay}: terminationGracePeriodSeconds {grace} <= shutdownTimeout {drain}s"
    );
    // The mounted config is one the gateway accepts (unknown keys are errors).
    let text = find(items, "ConfigMap", "signal-gateway")["data"]["config.yaml"]
        .as_str()
        .unwrap();
    if let Err(e) = signal_gateway::config::Config::from_yaml(text) {
        panic!("{overlay}: config.yaml rejected: {e:#}");
    }
    deployment
}

#[test]
fn the_dev_overlay_renders_and_the_api_server_accepts_it() {
    let items = dry_run("dev");
    let deployment = check_common("dev", &items);
    assert_eq!(deployment["spec"]["replicas"], 1);
}

#[test]
fn the_production_overlay_runs_three_spread_replicas_that_keep_two_through_disruptions() {
    let items = dry_run("production");
    let deployment = check_common("production", &items);
    assert_eq!(deployment["spec"]["replicas"], 3);
    let spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        .as_array()
        .expect("topology spread");
    assert!(spread.iter().any(|s| s["topologyKey"] == "kubernetes.io/hostname"));
    let resources = &deployment["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert!(resources["requests"]["cpu"].is_string() && resources["limits"]["memory"].is_string());
    let pdb = find(&items, "PodDisruptionBudget", "signal-gateway");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert!(pdb["spec"].get("maxUnavailable").is_none());
}

#[test]
fn the_monitoring_kustomization_renders_and_its_servicemonitor_selects_the_metrics_service() {
    let env = testenv();
    let out = Command::new(env.repo.join("target/testenv/bin/kubectl"))
        .arg("kustomize")
        .arg(env.repo.join("deploy/monitoring"))
        .output()
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for kind in ["kind: ServiceMonitor", "kind: PrometheusRule", "kind: ConfigMap"] {
        assert!(text.contains(kind), "deploy/monitoring lacks {kind}");
    }
    // The ServiceMonitor's selector matches the labels of the metrics Service in the base.
    let monitor: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(env.repo.join("deploy/monitoring/servicemonitor.yaml")).unwrap(),
    )
    .unwrap();
    let items = dry_run("dev");
    let service = find(&items, "Service", "signal-gateway-metrics");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&service["metadata"]["labels"][k], v, "label {k}");
    }
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port)
    );
}
