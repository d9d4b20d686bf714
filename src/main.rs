//! Command line: parse flags, load configuration, start logging, call `signal_gateway::run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use signal_gateway::config::{AuthMode, BackendKind, Config, Identity, LogFormat, parse_duration};
use signal_gateway::dedup::Strategy;

#[derive(Parser, Debug)]
#[command(
    name = "signal-gateway",
    version,
    about = "Deduplicates alerts and events into Kubernaut RemediationRequests"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML configuration file (unknown keys are errors).
    #[arg(long, global = true, env = "SIGNAL_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Where RemediationRequests live (auto: kubernetes when a cluster is configured).
    #[arg(long, global = true, value_enum)]
    backend: Option<BackendKind>,
    /// Signals API address (default 0.0.0.0:8080).
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Admin address for /metrics, /healthz, /readyz (default 0.0.0.0:9090).
    #[arg(long, global = true)]
    admin_listen: Option<SocketAddr>,
    /// Namespace of RemediationRequests and Leases (default POD_NAMESPACE).
    #[arg(long, global = true)]
    namespace: Option<String>,
    /// Deduplication strategy.
    #[arg(long, global = true, value_enum)]
    dedup_strategy: Option<Strategy>,
    /// Lock lease duration, e.g. 30s or 1m30s.
    #[arg(long, global = true, value_parser = parse_duration)]
    lease_duration: Option<std::time::Duration>,
    /// Log format.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Who may send signals (none: anyone; for a local trial).
    #[arg(long, global = true, value_enum)]
    auth_mode: Option<AuthMode>,
    /// Kubernaut DataStorage base URL for the audit trail (audit.url), e.g.
    /// https://data-storage-service.kubernaut.svc.cluster.local:8080; unset: no audit trail.
    #[arg(long, global = true)]
    audit_url: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print the RemediationRequest CRD as YAML.
    Crd,
}

fn identity() -> (Identity, Vec<String>) {
    let mut warnings = Vec::new();
    let pod_name = std::env::var("POD_NAME")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            let host = if host.is_empty() {
                "signal-gateway".to_owned()
            } else {
                host
            };
            warnings.push(format!(
                "POD_NAME is not set; using the hostname {host:?} as lease holder identity"
            ));
            host
        });
    let pod_namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            warnings.push("POD_NAMESPACE is not set; using namespace \"default\"".into());
            "default".into()
        });
    (
        Identity {
            pod_name,
            pod_namespace,
            pod_ip: std::env::var("POD_IP").unwrap_or_default(),
        },
        warnings,
    )
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        print!("{}", signal_gateway::crd::crd_yaml());
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(b) = cli.backend {
        config.backend.kind = b;
    }
    if let Some(a) = cli.listen {
        config.server.listen = a;
    }
    if let Some(a) = cli.admin_listen {
        config.server.admin_listen = a;
    }
    if let Some(ns) = cli.namespace {
        config.backend.namespace = Some(ns);
    }
    if let Some(s) = cli.dedup_strategy {
        config.dedup.strategy = s;
    }
    if let Some(d) = cli.lease_duration {
        config.lock.lease_duration = d;
    }
    if let Some(f) = cli.log_format {
        config.logging.format = f;
    }
    if let Some(m) = cli.auth_mode {
        config.auth.mode = m;
    }
    if let Some(url) = cli.audit_url {
        config.audit.url = url;
    }
    let (identity, warnings) = identity();
    config.identity = identity;
    let telemetry = signal_gateway::telemetry::init(
        config.logging.format,
        &config.logging.level,
        &config.tracing.otlp_endpoint,
    )?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    config.validate()?;
    tracing::info!(enabled = telemetry.tracing_enabled(), "OTLP trace export");

    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK)
        .build()?
        .block_on(async move {
            let listeners = signal_gateway::Listeners::bind(&config).await?;
            signal_gateway::run(config, listeners, shutdown_signal()).await
        });
    telemetry.shutdown();
    result
}

/// Stack of each runtime thread. Tokio's default (2 MiB) is too close to what a signal's future
/// needs in a debug build: measured against the testenv, a worker stack of 1.5 MiB overflows on the
/// first signal of the always-lock path, and at 2 MiB a replica of tests/faults_under_load.rs
/// aborted ("thread 'tokio-rt-worker' has overflowed its stack") while resolving a status write
/// left unanswered when the API server stopped. Untouched stack pages cost address space only.
const WORKER_STACK: usize = 8 * 1024 * 1024;

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("signal-gateway").chain(args.iter().copied())).map_err(|e| e.to_string())
    }

    #[test]
    fn enum_flags_take_the_config_files_spellings_and_list_them_when_wrong() {
        let cli = parse(&[
            "--backend",
            "embedded",
            "--dedup-strategy",
            "always-lock",
            "--log-format",
            "text",
            "--auth-mode",
            "static",
            "--lease-duration",
            "1m30s",
        ])
        .unwrap();
        assert_eq!(cli.backend, Some(BackendKind::Embedded));
        assert_eq!(cli.dedup_strategy, Some(Strategy::AlwaysLock));
        assert_eq!(cli.log_format, Some(LogFormat::Text));
        assert_eq!(cli.auth_mode, Some(AuthMode::Static));
        assert_eq!(cli.lease_duration, Some(std::time::Duration::from_secs(90)));
        // Each flag's values are the configuration file's (one spelling for both).
        for (flag, value) in [
            ("--backend", "auto"),
            ("--backend", "kubernetes"),
            ("--dedup-strategy", "optimistic"),
            ("--log-format", "json"),
            ("--auth-mode", "kubernetes"),
            ("--auth-mode", "none"),
        ] {
            parse(&[flag, value]).unwrap_or_else(|e| panic!("{flag} {value}: {e}"));
        }
        let err = parse(&["--backend", "cloud"]).unwrap_err();
        assert!(err.contains("possible values: auto, embedded, kubernetes"), "{err}");
        let err = parse(&["--auth-mode", "open"]).unwrap_err();
        assert!(err.contains("possible values: kubernetes, static, none"), "{err}");
    }
}
