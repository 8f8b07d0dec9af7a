//! One delivery from start to ack: check, decode, run the handler in its slot, publish the
//! result (or the retry, or the dead letter) with a confirm, and only then ack.

use crate::disposition::{self, Disposition, Outcome};
use crate::registry::{HandlerError, Registry, TaskContext, Work};
use chrono::Utc;
use fleet_shared::envelope::{self, ErrorInfo, Status, TaskResult};
use fleet_shared::publisher::{Outgoing, PublishError, Publisher, header_str};
use fleet_shared::settings::Settings;
use fleet_shared::topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

/// Runs deliveries. Shared by every in-flight delivery of one consumer process.
pub struct Worker {
    registry: Registry,
    publisher: Publisher,
    pool: rayon::ThreadPool,
    compute_slots: Semaphore,
    io_slots: Semaphore,
    settings: Arc<Settings>,
    identity: String,
    shutdown: CancellationToken,
}

/// Why a delivery could not be settled; it stays unacked and the broker redelivers it.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// A result, retry or dead-letter publish was not confirmed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The ack itself failed (the channel is gone).
    #[error("ack failed")]
    Ack(#[source] lapin::Error),
}

impl Worker {
    /// A worker with `settings.consumer.workers` compute threads.
    ///
    /// Fails if the thread pool cannot be started.
    pub fn new(
        settings: Arc<Settings>,
        registry: Registry,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> Result<Self, rayon::ThreadPoolBuildError> {
        let workers = settings.consumer.workers;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .thread_name(|i| format!("fleet-worker-{i}"))
            .build()?;
        Ok(Self {
            registry,
            publisher,
            pool,
            compute_slots: Semaphore::new(workers),
            io_slots: Semaphore::new(settings.consumer.io_concurrency),
            identity: format!(
                "{}/{}",
                gethostname::gethostname().to_string_lossy(),
                std::process::id()
            ),
            settings,
            shutdown,
        })
    }

    /// Handles one delivery to the end. Never panics and never returns an error: a delivery it
    /// cannot settle is nacked back to the queue (or left for the broker to redeliver).
    pub async fn handle(self: Arc<Self>, delivery: Delivery) {
        if let Err(error) = self.process(&delivery).await {
            tracing::warn!(
                message_id = ?delivery.properties.message_id(),
                error = %anyhow::Error::from(error),
                "could not settle the task; returning it to the queue"
            );
            // If the channel is gone this fails too, and the broker redelivers anyway.
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }

    async fn process(&self, delivery: &Delivery) -> Result<(), SettleError> {
        let max = self.settings.consumer.max_message_bytes;
        if delivery.data.len() > max {
            let reason = format!(
                "too large: {} bytes, the limit is {max}",
                delivery.data.len()
            );
            return self.dead_letter(delivery, &reason).await;
        }
        let task = match envelope::decode_task(&delivery.data) {
            Ok(task) => task,
            Err(error) => return self.dead_letter(delivery, &error.to_string()).await,
        };
        let Some(handler) = self.registry.get(&task.kind) else {
            let reason = format!("unknown kind `{}`", task.kind);
            return self.dead_letter(delivery, &reason).await;
        };
        let attempt = attempt_of(delivery);
        let ctx = TaskContext {
            id: Arc::from(task.id.as_str()),
            attempt,
            deadline: task.deadline,
        };

        let permit = {
            let slots = match handler.work {
                Work::Compute => &self.compute_slots,
                Work::Io => &self.io_slots,
            };
            tokio::select! {
                biased;
                permit = slots.acquire() => permit.expect("slot semaphores are never closed"),
                () = self.shutdown.cancelled() => {
                    // Draining: a task that has not started goes back to the queue untouched.
                    delivery
                        .nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })
                        .await
                        .map_err(SettleError::Ack)?;
                    return Ok(());
                }
            }
        };
        let started_at = Utc::now();
        let (output, slot) = if task.deadline.is_some_and(|d| d < started_at) {
            (
                Err(HandlerError::permanent(
                    "expired",
                    "the task's deadline passed before it ran",
                )),
                "-".to_owned(),
            )
        } else {
            let future = (handler.call)(task.payload.clone(), ctx);
            match handler.work {
                Work::Compute => self.run_compute(future).await,
                Work::Io => (run_io(future).await, "io".to_owned()),
            }
        };
        drop(permit);
        let finished_at = Utc::now();
        tracing::debug!(task_id = %task.id, kind = %task.kind, attempt, ok = output.is_ok(), "task ran");

        let outcome = match &output {
            Ok(_) => Outcome::Ok,
            Err(error) => Outcome::Failed(error.clone()),
        };
        let result = |status, output, error| TaskResult {
            v: envelope::VERSION,
            task_id: task.id.clone(),
            batch: task.batch.clone(),
            kind: task.kind.clone(),
            status,
            output,
            error,
            attempts: attempt + 1,
            worker: format!("{}/{slot}", self.identity),
            started_at,
            finished_at,
        };
        let consumer = &self.settings.consumer;
        match disposition::decide(
            &outcome,
            attempt,
            consumer.max_attempts,
            &self.settings.topology.retry_delays_ms,
        ) {
            Disposition::Complete => {
                let output = output.ok();
                self.publisher
                    .publish(Outgoing::result(&result(Status::Ok, output, None)))
                    .await?;
                ack(delivery).await
            }
            Disposition::Retry { delay_ms } => {
                tracing::debug!(task_id = %task.id, attempt, delay_ms, "retrying");
                let retry = Outgoing::forward(
                    topology::RETRY_EXCHANGE,
                    delivery.routing_key.as_str(),
                    delivery.data.clone(),
                    &delivery.properties,
                    vec![
                        (
                            envelope::HEADER_ATTEMPT,
                            AMQPValue::LongLongInt((attempt + 1).into()),
                        ),
                        (
                            envelope::HEADER_DELAY,
                            header_str(&topology::delay_key(delay_ms)),
                        ),
                    ],
                );
                self.publisher.publish(retry).await?;
                ack(delivery).await
            }
            Disposition::Fail => {
                let error = output.err().map(|e| ErrorInfo {
                    kind: e.kind,
                    message: e.message,
                });
                let reason = error
                    .as_ref()
                    .map_or_else(String::new, |e| format!("{}: {}", e.kind, e.message));
                tracing::warn!(task_id = %task.id, kind = %task.kind, attempts = attempt + 1, %reason, "task failed");
                self.publisher
                    .publish(Outgoing::result(&result(Status::Failed, None, error)))
                    .await?;
                self.dead_letter(delivery, &reason).await
            }
        }
    }

