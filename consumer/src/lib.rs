//! fleet-consumer: the worker process. It takes tasks from `fleet.tasks.default`, runs each in a
//! slot (compute-bound handlers on a pool of exactly `workers` threads, I/O-bound ones as async
//! tasks), publishes the result with a broker confirm and only then acks.
//!
//! - [`registry`]: kind -> handler, built once and passed into [`run`].
//! - [`handlers`]: the built-in handlers, one file each.
//! - [`worker`]: one delivery from decode to its confirmed outcome.
//! - [`acks`]: acks, batched into one multiple ack per group of settled deliveries.
//! - [`results`]: results, each confirmed before its ack; optionally several in one message.
//! - [`disposition`]: outcome -> complete, retry or fail (the delivery-semantics table).
//! - [`pool`]: the compute pool, exactly `workers` threads that sleep when idle.
//! - [`progress`]: whether deliveries in hand still settle, for `/readyz`.
//! - [`metrics`]: what `/metrics` on `consumer.listen` shows (with `/healthz` and `/readyz`).

pub mod acks;
pub mod disposition;
pub mod handlers;
pub mod metrics;
pub mod pool;
pub mod progress;
pub mod registry;
pub mod settle;
pub mod worker;

use acks::Acks;
use anyhow::Context as _;
use fleet_shared::observe::{Health, Observer};
use fleet_shared::settings::Settings;
use fleet_shared::telemetry::redact;
use fleet_shared::{amqp, status, topology};
use futures_util::StreamExt;
use metrics::Metrics;
use registry::Registry;
use settle::{Results, Settle};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use worker::Worker;

/// Runs a consumer until `shutdown` is cancelled, then drains: no new deliveries, in-flight tasks
/// finish within `consumer.grace_period_secs`, unstarted ones are handed back to the work queue
/// without spending their delivery budget ([`worker::Worker::give_back`]).
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
    let server = tokio::spawn(fleet_shared::http::serve(
        listener,
        observer.router(),
        http_shutdown.clone().cancelled_owned(),
    ));
    let worker = Arc::new(
        Worker::new(Arc::clone(&settings), registry, metrics, shutdown.clone())
            .context("starting the worker pool")?,
    );
    // Every delivery ever started, for the final drain.
    let in_flight = TaskTracker::new();
    let watchdog = AbortOnDrop(tokio::spawn(progress::watch(
        Arc::clone(&worker),
        in_flight.clone(),
        Arc::clone(&health),
        progress::stall_after(&settings),
    )));
    let queues = topology::work_queues(&settings);
    // Once, when the first lane is consuming.
    let announced = std::sync::Once::new();
    let announce = || {
        announced.call_once(|| {
            tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            broker = %redact(&settings.amqp.url),
            queues = ?queues,
            workers = settings.consumer.workers,
            io_concurrency = settings.consumer.io_concurrency,
            prefetch = settings.prefetch(),
            kinds = ?kinds,
            %listen,
            "fleet-consumer started"
            );
        });
    };
    // One lane per work queue, each with its own connection; the prefetch is shared out.
    let lane_prefetch = settings
        .prefetch()
        .div_ceil(u16::try_from(queues.len()).unwrap_or(u16::MAX));
    // Settled tags may wait a moment to share an ack (see `acks`): at most half of the window
    // the prefetch gives beyond the slots, so that the slots never wait for the broker for it.
    let read_ahead = settings.consumer.workers.saturating_mul(usize::from(
        settings.consumer.prefetch_per_worker.saturating_sub(1),
    ));
    let ack_hold = read_ahead / 2 / queues.len().max(1);
    let shared = Lanes {
        settings: &settings,
        worker: &worker,
        in_flight: &in_flight,
        common: &common,
        health: &health,
        shutdown: &shutdown,
        prefetch: lane_prefetch,
        ack_hold,
        announce: &announce,
    };
    let lanes = queues.iter().map(|queue| shared.run(queue));
    let subscriptions = match futures_util::future::try_join_all(lanes).await {
        Ok(subscriptions) => subscriptions,
        Err(error) => {
            http_shutdown.cancel();
            return Err(error);
        }
    };
    health.consuming(false);
    tracing::info!(in_flight = in_flight.len(), "draining");
    // Each lane has cancelled its subscription; what was prefetched is run or handed back.
    in_flight.close();
    let drained = tokio::time::timeout(settings.consumer_grace(), in_flight.wait())
        .await
        .is_ok();
    if !drained {
        tracing::warn!(
            left = in_flight.len(),
            "grace period over; unfinished tasks go back to the queue when the channel closes"
        );
    }
    for (subscription, acker) in subscriptions.into_iter().flatten() {
        // Every settled delivery is acked before the channel closes (else it would come back).
        // The acker ends once no delivery is left to hand it a tag, so only after a full drain.
        if drained {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), acker.flushed()).await;
        }
        subscription.close().await;
    }
    drop(watchdog);
    http_shutdown.cancel();
    let _ = server.await;
    tracing::info!("fleet-consumer stopped");
    Ok(())
}

