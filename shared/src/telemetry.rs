//! Logging: `tracing` with a `RUST_LOG` filter, human-readable or JSON lines.

use crate::settings::LogFormat;
use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is unset: fleet at info, and lapin's own lines off. fleet logs every
/// broker failure with its context once; lapin would add several ERROR lines of its own for one
/// refused login or dropped connection. `RUST_LOG=info,lapin=debug` shows them.
pub const DEFAULT_FILTER: &str = "info,lapin=off";

/// Installs the global subscriber. `RUST_LOG` wins over the `default` filter (e.g. `"info"`).
/// Logs go to stderr so stdout stays for a command's output (batch ids, results).
pub fn init(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests run many services in one process) is not an error worth reporting.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
    use super::redact;

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
