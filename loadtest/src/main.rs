//! signal-gateway load test (goose 0.19).
//!
//! Goose parses its own command line (`--report-file`, `-q`, `--users`, ...); the load test's
//! own settings come from environment variables:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `LOADTEST_SCENARIO` | `mixed` | `storm`, `mixed`, `unique`, `batch` or `events` |
//! | `LOADTEST_RATE` | `100` | target **signals** per second (all users together) |
//! | `LOADTEST_DURATION` | `10` | seconds to run once every user has started |
//! | `LOADTEST_TARGETS` | `http://127.0.0.1:8080` | comma-separated gateway base URLs, used round-robin |
//! | `LOADTEST_NAMESPACE` | `load` | namespace of the signals' targets (make it unique per run) |
//! | `LOADTEST_BATCH` | `10-50` | alerts per notification in `batch`: `N` or `MIN-MAX` |
//! | `LOADTEST_STANDING` | `200` | standing incidents in `mixed`, `batch`, `events` |
//! | `LOADTEST_NEW_FRACTION` | `0.05` | share of brand-new incidents in `mixed`, `batch`, `events` |
//! | `LOADTEST_USERS` | from the rate | concurrent goose users |
//! | `LOADTEST_ACK_FILE` | none | where to write what was acknowledged (JSON) |
//! | `LOADTEST_THRESHOLD` | `0.95` | exit 3 when achieved signals/s < threshold x target (0: off) |
//! | `LOADTEST_REUSE_WITHIN_MS` | `2500` | longest a user's idle connection is reused (a quarter of the gateways' `server.headerReadTimeout`, 10 s by default: a request sent on a connection as the gateway closes it is cut off, not answered) |
//! | `LOADTEST_WARMUP` | `0` | `1`: the warm-up of `mixed`, `batch` or `events`: one signal per request about the standing incidents in rank order (run it before the measured run so their RRs exist) |
//!
//! Pacing: every request reserves its signals on one global schedule (signal k is due at
//! start + k / rate) and waits for its slot before it is sent, so the signal rate is exact for any
//! batch size and a late request is sent at once (the schedule never drifts). Goose's own
//! `--throttle-requests` is not used by default: it paces whole requests and its 10 ms ticks
//! each oversleep, which loses several percent of the rate.
//!
//! Latency is measured from each request's due time (that of its first signal) to its final
//! answer, not from its send: a run that falls behind its schedule shows it in the tail instead
//! of hiding it (no coordinated omission). How late each request went out is recorded too.

mod ack;
mod histogram;
mod workload;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use goose::prelude::*;
use serde_json::json;

use crate::ack::Record;
use crate::workload::{Scenario as Kind, Workload};

struct Settings {
    scenario: Kind,
    rate: f64,
    duration: usize,
    targets: Vec<String>,
    users: usize,
    rate_req: f64,
    ack_file: Option<String>,
    threshold: f64,
    reuse_within: Duration,
}

struct State {
    settings: Settings,
    workload: Workload,
    record: Mutex<Record>,
    next_target: AtomicU64,
    pacer: Pacer,
}

/// One schedule for all users: signal number k is due at `start + k / rate`.
struct Pacer {
    rate: f64,
    start: OnceLock<Instant>,
    reserved: AtomicU64,
}

impl Pacer {
    /// Reserves `signals` slots, waits until the first of them is due, and returns its due time.
    async fn wait(&self, signals: u64) -> Instant {
        let start = *self.start.get_or_init(Instant::now);
        let first = self.reserved.fetch_add(signals, Ordering::Relaxed);
        let due = start + Duration::from_secs_f64(first as f64 / self.rate);
        tokio::time::sleep_until(due.into()).await;
        due
    }

    /// Time from the schedule's start to `t`.
    fn since_start(&self, t: Instant) -> Duration {
        self.start
            .get()
            .map_or(Duration::ZERO, |start| t.saturating_duration_since(*start))
    }

    /// Microseconds from the schedule's start to `t` (saturating: a run of over 71 minutes
    /// gives its later signals the same arrival time).
    fn offset_us(&self, t: Instant) -> u32 {
        u32::try_from(self.since_start(t).as_micros()).unwrap_or(u32::MAX)
    }
}

static STATE: OnceLock<State> = OnceLock::new();

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn env_parse<T: std::str::FromStr>(name: &str, default: &str) -> Result<T, String> {
    let raw = env_or(name, default);
    raw.trim()
        .parse()
        .map_err(|_| format!("{name}={raw:?} is not a valid value"))
}

fn parse_batch(raw: &str) -> Result<(usize, usize), String> {
    let bad = || format!("LOADTEST_BATCH={raw:?}: expected N or MIN-MAX");
    match raw.split_once('-') {
        Some((a, b)) => Ok((
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        )),
        None => {
            let n = raw.trim().parse().map_err(|_| bad())?;
            Ok((n, n))
        }
    }
}

