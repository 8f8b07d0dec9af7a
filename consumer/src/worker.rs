//! One delivery from start to ack: check, decode, run the handler in its slot, publish the
//! result (or the retry, or the dead letter) with a confirm, and only then ack.

use crate::disposition::{self, Disposition, Outcome};
use crate::metrics::{Busy, Metrics, TaskOutcome, UNKNOWN as UNKNOWN_KIND};
use crate::pool::ComputePool;
use crate::registry::{HandlerError, Registry, TaskContext, Work};
use crate::settle::{self, Settle, SettleError};
use chrono::Utc;
use fleet_shared::envelope::{self, DeadReason, ErrorInfo, Status, TaskResult};
use fleet_shared::error::PermissionError;
use fleet_shared::settings::Settings;
use fleet_shared::telemetry::printable;
use fleet_shared::trace::TraceParent;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Runs deliveries. Shared by every in-flight delivery of one consumer process.
pub struct Worker {
    registry: Registry,
    pool: ComputePool,
    compute_slots: Arc<Semaphore>,
    io_slots: Arc<Semaphore>,
    settings: Arc<Settings>,
    identity: String,
    shutdown: CancellationToken,
    settled: AtomicU64,
    /// The broker user this consumer publishes as, to recognise its own retries.
    own_user: Option<String>,
    /// The first publish the broker refused this user: the consumer then stops and exits 3.
    refused: std::sync::Mutex<Option<PermissionError>>,
    metrics: Metrics,
}

/// A slot held by a running handler: its semaphore permit, and its place in
/// `fleet_worker_slots_busy`. Both are given back on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _busy: Busy,
}

/// How a delivery ended.
enum Settled {
    /// Its result, retry or dead letter is confirmed: ack it.
    Confirmed,
    /// Draining before it started: it is handed back ([`Worker::give_back`]).
    Unstarted,
}

impl Worker {
    /// A worker with `settings.consumer.workers` compute threads.
    ///
    /// Fails if the thread pool cannot be started.
    pub fn new(
        settings: Arc<Settings>,
        registry: Registry,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let workers = settings.consumer.workers;
        let own_user = settings.broker_user();
        let pool = ComputePool::new(workers)?;
        Ok(Self {
            registry,
            pool,
            compute_slots: Arc::new(Semaphore::new(workers)),
            io_slots: Arc::new(Semaphore::new(settings.consumer.io_concurrency)),
            identity: fleet_shared::status::process_id(),
            settings,
            shutdown,
            settled: AtomicU64::new(0),
            own_user,
            refused: std::sync::Mutex::default(),
            metrics,
        })
    }

    /// Handles one delivery to the end, settling it through `channel`: its outcome is published
    /// and confirmed, then the delivery tag goes to the channel's acker. Never panics and never
    /// returns an error: a delivery it cannot settle is nacked back to the queue (or left for
    /// the broker to redeliver).
    ///
    /// Everything it logs is inside a `task` span with the task id, kind and trace id: the
    /// trace of the delivery's `traceparent`, or a new one. The span is this hop of the trace
    /// (exported with `log.otlp_endpoint`), and the result names it as its parent.
    pub async fn handle(self: Arc<Self>, delivery: Delivery, channel: Arc<Settle>) {
        let span = tracing::info_span!(
            "task",
            task_id = %delivery.properties.message_id().as_ref().map_or("-", |id| id.as_str()),
            kind = %delivery.routing_key,
            trace_id = tracing::field::Empty,
        );
        let trace = TraceParent::continue_in(&span, TraceParent::of(&delivery.properties));
        span.record("trace_id", trace.trace_id());
        self.handle_in_span(delivery, channel, trace)
            .instrument(span)
            .await;
    }

