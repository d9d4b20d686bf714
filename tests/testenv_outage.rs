//! An API-server outage against the real testenv (its own test binary: it stops the shared
//! kube-apiserver, so nothing else may run meanwhile).

mod common;

use std::time::{Duration, Instant};

use common::testenv::{Replica, UndoOnDrop, admin, requests_for, sender, testenv, testenv_cmd, unique};
use common::{count_of, eventually, fp_of_pod, pod_alert, webhook};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_means_fast_503s_and_unready_then_recovery_without_restart_and_no_lost_ack() {
    let config = "logging:\n  format: json\nserver:\n  requestTimeout: 3s\nbackend:\n  apiTimeout: 1s\n";
    let replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start(&format!("outage-{}-{i}", unique()), config))
        .collect();
    // One more replica authenticating senders with TokenReview (auth.mode: kubernetes).
    let authenticating = Replica::start(
        &format!("outage-auth-{}", unique()),
        &format!(
            "auth:\n  mode: kubernetes\n{}",
            config.replace("logging:\n  format: json\n", "")
        ),
    );
    let client = common::client();
    for r in replicas.iter().chain([&authenticating]) {
        r.wait_ready(&client).await;
    }
    let token = sender(true);
    let authenticated = |ns: &str| {
        client
            .post(format!("{}/api/v1/signals/prometheus", authenticating.base))
            .bearer_auth(&token)
            .json(&webhook(vec![pod_alert(ns, "web")]))
            .send()
    };
    let auth_ns = format!("shop-auth-{}", unique());
    let ns = format!("shop-{}", unique());
    let pods = ["a", "b", "c", "d"];
    let mut acked = 0usize;
    let send = |i: usize| {
        let (client, url) = (
            client.clone(),
            format!("{}/api/v1/signals/prometheus", replicas[i % 3].base),
        );
        let body = webhook(vec![pod_alert(&ns, pods[i % pods.len()])]);
        async move { client.post(url).json(&body).send().await.unwrap() }
    };
    for i in 0..12 {
        assert!(send(i).await.status().is_success());
        acked += 1;
    }

    testenv_cmd(&["stop-apiserver"]);
    let guard = UndoOnDrop::on_panic("start-apiserver");
    // The token was never reviewed: with the review API down the answer is 503, not 401.
    let r = authenticated(&auth_ns).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "TokenReview unreachable");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let started = Instant::now();
    let answers = futures::future::join_all((0..12).map(send)).await;
    for r in &answers {
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "no 2xx while the API server is down"
        );
        assert!(r.headers().contains_key("retry-after"));
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered within the deadline, no hang: {:?}",
        started.elapsed()
    );
    for r in &replicas {
        eventually(Duration::from_secs(10), "readyz turns false", || async {
            (r.readyz(&client).await?.0 == 503).then_some(())
        })
        .await;
    }

    testenv_cmd(&["start-apiserver"]);
    drop(guard);
    for r in &replicas {
        eventually(Duration::from_secs(60), "readyz recovers", || async {
            (r.readyz(&client).await?.0 == 200).then_some(())
        })
        .await;
    }
    for i in 0..12 {
        let r = send(i).await;
        assert!(r.status().is_success(), "after recovery: {}", r.status());
        acked += 1;
    }
    eventually(
        Duration::from_secs(10),
        "the token is accepted after recovery",
        || async { authenticated(&auth_ns).await.ok()?.status().is_success().then_some(()) },
    )
    .await;
    assert!(
        authenticating
            .metric(&client, "gateway_auth_requests_total", &["result=\"error\""])
            .await
            >= 1.0
    );
    let admin = admin().await;
    let mut stored = 0;
    for pod in pods {
        let fp = fp_of_pod(&ns, pod);
        let rrs = requests_for(&admin, &testenv().namespace, &fp).await;
        assert_eq!(rrs.len(), 1, "{pod}");
        stored += count_of(&rrs[0]);
    }
    assert_eq!(stored as usize, acked, "sum of counts == number of 2xx answers");
}
