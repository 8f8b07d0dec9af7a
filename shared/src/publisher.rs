//! A confirmed publisher: every publish is `mandatory` and persistent, and succeeds only when the
//! broker confirms it. Up to `window` publishes wait for their confirm at once.

use crate::envelope::{self, BatchManifest, Task, TaskResult};
use crate::topology;
use chrono::Utc;
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// The AMQP `app_id` of everything fleet publishes.
pub const APP_ID: &str = "fleet";

/// Times a nacked publish is sent again before the nack is the caller's error.
const NACK_RETRIES: usize = 4;

/// Why a publish did not succeed. In every case the caller still owns the message.
#[derive(Debug, thiserror::Error)]
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

    /// A result for `fleet.results`.
    pub fn result(result: &TaskResult) -> Self {
        let mut properties = BasicProperties::default()
            .with_message_id(result.task_id.as_str().into())
            .with_type(result.kind.as_str().into())
            .with_content_type(envelope::CONTENT_TYPE.into())
            .with_timestamp(now_secs())
            .with_app_id(APP_ID.into());
        if let Some(batch) = &result.batch {
            properties = properties.with_correlation_id(batch.as_str().into());
        }
        Self {
            exchange: String::new(),
            routing_key: topology::RESULTS_QUEUE.to_owned(),
            body: envelope::encode(result),
            properties,
        }
    }

    /// A batch manifest for `fleet.results`.
    pub fn manifest(manifest: &BatchManifest) -> Self {
        let properties = BasicProperties::default()
            .with_type(envelope::BATCH_TYPE.into())
            .with_correlation_id(manifest.batch.as_str().into())
            .with_content_type(envelope::CONTENT_TYPE.into())
            .with_timestamp(now_secs())
            .with_app_id(APP_ID.into());
        Self {
            exchange: String::new(),
            routing_key: topology::RESULTS_QUEUE.to_owned(),
            body: envelope::encode(manifest),
            properties,
        }
    }

    /// A copy of a received message for another exchange, with `extra` headers added.
    pub fn forward(
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: &BasicProperties,
        extra: Vec<(&str, AMQPValue)>,
    ) -> Self {
        let mut headers = properties.headers().clone().unwrap_or_default();
        for (k, v) in extra {
            headers.insert(ShortString::from(k), v);
        }
        Self {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body,
            properties: properties.clone().with_headers(headers),
        }
    }
}

/// A string header value.
pub fn header_str(value: &str) -> AMQPValue {
    long(value)
}

/// A confirm-mode channel that publishes `mandatory`, persistent messages.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    window: Arc<Semaphore>,
    window_size: usize,
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
            window: Arc::new(Semaphore::new(window)),
            window_size: window,
        })
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
        // A quorum queue nacks while it is still electing its first leader (seen right after
        // declaration); the message is still ours, so send it again a few times.
        let mut delay = std::time::Duration::from_millis(50);
        for _ in 0..NACK_RETRIES {
            let (exchange, routing_key) = (message.exchange.clone(), message.routing_key.clone());
            let confirm = self.send(message.clone()).await?;
            match check(confirm.await, exchange, routing_key) {
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
        let (exchange, routing_key) = (message.exchange.clone(), message.routing_key.clone());
        let confirm = self.send(message).await?;
        check(confirm.await, exchange, routing_key)
    }

    /// Publishes every message, keeping up to the window's confirms outstanding, and returns when
    /// all are confirmed. Fails on the first error; messages after it may or may not be published.
    pub async fn publish_all(
        &self,
        messages: impl IntoIterator<Item = Outgoing>,
    ) -> Result<u64, PublishError> {
        let mut pending = FuturesUnordered::new();
        let mut confirmed = 0u64;
        for message in messages {
            if pending.len() >= self.window_size
                && let Some(result) = pending.next().await
            {
                result?;
                confirmed += 1;
            }
            let (exchange, routing_key) = (message.exchange.clone(), message.routing_key.clone());
            let confirm = self.send(message).await?;
            pending.push(async move { check(confirm.await, exchange, routing_key) });
        }
        while let Some(result) = pending.next().await {
            result?;
            confirmed += 1;
        }
        Ok(confirmed)
    }

    async fn send(&self, message: Outgoing) -> Result<lapin::PublisherConfirm, PublishError> {
        let properties = message.properties.with_delivery_mode(2);
        self.channel
            .basic_publish(
                message.exchange.as_str().into(),
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
                exchange: message.exchange,
                source,
            })
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
