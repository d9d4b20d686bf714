//! Command line: parse flags, load configuration, start logging, call `signal_gateway::run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use signal_gateway::config::{AuthMode, BackendKind, Config, Identity, LogFormat, parse_duration};
use signal_gateway::dedup::Strategy;

#[derive(Parser)]
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
    /// embedded, kubernetes or auto (kubernetes when a cluster is configured).
    #[arg(long, global = true, value_parser = parse_backend)]
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
    /// optimistic or always-lock.
    #[arg(long, global = true, value_parser = parse_strategy)]
    dedup_strategy: Option<Strategy>,
    /// Lock lease duration, e.g. 30s.
    #[arg(long, global = true, value_parser = parse_duration)]
    lease_duration: Option<std::time::Duration>,
    /// json or text.
    #[arg(long, global = true, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// Who may send signals: kubernetes (TokenReview + SubjectAccessReview, the default),
    /// static (auth.tokensFile) or none (anyone; for a local trial).
    #[arg(long, global = true, value_parser = parse_auth_mode)]
    auth_mode: Option<AuthMode>,
    /// Kubernaut DataStorage base URL for the audit trail (audit.url), e.g.
    /// https://data-storage-service.kubernaut.svc.cluster.local:8080; unset: no audit trail.
    #[arg(long, global = true)]
    audit_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print the RemediationRequest CRD as YAML.
    Crd,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    match s {
        "auto" => Ok(BackendKind::Auto),
        "embedded" => Ok(BackendKind::Embedded),
        "kubernetes" => Ok(BackendKind::Kubernetes),
        _ => Err("expected embedded, kubernetes or auto".into()),
    }
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    match s {
        "optimistic" => Ok(Strategy::Optimistic),
        "always-lock" => Ok(Strategy::AlwaysLock),
        _ => Err("expected optimistic or always-lock".into()),
    }
}

fn parse_auth_mode(s: &str) -> Result<AuthMode, String> {
    match s {
        "kubernetes" => Ok(AuthMode::Kubernetes),
        "static" => Ok(AuthMode::Static),
        "none" => Ok(AuthMode::None),
        _ => Err("expected kubernetes, static or none".into()),
    }
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        _ => Err("expected json or text".into()),
    }
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
        .build()?
        .block_on(async move {
            let listeners = signal_gateway::Listeners::bind(&config).await?;
            signal_gateway::run(config, listeners, shutdown_signal()).await
        });
    telemetry.shutdown();
    result
}

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
