//! Status over AMQP alone, without the management plugin: queue depths from passive declares,
//! and unacked counts from the services themselves.
//!
//! AMQP 0-9-1 tells anyone the ready messages and consumers of a queue (a passive
//! `queue.declare`), but not how many are delivered and unacked. So every consumer and the
//! collector publish a small [`Beat`] to the fanout exchange `fleet.status` every
//! [`BEAT_EVERY`]: who they are, the queue they take from and how many deliveries they hold
//! unacked. Nobody listens unless `fleet-producer status` runs: it binds a queue of its own for
//! a moment and adds up the beats, as Celery's `inspect` and event monitors do.

use crate::envelope;
use crate::settings::Settings;
use crate::topology;
use chrono::{DateTime, Utc};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often services beat.
pub const BEAT_EVERY: Duration = Duration::from_secs(2);

/// One service's status at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beat {
    /// `consumer` or `collector`.
    pub service: String,
    /// `<host>/<pid>`.
    pub process: String,
    /// The queue it takes from.
    pub queue: String,
    /// Deliveries it holds unacked.
    pub unacked: u64,
    /// Its prefetch.
    pub prefetch: u16,
    /// When it beat.
    pub at: DateTime<Utc>,
}

/// `<host>/<pid>` of this process.
pub fn process_id() -> String {
    format!(
        "{}/{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    )
}

/// Publishes a beat on `channel` every [`BEAT_EVERY`] until `stop` is cancelled, with
/// `unacked()` read each time. Beats are not confirmed and not mandatory: a lost one is
/// replaced two seconds later, and with nobody listening the exchange drops them.
pub fn spawn_beats(
    channel: Channel,
    service: &'static str,
    queue: String,
    prefetch: u16,
    unacked: impl Fn() -> u64 + Send + 'static,
    stop: CancellationToken,
) {
    let process = process_id();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(BEAT_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let beat = Beat {
                service: service.to_owned(),
                process: process.clone(),
                queue: queue.clone(),
                unacked: unacked(),
                prefetch,
                at: Utc::now(),
            };
            let body = envelope::encode(&beat);
            let sent = channel
                .basic_publish(
                    topology::STATUS_EXCHANGE.into(),
                    service.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_content_type(envelope::CONTENT_TYPE.into()),
                )
                .await;
            if sent.is_err() {
                // The channel is gone; the session that owns it ends and starts another.
                return;
            }
        }
    });
}

/// One queue's line of the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// Queue name.
    pub queue: String,
    /// Messages ready for delivery.
    pub ready: u32,
    /// Delivered and not yet acked, as the services holding them report it; `None` when the
    /// queue has consumers that did not report (no beat heard).
    pub unacked: Option<u64>,
    /// Consumers.
    pub consumers: u32,
}

/// The whole status: every queue, and the services heard from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Work, delay, dead-letter and result queues.
    pub queues: Vec<QueueStatus>,
    /// The latest beat of every service heard.
    pub services: Vec<Beat>,
}

/// Listens to beats on a queue of its own (`fleet.status.<uuid>`, exclusive): needs a user that
/// may declare it (the admin role).
pub struct Listener {
    deliveries: lapin::Consumer,
}

impl Listener {
    /// Declares and binds the listening queue on `channel` and starts consuming it.
    ///
    /// Fails when the broker refuses (a role that may not declare `fleet.status.*` queues).
    pub async fn start(channel: &Channel) -> lapin::Result<Self> {
        let name = format!("{}.{}", topology::STATUS_EXCHANGE, uuid_simple());
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                name.as_str().into(),
                topology::STATUS_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let deliveries = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Self { deliveries })
    }

    /// Takes the beats that arrive within `window`, keeping the latest per process in `heard`.
    pub async fn listen(&mut self, window: Duration, heard: &mut BTreeMap<String, Beat>) {
        use futures_util::StreamExt as _;
        let until = tokio::time::sleep(window);
        tokio::pin!(until);
        loop {
            tokio::select! {
                () = &mut until => return,
                next = self.deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        if let Ok(beat) = serde_json::from_slice::<Beat>(&delivery.data) {
                            heard.insert(beat.process.clone(), beat);
                        }
                    }
                    _ => return,
                },
            }
        }
    }
}

fn uuid_simple() -> String {
    use rand::RngCore as _;
    format!("{:016x}", rand::rng().next_u64())
}

/// Ready and consumer counts of every queue (passive declares, which need no permission), with
/// the unacked counts the `heard` beats report; beats older than three intervals are dropped.
///
/// Fails when a queue is missing (the topology is not declared) or the channel fails.
pub async fn read(
    channel: &Channel,
    settings: &Settings,
    heard: &BTreeMap<String, Beat>,
) -> lapin::Result<Status> {
    let fresh: Vec<Beat> = heard
        .values()
        .filter(|b| {
            Utc::now()
                .signed_duration_since(b.at)
                .to_std()
                .unwrap_or_default()
                < BEAT_EVERY * 3
        })
        .cloned()
        .collect();
    let mut queues = Vec::new();
    for queue in topology::queues(settings) {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let reporting: Vec<&Beat> = fresh.iter().filter(|b| b.queue == queue).collect();
        let consumers = declared.consumer_count();
        let unacked = if consumers == 0 {
            Some(0)
        } else if reporting.is_empty() {
            None
        } else {
            Some(reporting.iter().map(|b| b.unacked).sum())
        };
        queues.push(QueueStatus {
            queue,
            ready: declared.message_count(),
            unacked,
            consumers,
        });
    }
    Ok(Status {
        queues,
        services: fresh,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self
            .queues
            .iter()
            .map(|q| q.queue.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<width$}  {:>8}  {:>8}  {:>9}",
            "queue", "ready", "unacked", "consumers"
        )?;
        for q in &self.queues {
            let unacked = q.unacked.map_or_else(|| "?".to_owned(), |n| n.to_string());
            writeln!(
                f,
                "{:<width$}  {:>8}  {:>8}  {:>9}",
                q.queue, q.ready, unacked, q.consumers
            )?;
        }
        for beat in &self.services {
            writeln!(
                f,
                "{} {} on {}: {} unacked, prefetch {}",
                // A beat comes from any role that may write fleet.status.
                crate::telemetry::printable(&beat.service),
                crate::telemetry::printable(&beat.process),
                crate::telemetry::printable(&beat.queue),
                beat.unacked,
                beat.prefetch
            )?;
        }
        Ok(())
    }
}
