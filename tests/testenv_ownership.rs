//! Fingerprint ownership (ADR 0014) with replicas as OS processes on a real kube-apiserver:
//! under a steady load, a replica is SIGKILLed, one is added and one is replaced by a rolling
//! restart. No incident gets a second RR, every acknowledged signal is counted (beyond those whose
//! answer was lost with a killed process), and the shards are owned again after the handovers.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::testenv::{Replica, admin, requests_for, testenv, unique};
use common::{count_of, fp_of_pod, pod_alert, webhook};

// Generous timeouts: the API server, etcd, four replicas and the load share two cores.
const CONFIG: &str = "logging:\n  format: json\nserver:\n  requestTimeout: 20s\nbackend:\n  apiTimeout: 6s\nownership:\n  enabled: true\n  leaseDuration: 15s\n";
const SHARDS: f64 = 64.0;
const LEASE: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Tally {
    /// Per pod: acknowledged signals, and requests whose outcome is unknown (no answer, or a
    /// 503 that says the write may be stored).
    acked: HashMap<String, i64>,
    unknown: HashMap<String, i64>,
    created: HashMap<String, i64>,
    not_stored: u64,
}

async fn owned_total(replicas: &[&Replica], client: &reqwest::Client) -> f64 {
    let mut sum = 0.0;
    for r in replicas {
        sum += r.metric(client, "gateway_ownership_shards_owned", &[]).await;
    }
    sum
}

