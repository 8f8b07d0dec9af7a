//! Connecting to the broker: password from settings files applied, a bounded wait, and the
//! broker's refusal of our credentials turned into an [`AuthError`] (exit code 3).

use crate::error::AuthError;
use crate::settings::Settings;
use crate::telemetry::redact;
use anyhow::Context as _;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Connection, ConnectionProperties, ErrorKind};
use std::time::Duration;

/// Connects as `name` (shown in the broker's connection list).
///
/// Fails with [`AuthError`] when the broker refuses the user, password or vhost, and with a
/// context naming the redacted broker URL on any other failure (unreachable, timeout).
pub async fn connect(settings: &Settings, name: &str) -> anyhow::Result<Connection> {
    let uri = settings.amqp_uri()?;
    let user = uri.authority.userinfo.username.clone();
    let broker = redact(&settings.amqp.url);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let timeout = Duration::from_secs(settings.amqp.connect_timeout_secs);
    let connected = tokio::time::timeout(timeout, Connection::connect_uri(uri, properties))
        .await
        .with_context(|| format!("timed out after {timeout:?} connecting to {broker}"))?;
    match connected {
        Ok(connection) => Ok(connection),
        Err(error) if is_refusal(&error) => Err(AuthError {
            broker,
            user,
            reason: error.to_string(),
        }
        .into()),
        Err(error) => Err(anyhow::Error::new(error).context(format!("connecting to {broker}"))),
    }
}

/// True when the broker refused access: bad credentials, unknown user, or no vhost permission.
pub fn is_refusal(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(e) => matches!(
            e.kind(),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
                | AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
        ),
        ErrorKind::AuthProviderError(_) => true,
        _ => false,
    }
}
