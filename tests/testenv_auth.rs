//! `auth.mode: kubernetes` against the real kube-apiserver: ServiceAccount tokens checked with
//! TokenReview, permission with SubjectAccessReview (deploy/rbac/auth.yaml), the verdict cached
//! so a storm with one token costs one review pair. (The review API down -> 503 is in
//! tests/testenv_outage.rs, which owns stopping the API server.)

mod common;

use common::testenv::{Replica, sender, unique};
use common::{pod_alert, webhook};
use reqwest::StatusCode;

const CONFIG: &str = "auth:\n  mode: kubernetes\n  cacheTTL: 60s\nbackend:\n  apiTimeout: 15s\n";

async fn send(client: &reqwest::Client, replica: &Replica, token: Option<&str>) -> reqwest::Response {
    send_about(client, replica, token, "auth-tests").await
}

async fn send_about(client: &reqwest::Client, replica: &Replica, token: Option<&str>, ns: &str) -> reqwest::Response {
    let mut req = client
        .post(format!("{}/api/v1/signals/prometheus", replica.base))
        .json(&webhook(vec![pod_alert(ns, "web-1")]));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn assert_problem(resp: reqwest::Response, status: StatusCode) {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_reviewed_and_authorized_by_the_api_server() {
    let replica = Replica::start(&format!("auth-{}", unique()), CONFIG);
    let client = common::client();
    replica.wait_ready(&client).await;
    let (allowed, denied) = (sender(true), sender(false));

    let ok = send_about(&client, &replica, Some(&allowed), &format!("auth-{}", unique())).await;
    assert_eq!(ok.status(), StatusCode::CREATED);
    assert_problem(send(&client, &replica, None).await, StatusCode::UNAUTHORIZED).await;
    assert_problem(
        send(&client, &replica, Some("not-a-token")).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // A real token whose signature the API server cannot verify: one character of the signature
    // changed. Not the last one: a base64url signature's last character carries padding bits, so
    // some replacements there decode to the same signature.
    let i = allowed.len() - 10;
    let swapped = if &allowed[i..=i] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &allowed[..i], &allowed[i + 1..]);
    assert_ne!(forged, allowed);
    assert_problem(send(&client, &replica, Some(&forged)).await, StatusCode::UNAUTHORIZED).await;
    let forbidden = send(&client, &replica, Some(&denied)).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = forbidden.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains(":alertmanager"),
        "names the user it refused: {body}"
    );
    for (result, n) in [("allowed", 1.0), ("unauthenticated", 3.0), ("forbidden", 1.0)] {
        assert_eq!(
            replica
                .metric(
                    &client,
                    "gateway_auth_requests_total",
                    &[&format!("result=\"{result}\"")]
                )
                .await,
            n,
            "{result}"
        );
    }
    let log = replica.log_text();
    assert!(
        !log.contains(&allowed) && !log.contains(&denied),
        "tokens are never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_with_one_token_costs_one_token_review_per_ttl() {
    let replica = Replica::start(&format!("auth-storm-{}", unique()), CONFIG);
    let client = common::client();
    replica.wait_ready(&client).await;
    let token = sender(true);
    let reviews = |resource: &'static str| {
        let (client, replica) = (&client, &replica);
        async move {
            replica
                .metric(
                    client,
                    "gateway_k8s_api_requests_total",
                    &["verb=\"create\"", &format!("resource=\"{resource}\"")],
                )
                .await
        }
    };
    let (tokens_before, access_before) = (reviews("tokenreviews").await, reviews("subjectaccessreviews").await);
    let ns = format!("auth-storm-{}", unique());
    let answers = futures::future::join_all((0..200).map(|_| send_about(&client, &replica, Some(&token), &ns))).await;
    for a in &answers {
        assert!(a.status().is_success(), "{}", a.status());
    }
    assert_eq!(
        reviews("tokenreviews").await - tokens_before,
        1.0,
        "200 requests with one token: one TokenReview"
    );
    assert_eq!(reviews("subjectaccessreviews").await - access_before, 1.0);
    assert!(
        replica
            .metric(&client, "gateway_auth_cache_lookups_total", &["result=\"hit\""])
            .await
            >= 199.0
    );
}

/// A ServiceAccount in a fresh namespace, authorized the way Kubernaut's chart authorizes its
/// senders: the ClusterRole `gateway-signal-source` (`create` on the Service `gateway-service`),
/// bound to it in the gateway's namespace. Returns a token for `audience` (None: the API server's).
fn kubernaut_sender(audience: Option<&str>) -> String {
    use common::testenv::{kubectl, testenv};
    let ns = format!("kubernaut-senders-{}", unique());
    kubectl(&["create", "namespace", &ns]);
    kubectl(&["-n", &ns, "create", "serviceaccount", "alertmanager"]);
    let role = format!("gateway-signal-source-{}", unique());
    kubectl(&[
        "create",
        "clusterrole",
        &role,
        "--verb=create",
        "--resource=services",
        "--resource-name=gateway-service",
    ]);
    kubectl(&[
        "-n",
        &testenv().namespace,
        "create",
        "rolebinding",
        &format!("{ns}-signal-source"),
        "--clusterrole",
        &role,
        "--serviceaccount",
        &format!("{ns}:alertmanager"),
    ]);
    let mut args = vec!["-n", ns.as_str(), "create", "token", "alertmanager", "--duration", "1h"];
    if let Some(a) = audience {
        args.extend(["--audience", a]);
    }
    kubectl(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_authorized_as_kubernaut_authorizes_them_are_let_in_by_default() {
    let replica = Replica::start(&format!("auth-kubernaut-{}", unique()), CONFIG);
    let client = common::client();
    replica.wait_ready(&client).await;
    let token = kubernaut_sender(None);
    let resp = send_about(&client, &replica, Some(&token), &format!("auth-{}", unique())).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "create on services/gateway-service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_audiences_configured_only_tokens_bound_to_them_are_accepted() {
    let config =
        "auth:\n  mode: kubernetes\n  cacheTTL: 60s\n  audiences: [signal-gateway]\nbackend:\n  apiTimeout: 15s\n";
    let replica = Replica::start(&format!("auth-audience-{}", unique()), config);
    let client = common::client();
    replica.wait_ready(&client).await;
    let bound = kubernaut_sender(Some("signal-gateway"));
    let ns = format!("auth-{}", unique());
    assert_eq!(
        send_about(&client, &replica, Some(&bound), &ns).await.status(),
        StatusCode::CREATED
    );
    // A token for the API server (what a pod's default ServiceAccount token is) is not for us.
    let general = kubernaut_sender(None);
    assert_problem(
        send_about(&client, &replica, Some(&general), &ns).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let other = kubernaut_sender(Some("vault"));
    assert_problem(
        send_about(&client, &replica, Some(&other), &ns).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}
