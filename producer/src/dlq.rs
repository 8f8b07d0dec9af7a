//! Dead-letter tools: `fleet-producer dlq list | replay | purge`.
//!
//! Messages reach `fleet.dead` two ways: the consumer dead-letters a task it cannot or will not
//! run again (with `x-fleet-error`, `x-fleet-attempt`, `x-fleet-dead-at`), and the broker
//! dead-letters a task that reached the work queue's delivery limit (with `x-death`, reason
//! `delivery_limit`). Both are read the same way here.
//!
//! Reading never loses a message: every message is taken unacked, and a message is acked only
//! once it was replayed (its task confirmed by the broker), purged, or put back (a copy
//! confirmed in `fleet.dead`). Reading never returns a message to the queue either, so reads do
//! not add to its delivery count ([`each`]).

use crate::submit::connect_publisher;
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use fleet_shared::envelope::{self, DeadReason, HEADER_ATTEMPT, HEADER_DEAD_AT, HEADER_ERROR};
use fleet_shared::publisher::{Outgoing, Publisher, header_str, task_headers, without_user_id};
use fleet_shared::settings::Settings;
use fleet_shared::telemetry::printable;
use fleet_shared::topology;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

/// One dead message, as `dlq list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// The task id (AMQP `message_id`, or the body's `id`), if there is one.
    pub id: Option<String>,
    /// The task kind (AMQP `type`, or the routing key).
    pub kind: String,
    /// Why it is dead.
    pub reason: String,
    /// Attempts made, as far as fleet knows.
    pub attempts: u32,
    /// When it was dead-lettered, if recorded.
    pub when: Option<DateTime<Utc>>,
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::LongLongInt(n) => Some(n),
        AMQPValue::LongInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::Timestamp(n) => i64::try_from(n).ok(),
        _ => None,
    }
}

/// The first `x-death` entry the broker added, if any.
fn first_death(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

/// Reads what fleet and the broker recorded on a dead message.
pub fn describe(delivery: &Delivery) -> DeadLetter {
    let properties = &delivery.properties;
    let headers = properties.headers().clone().unwrap_or_default();
    let get = |key: &str| headers.inner().get(key);
    let death = first_death(&headers);
    let reason = get(HEADER_ERROR)
        .and_then(text)
        .map(DeadReason::Recorded)
        .or_else(|| {
            let death = death?;
            let reason = death.inner().get("reason").and_then(text)?;
            let queue = death
                .inner()
                .get("queue")
                .and_then(text)
                .unwrap_or_default();
            Some(DeadReason::Broker { reason, queue })
        })
        .or_else(|| {
            // Routed here as the alternate exchange of the exchange it was published to.
            let exchange = delivery.exchange.as_str();
            (exchange != topology::DEAD_EXCHANGE).then(|| DeadReason::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: delivery.routing_key.as_str().to_owned(),
            })
        })
        .unwrap_or(DeadReason::Unknown)
        .to_string();
    let when = get(HEADER_DEAD_AT)
        .or_else(|| death.and_then(|d| d.inner().get("time")))
        .and_then(integer)
        .and_then(|secs| DateTime::from_timestamp(secs, 0));
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .or_else(|| envelope::decode_task(&delivery.data).ok().map(|t| t.id));
    let kind = properties.kind().as_ref().map_or_else(
        || delivery.routing_key.as_str().to_owned(),
        |k| k.as_str().to_owned(),
    );
    DeadLetter {
        id,
        kind,
        reason,
        attempts: get(HEADER_ATTEMPT)
            .and_then(integer)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        when,
    }
}

/// Which dead messages a command acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// Every message in the queue now.
    All,
    /// Those whose task id is this.
    Id(String),
}

impl Select {
    fn matches(&self, letter: &DeadLetter) -> bool {
        match self {
            Self::All => true,
            Self::Id(id) => letter.id.as_deref() == Some(id.as_str()),
        }
    }
}

/// How many kept letters wait before their copies are published back in one go.
const PUT_BACK_BURST: usize = 256;

