//! What the gateway acknowledged: every response is parsed into per-signal outcomes, and the
//! totals and the per-incident counts are written to `LOADTEST_ACK_FILE` at the end so the driver
//! can compare them with the stored RemediationRequests.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::histogram::{Histogram, Summary};

/// Most arrival times kept over all incidents (4 bytes each: 4 MiB; a 60 s run at 1000
/// signals/s needs 60 000). Beyond it arrivals are counted in `arrivals_dropped`, not kept, and
/// the driver computes no floor.
pub const ARRIVALS_CAP: usize = 1_000_000;
/// Seconds of the schedule the per-second send lag covers; later ones count into the last.
pub const MAX_SECONDS: usize = 3_600;

/// The outcome of one signal, as the gateway reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `created`, `duplicate`, `ignored`, `rejected` or `failed`.
    pub status: String,
    pub fingerprint: Option<String>,
}

impl Outcome {
    fn stored(&self) -> bool {
        self.status == "created" || self.status == "duplicate"
    }
}

fn outcome_of(v: &Value) -> Option<Outcome> {
    let status = v.get("status")?.as_str()?.to_owned();
    let fingerprint = v.get("fingerprint").and_then(Value::as_str).map(str::to_owned);
    Some(Outcome { status, fingerprint })
}

/// Per-signal outcomes of a response: one for a single-signal answer (201/202/200), one per
/// alert for a batch (`results`, also inside a 503 problem). `None` when the body has no outcome
/// (a problem without results, or an unexpected body).
pub fn outcomes(status: u16, body: &Value) -> Option<Vec<Outcome>> {
    let results = match body.get("results") {
        Some(Value::Array(items)) => Some(items),
        // 503 problem bodies nest the batch answer: {"results": {"results": [...], "summary": {...}}}.
        Some(Value::Object(inner)) => inner.get("results").and_then(Value::as_array),
        _ => None,
    };
    if let Some(items) = results {
        return items.iter().map(outcome_of).collect();
    }
    if (200..300).contains(&status) {
        return outcome_of(body).map(|o| vec![o]);
    }
    None
}

/// Counts for one incident (fingerprint).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Incident {
    /// Signals acknowledged (2xx) as stored for it: its RR's occurrenceCount must equal this.
    pub acknowledged: u64,
    /// How many of those were answered `created` (1 unless an RR was completed meanwhile).
    pub created: u64,
    /// When each acknowledged signal was sent, in µs after the schedule's start (in the order
    /// the answers came, not sorted), for the single-writer floor. Empty beyond `ARRIVALS_CAP`.
    pub arrivals_us: Vec<u32>,
}

/// Everything the run observed; serialised into the ack file.
#[derive(Debug, Default, Serialize)]
pub struct Record {
    /// HTTP requests that got an answer or failed in transport.
    pub requests: u64,
    /// Requests by HTTP status (`transport` for requests that got no answer).
    pub status_counts: BTreeMap<String, u64>,
    /// Requests that count as errors: status >= 400 or no answer.
    pub error_requests: u64,
    /// Requests answered 5xx.
    pub server_error_requests: u64,
    /// Signals in every request sent.
    pub signals_sent: u64,
    /// Signals in requests answered 2xx (the achieved rate counts these).
    pub signals_answered: u64,
    /// Signals acknowledged as stored: 201/202, or `created`/`duplicate` results of a 207.
    pub acknowledged: u64,
    pub acknowledged_created: u64,
    pub acknowledged_duplicate: u64,
    /// Signals answered `ignored`/`rejected` inside 2xx responses (no RR expected).
    pub not_stored: u64,
    /// Signals answered `failed` inside a 2xx response (should never happen).
    pub failed_in_2xx: u64,
    /// Signals in 2xx responses whose body could not be matched to them (should never happen).
    pub unparsed: u64,
    /// Signals in requests answered with an error or not answered.
    pub signals_in_error_requests: u64,
    /// Per-alert `created`/`duplicate` results inside non-2xx answers (a 503 batch): stored
    /// by the gateway but not acknowledged to the sender, by fingerprint.
    pub stored_in_error_requests: BTreeMap<String, u64>,
    /// Answers 503 to a multi-alert notification that the load test resent, as Alertmanager does
    /// (each also counts in `requests`, `status_counts` and `error_requests`; the resend's answer
    /// is recorded on its own).
    pub resent_requests: u64,
    /// Signals in error requests by target pod name (the pods of the run's namespace): a 503
    /// says "not stored", so an RR whose count exceeds its acknowledged signals can be matched
    /// against these.
    pub errors_by_pod: BTreeMap<String, u64>,
    /// Acknowledged incidents: fingerprint -> counts.
    pub incidents: BTreeMap<String, Incident>,
    /// A few examples of unexpected answers, for the report.
    pub samples: Vec<String>,
    /// Arrival times kept (`Incident::arrivals_us`) and not kept (over `ARRIVALS_CAP`).
    pub arrivals_kept: u64,
    pub arrivals_dropped: u64,
    /// Per request: from the due time of its first signal on the schedule to its final answer
    /// (after any resends; a transport error counts when it is reported).
    #[serde(skip)]
    pub from_due: Histogram,
    /// Per request: how late its first send was (send time - due time).
    #[serde(skip)]
    pub send_lag: Histogram,
    /// The largest send lag (ms) of the requests due in each second of the schedule: when the
    /// driver fell behind (its start, a stall of the machine) rather than only how much.
    #[serde(skip)]
    pub send_lag_max_ms_by_second: Vec<f64>,
}

