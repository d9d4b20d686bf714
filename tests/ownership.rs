//! Fingerprint ownership and forwarding (ADR 0014) on one embedded store shared by several
//! gateways in this process: the members split the shards, a signal sent to any replica is
//! written by its owner, creates under ownership take no Lease, an owner that cannot be reached
//! sends the signal down the Lease-guarded path, and the forwarding endpoint refuses what is not
//! a member's forward. (The same with OS processes on a real API server: tests/testenv_ownership.rs.)

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, count_of, eventually, pod_alert, test_config, webhook};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use signal_gateway::backend::embedded::EmbeddedStore;
use signal_gateway::clock::{SharedClock, SystemClock};
use signal_gateway::cluster::{Call, Cluster};
use signal_gateway::config::Config;
use signal_gateway::ownership;

const SHARDS: u32 = 16;

fn config(pod: &str) -> Config {
    let mut c = test_config();
    c.identity.pod_name = pod.into();
    c.ownership.enabled = true;
    c.ownership.shards = SHARDS;
    c
}

async fn fleet(store: &Arc<EmbeddedStore>, n: usize) -> Vec<Gateway> {
    fleet_with(store, n, |_| {}).await
}

/// [`fleet`] with `tweak` applied to every member's configuration.
async fn fleet_with(store: &Arc<EmbeddedStore>, n: usize, tweak: impl Fn(&mut Config)) -> Vec<Gateway> {
    let mut gateways = Vec::new();
    for i in 0..n {
        let mut c = config(&format!("gw-{i}"));
        tweak(&mut c);
        let cluster: Arc<dyn Cluster> = store.clone();
        gateways.push(Gateway::on(cluster, Some(store.clone()), c).await);
    }
    gateways
}

/// Waits until the members split every shard: each owns some, none is pending, and every
/// replica knows where each shard's signals go (its last list saw the claims).
async fn split(gateways: &[Gateway]) {
    let n = gateways.len() as f64;
    eventually(Duration::from_secs(30), "the members splitting every shard", || async {
        let owned = total(gateways, "gateway_ownership_shards_owned", &[]).await;
        for g in gateways {
            let routed_nowhere = g.metric("gateway_ownership_shards_routed", &["to=\"none\""]).await;
            let members = g.metric("gateway_ownership_members", &[]).await;
            let pending = g.metric("gateway_ownership_shards_pending", &[]).await;
            let owns = g.metric("gateway_ownership_shards_owned", &[]).await;
            if owns == 0.0 || routed_nowhere > 0.0 || pending > 0.0 || members != n {
                return None;
            }
        }
        (owned == f64::from(SHARDS)).then_some(())
    })
    .await;
}

