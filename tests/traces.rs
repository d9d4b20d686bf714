//! One trace per signal, exported over OTLP/HTTP to a real receiver (protobuf decoded with the
//! OpenTelemetry proto definitions): the span tree of a created and of a duplicate signal, with
//! the caller's W3C traceparent continued.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            let attrs = s
                                .attributes
                                .iter()
                                .map(|kv| {
                                    let v = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                                        Some(AnyValue::StringValue(s)) => s,
                                        Some(AnyValue::IntValue(i)) => i.to_string(),
                                        Some(AnyValue::DoubleValue(d)) => d.to_string(),
                                        Some(AnyValue::BoolValue(b)) => b.to_string(),
                                        other => format!("{other:?}"),
                                    };
                                    (kv.key.clone(), v)
                                })
                                .collect();
                            sink.lock().unwrap().push(Span {
                                name: s.name,
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                attrs,
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

fn trace(spans: &[Span], trace_id: &str) -> Vec<Span> {
    spans.iter().filter(|s| s.trace_id == trace_id).cloned().collect()
}

/// Every span but the root has its parent in the trace; the root's parent is the caller's span.
fn assert_tree(spans: &[Span], caller_span: &str) {
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Span> = spans.iter().filter(|s| !ids.contains(&s.parent.as_str())).collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    assert_eq!(roots[0].name, "http_request");
    assert_eq!(roots[0].parent, caller_span, "continues the caller's traceparent");
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_and_duplicate_signals_each_export_a_complete_span_tree() {
    let (otlp, spans) = receiver().await;
    let log = std::env::temp_dir().join(format!("sg-traces-{}.log", std::process::id()));
    // Port 0: the binary binds free ports and names them in its start line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_signal-gateway"))
        .args([
            "--backend",
            "embedded",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--auth-mode",
            "none",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("POD_NAME", "gw-trace")
        .env("POD_NAMESPACE", "signals")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let (signals, admin) = common::testenv::bound_addresses("gw-trace", &log, &mut child);
    let client = common::client();
    common::eventually(Duration::from_secs(20), "gateway ready", || async {
        client
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;

    let send_alerts = |trace_id: &'static str, caller: &'static str, pods: &'static [&'static str]| {
        let (client, signals) = (client.clone(), signals.clone());
        async move {
            let alerts = pods.iter().map(|p| common::pod_alert("shop", p)).collect();
            let r = client
                .post(format!("http://{signals}/api/v1/signals/prometheus"))
                .header("traceparent", format!("00-{trace_id}-{caller}-01"))
                .json(&common::webhook(alerts))
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["x-trace-id"], trace_id, "the response names the trace");
            r.status().as_u16()
        }
    };
    let (t1, c1) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let (t2, c2) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (t3, c3) = ("5c8a2b1e9d7f4a3c8e6b0d2f1a4c7e9b", "1a2b3c4d5e6f7081");
    assert_eq!(send_alerts(t1, c1, &["api-0"]).await, 201);
    assert_eq!(send_alerts(t2, c2, &["api-0"]).await, 202);
    let batch_status = send_alerts(t3, c3, &["web-0", "web-1"]).await;
    assert!((200..300).contains(&batch_status), "batch answered {batch_status}");

    let complete = |t: &str, outcome: &str| {
        let all = spans.lock().unwrap().clone();
        let tr = trace(&all, t);
        let done = tr
            .iter()
            .any(|s| s.name == "signal" && s.attrs.get("outcome").map(String::as_str) == Some(outcome))
            && tr.iter().any(|s| s.name == "http_request");
        done.then_some(tr)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (created, duplicate) = loop {
        let batch = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == t3 && s.name == "signal")
            .count();
        if let (Some(c), Some(d), 2) = (complete(t1, "created"), complete(t2, "duplicate"), batch) {
            break (c, d);
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let got: Vec<String> = spans
                .lock()
                .unwrap()
                .iter()
                .map(|s| format!("{} {} {:?}", s.trace_id, s.name, s.attrs))
                .collect();
            panic!("traces of the created and the duplicate signal not exported within 20s; received:\n{got:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();

    assert_tree(&created, c1);
    let n = names(&created);
    for want in [
        "http_request",
        "signal",
        "dedup.batch",
        "dedup",
        "dedup.lookup",
        "lock.acquire",
        "dedup.create",
        "dedup.status_update",
        "lock.release",
        "k8s.request",
    ] {
        assert!(n.contains(&want), "created trace lacks {want}: {n:?}");
    }
    let signal = created.iter().find(|s| s.name == "signal").unwrap();
    for attr in [
        "fingerprint",
        "signal_name",
        "source",
        "outcome",
        "rr_name",
        "api_calls",
    ] {
        assert!(
            signal.attrs.contains_key(attr),
            "signal span lacks {attr}: {:?}",
            signal.attrs
        );
    }
    assert_eq!(signal.attrs["signal_name"], "KubePodCrashLooping");
    let requests = created.iter().filter(|s| s.name == "k8s.request").count();
    assert_eq!(
        signal.attrs["api_calls"].parse::<f64>().unwrap() as usize,
        requests,
        "one span per API request"
    );
    let lock = created.iter().find(|s| s.name == "lock.acquire").unwrap();
    assert_eq!(lock.attrs["outcome"], "acquired");

    assert_tree(&duplicate, c2);
    let n = names(&duplicate);
    for want in [
        "http_request",
        "signal",
        "dedup.batch",
        "dedup",
        "dedup.status_update",
        "k8s.request",
    ] {
        assert!(n.contains(&want), "duplicate trace lacks {want}: {n:?}");
    }
    assert!(!n.contains(&"lock.acquire"), "a duplicate takes no lock: {n:?}");
    let signal = duplicate.iter().find(|s| s.name == "signal").unwrap();
    assert_eq!(
        signal.attrs["rr_name"],
        created.iter().find(|s| s.name == "signal").unwrap().attrs["rr_name"]
    );

    // A batch is one trace: the request span with one signal span per alert.
    let batch = trace(&spans.lock().unwrap(), t3);
    assert_tree(&batch, c3);
    let root = batch.iter().find(|s| s.name == "http_request").unwrap();
    let signals: Vec<&Span> = batch.iter().filter(|s| s.name == "signal").collect();
    assert_eq!(signals.len(), 2, "one signal span per alert");
    for s in signals {
        assert_eq!(s.parent, root.span_id, "each alert's span is a child of the request");
    }
}
