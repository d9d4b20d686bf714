//! What fuzzing found, kept as tests, and every committed seed replayed through the same checks
//! the fuzz targets run (docs/fuzzing.md). The checks themselves live in `fuzz/src/` and are
//! included here, so `cargo test` and `cargo fuzz` judge an input identically.

#[allow(dead_code)]
#[path = "../fuzz/src/bytes.rs"]
mod bytes;
#[allow(dead_code)]
#[path = "../fuzz/src/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../fuzz/src/invariants.rs"]
mod invariants;
#[allow(dead_code)]
#[path = "../fuzz/src/resolution.rs"]
mod resolution;

use std::path::PathBuf;

/// The committed seeds of one fuzz target, by file name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn every_alertmanager_seed_keeps_the_parser_invariants() {
    for (name, data) in seeds("alertmanager") {
        eprintln!("seed {name}");
        invariants::check_alertmanager(&data);
    }
}

#[test]
fn every_event_seed_keeps_the_parser_invariants() {
    for (name, data) in seeds("event") {
        eprintln!("seed {name}");
        invariants::check_event(&data);
    }
}

#[tokio::test]
async fn every_owner_resolution_seed_keeps_the_resolver_invariants() {
    for (name, data) in seeds("target") {
        eprintln!("seed {name}");
        resolution::check_scenario(&resolution::Scenario::decode(&data)).await;
    }
}

#[tokio::test]
async fn every_http_seed_gets_a_contract_answer_and_exact_counts() {
    for (name, data) in seeds("http") {
        eprintln!("seed {name}");
        http::check_request(&http::Request::decode(&data)).await;
    }
}

#[test]
fn the_owner_resolution_seeds_decode_to_the_scenarios_their_names_promise() {
    let chain = resolution::Scenario::decode(&std::fs::read(seed_path("target", "pod-replicaset-deployment")).unwrap());
    assert_eq!(
        (chain.target.kind.as_str(), chain.target.name.as_str()),
        ("Pod", "api-0")
    );
    let kinds: Vec<&str> = chain.objects.iter().map(|(o, _)| o.kind.as_str()).collect();
    assert_eq!(kinds, ["Pod", "ReplicaSet", "Deployment"]);
}

fn seed_path(target: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
        .join(name)
}

// Finding 1 (event target): `involvedObject.apiVersion` / `regarding.apiVersion` was copied as
// sent; the Kubernetes backend builds the owner lookup's URL path from it. Minimised from
// fuzz/artifacts/event/crash-61c7bfca… (the mutator turned `apps/v1` into `apps.v1`).

/// A Warning event about Deployment shop/web with this apiVersion.
fn deployment_event(api_version: &str) -> String {
    serde_json::json!({
        "regarding": {"kind": "Deployment", "name": "web", "namespace": "shop", "apiVersion": api_version},
        "reason": "ProgressDeadlineExceeded", "type": "Warning"
    })
    .to_string()
}

#[test]
fn an_event_whose_api_version_is_no_group_version_is_rejected() {
    for api_version in [
        "apps.v1",
        "v1/../../secrets",
        "apps/v1?watch=1",
        "a/b/c",
        "V1",
        "/v1",
        "apps/",
    ] {
        let body = deployment_event(api_version);
        assert_eq!(
            signal_gateway::signal::event::parse(body.as_bytes()),
            Ok(Err(signal_gateway::signal::Skip::Rejected(
                "invalid_target_api_version".into()
            ))),
            "{api_version}"
        );
        invariants::check_event(body.as_bytes());
    }
    for api_version in [
        "",
        "v1",
        "apps/v1",
        "batch/v1",
        "autoscaling/v2",
        "kubernaut.ai/v1alpha1",
    ] {
        let body = deployment_event(api_version);
        let signal = signal_gateway::signal::event::parse(body.as_bytes()).unwrap().unwrap();
        assert_eq!(signal.target.api_version, api_version);
        invariants::check_event(body.as_bytes());
    }
}