/// The latency figures written into the ack file (milliseconds).
#[derive(Debug, Serialize)]
pub struct Latencies {
    pub latency_from_due_ms: Summary,
    pub send_lag_ms: Summary,
    pub send_lag_max_ms_by_second: Vec<f64>,
}

impl Record {
    /// Records how late a request due `due_offset` after the schedule's start was sent (once per
    /// request, not per resend).
    pub fn sent(&mut self, due_offset: Duration, lag: Duration) {
        self.send_lag.record(lag);
        let second = (due_offset.as_secs() as usize).min(MAX_SECONDS);
        if self.send_lag_max_ms_by_second.len() <= second {
            self.send_lag_max_ms_by_second.resize(second + 1, 0.0);
        }
        let ms = lag.as_secs_f64() * 1e3;
        let slot = &mut self.send_lag_max_ms_by_second[second];
        *slot = slot.max((ms * 10.0).round() / 10.0);
    }

    /// Records a request's final outcome `from_due` after its first signal was due.
    pub fn finished(&mut self, from_due: Duration) {
        self.from_due.record(from_due);
    }

    pub fn latencies(&self) -> Latencies {
        Latencies {
            latency_from_due_ms: self.from_due.summary(),
            send_lag_ms: self.send_lag.summary(),
            send_lag_max_ms_by_second: self.send_lag_max_ms_by_second.clone(),
        }
    }

    /// Records one answered request carrying `signals` signals, sent `sent_us` µs after the
    /// schedule's start. Returns false when the answer is a 2xx whose body does not account for
    /// every signal (the caller marks it failed).
    pub fn answered(&mut self, status: u16, pods: &[String], body: &str, sent_us: u32) -> bool {
        let signals = pods.len() as u64;
        self.requests += 1;
        self.signals_sent += signals;
        *self.status_counts.entry(status.to_string()).or_default() += 1;
        let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let parsed = outcomes(status, &value);
        if !(200..300).contains(&status) {
            self.error_requests += 1;
            if status >= 500 {
                self.server_error_requests += 1;
            }
            self.signals_in_error_requests += signals;
            self.pods_failed(pods);
            for o in parsed.unwrap_or_default() {
                if o.stored()
                    && let Some(fp) = o.fingerprint
                {
                    *self.stored_in_error_requests.entry(fp).or_default() += 1;
                }
            }
            self.sample(format!("HTTP {status}: {}", truncate(body, 400)));
            return true;
        }
        self.signals_answered += signals;
        let items = parsed.unwrap_or_default();
        let mut ok = items.len() as u64 == signals;
        for o in &items {
            match (o.status.as_str(), &o.fingerprint) {
                ("created" | "duplicate", Some(fp)) => {
                    self.acknowledged += 1;
                    let inc = self.incidents.entry(fp.clone()).or_default();
                    inc.acknowledged += 1;
                    if (self.arrivals_kept as usize) < ARRIVALS_CAP {
                        inc.arrivals_us.push(sent_us);
                        self.arrivals_kept += 1;
                    } else {
                        self.arrivals_dropped += 1;
                    }
                    if o.status == "created" {
                        inc.created += 1;
                        self.acknowledged_created += 1;
                    } else {
                        self.acknowledged_duplicate += 1;
                    }
                }
                ("ignored" | "rejected", _) => self.not_stored += 1,
                ("failed", _) => {
                    self.failed_in_2xx += 1;
                    ok = false;
                }
                _ => {
                    self.unparsed += 1;
                    ok = false;
                }
            }
        }
        // Single answers must agree with their status code.
        if items.len() == 1 && signals == 1 {
            let want = match status {
                201 => "created",
                202 => "duplicate",
                _ => "",
            };
            if !want.is_empty() && items[0].status != want {
                ok = false;
            }
        }
        self.unparsed += signals.saturating_sub(items.len() as u64);
        if !ok {
            self.sample(format!("HTTP {status} with unexpected body: {}", truncate(body, 400)));
        }
        ok
    }

