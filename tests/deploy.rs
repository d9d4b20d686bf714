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

/// What every overlay installs besides the namespace and the CRD.
const GATEWAY_KINDS: [&str; 11] = [
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
];

fn check_common(overlay: &str, items: &[Value]) -> Value {
    for kind in ["Namespace", "CustomResourceDefinition"] {
        assert!(items.iter().any(|o| o["kind"] == kind), "{overlay}: no {kind}");
    }
    assert_eq!(
        items.iter().filter(|o| o["kind"] == "Service").count(),
        2,
        "{overlay}: signals + metrics Services"
    );
    // The namespace enforces Pod Security `restricted` (the pod template meets it: check_gateway).
    let labels = &find(items, "Namespace", "signal-gateway")["metadata"]["labels"];
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted", "{overlay}");
    check_gateway(overlay, items)
}

/// The gateway's own objects: least-privilege pod, probes, downward-API identity, a config it
/// accepts and a grace period that outlasts its drain.
fn check_gateway(overlay: &str, items: &[Value]) -> Value {
    for kind in GATEWAY_KINDS {
        assert!(items.iter().any(|o| o["kind"] == kind), "{overlay}: no {kind}");
    }
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
    pod_template_is_admitted_as_restricted(overlay, &deployment);
    // The admin port (unauthenticated) admits only Prometheus; the signals port everyone.
    let policy = find(items, "NetworkPolicy", "signal-gateway");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let rule_for = |port: u64| {
        rules
            .iter()
            .find(|r| r["ports"].as_array().unwrap().iter().any(|p| p["port"] == port))
            .unwrap_or_else(|| panic!("{overlay}: no ingress rule for port {port}"))
    };
    assert!(
        rule_for(8080).get("from").is_none(),
        "{overlay}: senders come from anywhere"
    );
    let from = rule_for(9090)["from"].as_array().expect("the admin port has sources");
    assert!(
        !from.is_empty()
            && from
                .iter()
                .all(|f| f.get("podSelector").is_some() || f.get("ipBlock").is_some())
    );
    deployment
}

