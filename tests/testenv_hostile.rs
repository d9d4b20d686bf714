//! Hostile input against a replica process on the real kube-apiserver: 100 000 distinct bogus
//! tokens, invented kinds and sockets. Each bound a sender can drive holds: API requests stay
//! within their budget, metric series do not grow, the replica's memory stays within its
//! configured bounds, and a genuine sender is still served. The figures each run measured are
//! printed (`--nocapture`); what is asserted are the bounds, never a speed.

mod common;

use std::time::{Duration, Instant};

use common::testenv::{Replica, sender, unique};
use common::{pod_alert, webhook};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;

const MIB: u64 = 1024 * 1024;

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    common::rss_bytes(Some(pid))
}

/// Metric series of the gateway (`gateway_*` sample names with their labels) on /metrics.
async fn series(client: &reqwest::Client, replica: &Replica) -> std::collections::BTreeSet<String> {
    replica
        .metrics_text(client)
        .await
        .lines()
        .filter(|l| l.starts_with("gateway_"))
        .filter_map(|l| l.rsplit_once(' ').map(|(name, _)| name.to_owned()))
        .collect()
}

/// Series present after a flood that were not before it, except those of the replica's own
/// periodic work (the lease sweep's list, the RemediationRequest watch), which may make their
/// first request meanwhile.
fn new_series(before: &std::collections::BTreeSet<String>, after: &std::collections::BTreeSet<String>) -> Vec<String> {
    after
        .difference(before)
        .filter(|s| !(s.contains("resource=\"leases\",verb=\"list\"") || s.contains("verb=\"watch\"")))
        .cloned()
        .collect()
}