    /// Records a 5xx answer to a notification that is about to be resent: an error request, but
    /// its signals are not given up (the resend's answer decides them).
    pub fn resending(&mut self, status: u16, body: &str) {
        self.requests += 1;
        self.error_requests += 1;
        self.server_error_requests += 1;
        self.resent_requests += 1;
        *self.status_counts.entry(status.to_string()).or_default() += 1;
        self.sample(format!("HTTP {status} (resent): {}", truncate(body, 400)));
    }

    /// Records a request that got no HTTP answer (connect error, timeout).
    pub fn transport_error(&mut self, pods: &[String], error: &str) {
        let signals = pods.len() as u64;
        self.pods_failed(pods);
        self.requests += 1;
        self.signals_sent += signals;
        self.error_requests += 1;
        self.signals_in_error_requests += signals;
        *self.status_counts.entry("transport".into()).or_default() += 1;
        self.sample(format!("transport error: {error}"));
    }

    fn pods_failed(&mut self, pods: &[String]) {
        for pod in pods {
            *self.errors_by_pod.entry(pod.clone()).or_default() += 1;
        }
    }

    fn sample(&mut self, s: String) {
        if self.samples.len() < 20 {
            self.samples.push(s);
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_notification_counts_its_signals_once() {
        let mut r = Record::default();
        r.resending(503, "{}");
        let body = r#"{"results":[
            {"status":"duplicate","fingerprint":"aa"},{"status":"created","fingerprint":"bb"}]}"#;
        assert!(r.answered(207, &pods(2), body, 0));
        assert_eq!((r.requests, r.error_requests, r.resent_requests), (2, 1, 1));
        assert_eq!((r.signals_sent, r.acknowledged, r.signals_in_error_requests), (2, 2, 0));
        assert!(r.errors_by_pod.is_empty() && r.stored_in_error_requests.is_empty());
    }

