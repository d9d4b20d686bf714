//! What the load test sends: the five scenarios, their incident (fingerprint) distributions and
//! the request bodies. Everything that must be unique across users (new incidents, event names)
//! draws from one process-wide atomic counter, so two users never produce the same "new" pod.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub const PROMETHEUS_PATH: &str = "/api/v1/signals/prometheus";
pub const EVENT_PATH: &str = "/api/v1/signals/kubernetes-event";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Every signal is the same incident: one pod alert.
    Storm,
    /// Zipf-popular standing incidents plus a fraction of brand-new ones, one alert per request.
    Mixed,
    /// Every signal is a new incident.
    Unique,
    /// Alertmanager notifications of several alerts, incidents drawn as in `Mixed`.
    Batch,
    /// core/v1 Warning Events, incidents drawn as in `Mixed`.
    Events,
}

impl Scenario {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "storm" => Ok(Scenario::Storm),
            "mixed" => Ok(Scenario::Mixed),
            "unique" => Ok(Scenario::Unique),
            "batch" => Ok(Scenario::Batch),
            "events" => Ok(Scenario::Events),
            other => Err(format!(
                "unknown scenario {other:?}: expected storm, mixed, unique, batch or events"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Storm => "storm",
            Scenario::Mixed => "mixed",
            Scenario::Unique => "unique",
            Scenario::Batch => "batch",
            Scenario::Events => "events",
        }
    }

    /// The `alertname` (or event reason) every signal of this scenario carries.
    pub fn signal_name(self) -> &'static str {
        match self {
            Scenario::Storm => "LoadStorm",
            Scenario::Mixed => "LoadMixed",
            Scenario::Unique => "LoadUnique",
            Scenario::Batch => "LoadBatch",
            Scenario::Events => "BackOff",
        }
    }
}

/// One request to send: where, the body, how many signals it carries and their target pods.
pub struct Request {
    pub path: &'static str,
    pub body: String,
    pub signals: u64,
    pub pods: Vec<String>,
}

/// Parameters of the incident mix and the generators' shared counters.
pub struct Workload {
    pub scenario: Scenario,
    /// Value of the `namespace` label / involvedObject namespace (unique per run).
    pub namespace: String,
    /// Number of standing incidents in `mixed`, `batch` and `events`.
    pub standing: usize,
    /// Fraction of signals that are brand-new incidents in `mixed`, `batch` and `events`.
    pub new_fraction: f64,
    /// Alerts per notification in `batch` (inclusive range).
    pub batch_min: usize,
    pub batch_max: usize,
    /// Cumulative Zipf(s = 1) distribution over the standing incidents, rank 1 first.
    cdf: Vec<f64>,
    /// Process-wide counter for new incidents and unique event names.
    next_unique: AtomicU64,
    /// Process-wide counter of batch notifications (drives the batch size sequence).
    next_batch: AtomicU64,
    /// Warm-up phase: requests walk the standing incidents in rank order instead of drawing.
    warmup: bool,
    next_warmup: AtomicU64,
    /// Stride through the batch sizes; coprime with the span so every size comes up once per cycle.
    batch_stride: u64,
    starts_at: String,
}

/// Who a signal is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Standing incident of this rank (0 = most popular).
    Standing(usize),
    /// Brand-new incident with this process-unique sequence number.
    New(u64),
    /// The single storm pod.
    Storm,
}

