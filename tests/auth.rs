//! Who may send, what the gateway acts on, and what the transport tolerates, over real HTTP on
//! the embedded backend: static bearer tokens, security headers and request ids, freshness and
//! scope rejections, header/body limits and slow clients, TLS with certificate reload.
//! (`auth.mode: kubernetes` against the real API server: tests/testenv_auth.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Gateway, eventually, metric_sum, pod_alert, test_config, webhook};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use reqwest::StatusCode;
use serde_json::json;
use signal_gateway::Deps;
use signal_gateway::clock::SystemClock;
use signal_gateway::cluster::ObjectRef;
use signal_gateway::config::{AuthMode, Config, Tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROMETHEUS: &str = "/api/v1/signals/prometheus";

async fn static_gateway(tokens: &str) -> (Gateway, PathBuf) {
    static_gateway_with(tokens, test_config()).await
}

async fn static_gateway_with(tokens: &str, mut config: Config) -> (Gateway, PathBuf) {
    let dir = common::temp_dir("tokens");
    let path = dir.join("tokens");
    std::fs::write(&path, tokens).unwrap();
    config.auth.mode = AuthMode::Static;
    config.auth.tokens_file = Some(path.clone());
    (Gateway::embedded(config).await, path)
}

async fn post_with(gw: &Gateway, auth: Option<&str>, body: String) -> reqwest::Response {
    let mut req = gw
        .client
        .post(format!("{}{PROMETHEUS}", gw.base))
        .header("content-type", "application/json")
        .body(body);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

async fn problem(resp: reqwest::Response, status: StatusCode) -> serde_json::Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    body
}

#[tokio::test]
async fn static_tokens_let_in_exactly_the_listed_senders_and_follow_the_file() {
    let (gw, path) = static_gateway("# alertmanager\nsecret-one\n").await;
    let body = || webhook(vec![pod_alert("shop", "web-1")]).to_string();

    let ok = post_with(&gw, Some("Bearer secret-one"), body()).await;
    assert_eq!(ok.status(), StatusCode::CREATED);

    let missing = post_with(&gw, None, body()).await;
    assert!(
        missing.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    problem(missing, StatusCode::UNAUTHORIZED).await;
    let wrong = problem(
        post_with(&gw, Some("Bearer secret-two"), body()).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(
        !wrong.to_string().contains("secret-two"),
        "the token is never echoed: {wrong}"
    );
    problem(
        post_with(&gw, Some("Basic c2VjcmV0LW9uZQ=="), body()).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // Refused before the body is read: an oversized body from a stranger is 401, not 413.
    let huge = "x".repeat(2 * 1024 * 1024);
    problem(post_with(&gw, None, huge).await, StatusCode::UNAUTHORIZED).await;

    let rrs = gw.store().all_requests();
    assert_eq!(rrs.len(), 1, "only the authenticated signal was stored");
    assert_eq!(
        gw.metric(
            "gateway_auth_requests_total",
            &["mode=\"static\"", "result=\"unauthenticated\""]
        )
        .await,
        4.0
    );
    assert_eq!(
        gw.metric(
            "gateway_auth_requests_total",
            &["mode=\"static\"", "result=\"allowed\""]
        )
        .await,
        1.0
    );

    // Rotate: the new token works and the old one stops working, without a restart.
    std::fs::write(&path, "secret-two\n").unwrap();
    eventually(Duration::from_secs(10), "the rotated token is accepted", || async {
        (post_with(&gw, Some("Bearer secret-two"), body()).await.status() == StatusCode::ACCEPTED).then_some(())
    })
    .await;
    assert_eq!(
        post_with(&gw, Some("Bearer secret-one"), body()).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(
        gw.metric("gateway_file_reloads_total", &["file=\"auth_tokens\"", "result=\"ok\""])
            .await
            >= 1.0
    );
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn every_response_carries_security_headers_and_a_request_id() {
    let gw = Gateway::embedded(test_config()).await;
    let created = gw
        .client
        .post(format!("{}{PROMETHEUS}", gw.base))
        .header("x-request-id", "am-notification-42")
        .json(&webhook(vec![pod_alert("shop", "web-1")]))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["x-request-id"], "am-notification-42", "echoed");
    let hostile = gw
        .client
        .post(format!("{}{PROMETHEUS}", gw.base))
        .header("x-request-id", "<script>alert(1)</script>")
        .json(&webhook(vec![pod_alert("shop", "web-1")]))
        .send()
        .await
        .unwrap();
    let generated = hostile.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        generated.len() == 32 && generated.bytes().all(|b| b.is_ascii_hexdigit()),
        "a malformed id is replaced, never echoed: {generated}"
    );
    let not_found = gw.client.get(format!("{}/nope", gw.base)).send().await.unwrap();
    let metrics = gw.client.get(format!("{}/metrics", gw.admin)).send().await.unwrap();
    for resp in [&created, &hostile, &not_found, &metrics] {
        let h = resp.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{}", resp.url());
        assert_eq!(h["x-frame-options"], "DENY");
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'")
        );
        assert_eq!(h["cache-control"], "no-store");
        assert!(h.contains_key("x-request-id"));
        assert!(!h.contains_key("strict-transport-security"), "HSTS only on TLS");
    }
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn sender_chosen_strings_never_become_metric_label_values() {
    let gw = Gateway::embedded(test_config()).await;
    for i in 0..20 {
        let mut alert = pod_alert("shop", &format!("web-{i}"));
        alert["labels"]["severity"] = json!(format!("attacker-severity-{i}"));
        let (status, _, _) = gw.alerts(&webhook(vec![alert])).await;
        assert_eq!(status, StatusCode::CREATED);
        let method = reqwest::Method::from_bytes(format!("ATTACK{i}").as_bytes()).unwrap();
        let resp = gw
            .client
            .request(method, format!("{}{PROMETHEUS}", gw.base))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }
    let metrics = gw.metrics().await;
    assert!(
        !metrics.contains("attacker-severity"),
        "severity values are a bounded set"
    );
    assert!(!metrics.contains("ATTACK"), "methods are a bounded set");
    assert_eq!(
        metric_sum(&metrics, "gateway_signals_received_total", &["severity=\"other\""]),
        20.0
    );
    assert!(
        metric_sum(
            &metrics,
            "gateway_http_request_duration_seconds_count",
            &["method=\"other\""]
        ) >= 20.0
    );
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn implausible_timestamps_are_rejected_with_a_reason_and_never_stored() {
    let mut config = test_config();
    config.freshness.max_age = Duration::from_secs(3600);
    let gw = Gateway::embedded(config).await;
    let at = |offset_s: i64| {
        let t = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(offset_s);
        t.to_string()
    };
    let alert = |pod: &str, starts: String| {
        let mut a = pod_alert("shop", pod);
        a["startsAt"] = json!(starts);
        a
    };
    let (status, _, body) = gw
        .alerts(&webhook(vec![
            alert("now", at(-60)),
            alert("future", at(3600)),
            alert("stale", at(-7200)),
            alert("garbage", "the day before yesterday".into()),
        ]))
        .await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    let reasons: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or(r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        ["created", "future_timestamp", "stale_signal", "invalid_timestamp"]
    );
    assert_eq!(body["summary"]["rejected"], 3);
    let (status, _, body) = gw
        .event(&json!({
            "type": "Warning", "reason": "BackOff", "message": "back-off restarting",
            "involvedObject": {"kind": "Pod", "name": "ev", "namespace": "shop"},
            "lastTimestamp": at(86_400),
        }))
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::OK, Some("future_timestamp"))
    );
    assert_eq!(
        gw.store().all_requests().len(),
        1,
        "only the plausible alert was stored"
    );
    for (reason, n) in [
        ("future_timestamp", 2.0),
        ("stale_signal", 1.0),
        ("invalid_timestamp", 1.0),
    ] {
        assert_eq!(
            gw.metric("gateway_signals_rejected_total", &[&format!("reason=\"{reason}\"")])
                .await,
            n,
            "{reason}"
        );
    }
    gw.stop().await.unwrap();
}

fn managed(value: &str) -> ObjectMeta {
    ObjectMeta {
        labels: Some([("kubernaut.ai/managed".to_owned(), value.to_owned())].into()),
        ..ObjectMeta::default()
    }
}

#[tokio::test]
async fn with_scope_on_only_opted_in_targets_produce_requests() {
    let mut config = test_config();
    config.scope.require_managed_label = true;
    let deps = Deps::embedded(Arc::new(SystemClock));
    let store = deps.embedded.clone().unwrap();
    store.put_object(ObjectRef::namespace("shop"), managed("true"));
    store.put_object(ObjectRef::namespace("lab"), ObjectMeta::default());
    let pod = |ns: &str, name: &str| ObjectRef {
        api_version: "v1".into(),
        kind: "Pod".into(),
        resource: String::new(),
        namespace: ns.into(),
        name: name.into(),
    };
    store.put_object(pod("shop", "opted-out"), managed("false"));
    store.put_object(pod("lab", "opted-in"), managed("true"));
    let gw = Gateway::start(deps, config).await;
    let (status, _, body) = gw
        .alerts(&webhook(vec![
            pod_alert("shop", "web-1"),
            pod_alert("shop", "opted-out"),
            pod_alert("lab", "opted-in"),
            pod_alert("lab", "web-2"),
        ]))
        .await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    let outcome: Vec<String> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["status"].as_str().unwrap(),
                r["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        outcome,
        [
            "created:",
            "rejected:unmanaged_resource",
            "created:",
            "rejected:unmanaged_resource"
        ]
    );
    assert_eq!(gw.store().all_requests().len(), 2);
    assert_eq!(
        gw.metric("gateway_scope_decisions_total", &["result=\"unmanaged\""])
            .await,
        2.0
    );
    gw.stop().await.unwrap();
}

/// Reads from `stream` until the server closes it (or `within` passes: then panics).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {within:?}"),
        }
    }
}

