//! The whole gateway on the embedded backend, driven over loopback with hand-written HTTP/1.1
//! requests (arbitrary body, content type, method, path, framing and traceparent). Started with
//! the public `signal_gateway::serve`, as the integration tests do, so the harness does not
//! depend on how the router and its state are wired.
//!
//! Input layout: byte 0 and byte 1 are flags (see [`Request::decode`]), the rest is the body.
//! A seed is therefore two zero bytes followed by a JSON payload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::clock::SystemClock;
use signal_gateway::config::Config;
use signal_gateway::{Deps, Listeners};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::bytes::Bytes;

const PATHS: &[&str] = &[
    "/api/v1/signals/prometheus",
    "/api/v1/signals/kubernetes-event",
    "/api/v1/signals/prometheus?receiver=x",
    "/api/v1/signals/webhook",
];
const CONTENT_TYPES: &[Option<&str>] = &[
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("application/alertmanager+json"),
    Some("APPLICATION/JSON"),
    Some("text/plain"),
    None,
    Some("application/x-www-form-urlencoded"),
    Some("application/json+xml"),
];
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACEPARENTS: &[Option<&str>] = &[
    None,
    Some(TRACEPARENT),
    Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    Some("garbage"),
];
/// The smaller body limit some inputs run with (the configuration's minimum is 1024).
const SMALL_BODY_LIMIT: usize = 2048;

#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: &'static str,
    pub path: &'static str,
    pub content_type: Option<&'static str>,
    pub traceparent: Option<&'static str>,
    pub chunked: bool,
    /// Send the same request twice (the second is a duplicate of the first).
    pub twice: bool,
    pub max_body_bytes: Option<usize>,
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// Byte 0: bits 0-1 path, 2-4 content type, 5 GET instead of POST, 6 send twice, 7 small body
    /// limit. Byte 1: bit 0 chunked framing, bits 1-2 traceparent. Then the body.
    pub fn decode(data: &'a [u8]) -> Self {
        let mut b = Bytes::new(data);
        let (f0, f1) = (b.byte(), b.byte());
        Request {
            path: PATHS[usize::from(f0 & 3)],
            content_type: CONTENT_TYPES[usize::from((f0 >> 2) & 7)],
            method: if f0 & 0x20 != 0 { "GET" } else { "POST" },
            twice: f0 & 0x40 != 0,
            max_body_bytes: (f0 & 0x80 != 0).then_some(SMALL_BODY_LIMIT),
            chunked: f1 & 1 != 0,
            traceparent: TRACEPARENTS[usize::from((f1 >> 1) & 3)],
            body: b.rest(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n",
            self.method, self.path
        );
        if let Some(ct) = self.content_type {
            head.push_str(&format!("content-type: {ct}\r\n"));
        }
        if let Some(tp) = self.traceparent {
            head.push_str(&format!("traceparent: {tp}\r\n"));
        }
        let mut out;
        if self.chunked {
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            out = head.into_bytes();
            if !self.body.is_empty() {
                out.extend_from_slice(format!("{:x}\r\n", self.body.len()).as_bytes());
                out.extend_from_slice(self.body);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            head.push_str(&format!("content-length: {}\r\n\r\n", self.body.len()));
            out = head.into_bytes();
            out.extend_from_slice(self.body);
        }
        out
    }
}

/// One parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn parse(raw: &[u8]) -> Self {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..end]).expect("response head is ASCII");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let rest = &raw[end + 4..];
        resp.body = if resp.header("transfer-encoding") == Some("chunked") {
            dechunk(rest)
        } else {
            let len = resp
                .header("content-length")
                .map_or(rest.len(), |l| l.parse().expect("numeric content-length"));
            assert_eq!(rest.len(), len, "body length differs from content-length");
            rest.to_vec()
        };
        resp
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..eol]).expect("chunk size is ASCII");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).expect("hex chunk size");
        rest = &rest[eol + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A gateway on a fresh embedded store, on loopback ports chosen by the OS.
struct Gateway {
    addr: SocketAddr,
    store: Arc<EmbeddedStore>,
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), String>>,
}

impl Gateway {
    async fn start(max_body_bytes: Option<usize>) -> Self {
        // Authentication (`auth.mode`, default `kubernetes`) is off: this harness sends no
        // credentials. Read from YAML so the harness also builds where the key does not exist.
        let mut config = Config::from_yaml("auth:\n  mode: none\n").unwrap_or_default();
        config.identity.pod_name = "gw-fuzz".into();
        config.identity.pod_namespace = "signals".into();
        if let Some(limit) = max_body_bytes {
            config.server.max_body_bytes = limit;
        }
        let deps = Deps::embedded(Arc::new(SystemClock));
        let store = deps.embedded.clone().expect("embedded deps carry their store");
        let signals = TcpListener::bind("127.0.0.1:0").await.expect("bind signals port");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin port");
        let addr = signals.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            signal_gateway::serve(deps, config, Listeners { signals, admin }, async move {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| format!("{e:#}"))
        });
        // `serve` checks its configuration before it first waits: let it get that far.
        tokio::task::yield_now().await;
        if handle.is_finished() {
            panic!("the gateway did not start: {:?}", handle.await);
        }
        Gateway {
            addr,
            store,
            stop,
            handle,
        }
    }

    async fn send(&self, request: &Request<'_>) -> Response {
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await.expect("connect to the gateway");
            stream.write_all(&request.to_bytes()).await.expect("send the request");
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.expect("read the response");
            raw
        };
        let raw = tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("the gateway answers within 20 s");
        Response::parse(&raw)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let result = self.handle.await.expect("serve did not panic");
        assert_eq!(result, Ok(()), "serve returned an error");
    }
}