    /// Runs a compute handler on the blocking pool; a panic becomes a permanent failure.
    async fn run_compute(
        &self,
        future: futures_util::future::BoxFuture<'static, Result<Value, HandlerError>>,
    ) -> (Result<Value, HandlerError>, String) {
        let (tx, rx) = oneshot::channel();
        self.pool.spawn(move || {
            let slot =
                rayon::current_thread_index().map_or_else(|| "?".to_owned(), |i| i.to_string());
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| futures_executor::block_on(future)))
                    .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
            // The receiver is gone only if the runtime is shutting down; nobody wants the result.
            let _ = tx.send((outcome, slot));
        });
        rx.await.unwrap_or_else(|_| {
            (
                Err(HandlerError::retryable(
                    "lost",
                    "the worker thread went away",
                )),
                "?".to_owned(),
            )
        })
    }

    /// Publishes a copy of the delivery to `fleet.dead` with the reason, then acks the original.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), SettleError> {
        tracing::warn!(message_id = ?delivery.properties.message_id(), %reason, "dead-lettering");
        let copy = Outgoing::forward(
            topology::DEAD_EXCHANGE,
            delivery.routing_key.as_str(),
            delivery.data.clone(),
            &delivery.properties,
            vec![
                (envelope::HEADER_ERROR, header_str(reason)),
                (
                    envelope::HEADER_ROUTING_KEY,
                    header_str(delivery.routing_key.as_str()),
                ),
                (
                    envelope::HEADER_ATTEMPT,
                    AMQPValue::LongLongInt(attempt_of(delivery).into()),
                ),
            ],
        );
        self.publisher.publish(copy).await?;
        ack(delivery).await
    }
}

async fn run_io(
    future: futures_util::future::BoxFuture<'static, Result<Value, HandlerError>>,
) -> Result<Value, HandlerError> {
    // Its own task, so a panic is caught by tokio and does not take the delivery down with it.
    match tokio::spawn(future).await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => Err(panicked(error.into_panic().as_ref())),
        Err(_) => Err(HandlerError::retryable(
            "cancelled",
            "the handler task was cancelled",
        )),
    }
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    HandlerError::permanent("panic", format!("handler panicked: {message}"))
}

async fn ack(delivery: &Delivery) -> Result<(), SettleError> {
    delivery
        .ack(BasicAckOptions::default())
        .await
        .map(drop)
        .map_err(SettleError::Ack)
}

/// The `x-fleet-attempt` header: attempts before this delivery (0 when absent).
pub fn attempt_of(delivery: &Delivery) -> u32 {
    let value = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(envelope::HEADER_ATTEMPT).cloned());
    let n: i64 = match value {
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => n.into(),
        Some(AMQPValue::ShortInt(n)) => n.into(),
        Some(AMQPValue::ShortShortInt(n)) => n.into(),
        Some(AMQPValue::LongUInt(n)) => n.into(),
        Some(AMQPValue::ShortUInt(n)) => n.into(),
        Some(AMQPValue::ShortShortUInt(n)) => n.into(),
        _ => 0,
    };
    u32::try_from(n).unwrap_or(0)
}
