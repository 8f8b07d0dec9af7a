//! fleet-consumer: the worker process. It takes tasks from `fleet.tasks.default`, runs each in a
//! slot (compute-bound handlers on a pool of exactly `workers` threads, I/O-bound ones as async
//! tasks), publishes the result with a broker confirm and only then acks.
//!
//! - [`registry`]: kind -> handler, built once and passed into [`run`].
//! - [`handlers`]: the built-in handlers, one file each.
//! - [`worker`]: one delivery from decode to ack.
//! - [`disposition`]: outcome -> complete, retry or fail (the delivery-semantics table).
//! - [`pool`]: the compute pool, exactly `workers` threads that sleep when idle.
//! - [`metrics`]: what `/metrics` on `consumer.listen` shows (with `/healthz` and `/readyz`).

pub mod disposition;
pub mod handlers;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod worker;

use anyhow::Context as _;
use fleet_shared::observe::{Health, Observer};
use fleet_shared::settings::Settings;
use fleet_shared::telemetry::redact;
use fleet_shared::{amqp, status, topology};
use futures_util::StreamExt;
use metrics::Metrics;
use registry::Registry;
use std::future::IntoFuture as _;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use worker::Worker;

/// Runs a consumer until `shutdown` is cancelled, then drains: no new deliveries, in-flight tasks
/// finish within `consumer.grace_period_secs`, unstarted ones return to the queue.
///
/// A lost connection, a closed channel or the broker cancelling our consumer ends only the
/// session: the consumer connects again with backoff, declares topology and subscribes again.
/// Tasks that were in flight on the lost connection are dropped here and redelivered by the
/// broker (to us or another consumer), so a reconnect can give duplicates but never loses a task.
///
/// Fails when the broker refuses us, when it stays unreachable for
/// `amqp.reconnect_timeout_secs`, or when the worker pool cannot start.
pub async fn run(
    settings: Settings,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let kinds: Vec<String> = registry.kinds().into_iter().map(str::to_owned).collect();
    let mut observer = Observer::new(Health::default());
    let metrics = Metrics::register(
        observer.registry(),
        settings.consumer.workers,
        settings.consumer.io_concurrency,
        &registry.kinds(),
    );
    let (common, health) = (observer.common.clone(), Arc::clone(&observer.health));
    let listener = tokio::net::TcpListener::bind(&settings.consumer.listen)
        .await
        .with_context(|| format!("listening on {}", settings.consumer.listen))?;
    let listen = listener.local_addr()?;
    let http_shutdown = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, observer.router())
            .with_graceful_shutdown(http_shutdown.clone().cancelled_owned())
            .into_future(),
    );
    let worker = Arc::new(
        Worker::new(Arc::clone(&settings), registry, metrics, shutdown.clone())
            .context("starting the worker pool")?,
    );
    // Every delivery ever started, for the final drain.
    let in_flight = TaskTracker::new();
    let mut sessions = 0u64;
    let outcome = loop {
        // Slow start: one delivery at a time until one has settled (see `widen`).
        let subscription = amqp::subscribe(
            &settings,
            "fleet-consumer",
            topology::WORK_QUEUE,
            1,
            &common,
            &shutdown,
        )
        .await;
        let mut subscription = match subscription {
            Ok(Some(subscription)) => subscription,
            Ok(None) => break Ok(None),
            Err(error) => break Err(error),
        };
        if sessions == 0 {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                broker = %redact(&settings.amqp.url),
                queue = topology::WORK_QUEUE,
                workers = settings.consumer.workers,
                io_concurrency = settings.consumer.io_concurrency,
                prefetch = settings.prefetch(),
                kinds = ?kinds,
                %listen,
                "fleet-consumer started"
            );
        } else {
            common.reconnects.inc();
            tracing::info!(reconnects = sessions, "fleet-consumer consuming again");
        }
        sessions += 1;
        health.subscribed();
        let lost = CancellationToken::new();
        // Status beats for `fleet-producer status`, until this session ends.
        let beats = CancellationToken::new();
        let _beats = beats.clone().drop_guard();
        let tracker = in_flight.clone();
        let prefetch = settings.prefetch();
        // A delivery counts from its arrival until its handling ends, a moment after its ack;
        // the broker never lets more than the prefetch be unacked.
        status::spawn_beats(
            subscription.channel.clone(),
            "consumer",
            topology::WORK_QUEUE,
            prefetch,
            move || (tracker.len() as u64).min(u64::from(prefetch)),
            beats,
        );
        let widen_at = (settings.prefetch() > 1).then(|| worker.settled() + 1);
        match consume(
            &mut subscription,
            &worker,
            &in_flight,
            &lost,
            &shutdown,
            widen_at,
            settings.prefetch(),
        )
        .await
        {
            None => break Ok(Some(subscription)),
            Some(error) => {
                tracing::warn!(
                    error = %format!("{error:#}"),
                    in_flight = in_flight.len(),
                    "lost the broker; reconnecting (unacked tasks are redelivered)"
                );
                health.lost();
                // Nothing started on the old connection can be settled any more: stop waiting
                // for it (I/O handlers are dropped, compute ones finish and free their slot).
                lost.cancel();
                tokio::spawn(subscription.close());
            }
        }
    };

    let subscription = match outcome {
        Ok(subscription) => subscription,
        Err(error) => {
            http_shutdown.cancel();
            return Err(error);
        }
    };
    health.consuming(false);
    tracing::info!(in_flight = in_flight.len(), "draining");
    // Stop new deliveries; those already prefetched are either run or returned by the worker.
    if let Some(subscription) = &subscription {
        subscription.cancel().await;
    }
    in_flight.close();
    if tokio::time::timeout(settings.consumer_grace(), in_flight.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = in_flight.len(),
            "grace period over; unfinished tasks go back to the queue when the channel closes"
        );
    }
    if let Some(subscription) = subscription {
        subscription.close().await;
    }
    http_shutdown.cancel();
    let _ = server.await;
    tracing::info!("fleet-consumer stopped");
    Ok(())
}