/// Acknowledged outcomes in one response: (created, duplicate).
fn acknowledged(body: &Value) -> (u64, u64) {
    let one = |v: &Value| match v["status"].as_str() {
        Some("created") => (1, 0),
        Some("duplicate") => (0, 1),
        _ => (0, 0),
    };
    match body.get("results").and_then(Value::as_array) {
        Some(results) => results.iter().map(one).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        None => one(body),
    }
}

/// The response contract of docs/api.md for one answer; the acknowledged outcomes in it.
fn check_response(request: &Request<'_>, resp: &Response, store: &EmbeddedStore) -> (u64, u64) {
    let status = resp.status;
    assert!(
        (200..300).contains(&status) || (400..500).contains(&status) || status == 503,
        "status {status}: only 2xx, 4xx and 503 are allowed"
    );
    let trace = resp.header("x-trace-id").expect("every response carries x-trace-id");
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "trace id {trace:?}"
    );
    if request.traceparent == Some(TRACEPARENT) {
        assert_eq!(
            trace, "4bf92f3577b34da6a3ce929d0e0e4736",
            "the caller's trace is continued"
        );
    }
    let body: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
        panic!(
            "status {status}: body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&resp.body)
        )
    });
    if status >= 400 {
        assert_eq!(
            resp.header("content-type"),
            Some("application/problem+json"),
            "status {status}"
        );
        for key in ["type", "title", "status", "detail", "instance"] {
            assert!(body.get(key).is_some(), "problem lacks {key}: {body}");
        }
        assert_eq!(body["status"], status, "{body}");
    }
    if status == 503 {
        let retry = resp.header("retry-after").expect("503 carries Retry-After");
        assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After {retry:?}");
    }
    if (200..300).contains(&status) {
        assert_eq!(resp.header("content-type"), Some("application/json"), "status {status}");
        assert_eq!(request.method, "POST");
    }
    let stored = |v: &Value| {
        let name = v["remediationRequestName"]
            .as_str()
            .expect("an acknowledged signal names its RR");
        let fp = v["fingerprint"].as_str().expect("and its fingerprint");
        let rr = store
            .all_requests()
            .into_iter()
            .find(|rr| rr.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("acknowledged RR {name} is not stored"));
        assert_eq!(rr.spec.signal_fingerprint, fp);
        assert_eq!(v["remediationRequestNamespace"], "signals");
    };
    match status {
        201 => {
            assert_eq!(body["status"], "created");
            assert_eq!(body["duplicate"], false);
            stored(&body);
        }
        202 => {
            assert_eq!(body["status"], "duplicate");
            assert_eq!(body["duplicate"], true);
            assert!(body["occurrenceCount"].as_i64().is_some_and(|c| c >= 2), "{body}");
            stored(&body);
        }
        200 => assert!(
            matches!(body["status"].as_str(), Some("ignored" | "rejected")),
            "{body}"
        ),
        207 => {
            let results = body["results"].as_array().expect("a batch has results");
            let summary = &body["summary"];
            assert_eq!(summary["total"], results.len());
            let count = |s: &str| results.iter().filter(|r| r["status"] == s).count();
            assert_eq!(summary["created"], count("created"));
            assert_eq!(summary["deduplicated"], count("duplicate"));
            assert_eq!(summary["rejected"], count("rejected"));
            assert_eq!(summary["ignored"], count("ignored"));
            assert_eq!(summary["failed"], 0, "a batch with a failure is a 503");
            for r in results
                .iter()
                .filter(|r| r["status"] == "created" || r["status"] == "duplicate")
            {
                stored(r);
            }
        }
        _ => {}
    }
    assert!(store.all_leases().is_empty(), "a lease outlived its request");
    acknowledged(&body)
}

/// Sends the decoded request (once or twice) to a fresh gateway and checks every answer and the
/// store: one RR per created acknowledgement, counts equal to the acknowledgements.
pub async fn check_request(request: &Request<'_>) {
    let gw = Gateway::start(request.max_body_bytes).await;
    let (mut created, mut duplicates) = (0, 0);
    for _ in 0..if request.twice { 2 } else { 1 } {
        let resp = gw.send(request).await;
        let (c, d) = check_response(request, &resp, &gw.store);
        created += c;
        duplicates += d;
    }
    let rrs = gw.store.all_requests();
    assert_eq!(rrs.len() as u64, created, "one RR per created acknowledgement");
    let counted: i64 = rrs.iter().map(|rr| i64::from(rr.occurrence_count())).sum();
    assert_eq!(
        counted as u64,
        created + duplicates,
        "occurrence counts equal acknowledgements"
    );
    gw.stop().await;
}

pub fn check_http(rt: &tokio::runtime::Runtime, data: &[u8]) {
    let request = Request::decode(data);
    rt.block_on(check_request(&request));
}
