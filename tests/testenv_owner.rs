//! The owner cache (`ownerResolution.metadataCache`) against the real kube-apiserver: once its
//! ReplicaSet watch has synced, a Pod -> ReplicaSet -> Deployment chain resolves without a single
//! ReplicaSet read (counted in `gateway_k8s_api_requests_total`); a ReplicaSet created later
//! arrives through the watch; a deleted one leaves the cache and is read fresh (gone: the climb
//! ends there). The testenv runs no controllers, so the test writes the ReplicaSet and Pods a
//! Deployment controller would, ownerReferences included.

mod common;

use std::time::Duration;

use common::testenv::{Replica, kubectl, replicaset_manifest, unique};
use reqwest::StatusCode;
use serde_json::{Value, json};
use signal_gateway::crd::TargetResource;
use signal_gateway::fingerprint::Fingerprint;

const CONFIG: &str = "backend:\n  apiTimeout: 15s\n";

/// The first test restarts the API server: the tests of this binary take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PODS: usize = 5;

/// Creates `object` (JSON) with kubectl as the testenv admin; returns its uid.
fn create(object: Value) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testenv/replicas");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("object-{}.json", unique()));
    std::fs::write(&file, object.to_string()).unwrap();
    kubectl(&["create", "-f", file.to_str().unwrap(), "-o", "jsonpath={.metadata.uid}"])
}

fn owner(api_version: &str, kind: &str, name: &str, uid: &str) -> Value {
    json!([{"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": true}])
}

/// The ReplicaSet `rs` of Deployment `deployment` (uid `uid`) and `PODS` Pods of it, as the
/// Deployment and ReplicaSet controllers would write them.
fn replicaset_with_pods(ns: &str, deployment: &str, uid: &str, rs: &str) {
    let rs_uid = create(replicaset_manifest(
        ns,
        rs,
        owner("apps/v1", "Deployment", deployment, uid),
    ));
    for i in 0..PODS {
        create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("{rs}-{i}"), "namespace": ns, "labels": {"app": rs},
                "ownerReferences": owner("apps/v1", "ReplicaSet", rs, &rs_uid)
            },
            "spec": {
                "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "registry.invalid/app"}]
            }
        }));
    }
}