/// Sends `requests` with at most `concurrency` in flight; the status of each (None: no answer).
async fn flood<F>(requests: impl Iterator<Item = F>, concurrency: usize) -> Vec<Option<StatusCode>>
where
    F: std::future::Future<Output = Result<reqwest::Response, reqwest::Error>>,
{
    futures::stream::iter(requests)
        .buffer_unordered(concurrency)
        .map(|r| r.ok().map(|r| r.status()))
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_bogus_tokens_costs_bounded_reviews_series_and_memory() {
    let config = "auth:\n  mode: kubernetes\n  reviewRate: 20\n  reviewBurst: 40\nbackend:\n  apiTimeout: 15s\n";
    let replica = Replica::start(&format!("hostile-tokens-{}", unique()), config);
    let client = common::client();
    replica.wait_ready(&client).await;
    let good = sender(true);
    let ns = format!("hostile-{}", unique());
    let body = webhook(vec![pod_alert(&ns, "web-1")]).to_string();
    let send = |token: String| {
        client
            .post(format!("{}/api/v1/signals/prometheus", replica.base))
            .header("content-type", "application/json")
            .bearer_auth(token)
            .body(body.clone())
            .send()
    };
    assert_eq!(send(good.clone()).await.unwrap().status(), StatusCode::CREATED);
    let reviews = || async {
        replica
            .metric(
                &client,
                "gateway_k8s_api_requests_total",
                &["resource=\"tokenreviews\""],
            )
            .await
    };
    // Warm up (allocator, caches of the first tokens), then measure from there.
    flood((0..2_000).map(|i| send(format!("warm-{i}"))), 32).await;
    let (rss_before, series_before, reviews_before) =
        (rss(replica.pid()), series(&client, &replica).await, reviews().await);
    let started = Instant::now();
    let answers = flood((0..100_000).map(|i| send(format!("bogus-{i}-{}", unique()))), 32).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (rss_after, series_after, reviews_after) =
        (rss(replica.pid()), series(&client, &replica).await, reviews().await);
    let reviewed = reviews_after - reviews_before;
    eprintln!(
        "100 000 bogus tokens in {elapsed:.1} s: {reviewed} TokenReviews, RSS {} -> {} MiB, {} -> {} series",
        rss_before / MIB,
        rss_after / MIB,
        series_before.len(),
        series_after.len()
    );
    // Never let in; every one answered (401 reviewed, 503 over budget).
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Some(StatusCode::UNAUTHORIZED | StatusCode::SERVICE_UNAVAILABLE)))
    );
    // The API server saw the budget, not the flood: burst + rate per second elapsed.
    assert!(
        reviewed <= 40.0 + 20.0 * elapsed.ceil() + 1.0,
        "{reviewed} TokenReviews in {elapsed:.1} s (rate 20/s, burst 40)"
    );
    assert_eq!(
        new_series(&series_before, &series_after),
        Vec::<String>::new(),
        "a token never becomes a series"
    );
    // Memory: at most the memory of unknown tokens (16 MiB) and allocator slack.
    assert!(
        rss_after < rss_before + 48 * MIB,
        "RSS grew from {} to {} MiB",
        rss_before / MIB,
        rss_after / MIB
    );
    // The sender seen before is still let in, during and after the flood.
    assert_eq!(send(good).await.unwrap().status(), StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_invented_kinds_keeps_series_discovery_requests_and_memory_flat() {
    let config = "scope:\n  requireManagedLabel: true\nbackend:\n  apiTimeout: 15s\n";
    let replica = Replica::start(&format!("hostile-kinds-{}", unique()), config);
    let client = common::client();
    replica.wait_ready(&client).await;
    let send = |i: usize| {
        client
            .post(format!("{}/api/v1/signals/kubernetes-event", replica.base))
            .json(&json!({
                "type": "Warning", "reason": "Failed", "message": "invented",
                "involvedObject": {"apiVersion": format!("g{}.example.com/v1", i % 1000), "kind": format!("Kind{i}"),
                                   "name": format!("x-{i}"), "namespace": "hostile"},
            }))
            .send()
    };
    let discovery = || async {
        replica
            .metric(&client, "gateway_k8s_api_requests_total", &["resource=\"discovery\""])
            .await
    };
    flood((0..2_000).map(send), 32).await;
    let (rss_before, series_before, discovery_before) =
        (rss(replica.pid()), series(&client, &replica).await, discovery().await);
    // The flood in quarters, the replica's RSS after each: what invented kinds cost shows as
    // growth that goes on, quarter after quarter; the allocator taking its working set (more
    // arenas when a loaded machine makes threads contend) shows once, in the first.
    let started = Instant::now();
    let mut answers = Vec::with_capacity(100_000);
    let mut rss_after_quarter = Vec::with_capacity(4);
    for quarter in 0..4 {
        let from = 2_000 + quarter * 25_000;
        answers.extend(flood((from..from + 25_000).map(send), 32).await);
        rss_after_quarter.push(rss(replica.pid()));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (series_after, discovery_after) = (series(&client, &replica).await, discovery().await);
    let reads = discovery_after - discovery_before;
    let mib = |b: &u64| b / MIB;
    eprintln!(
        "100 000 invented kinds in {elapsed:.1} s: {reads} discovery requests, RSS {} -> {:?} MiB, {} -> {} series",
        rss_before / MIB,
        rss_after_quarter.iter().map(mib).collect::<Vec<_>>(),
        series_before.len(),
        series_after.len()
    );
    assert!(
        answers.iter().all(|a| *a == Some(StatusCode::OK)),
        "each answered: rejected"
    );
    // Two documents per read, a read at most every 30 s (discovery::MIN_REFRESH).
    assert!(
        reads <= 2.0 * ((elapsed / 30.0).ceil() + 1.0),
        "{reads} discovery requests in {elapsed:.1} s"
    );
    assert_eq!(
        new_series(&series_before, &series_after),
        Vec::<String>::new(),
        "a kind never becomes a series"
    );
    // Flat: the last 50 000 kinds add less than 16 MiB (a kind that kept 336 bytes would add
    // more), and the whole flood stays within the allocator's slack.
    let (half, end) = (rss_after_quarter[1], rss_after_quarter[3]);
    assert!(
        end < half + 16 * MIB,
        "RSS grew from {} to {} MiB over the second 50 000 kinds",
        half / MIB,
        end / MIB
    );
    assert!(
        end < rss_before + 64 * MIB,
        "RSS grew from {} to {} MiB",
        rss_before / MIB,
        end / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sockets_never_holds_more_than_the_cap_nor_more_memory() {
    let config = "server:\n  maxConnections: 256\n  headerReadTimeout: 60s\nbackend:\n  apiTimeout: 15s\n";
    let replica = Replica::start(&format!("hostile-sockets-{}", unique()), config);
    let client = common::client();
    replica.wait_ready(&client).await;
    let addr = replica.base.trim_start_matches("http://").to_owned();
    let open = || async {
        replica
            .metric(&client, "gateway_http_connections", &["port=\"signals\""])
            .await
    };
    let rss_start = rss(replica.pid());
    let mut rss_before = rss_start;
    let (mut most, mut connected) = (0.0f64, 0usize);
    // 100 waves of 1 000 idle sockets held at once: 100 000 sockets. Memory is bounded when the
    // last 90 000 add nothing to what the first 10 000 left (the connection buffers of up to 256
    // sockets and the allocator's arenas are warm by then).
    for wave in 0..100 {
        if wave == 10 {
            rss_before = rss(replica.pid());
        }
        let mut held = Vec::with_capacity(1000);
        for _ in 0..1000 {
            if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
                held.push(s);
                connected += 1;
            }
        }
        most = most.max(open().await);
        drop(held);
    }
    let rss_after = rss(replica.pid());
    eprintln!(
        "{connected} sockets: at most {most} open at the gateway, RSS {} at start, {} after 10 000 sockets, {} after 100 000 (MiB)",
        rss_start / MIB,
        rss_before / MIB,
        rss_after / MIB
    );
    assert!(connected >= 99_000, "the client could open {connected}");
    assert!(most <= 256.0, "{most} connections open (cap 256)");
    assert!(
        rss_after < rss_before + 32 * MIB,
        "RSS grew from {} to {} MiB",
        rss_before / MIB,
        rss_after / MIB
    );
    // Served as before once the flood is over.
    let ns = format!("hostile-{}", unique());
    let status = common::eventually(Duration::from_secs(30), "a signal is served", || async {
        let r = client
            .post(format!("{}/api/v1/signals/prometheus", replica.base))
            .json(&webhook(vec![pod_alert(&ns, "web-1")]))
            .send()
            .await
            .ok()?;
        Some(r.status())
    })
    .await;
    assert_eq!(status, StatusCode::CREATED);
}
