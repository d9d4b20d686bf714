//! Logging and tracing. Logs are structured JSON (or text for people) with the fields of the
//! enclosing spans (trace id, fingerprint, outcome) on every line. Traces are exported over OTLP
//! (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`, or the config key
//! `tracing.otlpEndpoint`) is set; otherwise no exporter, propagator or OTel layer is installed.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes pending spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Installs the global subscriber. `RUST_LOG` overrides `level`.
pub fn init(format: LogFormat, level: &str, otlp_endpoint: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let from_env = env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let provider = if from_env || !otlp_endpoint.is_empty() {
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
        if !from_env {
            use opentelemetry_otlp::WithExportConfig;
            let base = otlp_endpoint.trim_end_matches('/');
            let url = if base.ends_with("/v1/traces") {
                base.to_owned()
            } else {
                format!("{base}/v1/traces")
            };
            builder = builder.with_endpoint(url);
        }
        let exporter = builder.build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("signal-gateway")
            .build();
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("signal-gateway")));
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => text_layer(std::io::stderr).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(Telemetry { provider })
}

/// The text log format for people. Field values (span fields such as `signal_name`, event
/// fields such as `group_key`, the message) may hold sender-chosen text: control characters
/// are escaped (`\n` becomes `\\n`), so one event is one line and nothing a sender writes can
/// forge a line or drive a terminal. (The JSON format escapes them by itself.)
fn text_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::field::MakeExt;
    let fields = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let raw = format!("{value:?}");
        let text = escape_controls(&raw);
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{}={text}", field.name())
        }
    })
    .delimited(" ");
    tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .fmt_fields(fields)
        .with_writer(writer)
}

/// `text` with every control character written as its Rust escape.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sender_chosen_strings_cannot_forge_lines_in_the_text_log() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(text_layer(move || out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let name = "KubePodCrashLooping\n2026-11-25T12:00:00Z  INFO forged: signal stored";
            let span = tracing::info_span!("signal", signal_name = %name);
            let _entered = span.enter();
            let group_key = "{}:{alertname=\"x\"}\r\u{1b}[2J";
            tracing::warn!(group_key, reason = %"a\nb", "truncated {}", "c\nd");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "one event, one line: {text:?}");
        assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
        assert!(
            text.contains("KubePodCrashLooping\\n2026"),
            "escaped, still readable: {text}"
        );
    }
}
