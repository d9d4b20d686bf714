//! The binary as an operator runs it: embedded by default on a bare machine, strict config,
//! graceful SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn unknown_config_keys_stop_startup_and_name_the_key() {
    let dir = std::env::temp_dir().join(format!("sg-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, "lock:\n  leaseDurationSeconds: 30\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_signal-gateway"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("leaseDurationSeconds"), "{stderr}");
}

#[test]
fn the_binary_serves_on_the_embedded_backend_and_drains_on_sigterm() {
    // Port 0: the binary binds free ports and names them in its start line (a port picked here
    // could be taken before the binary binds it).
    let mut child = Command::new(env!("CARGO_BIN_EXE_signal-gateway"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--auth-mode",
            "none",
        ])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", std::env::temp_dir())
        .env("POD_NAME", "gw-proc")
        .env("POD_NAMESPACE", "signals")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let lines = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("signal-gateway started") {
                let _ = started_tx.send(line.clone());
            }
            all.push(line);
        }
        all
    });
    let started: serde_json::Value = serde_json::from_str(
        &started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the binary logs its start line within 60 s"),
    )
    .expect("logs are JSON");
    let (signals, admin) = (started["signals"].as_str().unwrap(), started["admin"].as_str().unwrap());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Pooled connections only well within the gateway's keep-alive limit.
        let keep_alive = signal_gateway::config::Config::default().server.header_read_timeout;
        let client = reqwest::Client::builder()
            .pool_idle_timeout(signal_gateway::http::server::reuse_within(keep_alive))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(format!("http://{admin}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "gateway never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let body = serde_json::json!({"alerts": [{"status": "firing", "labels": {"alertname": "A", "namespace": "shop", "pod": "p"}}]});
        let r = client.post(format!("http://{signals}/api/v1/signals/prometheus")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["remediationRequestNamespace"], "signals", "POD_NAMESPACE places the RR");
    });

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "gateway did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "graceful exit: {exit:?}");
    let log = lines.join().unwrap();
    let started = log
        .iter()
        .find(|l| l.contains("signal-gateway started"))
        .expect("start line");
    let parsed: serde_json::Value = serde_json::from_str(started).expect("logs are JSON");
    assert_eq!(parsed["backend"], "embedded");
    assert_eq!(parsed["auth"], "none");
    assert!(
        log.iter()
            .any(|l| l.contains("WARN") && l.contains("auth.mode is none")),
        "running without authentication is announced as a warning"
    );
    assert!(
        log.iter().any(|l| l.contains("\"trace_id\"")),
        "signal logs carry trace ids"
    );
    assert!(log.iter().any(|l| l.contains("stopped")));
}

#[test]
fn authentication_is_never_off_unless_configured_so() {
    // Default auth.mode is kubernetes, which the embedded backend cannot serve: refuse to start
    // and say how to run without authentication, instead of silently letting everyone in.
    let out = Command::new(env!("CARGO_BIN_EXE_signal-gateway"))
        .args([
            "serve",
            "--backend",
            "embedded",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("POD_NAME", "gw-proc")
        .env("POD_NAMESPACE", "signals")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "must not start without an authentication decision"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.mode") && stderr.contains("none"), "{stderr}");
}
