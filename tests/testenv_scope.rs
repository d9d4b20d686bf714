//! `scope.requireManagedLabel` against the real kube-apiserver: an object that opts out with
//! `kubernaut.ai/managed=false` in a managed namespace stays out however a sender names its kind
//! (an unserved apiVersion, another letter case, a kind whose plural is not `kind + "s"`), and a
//! target whose label the gateway may not read is not judged by its namespace.

mod common;

use common::testenv::{Replica, kubectl, unique};
use reqwest::StatusCode;
use serde_json::{Value, json};

const CONFIG: &str = "scope:\n  requireManagedLabel: true\nbackend:\n  apiTimeout: 15s\n";

async fn event(client: &reqwest::Client, replica: &Replica, ns: &str, object: Value) -> (StatusCode, Value) {
    let mut involved = object;
    involved["namespace"] = json!(ns);
    let resp = client
        .post(format!("{}/api/v1/signals/kubernetes-event", replica.base))
        .json(&json!({
            "type": "Warning", "reason": "BackOff", "message": "failing",
            "involvedObject": involved,
        }))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_out_objects_stay_out_however_senders_name_their_kind() {
    let u = unique();
    let ns = format!("scope-{u}");
    kubectl(&["create", "namespace", &ns]);
    kubectl(&["label", "namespace", &ns, "kubernaut.ai/managed=true"]);
    kubectl(&[
        "-n",
        &ns,
        "create",
        "deployment",
        "payments",
        "--image=registry.invalid/app",
    ]);
    kubectl(&[
        "-n",
        &ns,
        "label",
        "deployment",
        "payments",
        "kubernaut.ai/managed=false",
    ]);
    for ingress in ["edge", "open"] {
        kubectl(&["-n", &ns, "create", "ingress", ingress, "--rule=shop.example/=web:80"]);
    }
    kubectl(&["-n", &ns, "label", "ingress", "edge", "kubernaut.ai/managed=false"]);
    kubectl(&["-n", &ns, "create", "service", "clusterip", "hidden", "--tcp=80:80"]);
    kubectl(&["-n", &ns, "label", "service", "hidden", "kubernaut.ai/managed=false"]);

    let replica = Replica::start(&format!("scope-{u}"), CONFIG);
    let client = common::client();
    replica.wait_ready(&client).await;

    // The Deployment opted out: refused whatever apiVersion or spelling the sender used.
    for (api_version, kind) in [
        ("apps/v1", "Deployment"),
        ("apps/v1beta2", "Deployment"),
        ("apps/v1", "deployment"),
        ("", "DEPLOYMENT"),
    ] {
        let (status, body) = event(
            &client,
            &replica,
            &ns,
            json!({"apiVersion": api_version, "kind": kind, "name": "payments"}),
        )
        .await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::OK, Some("unmanaged_resource")),
            "{api_version} {kind}: {body}"
        );
    }
    // The gateway may not read Services (deploy/rbac): the label is unknown, so the Service is not
    // taken for managed by its namespace.
    let (status, body) = event(&client, &replica, &ns, json!({"kind": "Service", "name": "hidden"})).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::OK, Some("unmanaged_resource")),
        "{body}"
    );

    // Ingresses are served as `ingresses`, not `ingresss`: once the gateway may read them, the
    // opted-out one is refused and the unlabelled one is managed by its namespace.
    let role = format!("scope-test-ingresses-{u}");
    common::testenv::grant_to_gateway(&role, "get", "ingresses.networking.k8s.io");
    let (status, body) = common::eventually(std::time::Duration::from_secs(30), "RBAC took effect", || {
        let (client, replica, ns) = (&client, &replica, &ns);
        async move {
            let (s, b) = event(
                client,
                replica,
                ns,
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "name": "open"}),
            )
            .await;
            (s == StatusCode::CREATED).then_some((s, b))
        }
    })
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = event(
        &client,
        &replica,
        &ns,
        json!({"apiVersion": "networking.k8s.io/v1beta1", "kind": "Ingress", "name": "edge"}),
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::OK, Some("unmanaged_resource")),
        "{body}"
    );
    common::testenv::revoke(&role);
}
