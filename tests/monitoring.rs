//! Monitoring artefacts checked against the real tools: promtool for the alert rules, a real
//! Prometheus scraping a gateway replica and the testenv kube-apiserver (every dashboard query and
//! every runbook PromQL block evaluated through its HTTP API), and a real Alertmanager delivering
//! to the gateway's webhook. The tools come from Debian's packages; scripts/test installs them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::testenv::{Replica, free_port, testenv, unique};
use common::{Gateway, count_of, eventually, metric_sum, pod_alert, test_config, webhook};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_saphyr::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A Debian-packaged tool; failing (not skipping) when it is missing.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: scripts/test installs it (Debian packages prometheus, prometheus-alertmanager)");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn alert_rules() -> Vec<Value> {
    let rules = yaml("alerts/signal-gateway.rules.yml");
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(repo().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 3, "three dashboards: API-server impact, locking, signals");
    out
}

/// (dashboard file, panel title, expr) of every query of every panel.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((
                    file.clone(),
                    p["title"].as_str().unwrap().to_owned(),
                    t["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    out
}

/// Every ```promql block of every runbook, with its file.
fn runbook_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("runbooks")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut block: Option<String> = None;
        for line in text.lines() {
            match (&mut block, line.trim_end()) {
                (None, "```promql") => block = Some(String::new()),
                (Some(b), "```") => {
                    out.push((
                        path.file_name().unwrap().to_string_lossy().into_owned(),
                        b.trim().to_owned(),
                    ));
                    block = None;
                }
                (Some(b), l) => {
                    b.push_str(l);
                    b.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    out.sort();
    out
}

/// Metric names (gateway_*, process_*) a PromQL expression reads, histogram suffixes removed.
fn gateway_metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let rest: String = bytes[i..].iter().collect();
        let boundary = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        if boundary && (rest.starts_with("gateway_") || rest.starts_with("process_")) {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            i += name.len();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| b.ends_with("_seconds") || b.ends_with("_size") || b.ends_with("_per_signal"))
                .unwrap_or(&name);
            out.insert(base.to_owned());
        } else {
            i += 1;
        }
    }
    out
}

fn documented_metrics() -> BTreeSet<String> {
    read("docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn generated_dashboards_prometheusrule_and_inventory_are_fresh() {
    run(Command::new(repo().join("scripts/gen-monitoring")).arg("--check"));
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = tool("promtool");
    let out = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo().join("alerts/signal-gateway.rules.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo().join("alerts/tests.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_quiet() {
    let tests = yaml("alerts/tests.yml");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in tests["tests"].as_array().unwrap() {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = a["alertname"].as_str().unwrap().to_owned();
            let expected = a["exp_alerts"].as_array().map_or(0, Vec::len);
            if expected > 0 {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    for rule in alert_rules() {
        let name = rule["alert"].as_str().unwrap();
        assert!(fires.contains(name), "no promtool test makes {name} fire");
        assert!(quiet.contains(name), "no promtool test shows {name} quiet");
    }
}

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook_with_the_four_sections() {
    let rules = alert_rules();
    assert!(rules.len() >= 10, "alert catalogue: {}", rules.len());
    for rule in rules {
        let name = rule["alert"].as_str().unwrap();
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key].as_str().is_some_and(|s| s.len() > 10),
                "{name}: annotation {key}"
            );
        }
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
        assert_eq!(url, format!("runbooks/{name}.md"), "{name}: runbook_url");
        let runbook = read(url);
        for section in ["## Meaning", "## Impact", "## Diagnosis", "## Mitigation"] {
            assert!(runbook.lines().any(|l| l.trim() == section), "{url} lacks {section}");
        }
        assert!(
            runbook.contains("```promql") || runbook.contains("```sh"),
            "{url}: diagnosis has no commands"
        );
    }
    // The PrometheusRule carries exactly these rules (generated; freshness is tested above).
    let pr = yaml("deploy/monitoring/prometheusrule.yaml");
    assert_eq!(pr["kind"], "PrometheusRule");
    assert_eq!(pr["spec"]["groups"], yaml("alerts/signal-gateway.rules.yml")["groups"]);
}

#[test]
fn dashboards_use_the_datasource_variable_rate_interval_and_only_documented_metrics() {
    let documented = documented_metrics();
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"].as_str().unwrap();
        assert!(
            uid.starts_with("signal-gateway-") && uids.insert(uid.to_owned()),
            "{file}: uid {uid}"
        );
        assert!(
            d["tags"].as_array().unwrap().contains(&json!("signal-gateway")),
            "{file}: tags"
        );
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(vars, ["datasource", "namespace", "instance"], "{file}");
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap();
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{file}/{title}");
            assert!(p["fieldConfig"]["defaults"]["unit"].is_string(), "{file}/{title}: unit");
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{file}/{title}");
                let expr = t["expr"].as_str().unwrap();
                let windows = expr.matches("[$__rate_interval]").count();
                assert_eq!(
                    expr.matches('[').count(),
                    windows,
                    "{file}/{title}: every range is $__rate_interval: {expr}"
                );
                assert_eq!(expr.matches("rate(").count(), windows, "{file}/{title}: {expr}");
                for m in gateway_metrics_in(expr) {
                    assert!(
                        documented.contains(&m) || m.starts_with("process_"),
                        "{file}/{title} reads {m}, which docs/metrics.md does not document"
                    );
                }
            }
        }
    }
    for rule in alert_rules() {
        for m in gateway_metrics_in(rule["expr"].as_str().unwrap()) {
            assert!(
                documented.contains(&m),
                "alert {} reads undocumented {m}",
                rule["alert"]
            );
        }
    }
}