// Finding 2 (target target): an ownerReference's name and apiVersion are only required to be
// non-empty by the API server, and the resolver made them the signal's target (its
// fingerprint, `spec.targetResource`, and the next owner lookup's URL). Seed
// fuzz/seeds/target/cross-namespace-hostile-owner.
#[tokio::test]
async fn an_owner_reference_that_names_no_valid_object_is_not_followed() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use signal_gateway::backend::embedded::EmbeddedStore;
    use signal_gateway::clock::SystemClock;
    use signal_gateway::cluster::Call;
    use signal_gateway::cluster::ObjectRef;
    use signal_gateway::crd::TargetResource;
    use signal_gateway::target::OwnerResolver;
    use std::sync::Arc;
    use std::time::Duration;

    let pod = |name: &str| TargetResource {
        kind: "Pod".into(),
        name: name.into(),
        namespace: "payments".into(),
        api_version: "v1".into(),
    };
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    for (pod_name, owner_name, owner_version) in [
        ("bad-name", "../etc", "apps/v1"),
        ("bad-version", "api-7d9f", "v1/../../secrets"),
        ("good", "api-7d9f", "apps/v1"),
    ] {
        store.put_object(
            ObjectRef {
                api_version: "v1".into(),
                kind: "Pod".into(),
                resource: String::new(),
                namespace: "payments".into(),
                name: pod_name.into(),
            },
            ObjectMeta {
                owner_references: Some(vec![OwnerReference {
                    api_version: owner_version.into(),
                    kind: "ReplicaSet".into(),
                    name: owner_name.into(),
                    controller: Some(true),
                    uid: "00000000-0000-4000-8000-000000000001".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        );
    }
    let resolver = OwnerResolver::new(store, true, 5, Duration::from_secs(30));
    assert_eq!(
        resolver.resolve(pod("bad-name"), Call::UNCOUNTED).await,
        Ok(pod("bad-name"))
    );
    assert_eq!(
        resolver.resolve(pod("bad-version"), Call::UNCOUNTED).await,
        Ok(pod("bad-version"))
    );
    let good = resolver.resolve(pod("good"), Call::UNCOUNTED).await.unwrap();
    assert_eq!(
        (good.kind.as_str(), good.name.as_str(), good.namespace.as_str()),
        ("ReplicaSet", "api-7d9f", "payments")
    );
    let seed = std::fs::read(seed_path("target", "cross-namespace-hostile-owner")).unwrap();
    resolution::check_scenario(&resolution::Scenario::decode(&seed)).await;
}

// Finding 3 (alertmanager target): the alert name became `spec.signalName` uncut, which the CRD
// bounds to 253 characters, so the API server would refuse the RR on every retry. Seed
// fuzz/seeds/alertmanager/long-alertname.json.
#[test]
fn an_alert_name_longer_than_the_crd_admits_is_cut_to_253_characters() {
    let name = format!("KubePodCrashLooping{}", "é".repeat(300));
    let body = serde_json::json!({"alerts": [{"status": "firing",
        "labels": {"alertname": name, "pod": "api-0", "namespace": "shop"}}]})
    .to_string();
    let batch = signal_gateway::signal::alertmanager::parse(body.as_bytes()).unwrap();
    let signal = batch.alerts[0].as_ref().unwrap();
    assert!(
        signal.name.len() <= 253 && name.starts_with(&signal.name),
        "{}",
        signal.name
    );
    assert_eq!(signal.labels["alertname"], name, "the label itself is kept whole");
    invariants::check_alertmanager(body.as_bytes());
}

#[test]
fn api_versions_are_checked_the_same_way_by_the_gateway_and_the_fuzz_oracle() {
    for v in [
        "",
        "v1",
        "apps/v1",
        "a.b/v1",
        "a..b/v1",
        ".a/v1",
        "a/",
        "/v1",
        "-a/v1",
        "a-/v1",
        "A/v1",
        "a/V1",
        "a/b/c",
        "a/v1-",
        "x/v1beta1",
    ] {
        assert_eq!(
            signal_gateway::signal::is_valid_api_version(v),
            invariants::api_version_is_well_formed(v),
            "{v:?}"
        );
    }
}