impl Target {
    pub fn pod(&self, scenario: Scenario) -> String {
        match self {
            Target::Storm => "storm-0".to_owned(),
            Target::Standing(rank) => format!("standing-{rank}"),
            Target::New(n) if scenario == Scenario::Unique => format!("unique-{n}"),
            Target::New(n) => format!("new-{n}"),
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Workload {
    pub fn new(
        scenario: Scenario,
        namespace: String,
        standing: usize,
        new_fraction: f64,
        batch: (usize, usize),
    ) -> Result<Self, String> {
        if standing == 0 {
            return Err("the number of standing incidents must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&new_fraction) {
            return Err(format!(
                "the new-incident fraction must be in [0, 1], got {new_fraction}"
            ));
        }
        let (batch_min, batch_max) = batch;
        if batch_min == 0 || batch_min > batch_max {
            return Err(format!("bad batch size range {batch_min}-{batch_max}"));
        }
        let weights: Vec<f64> = (1..=standing).map(|k| 1.0 / k as f64).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        *cdf.last_mut().expect("standing >= 1") = 1.0;
        let span = (batch_max - batch_min + 1) as u64;
        let mut stride = ((span as f64 * 0.618) as u64).max(1);
        while gcd(stride, span) != 1 {
            stride += 1;
        }
        Ok(Workload {
            scenario,
            namespace,
            standing,
            new_fraction,
            batch_min,
            batch_max,
            cdf,
            next_unique: AtomicU64::new(0),
            next_batch: AtomicU64::new(0),
            warmup: false,
            next_warmup: AtomicU64::new(0),
            batch_stride: stride,
            starts_at: rfc3339(SystemTime::now()),
        })
    }

    /// Turns this workload into the warm-up of its scenario: one signal per request, about the
    /// standing incidents in rank order (0, 1, ..., standing - 1, 0, ...), so that a run measures
    /// the steady state its definition describes (standing incidents already have their RR; only
    /// `new_fraction` of the signals are new incidents) whatever its duration.
    pub fn warming_up(mut self) -> Self {
        self.warmup = true;
        self
    }

    /// Mean signals per request (the batch size sequence cycles through every size in the
    /// range exactly once per `max - min + 1` notifications, so this is exact per cycle).
    pub fn mean_batch(&self) -> f64 {
        match self.scenario {
            Scenario::Batch if !self.warmup => (self.batch_min + self.batch_max) as f64 / 2.0,
            _ => 1.0,
        }
    }

    /// Probability of standing incident `rank` (0-based) among standing picks.
    #[cfg(test)]
    pub fn standing_probability(&self, rank: usize) -> f64 {
        let below = if rank == 0 { 0.0 } else { self.cdf[rank - 1] };
        self.cdf[rank] - below
    }

    fn new_incident(&self) -> Target {
        Target::New(self.next_unique.fetch_add(1, Ordering::Relaxed))
    }

    /// A standing incident drawn by Zipf popularity.
    pub fn zipf(&self, rng: &mut fastrand::Rng) -> Target {
        let u = rng.f64();
        let rank = self.cdf.partition_point(|&c| c < u).min(self.standing - 1);
        Target::Standing(rank)
    }

    /// A `mixed` incident: new with probability `new_fraction`, else a Zipf-drawn standing one.
    pub fn mixed(&self, rng: &mut fastrand::Rng) -> Target {
        if rng.f64() < self.new_fraction {
            self.new_incident()
        } else {
            self.zipf(rng)
        }
    }

    /// The next batch size: min + (i * stride mod span), a fixed permutation of the range.
    pub fn next_batch_size(&self) -> usize {
        let i = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let span = (self.batch_max - self.batch_min + 1) as u64;
        self.batch_min + ((i.wrapping_mul(self.batch_stride)) % span) as usize
    }

    /// `n` distinct incidents for one notification (Alertmanager never repeats an alert within
    /// one group); a standing draw that repeats is redrawn, and a new incident is used when
    /// redrawing does not find a fresh one quickly.
    pub fn batch_targets(&self, n: usize, rng: &mut fastrand::Rng) -> Vec<Target> {
        let mut seen = HashSet::with_capacity(n);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let mut t = self.mixed(rng);
            let mut tries = 0;
            while seen.contains(&t) {
                tries += 1;
                t = if tries > 64 {
                    self.new_incident()
                } else {
                    self.mixed(rng)
                };
            }
            seen.insert(t.clone());
            out.push(t);
        }
        out
    }

    /// The next request of this scenario.
    pub fn next_request(&self, rng: &mut fastrand::Rng) -> Request {
        let scenario = self.scenario;
        if self.warmup {
            let rank = self.next_warmup.fetch_add(1, Ordering::Relaxed) as usize % self.standing;
            let target = match scenario {
                // Nothing stands in these: a storm's one incident is created by its first signal,
                // and `unique` has none (the driver does not warm them up).
                Scenario::Storm | Scenario::Unique => Target::Storm,
                _ => Target::Standing(rank),
            };
            if scenario == Scenario::Events {
                let seq = self.next_unique.fetch_add(1, Ordering::Relaxed);
                return Request {
                    path: EVENT_PATH,
                    body: self.event(&target, seq).to_string(),
                    signals: 1,
                    pods: vec![target.pod(scenario)],
                };
            }
            return self.alerts_request(&[target]);
        }
        match scenario {
            Scenario::Storm => self.alerts_request(&[Target::Storm]),
            Scenario::Mixed => self.alerts_request(&[self.mixed(rng)]),
            Scenario::Unique => self.alerts_request(&[self.new_incident()]),
            Scenario::Batch => {
                let n = self.next_batch_size();
                let targets = self.batch_targets(n, rng);
                self.alerts_request(&targets)
            }
            Scenario::Events => {
                let target = self.mixed(rng);
                let seq = self.next_unique.fetch_add(1, Ordering::Relaxed);
                Request {
                    path: EVENT_PATH,
                    body: self.event(&target, seq).to_string(),
                    signals: 1,
                    pods: vec![target.pod(scenario)],
                }
            }
        }
    }

    fn alerts_request(&self, targets: &[Target]) -> Request {
        let alerts: Vec<Value> = targets.iter().map(|t| self.alert(t)).collect();
        Request {
            path: PROMETHEUS_PATH,
            body: self.webhook(alerts).to_string(),
            signals: targets.len() as u64,
            pods: targets.iter().map(|t| t.pod(self.scenario)).collect(),
        }
    }

    /// One firing pod alert, as Alertmanager 0.25 sends it.
    pub fn alert(&self, target: &Target) -> Value {
        let pod = target.pod(self.scenario);
        let alertname = self.scenario.signal_name();
        json!({
            "status": "firing",
            "labels": {
                "alertname": alertname,
                "namespace": self.namespace,
                "pod": pod,
                "severity": "critical",
                "job": "signal-gateway-loadtest",
            },
            "annotations": {
                "summary": "Load test signal",
                "description": format!("Pod {}/{pod} is under load test", self.namespace),
            },
            "startsAt": self.starts_at,
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.loadtest:9090/graph",
            "fingerprint": format!("{:016x}", fnv1a(format!("{alertname}/{}/{pod}", self.namespace).as_bytes())),
        })
    }

    /// An Alertmanager webhook v4 notification carrying `alerts`.
    pub fn webhook(&self, alerts: Vec<Value>) -> Value {
        let alertname = self.scenario.signal_name();
        json!({
            "version": "4",
            "groupKey": format!("{{}}:{{alertname=\"{alertname}\"}}"),
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "signal-gateway-loadtest",
            "groupLabels": {"alertname": alertname},
            "commonLabels": {"alertname": alertname, "namespace": self.namespace, "severity": "critical"},
            "commonAnnotations": {"summary": "Load test signal"},
            "externalURL": "http://alertmanager.loadtest:9093",
            "alerts": alerts,
        })
    }

    /// A core/v1 Warning Event (kubelet BackOff) about the pod of `target`; `seq` makes the
    /// Event object itself unique.
    pub fn event(&self, target: &Target, seq: u64) -> Value {
        let pod = target.pod(self.scenario);
        let ns = &self.namespace;
        json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": format!("{pod}.{seq:016x}"),
                "namespace": ns,
                "uid": uuid_like(fnv1a(format!("event/{ns}/{seq}").as_bytes())),
                "resourceVersion": seq.to_string(),
                "creationTimestamp": self.starts_at,
            },
            "involvedObject": {
                "kind": "Pod",
                "namespace": ns,
                "name": pod,
                "uid": uuid_like(fnv1a(format!("pod/{ns}/{pod}").as_bytes())),
                "apiVersion": "v1",
                "fieldPath": "spec.containers{app}",
            },
            "reason": "BackOff",
            "message": format!("Back-off restarting failed container app in pod {pod}_{ns}"),
            "source": {"component": "kubelet", "host": "loadtest-node"},
            "firstTimestamp": self.starts_at,
            "lastTimestamp": self.starts_at,
            "count": 1,
            "type": "Warning",
            "eventTime": null,
            "reportingComponent": "kubelet",
            "reportingInstance": "loadtest-node",
        })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn uuid_like(h: u64) -> String {
    let g = h.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        g >> 52,
        g & 0xffff_ffff_ffff
    )
}

/// RFC 3339 UTC timestamp with second precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    fn workload(s: Scenario) -> Workload {
        Workload::new(s, "load-test".into(), 200, 0.05, (10, 50)).unwrap()
    }

    #[test]
    fn zipf_popularity_is_one_over_rank() {
        let w = workload(Scenario::Mixed);
        let h200: f64 = (1..=200).map(|k| 1.0 / k as f64).sum();
        assert!((w.standing_probability(0) - 1.0 / h200).abs() < 1e-12);
        assert!((w.standing_probability(9) - 0.1 / h200).abs() < 1e-12);
        let total: f64 = (0..200).map(|r| w.standing_probability(r)).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn mixed_draws_match_the_distribution() {
        let w = workload(Scenario::Mixed);
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 200_000;
        let mut counts: HashMap<Target, usize> = HashMap::new();
        let mut new = 0;
        for _ in 0..n {
            match w.mixed(&mut rng) {
                Target::New(_) => new += 1,
                t => *counts.entry(t).or_default() += 1,
            }
        }
        let new_share = new as f64 / n as f64;
        assert!((new_share - 0.05).abs() < 0.005, "{new_share}");
        let top = counts[&Target::Standing(0)] as f64 / n as f64;
        let want = 0.95 * w.standing_probability(0);
        assert!((top - want).abs() < 0.01, "{top} vs {want}");
        assert!(counts.keys().all(|t| matches!(t, Target::Standing(r) if *r < 200)));
    }

    #[test]
    fn new_incidents_are_unique_across_threads() {
        let w = std::sync::Arc::new(workload(Scenario::Unique));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let w = w.clone();
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(i);
                    (0..1000)
                        .map(|_| {
                            let body: Value = serde_json::from_str(&w.next_request(&mut rng).body).unwrap();
                            body["alerts"][0]["labels"]["pod"].as_str().unwrap().to_owned()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let pods: Vec<String> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let distinct: HashSet<&String> = pods.iter().collect();
        assert_eq!(distinct.len(), 4000);
    }

    #[test]
    fn batch_sizes_cycle_through_the_range_with_the_exact_mean() {
        let w = workload(Scenario::Batch);
        let sizes: Vec<usize> = (0..41).map(|_| w.next_batch_size()).collect();
        let mut sorted = sizes.clone();
        sorted.sort();
        assert_eq!(sorted, (10..=50).collect::<Vec<_>>());
        assert_eq!(sizes.iter().sum::<usize>() as f64 / 41.0, w.mean_batch());
    }

    #[test]
    fn a_batch_never_repeats_an_incident() {
        let w = workload(Scenario::Batch);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..200 {
            let req = w.next_request(&mut rng);
            let body: Value = serde_json::from_str(&req.body).unwrap();
            let alerts = body["alerts"].as_array().unwrap();
            assert_eq!(alerts.len() as u64, req.signals);
            assert!((10..=50).contains(&alerts.len()));
            let pods: HashSet<&str> = alerts.iter().map(|a| a["labels"]["pod"].as_str().unwrap()).collect();
            assert_eq!(pods.len(), alerts.len());
        }
    }

    #[test]
    fn storm_is_one_incident_and_events_are_warnings() {
        let w = workload(Scenario::Storm);
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..3 {
            let body: Value = serde_json::from_str(&w.next_request(&mut rng).body).unwrap();
            assert_eq!(body["alerts"][0]["labels"]["pod"], "storm-0");
            assert_eq!(body["alerts"][0]["labels"]["alertname"], "LoadStorm");
            assert_eq!(body["version"], "4");
        }
        let w = workload(Scenario::Events);
        let req = w.next_request(&mut rng);
        assert_eq!(req.path, EVENT_PATH);
        let body: Value = serde_json::from_str(&req.body).unwrap();
        assert_eq!(body["type"], "Warning");
        assert_eq!(body["involvedObject"]["kind"], "Pod");
        assert_eq!(body["involvedObject"]["namespace"], "load-test");
    }

    #[test]
    fn the_warm_up_walks_every_standing_incident_once_per_round() {
        for scenario in [Scenario::Mixed, Scenario::Batch, Scenario::Events] {
            let w = Workload::new(scenario, "ns".into(), 7, 0.5, (10, 50))
                .unwrap()
                .warming_up();
            assert_eq!(w.mean_batch(), 1.0);
            let mut rng = fastrand::Rng::with_seed(1);
            let pods: Vec<String> = (0..14)
                .map(|_| {
                    let r = w.next_request(&mut rng);
                    assert_eq!(r.signals, 1);
                    r.pods.into_iter().next().unwrap()
                })
                .collect();
            let expected: Vec<String> = (0..14).map(|i| format!("standing-{}", i % 7)).collect();
            assert_eq!(pods, expected, "{scenario:?}");
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_514_400)),
            "2026-11-24T10:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