/// Takes each message in `fleet.dead` (as many as it holds now) unacked and hands it to `act`,
/// which acks it (the letter leaves) or hands it back to keep it; returns when all were seen.
///
/// A message `act` keeps is put back without being returned: a copy is published to
/// `fleet.dead` and, once the broker confirmed it, the original is acked. Returning it instead
/// (a requeue, or the channel closing on it) would count as a delivery on a quorum queue: its
/// `x-delivery-count` would grow with every read and, where the broker sets a delivery limit
/// (RabbitMQ 4.x sets one of 20 by default), a dead letter would be dropped after enough reads.
/// Kept letters keep their order among themselves; a process killed between a copy's confirm and
/// its original's ack leaves that letter twice (never none).
async fn each<F, Fut>(settings: &Settings, mut act: F) -> anyhow::Result<()>
where
    F: FnMut(BasicGetMessage, Publisher) -> Fut,
    Fut: Future<Output = anyhow::Result<Option<Delivery>>>,
{
    let (connection, publisher) = connect_publisher(settings, "fleet-producer-dlq").await?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    let queue = channel
        .queue_declare(
            topology::DEAD_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("looking up fleet.dead")?;
    let mut outcome = Ok(());
    let mut kept = Vec::new();
    for _ in 0..queue.message_count() {
        let got = channel
            .basic_get(topology::DEAD_QUEUE.into(), BasicGetOptions::default())
            .await
            .context("reading fleet.dead");
        let message = match got {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(error) => {
                outcome = Err(error);
                break;
            }
        };
        match act(message, publisher.clone()).await {
            Ok(None) => {}
            Ok(Some(delivery)) => kept.push(delivery),
            Err(error) => {
                outcome = Err(error);
                break;
            }
        }
        if kept.len() >= PUT_BACK_BURST
            && let Err(error) = put_back(&publisher, std::mem::take(&mut kept)).await
        {
            outcome = Err(error);
            break;
        }
    }
    if outcome.is_ok() {
        outcome = put_back(&publisher, kept).await;
    }
    // Anything still unacked (only after a failure) returns to fleet.dead here.
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    outcome
}

/// Publishes a copy of each kept dead letter to `fleet.dead`, then acks the originals.
///
/// The copy carries fleet's own description of the letter (reason, attempts, when), so it reads
/// the same whether or not the broker keeps a client's `x-death` header.
async fn put_back(publisher: &Publisher, kept: Vec<Delivery>) -> anyhow::Result<()> {
    if kept.is_empty() {
        return Ok(());
    }
    let copies = kept.iter().map(kept_copy).collect();
    publisher
        .publish_all(copies)
        .await
        .map_err(|unconfirmed| unconfirmed.error)
        .context("putting dead letters back")?;
    for delivery in kept {
        delivery
            .ack(BasicAckOptions::default())
            .await
            .context("removing a dead letter that was put back")?;
    }
    Ok(())
}

/// The copy of a kept dead letter: the same body, routing key and properties (without the
/// `user_id`, which only its first publisher may set, and without the broker's delivery count),
/// with fleet's headers filled in from what [`describe`] reads.
fn kept_copy(delivery: &Delivery) -> Outgoing {
    let letter = describe(delivery);
    let mut headers = FieldTable::default();
    if let Some(old) = delivery.properties.headers() {
        for (key, value) in old.inner() {
            if key.as_str() != "x-delivery-count" {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    let has = |headers: &FieldTable, key: &str| headers.inner().contains_key(key);
    if !has(&headers, HEADER_ERROR) {
        headers.insert(HEADER_ERROR.into(), header_str(&letter.reason));
    }
    if !has(&headers, HEADER_ATTEMPT) {
        headers.insert(
            HEADER_ATTEMPT.into(),
            AMQPValue::LongLongInt(letter.attempts.into()),
        );
    }
    if !has(&headers, HEADER_DEAD_AT)
        && let Some(when) = letter.when
    {
        headers.insert(
            HEADER_DEAD_AT.into(),
            AMQPValue::Timestamp(u64::try_from(when.timestamp()).unwrap_or_default()),
        );
    }
    Outgoing {
        exchange: topology::DEAD_EXCHANGE.to_owned(),
        routing_key: delivery.routing_key.as_str().to_owned(),
        body: delivery.data.clone(),
        properties: without_user_id(&delivery.properties).with_headers(headers),
    }
}

/// Every message in `fleet.dead`, oldest first; none is removed.
///
/// Fails when the broker cannot be reached or refuses us.
pub async fn list(settings: &Settings) -> anyhow::Result<Vec<DeadLetter>> {
    let mut letters = Vec::new();
    each(settings, |message, _| {
        letters.push(describe(&message.delivery));
        async { Ok(Some(message.delivery)) }
    })
    .await?;
    Ok(letters)
}

/// What `replay` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Tasks published back to `fleet.tasks` (and removed from `fleet.dead`).
    pub replayed: u64,
    /// Selected dead messages left where they are because they are no task ([`replayable`]).
    pub kept: u64,
}

/// Whether a dead message may go back to the task path: only a task does, by its shape (the
/// body decodes as a v1 task) and by where it came from (routed by its own kind, as every task
/// published to `fleet.tasks` is, and not set aside from the result path). Anything else, a
/// result or a manifest above all, stays in `fleet.dead`: replay never publishes to the result
/// path, so no role can launder a forged result or manifest through an admin's replay.
///
/// Fails with the reason it is no task.
pub fn replayable(delivery: &Delivery) -> Result<(), String> {
    let task = envelope::decode_task(&delivery.data).map_err(|e| format!("not a task: {e}"))?;
    let routing_key = delivery.routing_key.as_str();
    if routing_key == topology::RESULTS_QUEUE {
        return Err("set aside from the result path".to_owned());
    }
    if routing_key != task.kind {
        return Err(format!(
            "routed as `{routing_key}`, not as its kind `{}`",
            task.kind
        ));
    }
    Ok(())
}

/// Publishes the selected dead tasks back to `fleet.tasks` with their routing key, attempts
/// reset to 0 and the dead-letter headers removed; each dead copy is acked only after the broker
/// confirmed its replay, so a failure midway loses nothing (it may replay a task twice).
/// Selected messages that are no task ([`replayable`]) are kept, and counted.
///
/// Fails when the broker cannot be reached or a replay is not confirmed.
pub async fn replay(settings: &Settings, select: &Select) -> anyhow::Result<Replayed> {
    let mut done = Replayed::default();
    each(settings, |message, publisher| {
        let chosen = select.matches(&describe(&message.delivery));
        let task = chosen && {
            let replayable = replayable(&message.delivery);
            if let Err(why) = &replayable {
                tracing::warn!(id = ?message.delivery.properties.message_id(), why = %printable(why), "kept in fleet.dead");
            }
            replayable.is_ok()
        };
        if task {
            done.replayed += 1;
        } else if chosen {
            done.kept += 1;
        }
        async move {
            if !task {
                return Ok(Some(message.delivery));
            }
            let delivery = &message.delivery;
            let routing_key = delivery.routing_key.as_str();
            let exchange = topology::TASKS_EXCHANGE;
            let mut headers = task_headers(0);
            if let Some(old) = delivery.properties.headers() {
                for (key, value) in old.inner() {
                    let key = key.as_str();
                    let dropped = key.starts_with("x-death")
                        || key.starts_with("x-first-death")
                        || key.starts_with("x-last-death")
                        || key == "x-delivery-count"
                        || key == HEADER_ERROR
                        || key == HEADER_DEAD_AT
                        || key == HEADER_ATTEMPT
                        || key == envelope::HEADER_ROUTING_KEY
                        || key == envelope::HEADER_DELAY;
                    if !dropped {
                        headers.insert(key.into(), value.clone());
                    }
                }
            }
            publisher
                .publish(Outgoing {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    body: delivery.data.clone(),
                    // Our publisher vouches with our own user_id; the consumer's would be refused.
                    properties: without_user_id(&delivery.properties).with_headers(headers),
                })
                .await
                .context("replaying a dead message")?;
            delivery
                .ack(BasicAckOptions::default())
                .await
                .context("removing the replayed dead copy")?;
            Ok(None)
        }
    })
    .await?;
    Ok(done)
}

/// Removes the selected dead messages for good; returns how many.
///
/// Fails when the broker cannot be reached.
pub async fn purge(settings: &Settings, select: &Select) -> anyhow::Result<u64> {
    let mut purged = 0;
    each(settings, |message, _| {
        let chosen = select.matches(&describe(&message.delivery));
        if chosen {
            purged += 1;
        }
        async move {
            if !chosen {
                return Ok(Some(message.delivery));
            }
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .context("removing a dead message")?;
            Ok(None)
        }
    })
    .await?;
    Ok(purged)
}

/// `dlq list` as text: one line per message, columns aligned.
pub fn table(letters: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:<36}  {:<12}  {:>8}  {:<20}  {}\n",
        "ID", "KIND", "ATTEMPTS", "WHEN", "REASON"
    );
    for l in letters {
        // Everything here came from whoever published the dead message.
        out.push_str(&format!(
            "{:<36}  {:<12}  {:>8}  {:<20}  {}\n",
            printable(l.id.as_deref().unwrap_or("-")),
            printable(&l.kind),
            l.attempts,
            l.when.map_or_else(
                || "-".to_owned(),
                |w| w.format("%Y-%m-%d %H:%M:%S").to_string()
            ),
            printable(&l.reason)
        ));
    }
    out
}