/// A process killed when dropped.
struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = repo().join("target/monitoring").join(format!("{name}-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `url` until it answers 2xx: true. False when the process exited because its port was
/// taken (the caller tries other ports); any other exit, or no answer within 60 s, fails the test.
async fn wait_ready(client: &reqwest::Client, url: &str, proc: &mut Proc) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        if let Some(status) = proc.0.try_wait().unwrap() {
            let log = proc.log();
            if log.contains("address already in use") {
                return false;
            }
            panic!("{url}: the process exited ({status}) before it was ready:\n{log}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never ready:\n{}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a Prometheus-family `tool` with `<dir>/<tool>.yml` (prometheus.yml, alertmanager.yml)
/// and the flags `extra` gives for each try, logging to `<dir>/<tool>.log`; returns once
/// `/-/ready`. Neither tool reports a port it picked itself, so the port is picked here; one taken
/// between the pick and the tool's bind (by another process's outgoing connection) fails the
/// start with "address already in use", and the start is tried again on other ports.
async fn start_tool(
    client: &reqwest::Client,
    tool_name: &str,
    dir: &Path,
    extra: impl Fn() -> Vec<String>,
) -> (Proc, String) {
    let short = tool_name.trim_start_matches("prometheus-");
    let log = dir.join(format!("{short}.log"));
    for _ in 0..4 {
        let port = free_port();
        let mut proc = Proc(
            Command::new(tool(tool_name))
                .arg(format!("--config.file={}", dir.join(format!("{short}.yml")).display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .args(extra())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("{tool_name} starts: {e}")),
            log.clone(),
        );
        let url = format!("http://127.0.0.1:{port}");
        if wait_ready(client, &format!("{url}/-/ready"), &mut proc).await {
            return (proc, url);
        }
    }
    panic!(
        "{tool_name} found no free port in 4 tries:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

async fn instant_query(client: &reqwest::Client, prometheus: &str, expr: &str) -> Result<Vec<f64>, String> {
    let resp = client
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    let result = &body["data"]["result"];
    Ok(match body["data"]["resultType"].as_str() {
        Some("vector") => result
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse().ok())
            .collect(),
        Some("scalar") => result[1].as_str().and_then(|v| v.parse().ok()).into_iter().collect(),
        other => return Err(format!("unexpected result type {other:?}")),
    })
}

/// Grafana's variables as a dashboard user would pick them: this namespace, all replicas.
fn substitute(expr: &str, namespace: &str) -> String {
    expr.replace("$__rate_interval", "20s")
        .replace("$namespace", namespace)
        .replace("$instance", ".*")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_and_runbook_query_returns_data_from_real_prometheus() {
    let env = testenv();
    let client = common::client();
    let replica = Replica::start(&format!("mon-{}", unique()), "logging:\n  format: json\n");
    replica.wait_ready(&client).await;
    // Two replicas owning the shards between them (ownership.enabled), so the ownership and
    // forwarding panels have data; the first one writes everything itself (the lock panels).
    let owners_config = "logging:\n  format: json\nownership:\n  enabled: true\n";
    let owners: Vec<Replica> = (0..2)
        .map(|i| Replica::start(&format!("mon-own-{i}-{}", unique()), owners_config))
        .collect();
    for r in &owners {
        r.wait_ready(&client).await;
    }

    let dir = scratch("prometheus");
    let testenv_dir = repo().join("target/testenv");
    let apiserver_port = std::fs::read_to_string(testenv_dir.join("apiserver.port")).unwrap();
    let config = format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: signal-gateway
    static_configs:
      - targets: ["{gateway}", "{owner0}", "{owner1}"]
        labels:
          namespace: {namespace}
  - job_name: apiserver
    scheme: https
    authorization:
      credentials_file: {token}
    tls_config:
      ca_file: {ca}
    static_configs:
      - targets: ["127.0.0.1:{apiserver}"]
"#,
        rules = repo().join("alerts/signal-gateway.rules.yml").display(),
        gateway = replica.admin.trim_start_matches("http://"),
        owner0 = owners[0].admin.trim_start_matches("http://"),
        owner1 = owners[1].admin.trim_start_matches("http://"),
        namespace = env.namespace,
        token = testenv_dir.join("admin.token").display(),
        ca = testenv_dir.join("pki/ca.crt").display(),
        apiserver = apiserver_port.trim(),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    run(Command::new(tool("promtool"))
        .args(["check", "config"])
        .arg(dir.join("prometheus.yml")));
    let (prometheus, prom) = start_tool(&client, "prometheus", &dir, || {
        vec![format!("--storage.tsdb.path={}", dir.join("data").display())]
    })
    .await;

    // Traffic for as long as the queries are evaluated: a new incident, duplicates of a standing
    // one and an Alertmanager batch each round, so every rate and quantile has samples.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, client) = (stop.clone(), client.clone());
        let bases = [replica.base.clone(), owners[0].base.clone(), owners[1].base.clone()];
        let ns = format!("mon-{}", unique());
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch = webhook(vec![
                    pod_alert(&ns, &format!("new-{sent}")),
                    pod_alert(&ns, "standing-0"),
                    pod_alert(&ns, "standing-1"),
                ]);
                let base = &bases[(sent % 3) as usize];
                let r = client
                    .post(format!("{base}/api/v1/signals/prometheus"))
                    .json(&batch)
                    .send()
                    .await
                    .expect("gateway answers");
                assert!(r.status().is_success(), "{}", r.status());
                sent += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sent
        })
    };

    let panels = panel_queries();
    let mut failures: BTreeMap<String, String> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        failures.clear();
        for (file, title, expr) in &panels {
            let q = substitute(expr, &env.namespace);
            match instant_query(&client, &prom, &q).await {
                Ok(values) if values.iter().any(|v| !v.is_nan()) => {}
                Ok(values) => {
                    failures.insert(format!("{file} / {title}: {q}"), format!("no data: {values:?}"));
                }
                Err(e) => {
                    failures.insert(format!("{file} / {title}: {q}"), e);
                }
            }
        }
        if failures.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} panel queries return no data after {sent} rounds of traffic:\n{:#?}",
        failures.len(),
        panels.len(),
        failures
    );

    // Runbook PromQL: every block parses and evaluates in this Prometheus.
    let runbooks = runbook_queries();
    assert!(runbooks.len() >= 15, "runbook PromQL blocks: {}", runbooks.len());
    for (file, q) in runbooks {
        if let Err(e) = instant_query(&client, &prom, &q).await {
            panic!("{file}: {q}\n{e}");
        }
    }

    // The alert rules load and evaluate without error against the real series.
    let rules: Value = client
        .get(format!("{prom}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), alert_rules().len());
    for r in loaded {
        assert_ne!(
            r["health"], "err",
            "rule {} failed to evaluate: {}",
            r["name"], r["lastError"]
        );
    }
    drop(prometheus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_delivers_firing_alerts_as_counted_requests_and_resolved_ones_create_nothing() {
    // As deployed outside the cluster: the gateway takes static tokens, Alertmanager sends one
    // from a file (http_config.authorization.credentials_file).
    let dir = scratch("alertmanager");
    std::fs::write(dir.join("gateway-tokens"), "# alertmanager\nam-e2e-token-7f3c\n").unwrap();
    std::fs::write(dir.join("am-token"), "am-e2e-token-7f3c").unwrap();
    let mut gw_config = test_config();
    gw_config.auth.mode = signal_gateway::config::AuthMode::Static;
    gw_config.auth.tokens_file = Some(dir.join("gateway-tokens"));
    let gw = Gateway::embedded(gw_config).await;
    let client = common::client();
    let config = format!(
        r#"route:
  receiver: signal-gateway
  group_by: [alertname]
  group_wait: 1s
  group_interval: 2s
  repeat_interval: 1h
receivers:
  - name: signal-gateway
    webhook_configs:
      - url: {base}/api/v1/signals/prometheus
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials_file: {token}
"#,
        base = gw.base,
        token = dir.join("am-token").display()
    );
    std::fs::write(dir.join("alertmanager.yml"), config).unwrap();
    let (am, am_url) = start_tool(&client, "prometheus-alertmanager", &dir, || {
        vec![
            format!("--storage.path={}", dir.join("data").display()),
            format!("--cluster.listen-address=127.0.0.1:{}", free_port()),
            "--log.level=debug".to_owned(),
        ]
    })
    .await;

    let alert = |pod: &str, resolved: bool| {
        let now = jiff::Timestamp::now();
        let mut a = json!({
            "labels": {"alertname": "GatewayE2ECrashLooping", "namespace": "shop", "pod": pod, "severity": "critical"},
            "annotations": {"summary": "crash looping"},
            // A firing alert starts now: Alertmanager flushes a new group at once, instead of
            // after group_wait, when its first alert started longer than group_wait ago; the
            // second alert of the same POST then lands in its own later notification or not,
            // depending on which goroutine runs first (the count of the first would be 2).
            "startsAt": (if resolved { now - jiff::SignedDuration::from_secs(60) } else { now }).to_string(),
            "generatorURL": "http://prometheus.test/graph"
        });
        if resolved {
            a["endsAt"] = json!(now.to_string());
        }
        a
    };
    let post = |alerts: Vec<Value>| {
        let (client, url) = (client.clone(), format!("{am_url}/api/v2/alerts"));
        async move {
            let r = client.post(url).json(&alerts).send().await.unwrap();
            assert!(r.status().is_success(), "alertmanager refused alerts: {}", r.status());
        }
    };
    let counts = |gw: &Gateway| -> BTreeMap<String, i64> {
        gw.store()
            .all_requests()
            .iter()
            .map(|rr| (rr.spec.target_resource.name.clone(), count_of(rr)))
            .collect()
    };
    let expect =
        |want: &[(&str, i64)]| -> BTreeMap<String, i64> { want.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect() };

    // One notification with two firing alerts: one RR each, counted once.
    post(vec![alert("api-0", false), alert("api-1", false)]).await;
    let want = expect(&[("api-0", 1), ("api-1", 1)]);
    // Alertmanager delivers on its own schedule (group_wait, its retries): on a starved machine
    // that takes a while, so the wait is generous and says what it saw last.
    let until_counts = |what: &'static str, want: BTreeMap<String, i64>| {
        let gw = &gw;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            loop {
                let seen = counts(gw);
                if seen == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: counts {seen:?}, want {want:?}; decisions {:?}",
                    gw.metric("gateway_dedup_decisions_total", &[]).await
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until_counts("first notification stored", want).await;

    // A new alert in the group: Alertmanager re-sends the group, so the standing alerts count again.
    post(vec![alert("api-2", false)]).await;
    let want = expect(&[("api-0", 2), ("api-1", 2), ("api-2", 1)]);
    until_counts("second notification stored", want).await;

    // api-2 resolves: the notification carries it as resolved (ignored) beside the firing ones.
    post(vec![alert("api-2", true)]).await;
    let want = expect(&[("api-0", 3), ("api-1", 3), ("api-2", 1)]);
    eventually(Duration::from_secs(90), "resolved notification processed", || async {
        let ignored = gw
            .metric("gateway_dedup_decisions_total", &["decision=\"ignored\""])
            .await;
        (ignored >= 1.0 && counts(&gw) == want).then_some(())
    })
    .await;
    assert_eq!(gw.store().all_requests().len(), 3, "a resolved alert creates nothing");

    let metrics = client
        .get(format!("{am_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sent = metric_sum(
        &metrics,
        "alertmanager_notifications_total",
        &["integration=\"webhook\""],
    );
    let failed = metric_sum(
        &metrics,
        "alertmanager_notifications_failed_total",
        &["integration=\"webhook\""],
    );
    assert_eq!(sent, 3.0, "three notifications delivered");
    assert_eq!(failed, 0.0, "no failed notifications:\n{}", am.log());
    let log = am.log();
    assert!(!log.contains("Notify for alerts failed"), "{log}");
    assert!(!log.contains("level=error"), "{log}");
    assert_eq!(
        gw.metric(
            "gateway_auth_requests_total",
            &["mode=\"static\"", "result=\"allowed\""]
        )
        .await,
        3.0,
        "every notification carried the sender's token"
    );
    drop(am);
    gw.stop().await.unwrap();
}
