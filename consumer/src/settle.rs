//! Settling a delivery: everything the consumer publishes for a task (its result, alone or in a
//! group, its retry, its dead letter, the copy that hands it back) and the requeue, each waiting
//! for the broker's confirm before the caller acks.
//!
//! Results on their way to `fleet.results`: each handling waits until its own result is
//! confirmed before its delivery is acked; with `consumer.results_per_message` above 1, results
//! that are ready at the same moment share one message.
//!
//! Grouped, one task per session publishes: it takes the first result waiting and every other
//! one already waiting (up to the limit), sends them as one message, and when the broker
//! confirms it, tells each handling. A result that is alone goes as the plain v1 result message.
//! While a confirm is outstanding the next results gather, so under load a group holds about
//! what arrives in one confirm's time, and an idle consumer sends a result at once: no timer,
//! no added wait. Per task this saves the broker a message (enqueue, Raft log entry, delivery,
//! ack) and the collector a delivery; the at-least-once guarantee is unchanged, because no
//! delivery is acked before the message holding its result is confirmed.

use crate::acks::Acks;
use crate::metrics::Metrics;
use chrono::Utc;
use fleet_shared::envelope::{self, DeadReason, EncodedResult, TaskResult};
use fleet_shared::publisher::{Outgoing, PublishError, Publisher, header_str};
use fleet_shared::telemetry::printable;
use fleet_shared::topology;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::AMQPValue;
use tokio::sync::{mpsc, oneshot};

/// Where a delivery is settled: the confirmed publisher on its connection and the acker of the
/// channel it came on.
pub struct Settle {
    /// Retries and dead letters.
    pub publisher: Publisher,
    /// Results, alone or grouped.
    pub results: Results,
    /// Acks, batched.
    pub acks: Acks,
}

/// Why a delivery could not be settled; it is returned to the queue (or, with the channel gone,
/// redelivered by the broker).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// A result, retry or dead-letter publish was not confirmed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The session's result publisher ended before confirming (its session is over).
    #[error("the result publisher of this session stopped")]
    ResultsStopped,
}

/// Publishes a copy of the delivery to `fleet.dead` with the reason, the attempts made in all and
/// the time, and waits for its confirm; the caller then acks the original.
pub async fn dead_letter(
    publisher: &Publisher,
    delivery: &Delivery,
    reason: &DeadReason,
    attempts: u32,
    who: Option<&str>,
) -> Result<(), SettleError> {
    tracing::warn!(message_id = ?delivery.properties.message_id(), reason = %printable(&reason.to_string()), "dead-lettering");
    let headers = vec![
        (envelope::HEADER_ERROR, header_str(&reason.header())),
        (
            envelope::HEADER_ROUTING_KEY,
            header_str(delivery.routing_key.as_str()),
        ),
        (
            envelope::HEADER_ATTEMPT,
            AMQPValue::LongLongInt(attempts.into()),
        ),
        (
            envelope::HEADER_DEAD_AT,
            AMQPValue::Timestamp(u64::try_from(Utc::now().timestamp()).unwrap_or_default()),
        ),
    ];
    copy_to(publisher, topology::DEAD_EXCHANGE, delivery, headers, who).await?;
    Ok(())
}

/// Sends the delivery to the delay queue of `delay_ms` through `fleet.retry`, as attempt
/// `attempt` (0-based), and waits for its confirm; the caller then acks the original.
pub async fn retry(
    publisher: &Publisher,
    delivery: &Delivery,
    attempt: u32,
    delay_ms: u64,
    who: Option<&str>,
) -> Result<(), PublishError> {
    let headers = vec![
        (
            envelope::HEADER_ATTEMPT,
            AMQPValue::LongLongInt(attempt.into()),
        ),
        (
            envelope::HEADER_DELAY,
            header_str(&topology::delay_key(delay_ms)),
        ),
    ];
    copy_to(publisher, topology::RETRY_EXCHANGE, delivery, headers, who).await
}

/// Sends a copy of an unstarted delivery back to the work queue through `fleet.retry`
/// undelayed ([`topology::NO_DELAY`]), and waits for its confirm; the caller then acks the
/// original, which spends none of its delivery budget (docs/DELIVERY.md, "Draining").
pub async fn hand_back(
    publisher: &Publisher,
    delivery: &Delivery,
    who: Option<&str>,
) -> Result<(), PublishError> {
    let headers = vec![(envelope::HEADER_DELAY, header_str(topology::NO_DELAY))];
    copy_to(publisher, topology::RETRY_EXCHANGE, delivery, headers, who).await
}

