//! Installing our CRD over Kubernaut's, or Kubernaut's over ours, loses nothing; and requests an
//! older signal-gateway created under its own CRD are still counted into after the upgrade.
//! Kubernaut's CRD is built here from its schema facts (tests/fixtures/kubernaut/rr-schema.json).
//! This binary swaps the testenv's CRD, so it runs on its own (cargo runs test binaries one after
//! another) and leaves the CRD of deploy/crds installed.

mod common;

use common::contract::Orchestrator;
use common::testenv::{AdminOrchestrator, admin, raw_request, requests_for, start_replicas, storm, testenv, unique};
use common::{count_of, fp_of_pod, orchestrator_status};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};

const CONFIG: &str = "logging:\n  format: json\nserver:\n  requestTimeout: 20s\nbackend:\n  apiTimeout: 15s\n";

/// Kubernaut's RemediationRequest CRD as its schema facts describe it: every path with its type
/// and constraints, the selectable fields, printer columns and the status subresource.
fn kubernauts_crd() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kubernaut/rr-schema.json");
    let facts: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut root = json!({"type": "object", "properties": {}});
    for (path, fact) in facts["paths"].as_object().unwrap() {
        let node = node_at(&mut root, path);
        for (key, value) in fact.as_object().unwrap() {
            match key.as_str() {
                "cel" => {
                    let rules: Vec<Value> = value.as_array().unwrap().iter().map(|r| json!({"rule": r})).collect();
                    node.insert("x-kubernetes-validations".into(), Value::Array(rules));
                }
                _ => {
                    node.insert(key.clone(), value.clone());
                }
            }
        }
    }
    let selectable: Vec<Value> = facts["selectableFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| json!({"jsonPath": f}))
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "remediationrequests.kubernaut.ai"},
        "spec": {
            "group": "kubernaut.ai", "scope": "Namespaced",
            "names": {"kind": "RemediationRequest", "plural": "remediationrequests", "singular": "remediationrequest",
                      "listKind": "RemediationRequestList", "shortNames": ["rr"]},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "selectableFields": selectable,
                "additionalPrinterColumns": facts["printerColumns"],
                "schema": {"openAPIV3Schema": root},
            }],
        },
    })
}

/// The schema object at `path` (`.spec.a[].b{}` notation), created on the way.
fn node_at<'a>(root: &'a mut Value, path: &str) -> &'a mut Map<String, Value> {
    let mut node = root;
    let mut rest = path;
    while !rest.is_empty() {
        let (step, tail) = if let Some(t) = rest.strip_prefix("[]") {
            ("[]", t)
        } else if let Some(t) = rest.strip_prefix("{}") {
            ("{}", t)
        } else {
            let t = rest.strip_prefix('.').expect("paths are .name, [] or {} steps");
            let end = t.find(['.', '[', '{']).unwrap_or(t.len());
            (&t[..end], &t[end..])
        };
        node = match step {
            "[]" => node
                .as_object_mut()
                .unwrap()
                .entry("items")
                .or_insert_with(|| json!({})),
            "{}" => node
                .as_object_mut()
                .unwrap()
                .entry("additionalProperties")
                .or_insert_with(|| json!({})),
            name => node
                .as_object_mut()
                .unwrap()
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap()
                .entry(name)
                .or_insert_with(|| json!({})),
        };
        rest = tail;
    }
    node.as_object_mut().unwrap()
}

/// Applies a CRD (server-side, taking over the fields whoever applied before owned) and waits
/// until the API server serves it.
fn install(crd_json_or_yaml: &str, what: &str) {
    let file = testenv().repo.join(format!("target/testenv/crd-{}.yaml", unique()));
    std::fs::write(&file, crd_json_or_yaml).unwrap();
    common::testenv::kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager",
        "testenv-crd-swap",
        "-f",
        file.to_str().unwrap(),
    ]);
    common::testenv::kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/remediationrequests.kubernaut.ai",
    ]);
    let _ = std::fs::remove_file(file);
    eprintln!("installed {what}");
}

fn ours() -> String {
    std::fs::read_to_string(testenv().repo.join("deploy/crds/remediationrequests.kubernaut.ai.yaml")).unwrap()
}

/// The tests here install CRDs: one at a time.
static SWAP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Puts deploy/crds back however the test ends.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        install(&ours(), "our CRD (restored)");
    }
}