    async fn handle_in_span(&self, delivery: Delivery, channel: Arc<Settle>, trace: TraceParent) {
        let _in_flight = self.metrics.handling();
        let tag = delivery.delivery_tag;
        // A panic anywhere in the handling settles this delivery alone: it is dead-lettered
        // with the panic's message, and the consumer goes on.
        let processed = match AssertUnwindSafe(self.process(&delivery, &channel, trace))
            .catch_unwind()
            .await
        {
            Ok(processed) => processed,
            Err(panic) => {
                let reason = DeadReason::Panicked(panic_message(panic.as_ref()));
                tracing::error!(reason = %printable(&reason.to_string()), "dead-lettering the delivery");
                let who = published_by(&delivery, self.own_user.as_deref());
                self.metrics.ended(UNKNOWN_KIND, TaskOutcome::Rejected);
                self.metrics.dead_lettered(UNKNOWN_KIND);
                settle::dead_letter(
                    &channel.publisher,
                    &delivery,
                    &reason,
                    attempt_of(&delivery),
                    who.as_deref(),
                )
                .await
                .map(|()| Settled::Confirmed)
            }
        };
        match processed {
            Ok(Settled::Confirmed) => {
                channel.acks.ack(tag);
                self.settled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Settled::Unstarted) => self.give_back(&delivery, &channel).await,
            Err(error) => {
                if let SettleError::Publish(publish) = &error
                    && let Some(refusal) = publish.permission()
                {
                    self.refused
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert(refusal);
                }
                tracing::warn!(
                    message_id = ?delivery.properties.message_id(),
                    error = %anyhow::Error::from(error),
                    "could not settle the task; returning it to the queue"
                );
                // If the channel is gone this fails too, and the broker redelivers anyway.
                let _ = settle::requeue(&delivery).await;
                channel.acks.returned(tag);
            }
        }
    }

