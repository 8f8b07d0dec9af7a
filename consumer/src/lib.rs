//! fleet-consumer: the worker process. It takes tasks from `fleet.tasks.default`, runs each in a
//! slot (compute-bound handlers on a pool of exactly `workers` threads, I/O-bound ones as async
//! tasks), publishes the result with a broker confirm and only then acks.
//!
//! - [`registry`]: kind -> handler, built once and passed into [`run`].
//! - [`handlers`]: the built-in handlers, one file each.
//! - [`worker`]: one delivery from decode to ack.
//! - [`disposition`]: outcome -> complete, retry or fail (the delivery-semantics table).

pub mod disposition;
pub mod handlers;
pub mod registry;
pub mod worker;

use anyhow::Context as _;
use fleet_shared::settings::Settings;
use fleet_shared::telemetry::redact;
use fleet_shared::{amqp, topology};
use futures_util::StreamExt;
use registry::Registry;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use worker::Worker;

/// Runs a consumer until `shutdown` is cancelled, then drains: no new deliveries, in-flight tasks
/// finish within `consumer.grace_period_secs`, unstarted ones return to the queue.
///
/// Fails when the broker cannot be reached or refuses us, when topology cannot be declared, or
/// when the delivery stream ends or errors (the supervisor should restart the process).
pub async fn run(
    settings: Settings,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let mut subscription = amqp::subscribe(
        &settings,
        "fleet-consumer",
        topology::WORK_QUEUE,
        settings.prefetch(),
    )
    .await?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        broker = %redact(&settings.amqp.url),
        queue = topology::WORK_QUEUE,
        workers = settings.consumer.workers,
        io_concurrency = settings.consumer.io_concurrency,
        prefetch = settings.prefetch(),
        kinds = ?registry.kinds(),
        "fleet-consumer started"
    );

    let worker = Arc::new(
        Worker::new(
            Arc::clone(&settings),
            registry,
            subscription.publisher.clone(),
            shutdown.clone(),
        )
        .context("starting the worker pool")?,
    );
    let in_flight = TaskTracker::new();
    let outcome = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            next = subscription.deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    in_flight.spawn(Arc::clone(&worker).handle(delivery));
                }
                Some(Err(error)) => break Err(anyhow::Error::new(error).context("the delivery stream failed")),
                None => break Err(anyhow::anyhow!("the broker cancelled our consumer on {}", topology::WORK_QUEUE)),
            },
        }
    };

    tracing::info!(in_flight = in_flight.len(), "draining");
    // Stop new deliveries; those already prefetched are either run or returned by the worker.
    subscription.cancel().await;
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
    subscription.close().await;
    tracing::info!("fleet-consumer stopped");
    outcome
}