/// Aborts a spawned task when dropped, on every way out of [`run`].
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every lane of a consumer shares.
struct Lanes<'a> {
    settings: &'a Arc<Settings>,
    worker: &'a Arc<Worker>,
    in_flight: &'a TaskTracker,
    common: &'a fleet_shared::observe::Common,
    health: &'a Arc<Health>,
    shutdown: &'a CancellationToken,
    /// This lane's share of the prefetch.
    prefetch: u16,
    /// Settled tags that may wait to share an ack.
    ack_hold: usize,
    /// Logs the start-up banner, the first time it is called.
    announce: &'a (dyn Fn() + Sync),
}

impl Lanes<'_> {
    /// Consumes `queue` through connection losses until shutdown, then returns the session to
    /// drain (`None` if shutdown came while connecting). Fails when the broker refuses us or
    /// stays unreachable.
    async fn run(&self, queue: &str) -> anyhow::Result<Option<(amqp::Subscription, acks::Acker)>> {
        let Self {
            settings,
            worker,
            in_flight,
            common,
            health,
            shutdown,
            prefetch,
            ack_hold,
            announce,
        } = *self;
        let mut sessions = 0u64;
        loop {
            // Slow start: one delivery at a time until one has settled (see `widen`).
            let Some(mut subscription) =
                amqp::subscribe(settings, "fleet-consumer", queue, 1, common, shutdown).await?
            else {
                return Ok(None);
            };
            announce();
            if sessions > 0 {
                common.reconnects.inc();
                tracing::info!(
                    reconnects = sessions,
                    queue,
                    "fleet-consumer consuming again"
                );
            }
            sessions += 1;
            health.subscribed();
            let lost = CancellationToken::new();
            // Status beats for `fleet-producer status`, until this session ends.
            let beats = CancellationToken::new();
            let _beats = beats.clone().drop_guard();
            let tracker = in_flight.clone();
            // A delivery counts from its arrival until its handling ends, a moment after its
            // ack; the broker never lets more than the prefetch be unacked.
            status::spawn_beats(
                subscription.channel.clone(),
                "consumer",
                queue.to_owned(),
                prefetch,
                move || (tracker.len() as u64).min(u64::from(prefetch)),
                beats,
            );
            let widen_at = (prefetch > 1).then(|| worker.settled() + 1);
            let (acks, acker) = Acks::start(subscription.channel.clone(), ack_hold);
            // Shared by each delivery's handling: a clone would be three lapin channels' worth of
            // reference counts per delivery, and 1.2 KiB more in every handling future.
            let channel = Arc::new(Settle {
                publisher: subscription.publisher.clone(),
                results: Results::start(
                    subscription.publisher.clone(),
                    settings.consumer.results_per_message,
                    worker.metrics().clone(),
                ),
                acks,
            });
            let session = Session {
                queue,
                channel: &channel,
                worker,
                in_flight,
                lost: &lost,
            };
            match session
                .consume(&mut subscription, shutdown, widen_at, prefetch)
                .await
            {
                None => return Ok(Some((subscription, acker))),
                Some(error) => {
                    if let Some(refused) = worker.refusal() {
                        // A permission no reconnect gives back: unacked tasks are redelivered
                        // to consumers that have it.
                        health.lost();
                        lost.cancel();
                        tokio::spawn(subscription.close());
                        return Err(refused.into());
                    }
                    tracing::warn!(
                        error = %format!("{error:#}"),
                        queue,
                        in_flight = in_flight.len(),
                        "lost the broker; reconnecting (unacked tasks are redelivered)"
                    );
                    health.lost();
                    // Nothing started on the old connection can be settled any more: stop
                    // waiting for it (I/O handlers are dropped, compute ones finish and free
                    // their slot).
                    lost.cancel();
                    tokio::spawn(subscription.close());
                }
            }
        }
    }
}