/// Waits until every member has completed two more rounds with no shard changing hands anywhere.
async fn settled(gateways: &[Gateway]) {
    let handovers = total(gateways, "gateway_ownership_handovers_total", &[]).await;
    let mut rounds = Vec::new();
    for g in gateways {
        rounds.push(g.metric("gateway_ownership_rounds_total", &["result=\"ok\""]).await);
    }
    eventually(Duration::from_secs(60), "two quiet rounds of every member", || async {
        for (g, before) in gateways.iter().zip(&rounds) {
            if g.metric("gateway_ownership_rounds_total", &["result=\"ok\""]).await < before + 2.0 {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert_eq!(
        total(gateways, "gateway_ownership_handovers_total", &[]).await,
        handovers,
        "a settled assignment stays put"
    );
}

async fn total(gateways: &[Gateway], name: &str, labels: &[&str]) -> f64 {
    let mut sum = 0.0;
    for g in gateways {
        sum += g.metric(name, labels).await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_to_any_replica_are_written_by_their_shard_s_owner_with_exact_counts_and_no_lease() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock) as SharedClock));
    let gateways = fleet(&store, 3).await;
    // Settled: the shards are split (each member owns the ones it wins), and every replica knows
    // where each shard's signals go.
    split(&gateways).await;
    // ... and stays so for a round of every member: every view then holds the final claims (a
    // forward to a member whose claim is not yet effective would take the Lease path there).
    settled(&gateways).await;

    // 40 incidents x 6 signals, every signal to the next replica in turn, concurrently.
    let (incidents, per_incident) = (40, 6);
    let acked = send_round_robin(&gateways, "api", incidents, per_incident).await;
    exactly_acknowledged(&store, &acked, incidents, incidents * per_incident);
    // Two thirds of the signals reached a replica that does not own their shard.
    let forwarded = total(&gateways, "gateway_forwards_total", &["result=\"stored\""]).await;
    assert!(forwarded > 0.0, "signals were forwarded to their owner");
    assert_eq!(
        total(
            &gateways,
            "gateway_forwarded_signals_received_total",
            &["result=\"stored\""]
        )
        .await,
        forwarded
    );
    let mut why = String::new();
    for g in &gateways {
        for line in g.metrics().await.lines() {
            if line.starts_with("gateway_forward")
                || line.starts_with("gateway_ownership")
                || line.starts_with("gateway_lock_acq")
            {
                why.push_str(line);
                why.push('\n');
            }
        }
        why.push_str("--\n");
    }
    assert_eq!(
        total(&gateways, "gateway_lock_acquisitions_total", &[]).await,
        0.0,
        "creates under ownership take no per-fingerprint Lease:\n{why}"
    );
    assert!(
        store
            .all_leases()
            .iter()
            .all(|l| l.metadata.name.as_deref().is_some_and(|n| n.starts_with("gw-member-")))
    );

    // A clean stop hands the shards over at once: the other two own all of them.
    let mut gateways = gateways;
    gateways.pop().unwrap().stop().await.unwrap();
    eventually(Duration::from_secs(20), "the two left own every shard", || async {
        let owned = total(&gateways, "gateway_ownership_shards_owned", &[]).await;
        (owned == f64::from(SHARDS)).then_some(())
    })
    .await;
    assert_eq!(store.all_leases().len(), 2, "the stopped member's Lease is gone");
}

/// A member Lease that claims every shard for a replica nobody can reach.
fn unreachable_member(address: &str) -> Lease {
    ghost_member(address, None)
}

/// One member started beside the ghost `lease`, once it sees the ghost as a live member.
async fn beside(store: &Arc<EmbeddedStore>, lease: &Lease) -> Vec<Gateway> {
    store.create_lease(Call::UNCOUNTED, lease).await.unwrap();
    let gateways = fleet(store, 1).await;
    let g = &gateways[0];
    eventually(
        Duration::from_secs(20),
        "the ghost is seen as a live member",
        || async { (g.metric("gateway_ownership_members", &[]).await == 2.0).then_some(()) },
    )
    .await;
    gateways
}

/// A member Lease, live for 5 minutes, that claims every shard for `address`, publishing the
/// certificate fingerprint `cert_sha256` if given, and a key no gateway has.
fn ghost_member(address: &str, cert_sha256: Option<&str>) -> Lease {
    let all: Vec<String> = (0..SHARDS).map(|s| s.to_string()).collect();
    let mut annotations: BTreeMap<String, String> = [
        (ownership::ADDRESS_ANNOTATION.to_owned(), address.to_owned()),
        (ownership::KEY_ANNOTATION.to_owned(), "k".repeat(64)),
        (ownership::SHARDS_ANNOTATION.to_owned(), all.join(",")),
        (ownership::SHARD_COUNT_ANNOTATION.to_owned(), SHARDS.to_string()),
    ]
    .into();
    if let Some(pin) = cert_sha256 {
        annotations.insert(ownership::CERT_ANNOTATION.to_owned(), pin.to_owned());
    }
    Lease {
        metadata: ObjectMeta {
            name: Some("gw-member-ghost-00000000".into()),
            namespace: Some("signals".into()),
            labels: Some(
                [(
                    ownership::MEMBER_LABEL.0.to_owned(),
                    ownership::MEMBER_LABEL.1.to_owned(),
                )]
                .into(),
            ),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("ghost_00000000".into()),
            lease_duration_seconds: Some(300),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..LeaseSpec::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_cannot_be_reached_leaves_the_signal_to_the_lease_guarded_path() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock) as SharedClock));
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gateways = beside(&store, &unreachable_member(&address)).await;
    let g = &gateways[0];
    for (i, expected) in [(0, 201), (1, 202)] {
        let (status, _, body) = g.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
        assert_eq!(status.as_u16(), expected, "signal {i}: {body}");
    }
    assert_eq!(
        g.metric("gateway_forward_fallbacks_total", &["reason=\"unreachable\""])
            .await,
        2.0
    );
    assert_eq!(
        g.metric("gateway_ownership_shards_owned", &[]).await,
        0.0,
        "a live claim is never overlapped"
    );
    assert!(
        g.metric("gateway_lock_acquisitions_total", &["outcome=\"acquired\""])
            .await
            >= 1.0
    );
    assert_eq!(store.all_requests().len(), 1);
    assert_eq!(count_of(&store.all_requests()[0]), 2);
}

/// What a member publishes for `cert`: the SHA-256 of its (leaf) certificate's DER, hex.
fn pin_of(cert: &std::path::Path) -> String {
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert).unwrap();
    signal_gateway::http::server::sha256_hex(der.as_ref())
}