/// Hands one delivery to the worker as a task of its own, dropped if the session is `lost`.
fn start(
    worker: &Arc<Worker>,
    delivery: lapin::message::Delivery,
    publisher: &fleet_shared::publisher::Publisher,
    in_flight: &TaskTracker,
    lost: &CancellationToken,
) {
    let handled = Arc::clone(worker).handle(delivery, publisher.clone());
    let lost = lost.clone();
    in_flight.spawn(async move { lost.run_until_cancelled(handled).await });
}

/// Ends the slow start: a second consumer with the full prefetch replaces the first, whose
/// deliveries already received are still handled (and acked on the same channel).
async fn widen(
    subscription: &mut amqp::Subscription,
    worker: &Arc<Worker>,
    in_flight: &TaskTracker,
    lost: &CancellationToken,
    prefetch: u16,
) -> anyhow::Result<()> {
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let channel = subscription.channel.clone();
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("raising the prefetch")?;
    let wide = channel
        .basic_consume(
            topology::WORK_QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .context("consuming at the full prefetch")?;
    let mut narrow = std::mem::replace(&mut subscription.deliveries, wide);
    channel
        .basic_cancel(narrow.tag(), lapin::options::BasicCancelOptions::default())
        .await
        .context("ending the slow start")?;
    // After the cancel the narrow stream ends; anything it still holds was delivered to us.
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(std::time::Duration::from_millis(100), narrow.next()).await
    {
        start(worker, delivery, &subscription.publisher, in_flight, lost);
    }
    tracing::debug!(prefetch, "slow start over");
    Ok(())
}

/// Hands deliveries to the worker until shutdown (`None`) or until the session is lost (why).
/// Each delivery's handling stops where it is when `lost` is cancelled.
///
/// Each session starts at prefetch 1 and widens to the full prefetch once the worker has settled
/// `widen_at` deliveries in all. A task that kills the process (a poison message) is then
/// redelivered alone after a restart, so only its own delivery count climbs to the limit,
/// not those of the innocent tasks that happened to be prefetched beside it.
async fn consume(
    subscription: &mut amqp::Subscription,
    worker: &Arc<Worker>,
    in_flight: &TaskTracker,
    lost: &CancellationToken,
    shutdown: &CancellationToken,
    mut widen_at: Option<u64>,
    prefetch: u16,
) -> Option<anyhow::Error> {
    let mut health = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        if widen_at.is_some_and(|n| worker.settled() >= n) {
            widen_at = None;
            // Three quick calls; a cut at this moment could leave them waiting forever.
            let widening = widen(subscription, worker, in_flight, lost, prefetch);
            match tokio::time::timeout(std::time::Duration::from_secs(10), widening).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Some(error),
                Err(_) => return Some(anyhow::anyhow!("timed out ending the slow start")),
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            next = subscription.deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    start(worker, delivery, &subscription.publisher, in_flight, lost);
                }
                Some(Err(error)) => return Some(anyhow::Error::new(error).context("the delivery stream failed")),
                None => return Some(anyhow::anyhow!("the broker cancelled our consumer on {}", topology::WORK_QUEUE)),
            },
            _ = health.tick() => {
                // Results go out on a second channel; if the broker closed it, nothing can settle.
                // (The tick also lets the slow start above notice a settled delivery.)
                if let Some(why) = subscription.lost() {
                    return Some(why);
                }
            }
        }
    }
}
