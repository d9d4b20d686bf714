//! A Kubernetes API request sent on a pooled connection that sat idle gets the whole
//! `backend.apiTimeout` for its answer, not what the idle time left of it. Against the real
//! testenv; its own test binary, because it pauses the shared etcd (nothing else may run meanwhile).
//!
//! The load test found it (storm at 1000/s, 2026-12-03): the client's read timeout counted from
//! when a connection went idle, so a request handed a connection idle for most of apiTimeout timed
//! out after the rest, and its signal got a 503 although the API server answered in time.

mod common;

use std::time::{Duration, Instant};

use common::testenv::{Replica, UndoOnDrop, admin, requests_for, testenv, testenv_cmd, unique};
use common::{count_of, fp_of_pod, pod_alert, webhook};

const API_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the connections sit idle before the slow request: most of apiTimeout, but less, so
/// they are still open (a connection whose read timeout fires while idle is dropped, and the next
/// request opens a new one).
const IDLE: Duration = Duration::from_millis(2_600);
/// How long etcd is paused, so the API server answers the request this late: well within
/// apiTimeout, and well beyond what IDLE leaves of it.
const SLOW: Duration = Duration::from_millis(1_200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_connection_idle_for_most_of_api_timeout_still_gets_all_of_it() {
    let config = format!(
        "logging:\n  format: json\nserver:\n  requestTimeout: 8s\nbackend:\n  apiTimeout: {}s\n",
        API_TIMEOUT.as_secs()
    );
    let replica = Replica::start(&format!("idle-{}", unique()), &config);
    let client = common::client();
    replica.wait_ready(&client).await;
    let ns = format!("shop-{}", unique());
    let send = |pod: &'static str| {
        let (client, url) = (client.clone(), format!("{}/api/v1/signals/prometheus", replica.base));
        let body = webhook(vec![pod_alert(&ns, pod)]);
        async move { client.post(url).json(&body).send().await.unwrap() }
    };
    // Several rounds: each opens or reuses the client's connections, then lets them idle.
    for round in 0..3 {
        let warm = send("warm").await;
        assert!(warm.status().is_success(), "round {round}: warm-up {}", warm.status());
        // The scenario itself (connections idle for IDLE), not a wait for something to happen.
        tokio::time::sleep(IDLE).await;

        testenv_cmd(&["pause-etcd"]);
        let guard = UndoOnDrop::on_panic("resume-etcd");
        let paused = Instant::now();
        let resume = tokio::spawn(async move {
            tokio::time::sleep(SLOW).await;
            tokio::task::spawn_blocking(|| testenv_cmd(&["resume-etcd"]))
                .await
                .unwrap();
        });
        let pod = ["slow-0", "slow-1", "slow-2"][round];
        let r = send(pod).await;
        let took = paused.elapsed();
        resume.await.unwrap();
        drop(guard);
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "round {round}: the API server answered within apiTimeout ({API_TIMEOUT:?}), yet {status} after {took:?}: {body}"
        );
        let rrs = requests_for(&admin().await, &testenv().namespace, &fp_of_pod(&ns, pod)).await;
        assert_eq!(rrs.len(), 1, "round {round}: {pod}");
        assert_eq!(count_of(&rrs[0]), 1, "round {round}: {pod}");
    }
}