/// A namespace with the Deployment `api`, its ReplicaSet `api-<rs>` and its Pods.
fn workload(ns: &str, rs: &str) -> String {
    kubectl(&["create", "namespace", ns]);
    // No controller makes the namespace's default ServiceAccount here; Pods need it.
    kubectl(&["-n", ns, "create", "serviceaccount", "default"]);
    let uid = kubectl(&[
        "-n",
        ns,
        "create",
        "deployment",
        "api",
        "--image=registry.invalid/app",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    replicaset_with_pods(ns, "api", &uid, rs);
    uid
}

fn fingerprint(ns: &str, kind: &str, name: &str, api_version: &str) -> String {
    Fingerprint::of(
        "",
        &TargetResource {
            kind: kind.into(),
            name: name.into(),
            namespace: ns.into(),
            api_version: api_version.into(),
        },
    )
    .to_string()
}

/// Sends one alert about each Pod of `rs`, twice; returns the fingerprints answered.
async fn alert_every_pod_twice(client: &reqwest::Client, replica: &Replica, ns: &str, rs: &str) -> Vec<String> {
    let mut fingerprints = Vec::new();
    for _ in 0..2 {
        for i in 0..PODS {
            let resp = client
                .post(format!("{}/api/v1/signals/prometheus", replica.base))
                .json(&common::webhook(vec![common::pod_alert(ns, &format!("{rs}-{i}"))]))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap();
            assert!(
                status == StatusCode::CREATED || status == StatusCode::ACCEPTED,
                "{status}: {body}"
            );
            fingerprints.push(body["fingerprint"].as_str().unwrap().to_owned());
        }
    }
    fingerprints
}

async fn gets(client: &reqwest::Client, replica: &Replica, resource: &str) -> f64 {
    replica
        .metric(
            client,
            "gateway_k8s_api_requests_total",
            &["verb=\"get\"", &format!("resource=\"{resource}\"")],
        )
        .await
}

async fn gauge(client: &reqwest::Client, replica: &Replica, name: &str, kind: &str) -> f64 {
    replica.metric(client, name, &[&format!("kind=\"{kind}\"")]).await
}

async fn wait_synced(client: &reqwest::Client, replica: &Replica, kind: &str) {
    common::eventually(Duration::from_secs(30), "the owner cache's watch synced", || async {
        (gauge(client, replica, "gateway_owner_cache_synced", kind).await == 1.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicaset_deployment_chain_resolves_without_replicaset_reads_once_the_watch_synced() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let u = unique();
    let ns = format!("owner-{u}");
    let deployment_uid = workload(&ns, "api-6f7d");
    let deployment_fp = fingerprint(&ns, "Deployment", "api", "apps/v1");

    // Without the cache (the behaviour before it): each Pod read once, the ReplicaSet once (TTL).
    let client = reqwest::Client::new();
    let before = Replica::start(
        &format!("owner-off-{u}"),
        &format!("{CONFIG}ownerResolution:\n  metadataCache:\n    enabled: false\n"),
    );
    before.wait_ready(&client).await;
    let fps = alert_every_pod_twice(&client, &before, &ns, "api-6f7d").await;
    assert!(fps.iter().all(|f| *f == deployment_fp), "{fps:?}");
    let (rs_off, pods_off) = (
        gets(&client, &before, "replicasets").await,
        gets(&client, &before, "pods").await,
    );
    assert!(rs_off >= 1.0, "without the cache the ReplicaSet is read");
    drop(before);

    // With it (the default): after the ReplicaSet watch synced, no ReplicaSet read at all.
    let replica = Replica::start(&format!("owner-on-{u}"), CONFIG);
    replica.wait_ready(&client).await;
    wait_synced(&client, &replica, "ReplicaSet").await;
    let fps = alert_every_pod_twice(&client, &replica, &ns, "api-6f7d").await;
    assert!(fps.iter().all(|f| *f == deployment_fp), "{fps:?}");
    let (rs_on, pods_on) = (
        gets(&client, &replica, "replicasets").await + 0.0, // a sum of nothing is -0
        gets(&client, &replica, "pods").await,
    );
    assert_eq!(rs_on, 0.0, "the synced watch answered every ReplicaSet owner");
    let hits = replica
        .metric(&client, "gateway_owner_cache_lookups_total", &["result=\"hit\""])
        .await;
    assert!(hits >= (2 * PODS) as f64, "{hits} hits");
    eprintln!(
        "owner GETs for {} signals: without the cache {rs_off} replicasets + {pods_off} pods; with it {rs_on} replicasets + {pods_on} pods",
        2 * PODS
    );

    // A ReplicaSet created after the sync (a rollout) arrives through the watch: no read either.
    let held = gauge(&client, &replica, "gateway_owner_cache_objects", "ReplicaSet").await;
    replicaset_with_pods(&ns, "api", &deployment_uid, "api-88b2");
    common::eventually(Duration::from_secs(30), "the new ReplicaSet delivered", || async {
        (gauge(&client, &replica, "gateway_owner_cache_objects", "ReplicaSet").await > held).then_some(())
    })
    .await;
    let fps = alert_every_pod_twice(&client, &replica, &ns, "api-88b2").await;
    assert!(fps.iter().all(|f| *f == deployment_fp), "{fps:?}");
    assert_eq!(gets(&client, &replica, "replicasets").await, 0.0);

    // A deleted ReplicaSet leaves the cache; its Pods' next signals read it fresh: gone, so the
    // climb ends at the ReplicaSet the Pod names (its own incident), never at a remembered owner.
    let held = gauge(&client, &replica, "gateway_owner_cache_objects", "ReplicaSet").await;
    kubectl(&["-n", &ns, "delete", "replicaset", "api-88b2"]);
    common::eventually(Duration::from_secs(30), "the deletion delivered", || async {
        (gauge(&client, &replica, "gateway_owner_cache_objects", "ReplicaSet").await < held).then_some(())
    })
    .await;
    let fps = alert_every_pod_twice(&client, &replica, &ns, "api-88b2").await;
    let rs_fp = fingerprint(&ns, "ReplicaSet", "api-88b2", "apps/v1");
    assert!(fps.iter().all(|f| *f == rs_fp), "{fps:?}");
    assert!(gets(&client, &replica, "replicasets").await >= 1.0, "the miss was read");
    let misses = replica
        .metric(&client, "gateway_owner_cache_lookups_total", &["result=\"miss_read\""])
        .await;
    assert!(misses >= 1.0, "{misses}");
    let bytes = replica.metric(&client, "gateway_owner_cache_bytes", &[]).await;
    let objects = replica.metric(&client, "gateway_owner_cache_objects", &[]).await;
    eprintln!("owner cache: {objects} objects in {bytes} bytes");
    assert!(bytes > 0.0 && objects > 0.0);

    // The API server restarts. The watch fails, and once the server is back it lists again and
    // answers without reads again — with no change in the cluster to wake it.
    let relists = gauge(
        &client,
        &replica,
        "gateway_owner_cache_watch_relists_total",
        "ReplicaSet",
    )
    .await;
    common::testenv::testenv_cmd(&["stop-apiserver"]);
    common::eventually(Duration::from_secs(60), "the watch failed", || async {
        (gauge(&client, &replica, "gateway_owner_cache_synced", "ReplicaSet").await == 0.0).then_some(())
    })
    .await;
    common::testenv::testenv_cmd(&["start-apiserver"]);
    common::eventually(Duration::from_secs(90), "the watch listed again", || async {
        let synced = gauge(&client, &replica, "gateway_owner_cache_synced", "ReplicaSet").await == 1.0;
        let again = gauge(
            &client,
            &replica,
            "gateway_owner_cache_watch_relists_total",
            "ReplicaSet",
        )
        .await
            > relists;
        (synced && again).then_some(())
    })
    .await;
    assert!(
        gauge(
            &client,
            &replica,
            "gateway_owner_cache_watch_errors_total",
            "ReplicaSet"
        )
        .await
            >= 1.0
    );
    replica.wait_ready(&client).await;
    let rs_reads = gets(&client, &replica, "replicasets").await;
    let fps = alert_every_pod_twice(&client, &replica, &ns, "api-6f7d").await;
    assert!(fps.iter().all(|f| *f == deployment_fp), "{fps:?}");
    assert_eq!(
        gets(&client, &replica, "replicasets").await,
        rs_reads,
        "answered by the relisted watch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pods_watched_a_signal_costs_no_owner_read_at_all() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let u = unique();
    let ns = format!("owner-pods-{u}");
    workload(&ns, "api-41c9");
    // deploy/rbac grants get only on pods; metadataCache.pods needs list and watch.
    let role = format!("owner-test-pods-{u}");
    common::testenv::grant_to_gateway(&role, "list,watch", "pods");
    let client = reqwest::Client::new();
    let replica = Replica::start(
        &format!("owner-pods-{u}"),
        &format!("{CONFIG}ownerResolution:\n  metadataCache:\n    pods: true\n"),
    );
    replica.wait_ready(&client).await;
    wait_synced(&client, &replica, "ReplicaSet").await;
    wait_synced(&client, &replica, "Pod").await;
    let fps = alert_every_pod_twice(&client, &replica, &ns, "api-41c9").await;
    let deployment_fp = fingerprint(&ns, "Deployment", "api", "apps/v1");
    assert!(fps.iter().all(|f| *f == deployment_fp), "{fps:?}");
    let owner_gets = gets(&client, &replica, "pods").await + gets(&client, &replica, "replicasets").await + 0.0;
    assert_eq!(owner_gets, 0.0, "Pods and ReplicaSets answered by their watches");
    eprintln!("owner GETs for {} signals with pods watched: {owner_gets}", 2 * PODS);
    common::testenv::revoke(&role);
}