fn load_state() -> Result<State, String> {
    let scenario = Kind::parse(&env_or("LOADTEST_SCENARIO", "mixed"))?;
    let rate: f64 = env_parse("LOADTEST_RATE", "100")?;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(format!("LOADTEST_RATE must be positive, got {rate}"));
    }
    let duration: usize = env_parse("LOADTEST_DURATION", "10")?;
    if duration == 0 {
        return Err("LOADTEST_DURATION must be at least 1 second".into());
    }
    let targets: Vec<String> = env_or("LOADTEST_TARGETS", "http://127.0.0.1:8080")
        .split(',')
        .map(|t| t.trim().trim_end_matches('/').to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if targets.is_empty() {
        return Err("LOADTEST_TARGETS names no gateway".into());
    }
    let mut workload = Workload::new(
        scenario,
        env_or("LOADTEST_NAMESPACE", "load"),
        env_parse("LOADTEST_STANDING", "200")?,
        env_parse("LOADTEST_NEW_FRACTION", "0.05")?,
        parse_batch(&env_or("LOADTEST_BATCH", "10-50"))?,
    )?;
    if env_or("LOADTEST_WARMUP", "0") == "1" {
        if matches!(scenario, Kind::Storm | Kind::Unique) {
            return Err(format!("{} has no standing incidents to warm up", scenario.name()));
        }
        workload = workload.warming_up();
    }
    // Requests per second needed for the signal rate.
    let rate_req = rate / workload.mean_batch();
    // Closed loop: each user keeps one request in flight, so at ~100 ms per answer a user
    // sustains 10 requests/s; size for that, at least 8.
    let users = match std::env::var("LOADTEST_USERS").ok().filter(|v| !v.is_empty()) {
        Some(_) => env_parse("LOADTEST_USERS", "8")?,
        None => ((rate_req * 0.1).ceil() as usize).max(8),
    };
    let settings = Settings {
        scenario,
        rate,
        duration,
        targets,
        users,
        rate_req,
        ack_file: std::env::var("LOADTEST_ACK_FILE").ok().filter(|v| !v.is_empty()),
        threshold: env_parse("LOADTEST_THRESHOLD", "0.95")?,
        reuse_within: Duration::from_millis(env_parse("LOADTEST_REUSE_WITHIN_MS", "2500")?),
    };
    Ok(State {
        settings,
        workload,
        record: Mutex::new(Record::default()),
        next_target: AtomicU64::new(0),
        pacer: Pacer {
            rate,
            start: OnceLock::new(),
            reserved: AtomicU64::new(0),
        },
    })
}

fn state() -> &'static State {
    STATE.get().expect("state is set before the attack starts")
}

/// The one transaction: build the scenario's next request, send it to the next replica
/// (round-robin), and record what the gateway acknowledged.
async fn send_signal(user: &mut GooseUser) -> TransactionResult {
    let st = state();
    let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
    let request = st.workload.next_request(&mut rng);
    let i = st.next_target.fetch_add(1, Ordering::Relaxed) as usize;
    let url = format!("{}{}", st.settings.targets[i % st.settings.targets.len()], request.path);
    let name = request.path;
    let due = st.pacer.wait(request.signals).await;
    let sent = Instant::now();
    let sent_us = st.pacer.offset_us(sent);
    st.record
        .lock()
        .expect("record lock")
        .sent(st.pacer.since_start(due), sent.saturating_duration_since(due));
    let mut resends = 0;
    loop {
        let builder = user
            .get_request_builder(&GooseMethod::Post, &url)?
            .header("content-type", "application/json")
            .body(request.body.clone());
        let goose_request = GooseRequest::builder()
            .method(GooseMethod::Post)
            .path(url.as_str())
            .name(name)
            .set_request_builder(builder)
            .build();
        let mut goose = user.request(goose_request).await?;
        let response = match goose.response {
            Ok(response) => response,
            Err(e) => {
                let mut record = st.record.lock().expect("record lock");
                record.finished(due.elapsed());
                record.transport_error(&request.pods, &e.to_string());
                return Ok(());
            }
        };
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        // Alertmanager resends a notification answered 503, byte for byte, over the same
        // connection (here: to the same replica), with a growing pause.
        if status == 503 && request.signals > 1 && resends < RESENDS {
            st.record.lock().expect("record lock").resending(status, &body);
            resends += 1;
            tokio::time::sleep(RESEND_PAUSE * resends).await;
            continue;
        }
        let ok = {
            let mut record = st.record.lock().expect("record lock");
            record.finished(due.elapsed());
            record.answered(status, &request.pods, &body, sent_us)
        };
        if !ok {
            return user.set_failure(
                "2xx answer that does not account for every signal",
                &mut goose.request,
                None,
                Some(&body),
            );
        }
        return Ok(());
    }
}

/// Each user's client: goose's (its 60 s request timeout), but idle connections are reused only
/// within `reuse_within`. reqwest keeps them 90 s by default while a gateway closes them after
/// `server.headerReadTimeout`, and a signal sent as its connection closes is cut off unanswered:
/// a transport error the gateway never saw, counted against the run.
async fn client_within_keep_alive(user: &mut GooseUser) -> TransactionResult {
    let builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(state().settings.reuse_within);
    Ok(user.set_client_builder(builder).await?)
}

