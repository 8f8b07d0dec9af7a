//! A confirmed publisher: every publish is `mandatory` and persistent, and succeeds only when the
//! broker confirms it. Up to `window` publishes wait for their confirm at once.

use crate::envelope::{self, BatchManifest, Task, TaskResult};
use crate::topology;
use crate::trace::TraceParent;
use chrono::Utc;
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The AMQP `app_id` of everything fleet publishes.
pub const APP_ID: &str = "fleet";

/// Messages [`Publisher::publish_all`] hands to lapin at once: enough that its I/O thread
/// writes many per wake-up, few enough that its send buffer (and our memory) stays small.
const WRITE_BURST: usize = 128;

/// Times a nacked publish is sent again before the nack is the caller's error.
const NACK_RETRIES: usize = 4;

/// How long a publish waits for its confirm unless told otherwise (`amqp.confirm_timeout_secs`).
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a publish did not succeed. In every case the caller still owns the message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed before a confirm arrived.
    #[error("publishing to `{exchange}` failed")]
    Broker {
        /// Where it went.
        exchange: String,
        /// The channel or connection error.
        #[source]
        source: lapin::Error,
    },
    /// The broker nacked the message (it could not take responsibility for it).
    #[error("broker nacked the message to `{exchange}` with routing key `{routing_key}`")]
    Nacked {
        /// Where it went.
        exchange: String,
        /// Its routing key.
        routing_key: String,
    },
    /// No confirm came within the confirm timeout: the broker may or may not have the message,
    /// and this publisher's channel is not to be trusted any more ([`Publisher::stalled`]).
    #[error(
        "no confirm for the message to `{exchange}` with routing key `{routing_key}` within {} s \
         (amqp.confirm_timeout_secs)",
        after.as_secs()
    )]
    Unconfirmed {
        /// Where it went.
        exchange: String,
        /// Its routing key.
        routing_key: String,
        /// How long it waited.
        after: Duration,
    },
    /// The message was `mandatory` and no queue was bound for it.
    #[error(
        "broker returned the message to `{exchange}` with routing key `{routing_key}`: {reply_text}"
    )]
    Returned {
        /// Where it went.
        exchange: String,
        /// Its routing key.
        routing_key: String,
        /// The broker's reason, e.g. `NO_ROUTE`.
        reply_text: String,
    },
}

impl PublishError {
    /// The refusal, when the broker refused this user the publish: a [`PermissionError`] naming
    /// the exchange, for the process to exit 3 with.
    ///
    /// [`PermissionError`]: crate::error::PermissionError
    pub fn permission(&self) -> Option<crate::error::PermissionError> {
        match self {
            Self::Broker { exchange, source } if self.is_refused() => {
                Some(crate::error::PermissionError {
                    operation: "publish to".to_owned(),
                    resource: exchange.clone(),
                    reason: source.to_string(),
                })
            }
            _ => None,
        }
    }

    /// True when the broker refused this user the publish (ACCESS_REFUSED on its channel).
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Broker { source, .. } if matches!(
            source.kind(),
            lapin::ErrorKind::ProtocolError(e) if matches!(
                e.kind(),
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED)
            )
        ))
    }
}

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Exchange name (`""` for the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body bytes.
    pub body: Vec<u8>,
    /// AMQP properties; persistence is set by the publisher.
    pub properties: BasicProperties,
}

fn now_secs() -> u64 {
    u64::try_from(Utc::now().timestamp()).unwrap_or_default()
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Headers of a task on attempt `attempt`.
pub fn task_headers(attempt: u32) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        envelope::HEADER_ATTEMPT.into(),
        AMQPValue::LongLongInt(attempt.into()),
    );
    headers
}

impl Outgoing {
    /// A task for `fleet.tasks`, routing key = kind, with the properties DESIGN.md lists.
    pub fn task(task: &Task) -> Self {
        let mut properties = BasicProperties::default()
            .with_message_id(task.id.as_str().into())
            .with_type(task.kind.as_str().into())
            .with_content_type(envelope::CONTENT_TYPE.into())
            .with_timestamp(now_secs())
            .with_app_id(APP_ID.into())
            .with_headers(task_headers(0));
        if let Some(batch) = &task.batch {
            properties = properties.with_correlation_id(batch.as_str().into());
        }
        Self {
            exchange: topology::TASKS_EXCHANGE.to_owned(),
            routing_key: task.kind.clone(),
            body: envelope::encode(task),
            properties,
        }
    }

