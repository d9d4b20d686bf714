//! The audit trail to Kubernaut's DataStorage (docs/audit.md), against a DataStorage-compatible
//! receiver that validates every event (tests/common/datastorage.rs): exactly the contract's
//! events per decision, in batches, with the rotating token; nothing lost or stored twice across
//! a DataStorage outage; a flood beyond the buffer acknowledged with memory bounded; the buffer
//! flushed at shutdown; readiness tied to DataStorage only when asked.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::datastorage::{Mode, Receiver};
use common::testenv::Replica;
use common::{Gateway, eventually, pod_alert, test_config, webhook};
use serde_json::Value;
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::backend::faults::{Fault, Faulty, Op};
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::ApiError;
use signal_gateway::config::{AuthMode, Config};

/// Replaces `path`'s contents the way the kubelet rotates a projected token (write, rename).
fn rotate(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// A test config sending audit events to `receiver` with the token in `token_file`.
fn audit_config(receiver: &Receiver, token_file: &Path) -> Config {
    let mut c = test_config();
    c.audit.url = receiver.url.clone();
    c.audit.token_file = token_file.to_owned();
    c.audit.batch_size = 10;
    c.audit.flush_interval = Duration::from_millis(100);
    c.audit.retry_backoff = Duration::from_millis(50);
    c.audit.timeout = Duration::from_secs(2);
    c
}

async fn post_alerts(gw: &Gateway, token: &str, body: &Value) -> (u16, Value) {
    let r = gw
        .client
        .post(format!("{}/api/v1/signals/prometheus", gw.base))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// (event_type, correlation_id, occurrence_count) of an event: what identifies it in the trail.
fn key(e: &Value) -> (String, String, i64) {
    (
        e["event_type"].as_str().unwrap().to_owned(),
        e["correlation_id"].as_str().unwrap().to_owned(),
        e["event_data"]["occurrence_count"].as_i64().unwrap_or(0),
    )
}

async fn audit_metric(gw: &Gateway, result: &str) -> f64 {
    gw.metric("gateway_audit_events_total", &[&format!("result=\"{result}\"")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_its_duplicates_a_failed_create_and_a_batch_give_exactly_the_contracts_events() {
    let receiver = Receiver::start(Mode::Created).await;
    let dir = common::temp_dir("audit");
    let (token_file, tokens) = (dir.join("token"), dir.join("senders"));
    std::fs::write(&token_file, "gateway-token-1\n").unwrap();
    std::fs::write(&tokens, "alertmanager-token\n").unwrap();
    let mut config = audit_config(&receiver, &token_file);
    // The sender is known to authentication: the audit actor is that user.
    config.auth.mode = AuthMode::Static;
    config.auth.tokens_file = Some(tokens);
    config.server.request_timeout = Duration::from_secs(1);
    let (failing, unreadable) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock)));
    let cluster = {
        let (failing, unreadable) = (failing.clone(), unreadable.clone());
        Arc::new(Faulty::new(store.clone(), move |op| {
            let fails = match op {
                Op::CreateRequest => failing.load(Ordering::SeqCst),
                Op::GetMetadata => unreadable.load(Ordering::SeqCst),
                _ => false,
            };
            if fails {
                Fault::Fail(ApiError::Unavailable("etcdserver: request timed out".into()))
            } else {
                Fault::Pass
            }
        }))
    };
    let gw = Gateway::on(cluster, Some(store), config).await;
    let token = "alertmanager-token";

    // A new incident, then 9 duplicates of it.
    let (status, first) = post_alerts(&gw, token, &webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(status, 201, "{first}");
    let rr = first["remediationRequestName"].as_str().unwrap().to_owned();
    let rr_ns = first["remediationRequestNamespace"].as_str().unwrap().to_owned();
    for n in 2..=10 {
        let (status, dup) = post_alerts(&gw, token, &webhook(vec![pod_alert("shop", "api-0")])).await;
        assert_eq!((status, dup["occurrenceCount"].as_i64()), (202, Some(n)), "{dup}");
    }
    // A creation that fails: answered 503.
    failing.store(true, Ordering::SeqCst);
    let (status, failed) = post_alerts(&gw, token, &webhook(vec![pod_alert("shop", "broken-0")])).await;
    assert_eq!(status, 503, "{failed}");
    failing.store(false, Ordering::SeqCst);
    // A target whose owner chain cannot be read: 503 too, one failed event.
    unreadable.store(true, Ordering::SeqCst);
    let (status, _) = post_alerts(&gw, token, &webhook(vec![pod_alert("shop", "unreadable-0")])).await;
    assert_eq!(status, 503);
    unreadable.store(false, Ordering::SeqCst);
    // A resolved alert makes no decision: no event.
    let mut resolved = pod_alert("shop", "api-0");
    resolved["status"] = Value::String("resolved".into());
    assert_eq!(post_alerts(&gw, token, &webhook(vec![resolved])).await.0, 200);
    // A notification of 20 alerts about 20 pods: 20 new incidents.
    let batch: Value = serde_json::from_str(&common::fixture("batch-20-firing.json")).unwrap();
    let (status, answer) = post_alerts(&gw, token, &batch).await;
    assert_eq!(status, 207, "{answer}");
    let batch_rrs: Vec<String> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["remediationRequestName"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(batch_rrs.len(), 20);

    let mut expected: Vec<(String, String, i64)> = vec![
        ("gateway.signal.received".into(), rr.clone(), 0),
        ("gateway.crd.created".into(), rr.clone(), 1),
    ];
    expected.extend((2..=10).map(|n| ("gateway.signal.deduplicated".into(), rr.clone(), n)));
    for pod in ["broken-0", "unreadable-0"] {
        expected.push((
            "gateway.crd.failed".into(),
            format!("KubePodCrashLooping:shop:Pod:{pod}"),
            0,
        ));
    }
    for name in &batch_rrs {
        expected.push(("gateway.signal.received".into(), name.clone(), 0));
        expected.push(("gateway.crd.created".into(), name.clone(), 1));
    }
    let want_len = expected.len();
    let stored = eventually(Duration::from_secs(20), "every event stored", || {
        let stored = receiver.stored();
        async move { (stored.len() >= want_len).then_some(stored) }
    })
    .await;
    assert_eq!(
        receiver.violations(),
        Vec::<String>::new(),
        "every event meets the contract"
    );
    // Exactly these events, no more (the buffer is empty and everything enqueued was sent).
    eventually(Duration::from_secs(10), "the buffer to drain", || async {
        (gw.metric("gateway_audit_buffer_events", &[]).await == 0.0).then_some(())
    })
    .await;
    assert_eq!(audit_metric(&gw, "sent").await, expected.len() as f64);
    let mut got: Vec<_> = receiver.stored().iter().map(key).collect();
    let mut want = expected.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the events of each decision, once each");
    assert_eq!(stored.len(), expected.len());

    // Order within an incident: received before created; duplicates in count order.
    let position = |t: &str, id: &str, n: i64| {
        stored
            .iter()
            .position(|e| key(e) == (t.to_owned(), id.to_owned(), n))
            .unwrap()
    };
    for name in batch_rrs.iter().chain([&rr]) {
        assert!(position("gateway.signal.received", name, 0) < position("gateway.crd.created", name, 1));
    }
    for n in 3..=10 {
        assert!(position("gateway.signal.deduplicated", &rr, n - 1) < position("gateway.signal.deduplicated", &rr, n));
    }

    // What the events say.
    let received = &stored[position("gateway.signal.received", &rr, 0)];
    assert_eq!(received["actor_type"], "authenticated-service");
    assert_eq!(received["actor_id"], "static-token-1", "the sender's user");
    assert_eq!(received["namespace"], "shop");
    assert_eq!(received["event_data"]["remediation_request"], format!("{rr_ns}/{rr}"));
    assert_eq!(received["event_data"]["signal_name"], "KubePodCrashLooping");
    // The RR's originalPayload: the notification as received, as an object.
    assert_eq!(
        received["event_data"]["original_payload"]["alerts"][0]["labels"]["pod"],
        "api-0"
    );
    assert_eq!(received["event_data"]["signal_labels"]["pod"], "api-0");
    assert_eq!(received["event_data"]["fingerprint"], first["fingerprint"]);
    let failure = &stored[position("gateway.crd.failed", "KubePodCrashLooping:shop:Pod:broken-0", 0)];
    assert_eq!(failure["event_outcome"], "failure");
    assert_eq!(failure["event_data"]["error_details"]["component"], "gateway");
    assert_eq!(failure["event_data"]["error_details"]["retry_possible"], true);

    // In batches, each at most audit.batchSize, each with the gateway's token.
    let requests = receiver.requests();
    assert!(
        requests.len() >= 6,
        "{} batches for {} events",
        requests.len(),
        stored.len()
    );
    assert!(requests.iter().all(|r| r.events.len() <= 10));
    assert!(
        requests.iter().all(|r| r.token.as_deref() == Some("gateway-token-1")),
        "{:?}",
        requests.iter().map(|r| r.token.clone()).collect::<Vec<_>>()
    );

    // The token rotates: the next batch carries the new one.
    rotate(&token_file, "gateway-token-2\n");
    let (status, _) = post_alerts(&gw, token, &webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(status, 202);
    let last = eventually(Duration::from_secs(10), "the duplicate's event", || {
        let requests = receiver.requests();
        async move { (requests.iter().map(|r| r.events.len()).sum::<usize>() > want_len).then_some(requests) }
    })
    .await;
    let after = last.last().unwrap();
    assert_eq!(after.token.as_deref(), Some("gateway-token-2"));
    assert_eq!(after.events[0]["event_data"]["occurrence_count"], 11);
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastorage_answering_500_then_201_loses_nothing_and_stores_each_event_once() {
    // The outage is a few seconds rather than 30: the retries (50 ms, doubling, at most 30 s
    // apart, 30 of them) and the buffer do not care how long it is while the retries last.
    let receiver = Receiver::start(Mode::ServerError).await;
    let dir = common::temp_dir("audit-outage");
    std::fs::write(dir.join("token"), "t").unwrap();
    let mut config = audit_config(&receiver, &dir.join("token"));
    config.audit.batch_size = 5;
    config.audit.max_retries = 30;
    let gw = Gateway::embedded(config).await;

    let (status, _, first) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(status, 201);
    let rr = first["remediationRequestName"].as_str().unwrap().to_owned();
    for n in 2..=30 {
        let (status, _, dup) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
        assert_eq!((status.as_u16(), dup["occurrenceCount"].as_i64()), (202, Some(n)));
    }
    // The outage lasts until DataStorage has refused the first batch eight times (its retries are
    // then more than 3 s apart in all), while every signal above was acknowledged.
    eventually(Duration::from_secs(30), "eight refused attempts", || async {
        (receiver.requests().iter().filter(|r| r.status == Some(500)).count() >= 8).then_some(())
    })
    .await;
    receiver.set_mode(Mode::Created);

    let expected = 31;
    eventually(Duration::from_secs(60), "every event stored", || async {
        (receiver.stored().len() >= expected).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the buffer to drain", || async {
        (gw.metric("gateway_audit_buffer_events", &[]).await == 0.0).then_some(())
    })
    .await;
    let stored = receiver.stored();
    let mut keys: Vec<_> = stored.iter().map(key).collect();
    keys.sort();
    let mut want = vec![
        ("gateway.crd.created".to_owned(), rr.clone(), 1),
        ("gateway.signal.received".to_owned(), rr.clone(), 0),
    ];
    want.extend((2..=30).map(|n| ("gateway.signal.deduplicated".to_owned(), rr.clone(), n)));
    want.sort();
    // Nothing lost, nothing stored twice: each event's key exactly once among the stored.
    assert_eq!(keys, want);
    // Every refused request was a batch sent again unchanged and stored once: its body is
    // byte-identical to the body of exactly one accepted request.
    let requests = receiver.requests();
    let accepted: Vec<&[u8]> = requests
        .iter()
        .filter(|r| r.status == Some(201))
        .map(|r| r.body.as_ref())
        .collect();
    let refused: Vec<_> = requests.iter().filter(|r| r.status == Some(500)).collect();
    assert!(refused.len() >= 8);
    for r in &refused {
        assert_eq!(
            accepted.iter().filter(|a| **a == r.body.as_ref()).count(),
            1,
            "a refused batch was retried as it was and accepted once"
        );
    }
    assert_eq!(receiver.violations(), Vec::<String>::new());
    assert_eq!(audit_metric(&gw, "sent").await, expected as f64);
    for dropped in [
        "dropped_buffer_full",
        "dropped_retries_exhausted",
        "dropped_rejected",
        "dropped_shutdown",
    ] {
        assert_eq!(audit_metric(&gw, dropped).await, 0.0, "{dropped}");
    }
    assert!(
        gw.metric(
            "gateway_audit_batch_duration_seconds_count",
            &["result=\"server_error\""]
        )
        .await
            >= 3.0
    );
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_datastorage_rejects_is_dropped_and_counted_not_retried() {
    let receiver = Receiver::start(Mode::BadRequest).await;
    let dir = common::temp_dir("audit-400");
    std::fs::write(dir.join("token"), "t").unwrap();
    let gw = Gateway::embedded(audit_config(&receiver, &dir.join("token"))).await;
    let (status, _, _) = gw.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
    assert_eq!(status, 201, "DataStorage's answer does not touch the signal's");
    eventually(Duration::from_secs(10), "the rejected batch counted", || async {
        (audit_metric(&gw, "dropped_rejected").await == 2.0).then_some(())
    })
    .await;
    assert_eq!(receiver.requests().len(), 1, "a 4xx is not retried");
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_the_buffer_and_gives_up_at_the_drain_deadline() {
    // Nothing would leave before an hour's flush interval: only the drain sends it.
    let receiver = Receiver::start(Mode::Created).await;
    let dir = common::temp_dir("audit-drain");
    std::fs::write(dir.join("token"), "t").unwrap();
    let mut config = audit_config(&receiver, &dir.join("token"));
    config.audit.flush_interval = Duration::from_secs(3600);
    config.audit.batch_size = 100;
    let gw = Gateway::embedded(config.clone()).await;
    for pod in ["a", "b", "c"] {
        assert_eq!(gw.alerts(&webhook(vec![pod_alert("shop", pod)])).await.0, 201);
    }
    assert_eq!(receiver.requests().len(), 0);
    gw.stop().await.unwrap();
    assert_eq!(receiver.stored().len(), 6, "flushed before serve returned");

    // DataStorage hangs: shutdown still ends at its deadline.
    let hanging = Receiver::start(Mode::Hang).await;
    let mut config = audit_config(&hanging, &dir.join("token"));
    config.audit.timeout = Duration::from_secs(60);
    config.server.shutdown_timeout = Duration::from_secs(2);
    let gw = Gateway::embedded(config).await;
    assert_eq!(gw.alerts(&webhook(vec![pod_alert("shop", "a")])).await.0, 201);
    eventually(Duration::from_secs(10), "the batch in flight", || async {
        (!hanging.requests().is_empty()).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    gw.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped after {:?} (drain deadline 2 s)",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_datastorage_only_when_a_health_url_is_set() {
    let receiver = Receiver::start(Mode::Created).await;
    let dir = common::temp_dir("audit-ready");
    std::fs::write(dir.join("token"), "t").unwrap();
    let ready = |gw: &Gateway| {
        let (client, url) = (gw.client.clone(), format!("{}/readyz", gw.admin));
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    let plain = Gateway::embedded(audit_config(&receiver, &dir.join("token"))).await;
    let mut config = audit_config(&receiver, &dir.join("token"));
    config.audit.health_url = format!("{}/readyz", receiver.url);
    let tied = Gateway::embedded(config).await;
    assert_eq!((ready(&plain).await, ready(&tied).await), (200, 200));
    receiver.set_mode(Mode::ServerError);
    assert_eq!(
        ready(&tied).await,
        503,
        "DataStorage not ready: neither is the gateway that asked for it"
    );
    assert_eq!(
        ready(&plain).await,
        200,
        "an audit outage alone never takes a gateway out"
    );
    assert_eq!(plain.alerts(&webhook(vec![pod_alert("shop", "a")])).await.0, 201);
    plain.stop().await.unwrap();
    tied.stop().await.unwrap();
}

/// Resident memory of the process `pid` (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_buffer_is_acknowledged_with_memory_bounded_and_drops_counted() {
    // DataStorage hangs; the gateway (the real binary, so its memory is its own) holds at most
    // 256 KiB of events. Two floods of 8 MiB of events each: the second must not grow it.
    let receiver = Receiver::start(Mode::Hang).await;
    let dir = common::temp_dir("audit-flood");
    std::fs::write(dir.join("token"), "t").unwrap();
    let buffer_bytes = 256 * 1024;
    let replica = Replica::start_embedded(
        &format!("audit-flood-{}", std::process::id()),
        &format!(
            "logging:\n  level: warn\naudit:\n  url: {}\n  tokenFile: {}\n  bufferSize: 1000000\n  bufferBytes: {buffer_bytes}\n  timeout: 1h\n",
            receiver.url,
            dir.join("token").display()
        ),
    );
    let client = common::client();
    replica.wait_ready(&client).await;

    // 40 notifications of 25 alerts, each alert with an 8 KiB annotation: 1000 duplicates of a
    // few incidents, about 8 MiB of event text per flood.
    let annotation = "x".repeat(8 * 1024);
    let flood = |round: usize| {
        let (client, annotation, base) = (client.clone(), annotation.clone(), replica.base.clone());
        async move {
            for i in 0..40 {
                let alerts = (0..25)
                    .map(|j| {
                        let mut a = pod_alert("shop", &format!("p-{}", j % 5));
                        a["annotations"]["description"] = Value::String(format!("{round}-{i}-{j}-{annotation}"));
                        a
                    })
                    .collect();
                let r = client
                    .post(format!("{base}/api/v1/signals/prometheus"))
                    .json(&webhook(alerts))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    r.status(),
                    207,
                    "every signal acknowledged while audit events are dropped"
                );
            }
        }
    };
    flood(0).await;
    let after_first = rss(replica.pid());
    flood(1).await;
    let after_second = rss(replica.pid());
    let held = replica.metric(&client, "gateway_audit_buffer_bytes", &[]).await;
    let enqueued = replica
        .metric(&client, "gateway_audit_events_total", &["result=\"enqueued\""])
        .await;
    let dropped = replica
        .metric(
            &client,
            "gateway_audit_events_total",
            &["result=\"dropped_buffer_full\""],
        )
        .await;
    let events = 2000.0 + 5.0; // every signal's event, plus `received` of the five new incidents
    assert!(held <= buffer_bytes as f64, "{held} bytes held");
    assert_eq!(enqueued + dropped, events, "every event enqueued or counted as dropped");
    assert!(dropped >= 1900.0, "{dropped} dropped");
    let growth = after_second.saturating_sub(after_first);
    assert!(
        growth < 4 * 1024 * 1024,
        "resident memory grew {} KiB over the second flood of ~8 MiB of events (first flood: {} KiB)",
        growth / 1024,
        after_first / 1024
    );
    let counted: BTreeMap<&str, f64> = [("held", held), ("enqueued", enqueued), ("dropped", dropped)].into();
    eprintln!(
        "{counted:?}, rss {} KiB -> {} KiB",
        after_first / 1024,
        after_second / 1024
    );
}
