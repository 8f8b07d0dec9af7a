//! Logging: `tracing` with a `RUST_LOG` filter, human-readable or JSON lines; and, with
//! `log.otlp_endpoint`, the spans exported with OTLP over HTTP.

use crate::settings::{LogFormat, LogSettings};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The filter when `RUST_LOG` is unset: fleet at info, and lapin's own lines off. fleet logs every
/// broker failure with its context once; lapin would add several ERROR lines of its own for one
/// refused login or dropped connection. `RUST_LOG=info,lapin=debug` shows them.
pub const DEFAULT_FILTER: &str = "info,lapin=off";

/// True unless `metadata` is one of lapin's or amq-protocol's trace events: those print frames,
/// and the login frame's SASL response holds the password (as a list of bytes). Whatever
/// `RUST_LOG` says, these crates log at debug at most.
fn not_a_frame(metadata: &tracing::Metadata<'_>) -> bool {
    *metadata.level() < tracing::Level::TRACE
        || !(metadata.target().starts_with("lapin")
            || metadata.target().starts_with("amq_protocol"))
}

/// Installs the global subscriber. `RUST_LOG` wins over the `default` filter (e.g. `"info"`).
/// Logs go to stderr so stdout stays for a command's output (batch ids, results).
/// A second init (tests run many services in one process) changes nothing.
pub fn init(format: LogFormat, default: &str) {
    let log = LogSettings {
        format,
        otlp_endpoint: None,
    };
    drop(init_with(&log, default, "fleet"));
}

/// Keeps the span exporter, if any, and flushes it on drop (keep it until the process ends).
#[must_use = "dropping it stops the span export"]
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// As [`init`], and with `log.otlp_endpoint` set, every span (a task's, a publish's) is also
/// exported with OTLP/HTTP JSON as `service`, in the W3C trace its `traceparent` names. An
/// exporter that cannot be built is reported on stderr and logging goes on without it.
pub fn init_with(log: &LogSettings, default: &str, service: &str) -> Guard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let lines = match log.format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = log.otlp_endpoint.as_deref().and_then(|endpoint| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| eprintln!("warning: no span export to {endpoint}: {e}"))
            .ok()
            .map(|exporter| {
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service.to_owned())
                            .build(),
                    )
                    .build()
            })
    });
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer(service.to_owned()))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(not_a_frame))
        .with(lines)
        .with(spans)
        .try_init();
    Guard(provider)
}

/// `text` from outside (an id, a kind, a reason, a status beat) with its control characters
/// escaped (`\u{1b}`, `\n`), so that it prints as one line with no terminal escape in it.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
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

/// `url` with any password replaced by `***`, for logs and error messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{printable, redact};

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(printable("plain é ✓"), "plain é ✓");
        assert_eq!(printable("a\u{1b}[2Jb\nc\u{85}"), "a\\u{1b}[2Jb\\nc\\u{85}");
    }

    #[test]
    fn redact_hides_the_password_and_keeps_the_rest() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("amqps://u@h/v"), "amqps://u@h/v");
        assert_eq!(redact("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
    }
}
