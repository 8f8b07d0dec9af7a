//! Connecting to the broker: password from settings files applied, a bounded wait, and the
//! broker's refusal of our credentials turned into an [`AuthError`] (exit code 3); and
//! [`subscribe`], the start-up every consuming service shares.

use crate::error::AuthError;
use crate::observe::Common;
use crate::publisher::Publisher;
use crate::settings::Settings;
use crate::telemetry::redact;
use crate::topology;
use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable as _};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ErrorKind};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    let builder = lapin::DefaultConnectionBuilder::new()
        .context("starting lapin's runtime")?
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(tls_config(settings)?);
    let connecting = builder.connect();
    let connected = tokio::time::timeout(timeout, connecting)
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

/// The TLS side of `amqps://` connections: extra trusted CA certificates and the client
/// identity, read from the files the settings name (each time, so rotated files are picked up).
fn tls_config(settings: &Settings) -> anyhow::Result<OwnedTLSConfig> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("reading {key} {}", path.display()))
    };
    let cert_chain = match &settings.amqp.tls_ca_file {
        Some(path) => Some(
            String::from_utf8(read("amqp.tls_ca_file", path)?)
                .context("amqp.tls_ca_file is not PEM text")?,
        ),
        None => None,
    };
    let identity = match (&settings.amqp.tls_cert_file, &settings.amqp.tls_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("amqp.tls_cert_file", cert)?,
            key: read("amqp.tls_key_file", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
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

/// `error` as the process should see it: a [`PermissionError`] naming `operation` and `resource`
/// when the broker refused access (exit 3, no retry), else the error with that context.
pub fn refused_to(error: lapin::Error, operation: &str, resource: &str) -> anyhow::Error {
    match error.kind() {
        ErrorKind::ProtocolError(e)
            if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) =>
        {
            anyhow::Error::new(crate::error::PermissionError {
                operation: operation.to_owned(),
                resource: resource.to_owned(),
                reason: e.get_message().as_str().to_owned(),
            })
        }
        _ => anyhow::Error::new(error).context(format!("{operation} {resource}")),
    }
}

/// A service's consuming side: its connection, the channel deliveries arrive on, a confirmed
/// publisher on a second channel, and the delivery stream.
pub struct Subscription {
    /// The connection both channels live on.
    pub connection: Connection,
    /// The channel deliveries arrive and are acked on.
    pub channel: lapin::Channel,
    /// Confirmed publishes (results, retries, dead letters).
    pub publisher: Publisher,
    /// The delivery stream.
    pub deliveries: lapin::Consumer,
}

impl Subscription {
    /// Cancels the consumer (no new deliveries); errors are moot during shutdown.
    pub async fn cancel(&self) {
        let cancel = self
            .channel
            .basic_cancel(self.deliveries.tag(), BasicCancelOptions::default());
        // On a dead connection this may never answer; see `lost_watch`.
        let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
    }

    /// Why this subscription can no longer work (connection or either channel closed), if so.
    pub fn lost(&self) -> Option<anyhow::Error> {
        lost_of(
            self.connection.status(),
            self.channel.status(),
            self.publisher.channel().status(),
            self.publisher.stalled(),
        )
    }

    /// Resolves once the subscription is lost (see [`Subscription::lost`]), with the reason.
    ///
    /// lapin does not always fail a pending operation when its connection dies (an ack or a
    /// publish on a cut connection can wait forever), so every wait on the broker that is not
    /// itself a delivery stream should race against this. The future holds the connection's and
    /// channels' status, not the subscription: keep one for a whole session and race it by
    /// reference, so that its 100 ms timer is set once and not again for every wait (each new
    /// timer set from outside the runtime's thread wakes that thread).
    pub fn lost_watch(&self) -> impl Future<Output = anyhow::Error> + Send + 'static {
        let connection = self.connection.status().clone();
        let channel = self.channel.status().clone();
        let publishing = self.publisher.channel().status().clone();
        let stalled = self.publisher.stalled_flag();
        async move {
            loop {
                let stalled = stalled.load(std::sync::atomic::Ordering::SeqCst);
                if let Some(why) = lost_of(&connection, &channel, &publishing, stalled) {
                    return why;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Closes channel and connection; anything still unacked goes back to its queue.
    pub async fn close(self) {
        // On a dead connection these fail or hang until the heartbeat notices; don't wait long.
        let bye = async {
            let _ = self.channel.close(200, "bye".into()).await;
            let _ = self.connection.close(200, "bye".into()).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
    }
}

/// Why a subscription with these connection and channel states can no longer work, if so.
fn lost_of(
    connection: &lapin::ConnectionStatus,
    channel: &lapin::ChannelStatus,
    publishing: &lapin::ChannelStatus,
    stalled: bool,
) -> Option<anyhow::Error> {
    if !connection.connected() {
        Some(anyhow::anyhow!("the connection is closed"))
    } else if !channel.connected() {
        Some(anyhow::anyhow!("the consuming channel is closed"))
    } else if !publishing.connected() {
        Some(anyhow::anyhow!("the publishing channel is closed"))
    } else if stalled {
        Some(anyhow::anyhow!(
            "the broker stopped confirming publishes (amqp.confirm_timeout_secs)"
        ))
    } else {
        None
    }
}

/// Connects as `name`, declares the topology, sets `prefetch` and starts consuming `queue`.
///
/// Used at start and after every connection loss. A failed attempt is tried again with
/// jittered exponential backoff (100 ms growing to at most 5 s, [`backoff`]) until `amqp.reconnect_timeout_secs` of waiting
/// have passed; that also covers RabbitMQ 3.10 closing the connection with INTERNAL_ERROR when
/// `basic.consume` reaches a quorum queue whose Raft member has not started yet. A refusal of our
/// credentials ([`AuthError`]) and bad settings fail at once. Returns `Ok(None)` when `shutdown`
/// is cancelled first.
pub async fn subscribe(
    settings: &Settings,
    name: &str,
    queue: &str,
    prefetch: u16,
    common: &Common,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Subscription>> {
    let start = || subscribe_once(settings, name, queue, prefetch, common);
    let attempts = start
        .retry(backoff(settings))
        .when(|e: &anyhow::Error| !is_fatal(e))
        .notify(|e: &anyhow::Error, wait: Duration| {
            tracing::warn!(error = %format!("{e:#}"), ?wait, queue, "cannot consume; trying again");
        });
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Ok(None),
        subscribed = attempts => subscribed
            .map(Some)
            .with_context(|| format!("gave up reaching the broker after {:?}", settings.reconnect_timeout())),
    }
}

/// The longest wait between two connection attempts, jitter included.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The backoff between connection attempts: a base of 100 ms doubling to 2.5 s, plus a random
/// part of up to the base so a fleet of consumers does not reconnect in step (backon's jitter
/// adds up to the current delay once more); so every wait is at most [`MAX_BACKOFF`], until
/// `amqp.reconnect_timeout_secs` of waiting.
pub fn backoff(settings: &Settings) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_BACKOFF / 2)
        .with_jitter()
        .with_max_times(usize::MAX)
        .with_total_delay(Some(settings.reconnect_timeout()))
}

/// True for errors another attempt cannot fix: refused credentials or permissions, bad settings.
pub fn is_fatal(error: &anyhow::Error) -> bool {
    error.chain().any(|c| {
        c.is::<AuthError>()
            || c.is::<crate::error::PermissionError>()
            || c.is::<crate::error::SettingsError>()
    })
}

async fn subscribe_once(
    settings: &Settings,
    name: &str,
    queue: &str,
    prefetch: u16,
    common: &Common,
) -> anyhow::Result<Subscription> {
    let connection = connect(settings, name).await?;
    // Each step below can hang on a connection cut at that moment (see `lost_watch`).
    let limit = Duration::from_secs(settings.amqp.connect_timeout_secs);
    tokio::time::timeout(
        limit,
        start_consuming(connection, settings, queue, prefetch, common),
    )
    .await
    .with_context(|| format!("timed out after {limit:?} setting up the consumer"))?
}

async fn start_consuming(
    connection: Connection,
    settings: &Settings,
    queue: &str,
    prefetch: u16,
    common: &Common,
) -> anyhow::Result<Subscription> {
    topology::ensure(&connection, settings).await?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("setting prefetch")?;
    let publisher = Publisher::new(&connection, settings.amqp.publish_window)
        .await
        .context("opening the publish channel")?
        .identified_as(settings.broker_user())
        .confirm_timeout(settings.confirm_timeout())
        .timed(
            common.confirm_seconds.clone(),
            common.confirm_timeouts.clone(),
        );
    let deliveries = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused_to(e, "consume from", queue))?;
    Ok(Subscription {
        connection,
        channel,
        publisher,
        deliveries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder as _;

    #[test]
    fn backoff_waits_stay_within_the_cap_with_jitter_included() {
        let settings = Settings::load_from(None, Vec::new()).expect("defaults");
        for _ in 0..200 {
            let waits: Vec<Duration> = backoff(&settings).build().take(30).collect();
            assert_eq!(
                waits.len(),
                30,
                "30 waits fit in the default reconnect timeout"
            );
            assert!(waits[0] >= Duration::from_millis(100), "{waits:?}");
            assert!(waits[0] < Duration::from_millis(200), "{waits:?}");
            assert!(waits.iter().all(|w| *w <= MAX_BACKOFF), "{waits:?}");
        }
        let tail: Vec<Duration> = backoff(&settings).build().skip(10).take(200).collect();
        assert!(
            tail.iter().all(|w| *w >= MAX_BACKOFF / 2),
            "the base reaches 2.5 s: {tail:?}"
        );
    }
}