#[tokio::test]
async fn oversized_heads_are_refused_and_slow_clients_are_cut_off() {
    let mut config = test_config();
    config.server.max_header_bytes = 4096;
    config.server.max_headers = 16;
    config.server.header_read_timeout = Duration::from_millis(500);
    config.server.body_read_timeout = Duration::from_millis(500);
    let gw = Gateway::embedded(config).await;
    let url = format!("{}{PROMETHEUS}", gw.base);
    let body = webhook(vec![pod_alert("shop", "web-1")]);

    let big = gw
        .client
        .post(&url)
        .header("x-padding", "a".repeat(8000))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let mut many = gw.client.post(&url).json(&body);
    for i in 0..40 {
        many = many.header(format!("x-h{i}"), "v");
    }
    assert_eq!(
        many.send().await.unwrap().status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    let addr = gw.base.trim_start_matches("http://").to_owned();
    // Slowloris: half a request head, then silence.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /api/v1/signals/prometheus HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    closed_within(&mut slow, Duration::from_secs(5)).await;
    // An idle connection is closed as well.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    closed_within(&mut idle, Duration::from_secs(5)).await;
    // A body that stops halfway: answered 503 (the sender may retry), connection freed.
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            b"POST /api/v1/signals/prometheus HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"alerts\":",
        )
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&closed_within(&mut stalled, Duration::from_secs(5)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after"), "{answer}");

    // None of it disturbed normal service.
    let (status, _, _) = gw.alerts(&body).await;
    assert_eq!(status, StatusCode::CREATED);
    gw.stop().await.unwrap();
}

/// Whether the server has closed `stream` (EOF or reset) within `within`.
async fn is_closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_freed_places_are_reused() {
    let mut config = test_config();
    config.server.max_connections = 8;
    // Long enough that no idle connection is closed by the head deadline during the test.
    config.server.header_read_timeout = Duration::from_secs(120);
    let gw = Gateway::embedded(config).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    eventually(Duration::from_secs(10), "8 connections open", || async {
        (gw.metric("gateway_http_connections", &["port=\"signals\""]).await == 8.0).then_some(())
    })
    .await;
    // The ninth is closed at once (not left waiting, not served).
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    assert!(
        is_closed_within(&mut extra, Duration::from_secs(10)).await,
        "a connection beyond server.maxConnections stays open"
    );
    assert!(
        gw.metric("gateway_http_connections_refused_total", &["port=\"signals\""])
            .await
            >= 1.0
    );
    // The admin port has places of its own.
    assert!(gw.metrics().await.contains("gateway_http_connections"));
    // A place freed is a place for the next sender.
    drop(idle.pop());
    eventually(Duration::from_secs(10), "a signal is served again", || async {
        let client = common::client();
        let r = client
            .post(format!("{}{PROMETHEUS}", gw.base))
            .json(&webhook(vec![pod_alert("shop", "web-1")]))
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::CREATED || r.status() == StatusCode::ACCEPTED).then_some(())
    })
    .await;
    drop(idle);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn cheap_refusals_do_not_keep_their_connection_alive() {
    let mut config = test_config();
    config.server.header_read_timeout = Duration::from_secs(120);
    let (gw, _path) = static_gateway_with("secret-one\n", config).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    for request in [
        "GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n".to_owned(),
        format!("GET {PROMETHEUS} HTTP/1.1\r\nHost: gw\r\n\r\n"),
        format!("POST {PROMETHEUS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer nope\r\nContent-Length: 0\r\n\r\n"),
    ] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        assert!(
            is_closed_within(&mut stream, Duration::from_secs(10)).await,
            "kept alive after a refusal: {request:?}"
        );
    }
    // A sender that is let in keeps its connection for the next signal.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let body = webhook(vec![pod_alert("shop", "web-1")]).to_string();
    let request = format!(
        "POST {PROMETHEUS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer secret-one\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    assert!(
        !is_closed_within(&mut stream, Duration::from_secs(2)).await,
        "a good sender's connection stays"
    );
    gw.stop().await.unwrap();
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
fn make_pki(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{tag}-{f}"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let (ca_key, ca, key, csr, cert, ext) = (
        p("ca.key"),
        p("ca.crt"),
        p("tls.key"),
        p("tls.csr"),
        p("tls.crt"),
        p("ext"),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={tag}-ca"),
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (ca, cert, key)
}

fn client_trusting(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_serves_both_ports_and_picks_up_a_renewed_certificate() {
    let dir = common::temp_dir("tls");
    let (ca1, cert1, key1) = make_pki(&dir, "one");
    let (ca2, cert2, key2) = make_pki(&dir, "two");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let mut config: Config = test_config();
    config.server.tls = Some(Tls {
        cert_file: cert.clone(),
        key_file: key.clone(),
    });
    let gw = Gateway::embedded(config).await;
    let https = |base: &str| base.replace("http://", "https://");
    let (signals, admin) = (https(&gw.base), https(&gw.admin));
    let first = client_trusting(&ca1);
    let resp = first
        .post(format!("{signals}{PROMETHEUS}"))
        .json(&webhook(vec![pod_alert("shop", "web-1")]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(resp.headers().contains_key("strict-transport-security"));
    assert!(
        first
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    assert!(
        gw.client.get(format!("{}/healthz", gw.admin)).send().await.is_err(),
        "plain HTTP is not served on a TLS port"
    );

    // Renewal: a half-written pair is ignored, the complete new pair is served without restart.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    let second = client_trusting(&ca2);
    eventually(Duration::from_secs(10), "the broken pair is rejected", || async {
        let m = first
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (common::metric_sum(
            &m,
            "gateway_file_reloads_total",
            &["file=\"tls_certificate\"", "result=\"error\""],
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert!(
        first.get(format!("{admin}/healthz")).send().await.is_ok(),
        "old certificate still served"
    );
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    eventually(Duration::from_secs(10), "the renewed certificate is served", || async {
        second.get(format!("{admin}/healthz")).send().await.ok().map(|_| ())
    })
    .await;
    // A fresh client (no TLS session to resume) that trusts only the old CA is refused now.
    assert!(
        client_trusting(&ca1)
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    gw.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