fn published_pins(store: &EmbeddedStore) -> BTreeMap<String, String> {
    store
        .all_leases()
        .into_iter()
        .filter_map(|l| {
            let pin = l
                .metadata
                .annotations
                .as_ref()?
                .get(ownership::CERT_ANNOTATION)?
                .clone();
            Some((l.spec?.holder_identity?, pin))
        })
        .collect()
}

/// One RR per incident, each counting exactly the signals acknowledged with its name.
fn exactly_acknowledged(store: &EmbeddedStore, acked: &BTreeMap<String, i64>, incidents: usize, signals: usize) {
    let rrs = store.all_requests();
    assert_eq!(rrs.len(), incidents, "one RR per incident");
    let fingerprints: HashSet<_> = rrs.iter().map(|rr| rr.spec.signal_fingerprint.clone()).collect();
    assert_eq!(fingerprints.len(), incidents);
    for rr in &rrs {
        let name = rr.metadata.name.clone().unwrap();
        assert_eq!(
            count_of(rr),
            acked[&name],
            "{name}: stored count == acknowledged signals"
        );
    }
    assert_eq!(rrs.iter().map(count_of).sum::<i64>(), signals as i64);
}

/// Sends `incidents` x `per_incident` signals, each to the next gateway in turn, concurrently;
/// asserts every one was acknowledged and returns the acknowledged signals by RR name.
async fn send_round_robin(
    gateways: &[Gateway],
    tag: &str,
    incidents: usize,
    per_incident: usize,
) -> BTreeMap<String, i64> {
    let mut tasks = Vec::new();
    for k in 0..incidents * per_incident {
        let g = &gateways[k % gateways.len()];
        let (client, base) = (g.client.clone(), g.base.clone());
        let body = webhook(vec![pod_alert("shop", &format!("{tag}-{}", k % incidents))]);
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(format!("{base}/api/v1/signals/prometheus"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }));
    }
    let mut acked = BTreeMap::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == 201 || status == 202, "answered {status}: {body}");
        *acked
            .entry(body["remediationRequestName"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_members_forward_to_the_certificate_each_owner_publishes_also_after_a_renewal() {
    let dir = common::temp_dir("own-tls");
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock) as SharedClock));
    let mut gateways = Vec::new();
    let mut certs = Vec::new();
    for i in 0..2 {
        let tls = common::self_signed_cert(&dir, &format!("gw-{i}"));
        certs.push(tls.clone());
        let mut c = config(&format!("gw-{i}"));
        c.server.tls = Some(tls);
        let cluster: Arc<dyn Cluster> = store.clone();
        gateways.push(Gateway::on(cluster, Some(store.clone()), c).await.over_tls());
    }
    split(&gateways).await;
    settled(&gateways).await;
    // Each member publishes its own certificate's fingerprint beside its https address.
    let pins = published_pins(&store);
    let expected: HashSet<String> = certs.iter().map(|t| pin_of(&t.cert_file)).collect();
    assert_eq!(pins.values().cloned().collect::<HashSet<_>>(), expected, "{pins:?}");
    for l in store.all_leases() {
        let address = &l.metadata.annotations.as_ref().unwrap()[ownership::ADDRESS_ANNOTATION];
        assert!(address.starts_with("https://127.0.0.1:"), "{address}");
    }

    let mut acked = send_round_robin(&gateways, "api", 20, 4).await;
    let forwarded = total(&gateways, "gateway_forwards_total", &["result=\"stored\""]).await;
    assert!(forwarded > 0.0, "signals were forwarded over TLS to their owner");

    // gw-1's certificate is renewed (key and certificate replaced on disk): it serves and
    // publishes the new one, and forwards to it go on without a fallback.
    let renewed = common::self_signed_cert(&dir, "gw-1-renewed");
    std::fs::copy(&renewed.key_file, &certs[1].key_file).unwrap();
    std::fs::copy(&renewed.cert_file, &certs[1].cert_file).unwrap();
    let new_pin = pin_of(&renewed.cert_file);
    eventually(
        Duration::from_secs(30),
        "gw-1 publishing its renewed certificate",
        || async { published_pins(&store).values().any(|p| *p == new_pin).then_some(()) },
    )
    .await;
    settled(&gateways).await;
    for (name, n) in send_round_robin(&gateways, "api", 20, 4).await {
        *acked.entry(name).or_default() += n;
    }
    assert!(
        total(&gateways, "gateway_forwards_total", &["result=\"stored\""]).await > forwarded,
        "forwards reach the renewed certificate"
    );

    assert_eq!(
        total(&gateways, "gateway_forward_fallbacks_total", &[]).await,
        0.0,
        "no forward fell back to the Lease-guarded path"
    );
    exactly_acknowledged(&store, &acked, 20, 160);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_peer_is_sent_nothing_unless_it_presents_the_certificate_its_lease_publishes() {
    // A TLS gateway (not a member: forwards to it are refused once they reach it) that ghost
    // members name as their address.
    let dir = common::temp_dir("own-pin");
    let served = common::self_signed_cert(&dir, "served");
    let other = common::self_signed_cert(&dir, "other");
    let mut c = test_config();
    c.server.tls = Some(served.clone());
    let target = Gateway::embedded(c).await.over_tls();
    let received = || async { target.metric("gateway_forwarded_signals_received_total", &[]).await };

    // (the pin the ghost publishes, the fallback reason, whether the forward reached the target)
    let cases = [
        (Some(pin_of(&other.cert_file)), "untrusted", false),
        (None, "untrusted", false),
        (Some(pin_of(&served.cert_file)), "refused", true),
    ];
    for (pin, reason, reaches) in cases {
        let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock) as SharedClock));
        let gateways = beside(&store, &ghost_member(&target.base, pin.as_deref())).await;
        let g = &gateways[0];
        let before = received().await;
        let (status, _, body) = g.alerts(&webhook(vec![pod_alert("shop", "api-0")])).await;
        assert_eq!(status.as_u16(), 201, "{pin:?}: {body}");
        assert_eq!(
            g.metric("gateway_forward_fallbacks_total", &[&format!("reason=\"{reason}\"")])
                .await,
            1.0,
            "{pin:?}: processed here after the forward was {reason}"
        );
        assert_eq!(
            received().await - before,
            if reaches { 1.0 } else { 0.0 },
            "{pin:?}: whether the forward reached the peer's HTTP layer"
        );
        assert_eq!(store.all_requests().len(), 1);
        assert_eq!(count_of(&store.all_requests()[0]), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarding_endpoint_refuses_what_is_not_a_member_s_forward() {
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock) as SharedClock));
    let gateways = fleet(&store, 1).await;
    let g = &gateways[0];
    let key = eventually(Duration::from_secs(20), "the member Lease", || async {
        store
            .all_leases()
            .into_iter()
            .find_map(|l| l.metadata.annotations?.get(ownership::KEY_ANNOTATION).cloned())
    })
    .await;
    let url = format!("{}/internal/v1/forward", g.base);
    let fp = "a".repeat(64);
    let spec = serde_json::to_value(signal_gateway::crd::RemediationRequestSpec::example(&fp)).unwrap();
    let send = |key: Option<String>, body: String| {
        let mut req = g
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("x-signal-gateway-forward-key", k);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let ct = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, ct)
        }
    };
    let good = serde_json::json!({"fingerprint": fp, "spec": spec, "deadlineMs": 5000}).to_string();
    let problem = Some("application/problem+json".to_owned());
    assert_eq!(send(None, good.clone()).await, (403, problem.clone()), "no key");
    assert_eq!(
        send(Some("x".repeat(64)), good.clone()).await,
        (403, problem.clone()),
        "wrong key"
    );
    assert_eq!(
        send(Some(key.clone()), "{".into()).await,
        (400, problem.clone()),
        "not JSON"
    );
    let other = serde_json::json!({"fingerprint": "b".repeat(64), "spec": spec, "deadlineMs": 5000}).to_string();
    assert_eq!(
        send(Some(key.clone()), other).await,
        (400, problem.clone()),
        "spec of another fingerprint"
    );
    // Larger than a forward can be: refused with 413 — or the connection closed while the client
    // is still sending the rest, which is how a server refuses a body it will not read.
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let refused = g
        .client
        .post(&url)
        .header("x-signal-gateway-forward-key", key.clone())
        .body(huge)
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert!(matches!(refused, Ok(413) | Err(_)), "{refused:?}");
    assert!(store.all_requests().is_empty(), "nothing refused was stored");
    // A member's forward is stored and answered with its acknowledgement.
    let (status, _) = send(Some(key), good).await;
    assert_eq!(status, 200);
    assert_eq!(store.all_requests().len(), 1);
    assert_eq!(
        g.metric("gateway_forwarded_signals_received_total", &["result=\"refused\""])
            .await,
        5.0
    );
}