    async fn process(
        &self,
        delivery: &Delivery,
        channel: &Settle,
        trace: TraceParent,
    ) -> Result<Settled, SettleError> {
        let publisher = &channel.publisher;
        let who = published_by(delivery, self.own_user.as_deref());
        let who = who.as_deref();
        let max = self.settings.consumer.max_message_bytes;
        let reject = |reason: DeadReason| async move {
            self.metrics.received(UNKNOWN_KIND);
            settle::dead_letter(publisher, delivery, &reason, attempt_of(delivery), who).await?;
            self.metrics.ended(UNKNOWN_KIND, TaskOutcome::Rejected);
            self.metrics.dead_lettered(UNKNOWN_KIND);
            Ok(Settled::Confirmed)
        };
        if delivery.data.len() > max {
            let reason = DeadReason::TooLarge {
                bytes: delivery.data.len(),
                limit: max,
            };
            return reject(reason).await;
        }
        let task = match envelope::decode_task(&delivery.data) {
            Ok(task) => task,
            Err(error) => return reject(DeadReason::Invalid(error.to_string())).await,
        };
        let Some(handler) = self.registry.get(&task.kind) else {
            return reject(DeadReason::UnknownKind(task.kind.clone())).await;
        };
        let kind = task.kind.as_str();
        self.metrics.received(kind);
        let policy = self.settings.policy(&task.kind);
        let attempt = attempt_of(delivery);
        let ctx = TaskContext {
            id: Arc::from(task.id.as_str()),
            attempt,
            deadline: task.deadline,
            cancel: CancellationToken::new(),
        };

        let slots = match handler.work {
            Work::Compute => Some((&self.compute_slots, true)),
            Work::Io => Some((&self.io_slots, false)),
            Work::Inline => None,
        };
        let permit = match slots {
            Some((slots, compute)) => tokio::select! {
                biased;
                permit = Arc::clone(slots).acquire_owned() => Some(Slot {
                    _permit: permit.expect("slot semaphores are never closed"),
                    _busy: self.metrics.busy(compute),
                }),
                () = self.shutdown.cancelled() => return Ok(Settled::Unstarted),
            },
            None if self.shutdown.is_cancelled() => return Ok(Settled::Unstarted),
            None => None,
        };
        let started_at = Utc::now();
        let expired = task.deadline.is_some_and(|d| d < started_at);
        let (output, slot) = if expired {
            drop(permit);
            (
                Err(HandlerError::permanent(
                    "expired",
                    "the task's deadline passed before it ran",
                )),
                "-".to_owned(),
            )
        } else {
            let cancel = ctx.cancel.clone();
            let future = (handler.call)(task.payload.clone(), ctx);
            let running = match handler.work {
                Work::Compute => self.run_compute(future, permit),
                Work::Io => Box::pin(run_io(future, permit)),
                Work::Inline => Box::pin(run_inline(future)),
            };
            match tokio::time::timeout(policy.time_limit, running).await {
                Ok(done) => done,
                Err(_) => {
                    // An I/O handler was dropped with its future; a compute handler is told and
                    // keeps its slot until it returns. Either way the task is settled now.
                    cancel.cancel();
                    tracing::warn!(task_id = %task.id, kind = %task.kind, limit = ?policy.time_limit, "task ran past its time limit");
                    (
                        Err(HandlerError::retryable(
                            "timeout",
                            format!(
                                "ran past its time limit of {} ms",
                                policy.time_limit.as_millis()
                            ),
                        )),
                        "-".to_owned(),
                    )
                }
            }
        };
        let finished_at = Utc::now();
        if !expired {
            let ran = (finished_at - started_at).to_std().unwrap_or_default();
            self.metrics.ran(kind, ran.as_secs_f64());
        }
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
            attempts: attempt.saturating_add(1),
            worker: format!("{}/{slot}", self.identity),
            started_at,
            finished_at,
            published_by: who.map(str::to_owned),
            // The result carries the trace, with this hop's span as its parent.
            traceparent: Some(trace.to_string()),
        };
        match disposition::decide(
            &outcome,
            attempt,
            policy.max_attempts,
            policy.retry_delays_ms,
        ) {
            Disposition::Complete => {
                let output = output.ok();
                channel
                    .results
                    .publish(result(Status::Ok, output, None))
                    .await?;
                self.metrics.ended(kind, TaskOutcome::Ok);
                Ok(Settled::Confirmed)
            }
            Disposition::Retry { delay_ms } => {
                tracing::debug!(task_id = %task.id, attempt, delay_ms, "retrying");
                settle::retry(
                    publisher,
                    delivery,
                    attempt.saturating_add(1),
                    delay_ms,
                    who,
                )
                .await?;
                self.metrics.ended(kind, TaskOutcome::Retried);
                Ok(Settled::Confirmed)
            }
            Disposition::Fail => {
                let error = output.err().map(|e| ErrorInfo {
                    kind: e.kind,
                    message: e.message,
                });
                let reason = error
                    .as_ref()
                    .map_or(DeadReason::Unknown, |e| DeadReason::Failed {
                        kind: e.kind.clone(),
                        message: e.message.clone(),
                    });
                tracing::warn!(task_id = %task.id, kind = %task.kind, attempts = attempt.saturating_add(1), reason = %printable(&reason.to_string()), "task failed");
                // The dead letter first: if it is refused, nothing is stored and the task runs
                // again, so the stored outcome is the last run's (docs/DELIVERY.md, "A failure").
                settle::dead_letter(publisher, delivery, &reason, attempt.saturating_add(1), who)
                    .await?;
                channel
                    .results
                    .publish(result(Status::Failed, None, error))
                    .await?;
                self.metrics.ended(kind, TaskOutcome::Failed);
                self.metrics.dead_lettered(kind);
                Ok(Settled::Confirmed)
            }
        }
    }

    /// Gives back a delivery this consumer will not run (it is draining) without spending its
    /// delivery budget: a copy goes back to the work queue through `fleet.retry` undelayed
    /// ([`topology::NO_DELAY`]) and, once confirmed, the delivery is acked.
    ///
    /// A requeue would be simpler, but a quorum queue counts every message handed back to it
    /// toward its `x-delivery-limit`: a few clean restarts over a backlog would dead-letter
    /// tasks that never ran. The copy keeps the task's attempts and starts a fresh delivery
    /// count, so only real failures (a crash, a kill, a lost connection) count. If the copy is
    /// not confirmed, the delivery is requeued after all.
    pub async fn give_back(&self, delivery: &Delivery, channel: &Settle) {
        let tag = delivery.delivery_tag;
        let who = published_by(delivery, self.own_user.as_deref());
        match settle::hand_back(&channel.publisher, delivery, who.as_deref()).await {
            Ok(()) => {
                channel.acks.ack(tag);
                self.metrics.handed_back();
            }
            Err(error) => {
                tracing::warn!(message_id = ?delivery.properties.message_id(), %error, "could not hand back an unstarted task; returning it to the queue");
                if let Err(error) = settle::requeue(delivery).await {
                    tracing::debug!(%error, "could not return an unstarted task; the broker will");
                }
                channel.acks.returned(tag);
            }
        }
        self.settled.fetch_add(1, Ordering::Relaxed);
    }

    /// The consumer's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The publish the broker refused this consumer's user, if it did: waiting cannot help.
    pub fn refusal(&self) -> Option<PermissionError> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Deliveries settled (acked or returned) so far.
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }

    /// Runs a compute handler on the pool; a panic becomes a permanent failure. The slot
    /// (`permit`) is held by the pool thread, so it is freed only when the handler returns.
    fn run_compute(
        &self,
        future: BoxFuture<'static, Result<Value, HandlerError>>,
        permit: Option<Slot>,
    ) -> BoxFuture<'static, (Result<Value, HandlerError>, String)> {
        let (tx, rx) = oneshot::channel();
        // What the handler logs on the pool thread belongs to the task's span too.
        let span = tracing::Span::current();
        self.pool.spawn(move |index| {
            let _span = span.enter();
            let slot = index.to_string();
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| futures_executor::block_on(future)))
                    .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
            // The slot goes back with the outcome, so the runtime is woken once: freed here, it
            // would first wake a delivery waiting for a slot, then the send this handling. The
            // receiver is gone if the task timed out or the runtime is shutting down; the send
            // then hands the slot back and it is freed here, once the handler has returned.
            let _ = tx.send((outcome, slot, permit));
        });
        Box::pin(async move {
            match rx.await {
                // The slot is freed here, on the runtime's thread.
                Ok((outcome, slot, _permit)) => (outcome, slot),
                Err(_) => (
                    Err(HandlerError::retryable(
                        "lost",
                        "the worker thread went away",
                    )),
                    "?".to_owned(),
                ),
            }
        })
    }
}