    /// This message with the W3C `traceparent` header set to `trace`.
    #[must_use]
    pub fn traced(mut self, trace: &TraceParent) -> Self {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            envelope::HEADER_TRACEPARENT.into(),
            AMQPValue::LongString(trace.to_string().into()),
        );
        self.properties = self.properties.with_headers(headers);
        self
    }

    /// A result for exchange `fleet.results` (routing key = kind, for tracing only), with the
    /// result's `traceparent` as its header too.
    pub fn result(result: &TaskResult) -> Self {
        Self::encoded_result(result, envelope::encode(result))
    }

    /// As [`Outgoing::result`], with `body` the result already encoded.
    pub fn encoded_result(result: &TaskResult, body: Vec<u8>) -> Self {
        let mut properties = BasicProperties::default()
            .with_message_id(result.task_id.as_str().into())
            .with_type(result.kind.as_str().into())
            .with_content_type(envelope::CONTENT_TYPE.into())
            .with_timestamp(now_secs())
            .with_app_id(APP_ID.into());
        if let Some(batch) = &result.batch {
            properties = properties.with_correlation_id(batch.as_str().into());
        }
        if let Some(trace) = &result.traceparent {
            let mut headers = FieldTable::default();
            headers.insert(envelope::HEADER_TRACEPARENT.into(), long(trace));
            properties = properties.with_headers(headers);
        }
        Self {
            exchange: topology::RESULTS_EXCHANGE.to_owned(),
            routing_key: result.kind.clone(),
            body,
            properties,
        }
    }

    /// Several results in one message for exchange `fleet.results` (`type` = `results`; each
    /// result carries its own trace in its body), from results encoded with
    /// [`envelope::encode_result`].
    pub fn results(results: &[&serde_json::value::RawValue]) -> Self {
        let properties = BasicProperties::default()
            .with_type(envelope::RESULTS_TYPE.into())
            .with_content_type(envelope::CONTENT_TYPE.into())
            .with_timestamp(now_secs())
            .with_app_id(APP_ID.into());
        Self {
            exchange: topology::RESULTS_EXCHANGE.to_owned(),
            routing_key: envelope::RESULTS_TYPE.to_owned(),
            body: envelope::encode_group(results),
            properties,
        }
    }

    /// A batch manifest for exchange `fleet.batches`.
    pub fn manifest(manifest: &BatchManifest) -> Self {
        let properties = BasicProperties::default()
            .with_type(envelope::BATCH_TYPE.into())
            .with_correlation_id(manifest.batch.as_str().into())
            .with_content_type(envelope::CONTENT_TYPE.into())
            .with_timestamp(now_secs())
            .with_app_id(APP_ID.into());
        Self {
            exchange: topology::BATCHES_EXCHANGE.to_owned(),
            routing_key: manifest.kind.clone(),
            body: envelope::encode(manifest),
            properties,
        }
    }

    /// A copy of a received message for another exchange, with `extra` headers added.
    ///
    /// The copy drops the AMQP `user_id` (the broker would refuse it from another user; the
    /// forwarding publisher sets its own) and any `x-fleet-published-by` header, which only the
    /// forwarder may vouch for: pass it in `extra`. It drops the broker's `x-delivery-count`
    /// too.
    pub fn forward(
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: &BasicProperties,
        extra: Vec<(&str, AMQPValue)>,
    ) -> Self {
        let mut kept = properties
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        kept.remove(envelope::HEADER_PUBLISHED_BY);
        // The broker's count of the received message's deliveries; the copy is a new message.
        kept.remove("x-delivery-count");
        let mut headers = FieldTable::from(kept);
        for (k, v) in extra {
            headers.insert(ShortString::from(k), v);
        }
        Self {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body,
            properties: without_user_id(properties).with_headers(headers),
        }
    }
}