    fn pods(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("pod-{i}")).collect()
    }

    const FP1: &str = "2924e0764bb7e2db2924e0764bb7e2db2924e0764bb7e2db2924e0764bb7e2db";
    const FP2: &str = "ef1b76d88f42344978562a9fa0edb7e5d356a16d2d11396312e91a137d393384";

    #[test]
    fn single_answers_are_counted_per_incident() {
        let mut r = Record::default();
        let created = format!(
            r#"{{"status":"created","duplicate":false,"fingerprint":"{FP1}","remediationRequestName":"rr-1"}}"#
        );
        let dup = format!(r#"{{"status":"duplicate","duplicate":true,"fingerprint":"{FP1}","occurrenceCount":2}}"#);
        assert!(r.answered(201, &pods(1), &created, 0));
        assert!(r.answered(202, &pods(1), &dup, 0));
        assert!(r.answered(200, &pods(1), r#"{"status":"ignored","reason":"resolved"}"#, 0));
        assert_eq!(r.acknowledged, 2);
        assert_eq!(r.not_stored, 1);
        assert_eq!(r.incidents[FP1].acknowledged, 2);
        assert_eq!(r.incidents[FP1].created, 1);
        assert_eq!(r.signals_answered, 3);
    }

    #[test]
    fn acknowledged_signals_keep_their_send_time_per_incident_up_to_the_cap() {
        let mut r = Record::default();
        let dup = format!(r#"{{"status":"duplicate","fingerprint":"{FP1}"}}"#);
        assert!(r.answered(202, &pods(1), &dup, 7_000));
        assert!(r.answered(202, &pods(1), &dup, 3_000));
        assert!(r.answered(200, &pods(1), r#"{"status":"ignored","reason":"resolved"}"#, 5_000));
        assert!(r.answered(503, &pods(1), r#"{"status":503}"#, 6_000));
        assert_eq!(r.incidents[FP1].arrivals_us, vec![7_000, 3_000]);
        assert_eq!((r.arrivals_kept, r.arrivals_dropped), (2, 0));

        let mut full = Record {
            arrivals_kept: ARRIVALS_CAP as u64 - 1,
            ..Record::default()
        };
        assert!(full.answered(202, &pods(1), &dup, 1));
        assert!(full.answered(202, &pods(1), &dup, 2));
        assert_eq!(full.incidents[FP1].arrivals_us, vec![1]);
        assert_eq!(full.incidents[FP1].acknowledged, 2);
        assert_eq!(full.arrivals_dropped, 1);
    }

    #[test]
    fn latencies_are_summarised_per_request() {
        let mut r = Record::default();
        r.sent(Duration::from_millis(100), Duration::from_millis(2));
        r.finished(Duration::from_millis(10));
        r.sent(Duration::from_millis(2_500), Duration::ZERO);
        r.finished(Duration::from_millis(4));
        r.sent(Duration::from_millis(2_900), Duration::from_micros(1_250));
        r.finished(Duration::from_millis(4));
        let l = r.latencies();
        assert_eq!((l.latency_from_due_ms.count, l.latency_from_due_ms.max), (3, 10.0));
        assert_eq!(l.send_lag_ms.max, 2.0);
        assert!((1.0..1.5).contains(&l.send_lag_ms.p50), "{:?}", l.send_lag_ms);
        assert_eq!(l.send_lag_max_ms_by_second, vec![2.0, 0.0, 1.3]);
    }

    #[test]
    fn a_status_that_disagrees_with_the_body_is_flagged() {
        let mut r = Record::default();
        let dup = format!(r#"{{"status":"duplicate","fingerprint":"{FP1}"}}"#);
        assert!(!r.answered(201, &pods(1), &dup, 0));
    }

    #[test]
    fn batch_results_are_counted_per_alert() {
        let mut r = Record::default();
        let body = format!(
            r#"{{"results":[{{"status":"created","fingerprint":"{FP1}"}},{{"status":"duplicate","fingerprint":"{FP2}"}},{{"status":"rejected","reason":"x"}}],"summary":{{"total":3}}}}"#
        );
        assert!(r.answered(207, &pods(3), &body, 0));
        assert_eq!(r.acknowledged, 2);
        assert_eq!(r.not_stored, 1);
        assert_eq!(r.incidents.len(), 2);
        // A batch answer missing alerts is flagged and the missing ones counted.
        assert!(!r.answered(207, &pods(5), &body, 0));
        assert_eq!(r.unparsed, 2);
    }

    #[test]
    fn stored_alerts_of_a_503_batch_are_not_acknowledged() {
        let mut r = Record::default();
        let body = format!(
            r#"{{"type":"about:blank","status":503,"results":{{"results":[{{"status":"created","fingerprint":"{FP1}"}},{{"status":"failed","fingerprint":"{FP2}"}}],"summary":{{}}}}}}"#
        );
        assert!(r.answered(503, &pods(2), &body, 0));
        assert_eq!(r.acknowledged, 0);
        assert_eq!(r.server_error_requests, 1);
        assert_eq!(r.stored_in_error_requests[FP1], 1);
        assert_eq!(r.signals_in_error_requests, 2);
        r.transport_error(&pods(1), "connection refused");
        assert_eq!(r.errors_by_pod["pod-0"], 2);
        assert_eq!(r.error_requests, 2);
        assert_eq!(r.status_counts["transport"], 1);
    }
}