fn orchestrators_part(rr: &Value) -> Value {
    let mut status = rr["status"].clone();
    status.as_object_mut().unwrap().remove("deduplication");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_our_crd_and_kubernauts_either_way_loses_nothing_the_orchestrator_wrote() {
    let _one_at_a_time = SWAP.lock().await;
    let _restore = Restore;
    let gw_ns = testenv().namespace.clone();
    let admin = admin().await;
    let orchestrator = AdminOrchestrator(admin.clone());
    install(&kubernauts_crd().to_string(), "Kubernaut's CRD");
    let (replicas, client) = start_replicas(&format!("swap-{}", unique()), 3, CONFIG).await;
    let ns = format!("shop-{}", unique());
    let pod = ["api-0".to_owned()];

    // Under Kubernaut's CRD: the gateway's RR passes its validation.
    let first = storm(&replicas, &client, &ns, &pod, 1).await;
    assert_eq!(first[0].0, StatusCode::CREATED, "{:?}", first[0].1);
    let name = first[0].1["remediationRequestName"].as_str().unwrap().to_owned();
    orchestrator
        .patch_status(&gw_ns, &name, orchestrator_status())
        .await
        .unwrap();
    let written = orchestrators_part(&raw_request(&admin, &gw_ns, &name).await);
    assert_eq!(written, orchestrator_status());

    let mut expected = 1;
    for (crd, what) in [
        (ours(), "ours over Kubernaut's"),
        (kubernauts_crd().to_string(), "Kubernaut's over ours"),
    ] {
        install(&crd, what);
        // Pruning happens on write: make the gateway write, then look.
        let answers = storm(&replicas, &client, &ns, &pod, 20).await;
        assert!(
            answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED),
            "{what}: {answers:?}"
        );
        expected += 20;
        let rr = raw_request(&admin, &gw_ns, &name).await;
        assert_eq!(
            orchestrators_part(&rr),
            written,
            "{what}: every orchestrator field kept"
        );
        assert_eq!(rr["status"]["deduplication"]["occurrenceCount"], expected, "{what}");
        // And the orchestrator can still write every field under it.
        orchestrator
            .patch_status(&gw_ns, &name, json!({"message": format!("after {what}")}))
            .await
            .unwrap();
        orchestrator
            .patch_status(&gw_ns, &name, orchestrator_status())
            .await
            .unwrap();
    }
    let rrs = requests_for(&admin, &gw_ns, &fp_of_pod(&ns, "api-0")).await;
    assert_eq!(rrs.len(), 1);
    assert_eq!(count_of(&rrs[0]), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_an_older_gateway_created_are_counted_into_after_the_upgrade() {
    let _one_at_a_time = SWAP.lock().await;
    let _restore = Restore;
    let gw_ns = testenv().namespace.clone();
    let old_crd = std::fs::read_to_string(testenv().repo.join("tests/fixtures/signal-gateway-0.1-crd.yaml")).unwrap();
    install(&old_crd, "signal-gateway 0.1's CRD");
    let ns = format!("shop-{}", unique());
    let fp = fp_of_pod(&ns, "api-0");
    // What 0.1 wrote: its signalType and signalSource, no firingTime (it was optional).
    let old = json!({
        "apiVersion": "kubernaut.ai/v1alpha1", "kind": "RemediationRequest",
        "metadata": {"name": format!("rr-{}-1", &fp[..16]), "namespace": gw_ns,
                     "labels": {"app.kubernetes.io/managed-by": "signal-gateway"}},
        "spec": {"signalFingerprint": fp, "signalName": "KubePodCrashLooping", "severity": "critical",
                 "signalType": "prometheus-alert", "signalSource": "signal-gateway", "targetType": "kubernetes",
                 "targetResource": {"kind": "Pod", "name": "api-0", "namespace": ns, "apiVersion": "v1"},
                 "receivedTime": "2026-11-24T10:00:00Z"},
    });
    let file = testenv().repo.join(format!("target/testenv/old-rr-{}.json", unique()));
    std::fs::write(&file, old.to_string()).unwrap();
    common::testenv::kubectl(&["create", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(file);
    install(&ours(), "our CRD (the upgrade)");

    let (replicas, client) = start_replicas(&format!("upgrade-{}", unique()), 3, CONFIG).await;
    let admin = admin().await;
    let answers = storm(&replicas, &client, &ns, &["api-0".to_owned()], 10).await;
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED),
        "counted into the older RR: {answers:?}"
    );
    let rrs = requests_for(&admin, &gw_ns, &fp).await;
    assert_eq!(rrs.len(), 1, "no second RR for the incident the older gateway opened");
    assert_eq!(count_of(&rrs[0]), 10, "every acknowledged signal counted");
}