/// Polls until the live replicas own every shard; returns how long it took.
async fn until_all_owned(replicas: &[&Replica], client: &reqwest::Client, within: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        if owned_total(replicas, client).await == SHARDS {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what}: shards not all owned within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_add_and_rolling_restart_under_load_keep_one_rr_per_incident_and_exact_counts() {
    let run = unique();
    let client = common::client();
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start(&format!("own-{run}-{i}"), CONFIG))
        .collect();
    for r in &replicas {
        r.wait_ready(&client).await;
    }
    let live: Vec<&Replica> = replicas.iter().collect();
    let settled = until_all_owned(&live, &client, 6 * LEASE, "start").await;
    eprintln!("three members own all shards {settled:?} after ready");

    let ns = format!("own-{run}");
    let pods: Vec<String> = (0..30).map(|i| format!("api-{i}")).collect();
    let targets = Arc::new(Mutex::new(replicas.iter().map(|r| r.base.clone()).collect::<Vec<_>>()));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // ~40 signals/s, round-robin over the current targets, each in its own task.
    let load = {
        let (targets, tally, stop, client, ns, pods) = (
            targets.clone(),
            tally.clone(),
            stop.clone(),
            client.clone(),
            ns.clone(),
            pods.clone(),
        );
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            let mut k = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let url = {
                    let t = targets.lock().unwrap();
                    format!("{}/api/v1/signals/prometheus", t[k % t.len()])
                };
                let pod = pods[(k * 7) % pods.len()].clone();
                k += 1;
                let body = webhook(vec![pod_alert(&ns, &pod)]).to_string();
                let (client, tally) = (client.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    let sent = client
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body)
                        .timeout(Duration::from_secs(60))
                        .send()
                        .await;
                    let outcome = match sent {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let body: serde_json::Value = resp.json().await.unwrap_or_default();
                            Some((status, body))
                        }
                        Err(_) => None,
                    };
                    let mut t = tally.lock().unwrap();
                    match outcome {
                        Some((201, _)) => {
                            *t.acked.entry(pod.clone()).or_default() += 1;
                            *t.created.entry(pod).or_default() += 1;
                        }
                        Some((202, _)) => *t.acked.entry(pod).or_default() += 1,
                        Some((503, b)) if b["detail"].as_str().is_some_and(|d| d.contains("may be stored")) => {
                            *t.unknown.entry(pod).or_default() += 1
                        }
                        Some((503, _)) => t.not_stored += 1,
                        Some((status, b)) => panic!("{pod}: answered {status}: {b}"),
                        // Cut by a killed replica: it may have been stored.
                        None => *t.unknown.entry(pod).or_default() += 1,
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(8)).await;
    // 1. SIGKILL: its shards move once its Lease has stood still for a lease duration.
    replicas[2].kill9();
    targets.lock().unwrap().remove(2);
    let killed_at = Instant::now();
    let survivors: Vec<&Replica> = replicas[..2].iter().collect();
    let took = until_all_owned(&survivors, &client, 4 * LEASE, "after the kill").await;
    eprintln!(
        "after SIGKILL the survivors own all shards after {:?}",
        killed_at.elapsed().max(took)
    );

    // 2. A replica added: it takes its shards from the others, nothing overlaps.
    replicas.push(Replica::start(&format!("own-{run}-3"), CONFIG));
    replicas[3].wait_ready(&client).await;
    targets.lock().unwrap().push(replicas[3].base.clone());
    let added: Vec<&Replica> = [&replicas[0], &replicas[1], &replicas[3]].into_iter().collect();
    eventually_owns_some(&replicas[3], &client, 4 * LEASE).await;
    until_all_owned(&added, &client, 4 * LEASE, "after the scale-up").await;

    // 3. Rolling restart of one replica: SIGTERM (drain, member Lease deleted), a new one in its place.
    targets.lock().unwrap().retain(|b| *b != replicas[0].base);
    let status = replicas[0].terminate();
    assert!(status.success(), "graceful stop: {status}");
    let left_at = Instant::now();
    let remaining: Vec<&Replica> = [&replicas[1], &replicas[3]].into_iter().collect();
    until_all_owned(&remaining, &client, 4 * LEASE, "after a clean stop").await;
    eprintln!(
        "after a clean stop the others own all shards after {:?}",
        left_at.elapsed()
    );
    replicas.push(Replica::start(&format!("own-{run}-4"), CONFIG));
    replicas[4].wait_ready(&client).await;
    targets.lock().unwrap().push(replicas[4].base.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let t = std::mem::take(&mut *tally.lock().unwrap());
    let admin = admin().await;
    let mut forwards = 0.0;
    for r in [&replicas[1], &replicas[3], &replicas[4]] {
        forwards += r
            .metric(&client, "gateway_forwards_total", &["result=\"stored\""])
            .await;
    }
    let mut report = BTreeMap::new();
    let mut problems = Vec::new();
    for pod in &pods {
        let fp = fp_of_pod(&ns, pod);
        let rrs = requests_for(&admin, &testenv().namespace, &fp).await;
        let acked = t.acked.get(pod).copied().unwrap_or(0);
        let unknown = t.unknown.get(pod).copied().unwrap_or(0);
        let stored: i64 = rrs.iter().map(count_of).sum();
        if rrs.len() > 1 {
            problems.push(format!("{pod}: {} RRs", rrs.len()));
        }
        if acked > 0 && rrs.is_empty() {
            problems.push(format!("{pod}: {acked} acknowledged, no RR"));
        }
        if stored < acked || stored > acked + unknown {
            problems.push(format!(
                "{pod}: stored {stored}, acknowledged {acked}, unknown {unknown}"
            ));
        }
        if t.created.get(pod).copied().unwrap_or(0) > 1 {
            problems.push(format!("{pod}: answered 201 twice"));
        }
        report.insert(pod.clone(), (acked, unknown, stored));
        for rr in rrs {
            let name = rr.metadata.name.unwrap();
            kube::Api::<signal_gateway::crd::RemediationRequest>::namespaced(admin.clone(), &testenv().namespace)
                .delete(&name, &Default::default())
                .await
                .ok();
        }
    }
    let acked: i64 = t.acked.values().sum();
    eprintln!(
        "acknowledged {acked}, unknown {}, not stored {}, forwarded and stored {forwards}",
        t.unknown.values().sum::<i64>(),
        t.not_stored
    );
    assert!(problems.is_empty(), "{problems:#?}\n{report:#?}");
    assert!(acked > 0, "the load stored signals");
    assert!(forwards > 0.0, "signals went to their owners");
}

async fn eventually_owns_some(r: &Replica, client: &reqwest::Client, within: Duration) {
    let started = Instant::now();
    while r.metric(client, "gateway_ownership_shards_owned", &[]).await == 0.0 {
        assert!(
            started.elapsed() < within,
            "{}: owns no shard within {within:?}",
            r.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