/// The owner closes a keep-alive connection once it has been idle for `server.headerReadTimeout`
/// (its members run the same configuration). A forwarder that reuses a connection at that moment
/// has its forward cut off unanswered, and the sender gets a 503 for a signal that nobody
/// refused. Forwards sent at the owner's limit, each after one idle interval of the pair, are
/// all answered and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_at_the_owner_s_keep_alive_limit_are_answered_not_cut_off() {
    let limit = Duration::from_millis(400);
    let store = Arc::new(EmbeddedStore::new(Arc::new(SystemClock) as SharedClock));
    let gateways = fleet_with(&store, 2, |c| c.server.header_read_timeout = limit).await;
    split(&gateways).await;
    settled(&gateways).await;
    let g = &gateways[0];
    // The sender reuses no connection idle as long as these: only the forwarder's pool is under test.
    let sender = common::client_within(limit);
    let send = |pod: String| {
        let sender = sender.clone();
        let url = format!("{}/api/v1/signals/prometheus", g.base);
        async move {
            let resp = sender
                .post(url)
                .json(&webhook(vec![pod_alert("shop", &pod)]))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        }
    };
    // An incident gateway 0 forwards: its owner is gateway 1.
    let mut pod = None;
    for k in 0..64 {
        let before = g.metric("gateway_forwards_total", &["result=\"stored\""]).await;
        let candidate = format!("api-{k}");
        let (status, body) = send(candidate.clone()).await;
        assert!(status == 201 || status == 202, "answered {status}: {body}");
        if g.metric("gateway_forwards_total", &["result=\"stored\""]).await > before {
            pod = Some(candidate);
            break;
        }
    }
    let pod = pod.expect("an incident owned by the other member");
    let mut refused = Vec::new();
    let rounds = 120u32;
    for i in 0..rounds {
        // Idle intervals sweeping the owner's limit, 0.5 ms apart.
        tokio::time::sleep(limit - Duration::from_millis(10) + Duration::from_micros(500) * (i % 40)).await;
        let (status, body) = send(pod.clone()).await;
        if status != 202 {
            refused.push(format!("{i}: {status} {body}"));
        }
    }
    assert!(
        refused.is_empty(),
        "forwards cut off at the keep-alive limit:\n{}",
        refused.join("\n")
    );
    let (_, body) = send(pod.clone()).await;
    let name = serde_json::from_str::<serde_json::Value>(&body).unwrap()["remediationRequestName"]
        .as_str()
        .unwrap()
        .to_owned();
    let rr = store
        .all_requests()
        .into_iter()
        .find(|rr| rr.metadata.name.as_deref() == Some(name.as_str()))
        .unwrap();
    assert_eq!(
        count_of(&rr),
        i64::from(rounds) + 2,
        "every acknowledged signal counted once"
    );
}