/// One session of a lane: its queue, where its deliveries settle, and the token that drops
/// their handling when the connection is lost.
struct Session<'a> {
    queue: &'a str,
    channel: &'a Arc<Settle>,
    worker: &'a Arc<Worker>,
    in_flight: &'a TaskTracker,
    lost: &'a CancellationToken,
}

impl Session<'_> {
    /// Hands one delivery to the worker as a task of its own, dropped if the session is lost.
    fn start(&self, delivery: lapin::message::Delivery) {
        self.channel.acks.received(delivery.delivery_tag);
        // Boxed: the handling future is several KiB, and spawning and wrapping it would copy
        // all of it each time (memmove was 8 % of the consumer's CPU under load).
        let handled = Box::pin(Arc::clone(self.worker).handle(delivery, Arc::clone(self.channel)));
        let lost = self.lost.clone();
        self.in_flight
            .spawn(async move { lost.run_until_cancelled(handled).await });
    }

    /// Hands a delivery that arrived after shutdown back to the work queue, unstarted.
    fn hand_back(&self, delivery: lapin::message::Delivery) {
        self.channel.acks.received(delivery.delivery_tag);
        let (worker, channel) = (Arc::clone(self.worker), Arc::clone(self.channel));
        let lost = self.lost.clone();
        self.in_flight.spawn(async move {
            lost.run_until_cancelled(worker.give_back(&delivery, &channel))
                .await
        });
    }

    /// Stops taking deliveries: cancels the subscription and hands back what the broker had
    /// already sent it (up to the prefetch), so that a clean stop spends no delivery's budget.
    async fn stop_taking(&self, subscription: &mut amqp::Subscription) {
        subscription.cancel().await;
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            subscription.deliveries.next(),
        )
        .await
        {
            self.hand_back(delivery);
        }
    }

    /// Ends the slow start: a second consumer with the full prefetch replaces the first, whose
    /// deliveries already received are still handled (and acked on the same channel).
    async fn widen(
        &self,
        subscription: &mut amqp::Subscription,
        prefetch: u16,
    ) -> anyhow::Result<()> {
        use lapin::options::{BasicConsumeOptions, BasicQosOptions};
        let amqp = subscription.channel.clone();
        amqp.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("raising the prefetch")?;
        let wide = amqp
            .basic_consume(
                self.queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .context("consuming at the full prefetch")?;
        let mut narrow = std::mem::replace(&mut subscription.deliveries, wide);
        amqp.basic_cancel(narrow.tag(), lapin::options::BasicCancelOptions::default())
            .await
            .context("ending the slow start")?;
        // After the cancel the narrow stream ends; anything it still holds was delivered to us.
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(std::time::Duration::from_millis(100), narrow.next()).await
        {
            self.start(delivery);
        }
        tracing::debug!(prefetch, queue = self.queue, "slow start over");
        Ok(())
    }

    /// Hands deliveries to the worker until shutdown (`None`) or until the session is lost
    /// (why). Each delivery's handling stops where it is when `lost` is cancelled.
    ///
    /// Each session starts at prefetch 1 and widens to the full prefetch once the worker has
    /// settled `widen_at` deliveries in all. A task that kills the process (a poison message) is
    /// then redelivered alone after a restart, so only its own delivery count climbs to the
    /// limit, not those of the innocent tasks that happened to be prefetched beside it.
    async fn consume(
        &self,
        subscription: &mut amqp::Subscription,
        shutdown: &CancellationToken,
        mut widen_at: Option<u64>,
        prefetch: u16,
    ) -> Option<anyhow::Error> {
        let mut health = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            if widen_at.is_some_and(|n| self.worker.settled() >= n) {
                widen_at = None;
                // Three quick calls; a cut at this moment could leave them waiting forever.
                let widening = self.widen(subscription, prefetch);
                match tokio::time::timeout(std::time::Duration::from_secs(10), widening).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Some(error),
                    Err(_) => return Some(anyhow::anyhow!("timed out ending the slow start")),
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.stop_taking(subscription).await;
                    return None;
                }
                next = subscription.deliveries.next() => match next {
                    Some(Ok(delivery)) => self.start(delivery),
                    Some(Err(error)) => return Some(anyhow::Error::new(error).context("the delivery stream failed")),
                    None => return Some(anyhow::anyhow!("the broker cancelled our consumer on {}", self.queue)),
                },
                _ = health.tick() => {
                    // Results go out on a second channel; if the broker closed it, nothing can
                    // settle. (The tick also lets the slow start above notice a settled delivery.)
                    if let Some(why) = subscription.lost() {
                        return Some(why);
                    }
                }
            }
        }
    }
}