/// Resends of a notification answered 503 (Alertmanager keeps retrying until its next
/// group interval; three is enough to see the resend answered).
const RESENDS: u32 = 3;
const RESEND_PAUSE: Duration = Duration::from_millis(500);

fn goose_err(e: GooseError) -> String {
    format!("goose: {e}")
}

async fn run() -> Result<ExitCode, String> {
    let loaded = load_state()?;
    let _ = STATE.set(loaded);
    let st = state();
    let s = &st.settings;
    eprintln!(
        "loadtest: scenario={} rate={} signals/s ({:.2} req/s, mean batch {}) duration={}s users={} targets={}",
        s.scenario.name(),
        s.rate,
        s.rate_req,
        st.workload.mean_batch(),
        s.duration,
        s.users,
        s.targets.join(",")
    );
    let increase_rate = (s.users * 10).to_string();
    let attack = GooseAttack::initialize()
        .map_err(goose_err)?
        .register_scenario(
            Scenario::new(s.scenario.name())
                .register_transaction(transaction!(client_within_keep_alive).set_on_start().set_name("client"))
                .register_transaction(transaction!(send_signal).set_name(s.scenario.signal_name())),
        )
        .set_default(GooseDefault::Host, s.targets[0].as_str())
        .map_err(goose_err)?
        .set_default(GooseDefault::Users, s.users)
        .map_err(goose_err)?
        .set_default(GooseDefault::IncreaseRate, increase_rate.as_str())
        .map_err(goose_err)?
        .set_default(GooseDefault::RunTime, s.duration)
        .map_err(goose_err)?
        .set_default(GooseDefault::NoTelnet, true)
        .map_err(goose_err)?;
    let result = attack.execute().await;
    let ended = Instant::now();
    let elapsed = st
        .pacer
        .start
        .get()
        .map(|t| ended.duration_since(*t).as_secs_f64())
        .unwrap_or(0.0);
    if let Err(e) = &result {
        eprintln!("loadtest: goose failed: {e}");
    }

    let record = std::mem::take(&mut *st.record.lock().expect("record lock"));
    // A run shorter than asked can never look fast: divide by at least the asked duration.
    let window = elapsed.max(s.duration as f64);
    let achieved = record.signals_answered as f64 / window;
    // What the schedule asked for in that window: slot k is due at k / rate, so the slots due
    // before its end.
    let offered = (s.rate * window).ceil() as u64;
    let passed = s.threshold <= 0.0 || achieved >= s.threshold * s.rate;
    let latencies = record.latencies();
    let summary = json!({
        "scenario": s.scenario.name(),
        "namespace": st.workload.namespace,
        "target_signals_per_s": s.rate,
        "duration_s": s.duration,
        "elapsed_s": elapsed,
        "users": s.users,
        "target_requests_per_s": s.rate_req,
        "mean_batch": st.workload.mean_batch(),
        "targets": s.targets,
        "achieved_signals_per_s": achieved,
        "measured_window_s": window,
        "offered_signals": offered,
        "offered_signals_per_s": s.rate,
        "signals_reserved": st.pacer.reserved.load(Ordering::Relaxed),
        "achieved_vs_offered": record.signals_answered as f64 / offered.max(1) as f64,
        "latency_from_due_ms": latencies.latency_from_due_ms,
        "send_lag_ms": latencies.send_lag_ms,
        "send_lag_max_ms_by_second": latencies.send_lag_max_ms_by_second,
        "threshold": s.threshold,
        "threshold_passed": passed,
        "distinct_incidents": record.incidents.len(),
        "goose_error": result.as_ref().err().map(|e| e.to_string()),
    });
    let mut out = summary.clone();
    if let (Some(obj), Ok(serde_json::Value::Object(rec))) = (out.as_object_mut(), serde_json::to_value(&record)) {
        obj.extend(rec);
    }
    if let Some(path) = &s.ack_file {
        std::fs::write(path, serde_json::to_vec(&out).map_err(|e| e.to_string())?)
            .map_err(|e| format!("writing {path}: {e}"))?;
    }
    eprintln!(
        "loadtest: latency from due p50/p99/max {:.2}/{:.2}/{:.2} ms; send lag p99/max {:.2}/{:.2} ms; offered {} signals, achieved {:.3} of them",
        latencies.latency_from_due_ms.p50,
        latencies.latency_from_due_ms.p99,
        latencies.latency_from_due_ms.max,
        latencies.send_lag_ms.p99,
        latencies.send_lag_ms.max,
        offered,
        record.signals_answered as f64 / offered.max(1) as f64
    );
    eprintln!(
        "loadtest: {} signals sent, {} answered 2xx, {} acknowledged ({} distinct incidents), {} error requests; achieved {:.1} signals/s over {:.1}s (target {}, threshold {})",
        record.signals_sent,
        record.signals_answered,
        record.acknowledged,
        record.incidents.len(),
        record.error_requests,
        achieved,
        elapsed,
        s.rate,
        s.threshold
    );
    if result.is_err() {
        return Ok(ExitCode::from(1));
    }
    if !passed {
        eprintln!(
            "loadtest: FAILED: achieved {achieved:.1} signals/s < {} x {} target",
            s.threshold, s.rate
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}