/// Publishes a copy of the delivery to `exchange` with its routing key, `headers` added and who
/// published it (`x-fleet-published-by`), and waits for its confirm.
async fn copy_to(
    publisher: &Publisher,
    exchange: &str,
    delivery: &Delivery,
    mut headers: Vec<(&str, AMQPValue)>,
    who: Option<&str>,
) -> Result<(), PublishError> {
    if let Some(who) = who {
        headers.push((envelope::HEADER_PUBLISHED_BY, header_str(who)));
    }
    let copy = Outgoing::forward(
        exchange,
        delivery.routing_key.as_str(),
        delivery.data.clone(),
        &delivery.properties,
        headers,
    );
    publisher.publish(copy).await
}

/// Returns a delivery to its queue.
pub async fn requeue(delivery: &Delivery) -> lapin::Result<()> {
    delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
        .map(drop)
}

/// Where a session's handlings send their results. Cheap to clone.
#[derive(Clone)]
pub struct Results {
    /// With grouping: the session's publishing task.
    groups: Option<mpsc::UnboundedSender<Waiting>>,
    /// Without: each result is published here on its own.
    publisher: Publisher,
    metrics: Metrics,
}

/// A result waiting to be published, and who waits for its confirm.
pub struct Waiting {
    result: TaskResult,
    /// `result`, encoded for a group.
    encoded: EncodedResult,
    confirmed: oneshot::Sender<Result<(), PublishError>>,
}

impl Results {
    /// Results through `publisher`, up to `per_message` in one message. With more than one, a
    /// publishing task runs until every clone of the returned value is dropped.
    pub fn start(publisher: Publisher, per_message: usize, metrics: Metrics) -> Self {
        let groups = (per_message > 1).then(|| {
            let (waiting, rx) = mpsc::unbounded_channel();
            tokio::spawn(publish_groups(
                publisher.clone(),
                rx,
                per_message,
                metrics.clone(),
            ));
            waiting
        });
        Self {
            groups,
            publisher,
            metrics,
        }
    }

    /// Publishes `result` and returns when the broker has confirmed the message holding it.
    pub async fn publish(&self, result: TaskResult) -> Result<(), SettleError> {
        let Some(groups) = &self.groups else {
            self.metrics.result_message();
            return Ok(self.publisher.publish(Outgoing::result(&result)).await?);
        };
        let (confirmed, outcome) = oneshot::channel();
        let encoded = envelope::encode_result(&result);
        groups
            .send(Waiting {
                result,
                encoded,
                confirmed,
            })
            .map_err(|_| SettleError::ResultsStopped)?;
        Ok(outcome.await.map_err(|_| SettleError::ResultsStopped)??)
    }
}

/// Largest body of one group message: results past it go into the next message, so results
/// with large outputs (`exec` keeps up to `consumer.exec.max_output_bytes` of each stream) never
/// make a message the broker would refuse. A result larger than this goes alone.
pub const MAX_GROUP_BYTES: usize = 1 << 20;

async fn publish_groups(
    publisher: Publisher,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    per_message: usize,
    metrics: Metrics,
) {
    let mut ready = Vec::with_capacity(per_message);
    while waiting.recv_many(&mut ready, per_message).await > 0 {
        let mut group: Vec<Waiting> = Vec::new();
        let mut bytes = 0;
        for next in ready.drain(..) {
            let size = next.encoded.get().len();
            if !group.is_empty() && bytes + size > MAX_GROUP_BYTES {
                publish(&publisher, &metrics, std::mem::take(&mut group)).await;
                bytes = 0;
            }
            bytes += size;
            group.push(next);
        }
        publish(&publisher, &metrics, group).await;
    }
}

/// Sends `group` as one message and tells each of its handlings how that went.
async fn publish(publisher: &Publisher, metrics: &Metrics, group: Vec<Waiting>) {
    metrics.result_message();
    let message = match group.as_slice() {
        [alone] => Outgoing::encoded_result(&alone.result, alone.encoded.get().into()),
        _ => Outgoing::results(&group.iter().map(|w| &*w.encoded).collect::<Vec<_>>()),
    };
    let outcome = publisher.publish(message).await;
    for handling in group {
        // A handling that is gone (its session was lost) no longer needs to know.
        let _ = handling.confirmed.send(outcome.clone());
    }
}