/// Runs an inline handler in the delivery's own task; a panic becomes a permanent failure.
async fn run_inline(
    future: BoxFuture<'static, Result<Value, HandlerError>>,
) -> (Result<Value, HandlerError>, String) {
    let outcome = AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
    (outcome, "inline".to_owned())
}

/// Runs an I/O handler as its own task, so a panic is caught by tokio and does not take the
/// delivery down with it. Dropping the returned future (the time limit) aborts the handler.
async fn run_io(
    future: BoxFuture<'static, Result<Value, HandlerError>>,
    permit: Option<Slot>,
) -> (Result<Value, HandlerError>, String) {
    let mut task = AbortOnDrop(tokio::spawn(future));
    let outcome = match (&mut task.0).await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => Err(panicked(error.into_panic().as_ref())),
        Err(_) => Err(HandlerError::retryable(
            "cancelled",
            "the handler task was cancelled",
        )),
    };
    drop(permit);
    (outcome, "io".to_owned())
}

/// Aborts the spawned handler when the future waiting for it is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    HandlerError::permanent(
        "panic",
        format!("handler panicked: {}", panic_message(panic)),
    )
}

/// What a panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Who published the task, as far as the broker vouches for it: the AMQP `user_id` (the broker
/// refuses a `user_id` other than the publisher's login), or, when that is this consumer's own
/// user (a retry it republished), the `x-fleet-published-by` it recorded then. `None` when the
/// publisher set no `user_id`.
pub fn published_by(delivery: &Delivery, own_user: Option<&str>) -> Option<String> {
    let user = delivery.properties.user_id().as_ref()?.as_str();
    if Some(user) != own_user {
        return Some(user.to_owned());
    }
    match delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(envelope::HEADER_PUBLISHED_BY)?
    {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// The delivery's `x-fleet-attempt` ([`envelope::attempt`]).
pub fn attempt_of(delivery: &Delivery) -> u32 {
    envelope::attempt(delivery.properties.headers().as_ref())
}