/// `properties` without `user_id` (lapin has setters but no way to unset one field).
pub fn without_user_id(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.expiration() {
        out = out.with_expiration(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// A string header value.
pub fn header_str(value: &str) -> AMQPValue {
    long(value)
}

/// A confirm-mode channel that publishes `mandatory`, persistent messages.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    /// Its connection's status: a blocked connection (a broker alarm) is not a lost one.
    connection: lapin::ConnectionStatus,
    window: Arc<Semaphore>,
    window_size: usize,
    user: Option<ShortString>,
    confirm_seconds: Option<Histogram>,
    confirm_timeout: Duration,
    /// Counts confirms that did not come in time.
    timeouts: Option<Counter>,
    /// Set, for every clone, once a confirm did not come in time.
    stalled: Arc<AtomicBool>,
    /// Work queues to spread tasks over (`topology.work_queues`).
    shards: usize,
}

impl Publisher {
    /// Opens a channel on `connection` in confirm mode. Fails if the channel cannot be opened.
    pub async fn new(connection: &Connection, window: usize) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            connection: connection.status().clone(),
            window: Arc::new(Semaphore::new(window)),
            window_size: window,
            user: None,
            confirm_seconds: None,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            timeouts: None,
            stalled: Arc::new(AtomicBool::new(false)),
            shards: 1,
        })
    }

    /// Waits at most `timeout` for each confirm ([`DEFAULT_CONFIRM_TIMEOUT`] unless set), not
    /// counting the time the broker holds the connection blocked (a memory or disk alarm:
    /// flow control, which ends by itself, not a loss).
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// True once a confirm did not come within the confirm timeout. A broker that stops
    /// confirming on a channel does not start again on it: the owner drops the connection and
    /// does the unconfirmed work again on a new one.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// The flag behind [`Publisher::stalled`], for a watch that must not hold the channel.
    pub(crate) fn stalled_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stalled)
    }

    /// Spreads tasks (messages to [`topology::TASKS_EXCHANGE`]) over `shards` work queues, by a
    /// hash of the task id, so every publisher sends a given task to the same queue.
    #[must_use]
    pub fn sharded(mut self, shards: usize) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// Sets AMQP `user_id` = `user` (the broker user this connection logged in as) on every
    /// message, so the broker vouches for who published it. `None` leaves it unset.
    #[must_use]
    pub fn identified_as(mut self, user: Option<String>) -> Self {
        self.user = user.map(|u| ShortString::from(u.as_str()));
        self
    }

    /// Records each publish's time to its confirm in `histogram`, and counts in `timeouts` the
    /// confirms that did not come in time.
    #[must_use]
    pub fn timed(mut self, histogram: Histogram, timeouts: Counter) -> Self {
        self.confirm_seconds = Some(histogram);
        self.timeouts = Some(timeouts);
        self
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes one message and waits for its confirm.
    ///
    /// Fails on a channel error, a nack, or a return (no queue bound for a mandatory message).
    pub async fn publish(&self, message: Outgoing) -> Result<(), PublishError> {
        // The semaphore is never closed, so acquire only fails if it were.
        let _permit = self
            .window
            .acquire()
            .await
            .expect("publish window semaphore is never closed");
        self.confirmed(&message).await
    }

    /// Sends `message` and waits for its confirm. A quorum queue nacks while it is still
    /// electing its first leader (seen right after declaration); the message is still ours, so
    /// a nack is sent again a few times before it is the caller's error.
    async fn confirmed(&self, message: &Outgoing) -> Result<(), PublishError> {
        let mut delay = std::time::Duration::from_millis(50);
        for _ in 0..NACK_RETRIES {
            match self.send(message).await?.await {
                Err(PublishError::Nacked {
                    exchange,
                    routing_key,
                }) => {
                    tracing::warn!(%exchange, %routing_key, ?delay, "broker nacked a publish; sending it again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                outcome => return outcome,
            }
        }
        self.send(message).await?.await
    }

    /// Publishes every message, keeping up to the window's confirms outstanding, and returns
    /// how many were confirmed.
    ///
    /// On the first failure it stops sending and gives back every message that was not
    /// confirmed (failed, still unanswered when the channel died, or never sent) with the error,
    /// so the caller can send exactly those again on a new connection.
    pub async fn publish_all(&self, messages: Vec<Outgoing>) -> Result<u64, Unconfirmed> {
        let mut pending = FuturesUnordered::new();
        let mut confirmed = vec![false; messages.len()];
        let mut error = None;
        let burst = WRITE_BURST.min(self.window_size);
        'sending: for (n, chunk) in messages.chunks(burst).enumerate() {
            while pending.len() + chunk.len() > self.window_size
                && let Some((j, outcome)) = pending.next().await
            {
                match outcome {
                    Ok(()) => confirmed[j] = true,
                    Err(e) => {
                        error = Some(e);
                        break 'sending;
                    }
                }
            }
            // Sent together: lapin's publish returns only once its I/O thread has written the
            // frames, so sending one message after another costs two thread wake-ups each; a
            // burst goes out in one write and comes back in one wake-up. The channel numbers
            // each message as it queues its frames, so confirms still match.
            let sent = futures_util::future::join_all(chunk.iter().map(|m| self.send(m))).await;
            for (k, (message, sent)) in chunk.iter().zip(sent).enumerate() {
                let i = n * burst + k;
                match sent {
                    Ok(confirm) => pending.push(async move {
                        match confirm.await {
                            // Nacked: send it again as `publish` would.
                            Err(PublishError::Nacked { .. }) => (i, self.confirmed(message).await),
                            outcome => (i, outcome),
                        }
                    }),
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
            if error.is_some() {
                break;
            }
        }
        // Whatever was sent is answered (or failed with the channel) before we return.
        while let Some((j, outcome)) = pending.next().await {
            match outcome {
                Ok(()) => confirmed[j] = true,
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        drop(pending);
        let done = confirmed.iter().filter(|c| **c).count() as u64;
        match error {
            None => Ok(done),
            Some(error) => Err(Unconfirmed {
                error,
                confirmed: done,
                messages: messages
                    .into_iter()
                    .zip(confirmed)
                    .filter_map(|(m, c)| (!c).then_some(m))
                    .collect(),
            }),
        }
    }

    /// Sends one message; the returned future resolves with its confirm.
    async fn send(
        &self,
        message: &Outgoing,
    ) -> Result<impl Future<Output = Result<(), PublishError>> + use<>, PublishError> {
        let mut properties = message.properties.clone().with_delivery_mode(2);
        if let Some(user) = &self.user {
            properties = properties.with_user_id(user.clone());
        }
        let exchange = match self.shards {
            1 => message.exchange.clone(),
            _ if message.exchange != topology::TASKS_EXCHANGE => message.exchange.clone(),
            shards => topology::tasks_exchange(shard_of(&properties, shards)),
        };
        let routing_key = message.routing_key.clone();
        let sent = Instant::now();
        let timer = self.confirm_seconds.clone();
        let (limit, timeouts, stalled, connection) = (
            self.confirm_timeout,
            self.timeouts.clone(),
            Arc::clone(&self.stalled),
            self.connection.clone(),
        );
        let confirm = self
            .channel
            .basic_publish(
                exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                properties,
            )
            .await
            .map_err(|source| PublishError::Broker {
                exchange: exchange.clone(),
                source,
            })?;
        Ok(async move {
            let mut confirm = std::pin::pin!(confirm);
            let confirm = loop {
                match tokio::time::timeout(limit, &mut confirm).await {
                    Ok(confirm) => break Some(confirm),
                    Err(_) if connection.blocked() => {
                        tracing::debug!(%exchange, "the broker blocks the connection; still waiting for a confirm");
                    }
                    Err(_) => break None,
                }
            };
            let Some(confirm) = confirm else {
                if !stalled.swap(true, Ordering::SeqCst) {
                    tracing::warn!(%exchange, %routing_key, ?limit, "a publish was not confirmed in time; treating the connection as lost");
                }
                if let Some(timeouts) = timeouts {
                    timeouts.inc();
                }
                return Err(PublishError::Unconfirmed {
                    exchange,
                    routing_key,
                    after: limit,
                });
            };
            if let Some(histogram) = timer {
                histogram.observe(sent.elapsed().as_secs_f64());
            }
            check(confirm, exchange, routing_key)
        })
    }
}

/// The shard of a task: FNV-1a of its message id (the task id) modulo `shards`.
fn shard_of(properties: &BasicProperties, shards: usize) -> usize {
    let id = properties
        .message_id()
        .as_ref()
        .map_or("", |id| id.as_str());
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    usize::try_from(hash % shards as u64).unwrap_or(0)
}

/// Messages whose publish was not confirmed, given back to the caller with the first error.
#[derive(Debug, thiserror::Error)]
#[error("{} messages were not confirmed ({confirmed} were)", messages.len())]
pub struct Unconfirmed {
    /// The first failure.
    #[source]
    pub error: PublishError,
    /// How many were confirmed before or despite it.
    pub confirmed: u64,
    /// The messages not confirmed, in their original order.
    pub messages: Vec<Outgoing>,
}

impl Unconfirmed {
    /// True when the channel or connection failed or stopped confirming, so a new connection
    /// may succeed; false for a nack or a return, which another attempt would repeat.
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self.error,
            PublishError::Broker { .. } | PublishError::Unconfirmed { .. }
        )
    }
}

fn check(
    confirmation: lapin::Result<Confirmation>,
    exchange: String,
    routing_key: String,
) -> Result<(), PublishError> {
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
            Err(PublishError::Returned {
                exchange,
                routing_key,
                reply_text: returned.reply_text.to_string(),
            })
        }
        Ok(Confirmation::Nack(None) | Confirmation::NotRequested) => Err(PublishError::Nacked {
            exchange,
            routing_key,
        }),
        Err(source) => Err(PublishError::Broker { exchange, source }),
    }
}