/// A Pod made from the Deployment's template, dry-run in a namespace enforcing Pod Security
/// `restricted`: the admission plugin of the real API server judges it.
fn pod_template_is_admitted_as_restricted(overlay: &str, deployment: &Value) {
    let env = testenv();
    let ns = format!("psa-{overlay}-{:08x}", fastrand::u32(..));
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = Command::new(env.repo.join("target/testenv/bin/kubectl"));
        cmd.arg("--kubeconfig").arg(&env.admin_kubeconfig).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl runs");
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let namespace = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                            "pod-security.kubernetes.io/enforce-version": "latest"}},
    });
    let out = kubectl(&["create", "-f", "-"], Some(&namespace.to_string()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let out = kubectl(&["-n", &ns, "create", "serviceaccount", account], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "from-template", "namespace": ns},
        "spec": deployment["spec"]["template"]["spec"],
    });
    let out = kubectl(&["create", "--dry-run=server", "-f", "-"], Some(&pod.to_string()));
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
    assert!(
        out.status.success(),
        "{overlay}: the pod template is refused under Pod Security restricted:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
fn the_production_overlay_serves_tls_takes_audience_bound_tokens_and_bounds_its_requests() {
    let items = dry_run("production");
    let deployment = find(&items, "Deployment", "signal-gateway");
    let config: signal_gateway::config::Config = signal_gateway::config::Config::from_yaml(
        find(&items, "ConfigMap", "signal-gateway")["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    // TLS on both ports, from a mounted kubernetes.io/tls Secret; probes speak HTTPS.
    let tls = config.server.tls.expect("server.tls");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| tls.cert_file.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the certificate's directory is mounted");
    assert!(tls.key_file.starts_with(mount["mountPath"].as_str().unwrap()));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let secret = volume["secret"]["secretName"].as_str().expect("from a Secret");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    // The optional cert-manager component issues exactly that Secret.
    let env = testenv();
    let out = Command::new(env.repo.join("target/testenv/bin/kubectl"))
        .arg("kustomize")
        .arg(env.repo.join("deploy/components/cert-manager"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let certificate: Value = serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(certificate["kind"], "Certificate");
    assert_eq!(certificate["spec"]["secretName"], secret);
    // Sender tokens are bound to the gateway's audience.
    assert_eq!(config.auth.audiences, ["signal-gateway"]);
    // What one sender can make it store is bounded.
    let quota = find(&items, "ResourceQuota", "signal-gateway");
    assert!(quota["spec"]["hard"]["count/remediationrequests.kubernaut.ai"].is_string());
}

#[test]
fn the_kubernaut_overlay_takes_the_old_gateways_place_and_leaves_the_crd_and_namespace_to_the_chart() {
    let ns = kubernaut_namespace();
    let items = dry_run("kubernaut");
    let deployment = check_gateway("kubernaut", &items);
    for kind in ["Namespace", "CustomResourceDefinition"] {
        assert!(!items.iter().any(|o| o["kind"] == kind), "the chart owns the {kind}");
    }
    for o in &items {
        if let Some(object_ns) = o["metadata"]["namespace"].as_str() {
            assert_eq!(object_ns, ns, "{} {}", o["kind"], o["metadata"]["name"]);
        }
    }
    // Where Alertmanager already sends: gateway-service, port names of Kubernaut's chart.
    let service = find(&items, "Service", "gateway-service");
    let ports: Vec<(String, u64)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        ports,
        vec![("http".into(), 8080), ("health".into(), 8081), ("metrics".into(), 9090)]
    );
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "gateway-service selects our pods ({k})");
    }
    assert_eq!(pod_labels["app"], "gateway");
    // Senders keep Kubernaut's RBAC: create on services/gateway-service, and the gateway checks it.
    let role = find(&items, "ClusterRole", "gateway-signal-source");
    assert_eq!(role["rules"][0]["resourceNames"][0], "gateway-service");
    assert_eq!(role["rules"][0]["verbs"][0], "create");
    let config: signal_gateway::config::Config = signal_gateway::config::Config::from_yaml(
        find(&items, "ConfigMap", "signal-gateway")["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let authz = &config.auth.authorization;
    assert_eq!(
        (authz.verb.as_str(), authz.resource.as_str(), authz.name.as_str()),
        ("create", "services", "gateway-service")
    );
    // The gateway's identity is the ServiceAccount in Kubernaut's namespace everywhere it is named.
    for (kind, name) in [
        ("RoleBinding", "signal-gateway"),
        ("ClusterRoleBinding", "signal-gateway-auth-delegator"),
        ("ClusterRoleBinding", "signal-gateway-owner-resolution"),
    ] {
        assert_eq!(
            find(&items, kind, name)["subjects"][0]["namespace"],
            ns,
            "{kind}/{name}"
        );
    }
    for schema in ["signal-gateway", "signal-gateway-reviews"] {
        assert_eq!(
            find(&items, "FlowSchema", schema)["spec"]["rules"][0]["subjects"][0]["serviceAccount"]["namespace"],
            ns,
            "{schema}"
        );
    }
    assert_eq!(deployment["spec"]["replicas"], 3);
}

/// Kubernaut's release namespace, as its chart made it (the CRD is installed, as the testenv has).
fn kubernaut_namespace() -> &'static str {
    let ns = "kubernaut-system";
    let exists = Command::new(testenv().repo.join("target/testenv/bin/kubectl"))
        .arg("--kubeconfig")
        .arg(&testenv().admin_kubeconfig)
        .args(["get", "namespace", ns])
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        common::testenv::kubectl(&["create", "namespace", ns]);
    }
    ns
}

#[test]
fn the_kubernaut_audit_component_binds_the_data_storage_client_role_and_points_the_trail_at_datastorage() {
    // The kubernaut overlay includes deploy/kubernaut (the component).
    let ns = kubernaut_namespace();
    let items = dry_run("kubernaut");
    let binding = find(&items, "RoleBinding", "signal-gateway-data-storage-client");
    assert_eq!(
        binding["metadata"]["namespace"], ns,
        "in Kubernaut's namespace, where DataStorage checks"
    );
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "data-storage-client");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], "signal-gateway");
    assert_eq!(binding["subjects"][0]["namespace"], ns);
    let deployment = find(&items, "Deployment", "signal-gateway");
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--audit-url=https://data-storage-service.kubernaut-system.svc.cluster.local:8080"),
        "{args:?}"
    );
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
