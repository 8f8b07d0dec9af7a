//! The collector service: consumes `fleet.results` (as its single active consumer, so a standby
//! can take over), stores each group of results in one SQLite transaction, acks after the
//! commit, and serves the read API.
//!
//! - [`store`]: the SQLite store.
//! - [`http`]: the read API, beside `/metrics`, `/healthz` and `/readyz`.

pub mod http;
pub mod store;

use anyhow::Context as _;
use fleet_shared::envelope::{self, DeadReason, HEADER_ERROR, ResultMessage};
use fleet_shared::observe::{Common, Health, Observer, register};
use fleet_shared::publisher::{Outgoing, Publisher, header_str};
use fleet_shared::settings::Settings;
use fleet_shared::telemetry::redact;
use fleet_shared::trace::TraceParent;
use fleet_shared::{amqp, status, topology};
use futures_util::{FutureExt as _, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use store::{Store, Stored};
use tokio_util::sync::CancellationToken;

/// Runs the collector until `shutdown` is cancelled; results already received are stored and
/// acked before it returns.
///
/// A lost connection or a cancelled consumer ends only the session: the collector connects
/// again with backoff and subscribes again. Results stored but not yet acked when the connection
/// went are redelivered and counted as duplicates, never stored twice.
///
/// Fails when the database cannot be opened or written, the HTTP address cannot be bound, the
/// broker refuses us, or it stays unreachable for `amqp.reconnect_timeout_secs`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = &settings.collector.db;
    let writer =
        Store::open(db).with_context(|| format!("opening the result store {}", db.display()))?;
    let reader =
        Store::open(db).with_context(|| format!("opening the result store {}", db.display()))?;
    let listener = tokio::net::TcpListener::bind(&settings.collector.listen)
        .await
        .with_context(|| format!("listening on {}", settings.collector.listen))?;
    let mut observer = Observer::new(Health::default());
    let metrics = Metrics::register(observer.registry());
    let (common, health) = (observer.common.clone(), Arc::clone(&observer.health));
    let http_shutdown = CancellationToken::new();
    let hosts = crate::hosts::HostCheck::for_listener(listener.local_addr()?);
    let routes =
        http::router(reader)
            .merge(observer.router())
            .layer(axum::middleware::from_fn_with_state(
                hosts,
                crate::hosts::check_host,
            ));
    let server = tokio::spawn(fleet_shared::http::serve(
        listener,
        routes,
        http_shutdown.clone().cancelled_owned(),
    ));

    // The sessions run on a thread of their own, which writes the store too: a group goes from
    // lapin's I/O thread to this one and is committed and acked there, with no hop through the
    // thread that serves HTTP nor to a blocking thread. The thread has a runtime of its own, so
    // that its timers and the readiness of the broker's socket (which lapin's I/O thread waits
    // on) are polled here too: with the main runtime's handle, every frame and every timer set
    // also woke the main thread (docs/BENCHMARKS.md, session 14).
    let outcome = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the collector's runtime")?
            .block_on(sessions(
                settings, writer, metrics, common, health, shutdown,
            ))
    })
    .await
    .context("the collector's thread failed")
    .and_then(|outcome| outcome);
    http_shutdown.cancel();
    let _ = server.await;
    if outcome.is_ok() {
        tracing::info!("fleet-collector stopped");
    }
    outcome
}

/// Consumes and stores until `shutdown`, subscribing again after a lost session.
async fn sessions(
    settings: Settings,
    mut writer: Store,
    metrics: Metrics,
    common: Common,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = &settings.collector.db;
    let prefetch =
        u16::try_from(settings.collector.batch_size.saturating_mul(2)).unwrap_or(u16::MAX);
    let mut sessions = 0u64;
    loop {
        let subscription = amqp::subscribe(
            &settings,
            "fleet-collector",
            topology::RESULTS_QUEUE,
            prefetch,
            &common,
            &shutdown,
        )
        .await;
        let mut subscription = match subscription {
            Ok(Some(subscription)) => subscription,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        if sessions == 0 {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                broker = %redact(&settings.amqp.url),
                queue = topology::RESULTS_QUEUE,
                db = %db.display(),
                listen = %settings.collector.listen,
                "fleet-collector started"
            );
        } else {
            common.reconnects.inc();
            tracing::info!(reconnects = sessions, "fleet-collector consuming again");
        }
        sessions += 1;
        health.subscribed();
        // Status beats for `fleet-producer status`, until this session ends.
        let pending = Arc::new(AtomicU64::new(0));
        let beats = CancellationToken::new();
        let _beats = beats.clone().drop_guard();
        let held = Arc::clone(&pending);
        status::spawn_beats(
            subscription.channel.clone(),
            "collector",
            topology::RESULTS_QUEUE.to_owned(),
            prefetch,
            move || held.load(Ordering::Relaxed),
            beats,
        );
        // After a signal, the group being stored gets `grace_period_secs` to commit and ack.
        let grace = Duration::from_secs(settings.collector.grace_period_secs);
        let grace_over = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            tracing::warn!(
                ?grace,
                "grace period over; unacked results will be redelivered"
            );
        };
        let ended = tokio::select! {
            ended = collect(&mut subscription, &mut writer, &metrics, &pending, &settings, &shutdown) => ended,
            () = grace_over => Ok(Ended::Shutdown),
        };
        match ended {
            Ok(Ended::Shutdown) => {
                health.consuming(false);
                // Whatever arrived before this point is stored and acked; the rest is returned.
                subscription.cancel().await;
                subscription.close().await;
                break Ok(());
            }
            Ok(Ended::Lost(error)) => {
                tracing::warn!(error = %format!("{error:#}"), "lost the broker; reconnecting");
                health.lost();
                subscription.close().await;
            }
            Err(error) => {
                subscription.close().await;
                break Err(error);
            }
        }
    }
}

/// The collector's metrics, beside [`fleet_shared::observe::Common`].
struct Metrics {
    /// `fleet_results_stored_total`: new results written.
    stored: Counter,
    /// `fleet_results_duplicates_total`: results for tasks already stored.
    duplicates: Counter,
    /// `fleet_batches_completed_total`: batches whose last result or manifest came in.
    completed: Counter,
    /// `fleet_results_dead_lettered_total`: undecodable or misrouted messages on the result path.
    dead_lettered: Counter,
    /// `fleet_store_seconds`: one group's transaction in the store, commit (and its fsync)
    /// included.
    store_seconds: Histogram,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let mut counter = |name, help| register(registry, name, help, Counter::default());
        Self {
            stored: counter("fleet_results_stored", "New results written to the store"),
            duplicates: counter(
                "fleet_results_duplicates",
                "Results for tasks already stored (not stored again)",
            ),
            completed: counter(
                "fleet_batches_completed",
                "Batches whose every result is stored",
            ),
            dead_lettered: counter(
                "fleet_results_dead_lettered",
                "Undecodable or misrouted messages on the result path, sent to fleet.dead",
            ),
            store_seconds: register(
                registry,
                "fleet_store_seconds",
                "Time of one group's store transaction, commit included",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
        }
    }

    fn record(&self, stored: &Stored) {
        self.stored.inc_by(stored.results);
        self.duplicates.inc_by(stored.duplicates);
        self.completed.inc_by(stored.completed.len() as u64);
    }
}

/// How long stored results may wait for the next group's to share an ack. Every ack is a command
/// the quorum queue writes to its log; at a few hundred results a second each group is a single
/// result, and the broker, on the same cores as the workers, spends the CPU they need
/// (docs/BENCHMARKS.md, session 13). The wait adds nothing to a result's time to stored, and a
/// result stored but not acked when the connection goes is redelivered and counted as a
/// duplicate, never stored twice.
const ACK_LINGER: Duration = Duration::from_millis(20);

/// How a session ended.
enum Ended {
    /// `shutdown` was cancelled; everything received is stored and acked.
    Shutdown,
    /// The connection, a channel or our consumer was lost.
    Lost(anyhow::Error),
}

/// Stores results in groups of up to `batch_size`, each gathered for up to `flush_interval_ms`
/// after its first result. Fails only when the store fails.
async fn collect(
    subscription: &mut amqp::Subscription,
    writer: &mut Store,
    metrics: &Metrics,
    pending: &AtomicU64,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ended> {
    let flush_every = Duration::from_millis(settings.collector.flush_interval_ms);
    let max = settings.collector.batch_size;
    let mut group: Vec<Delivery> = Vec::with_capacity(max);
    // One watch for the session, raced by every flush (see `Subscription::lost_watch`).
    let lost_watch = subscription.lost_watch();
    tokio::pin!(lost_watch);
    // Stored, not acked yet: the last one's acker (its multiple ack covers the others) and how
    // many. At most `batch_size` wait, so the prefetch (two groups) always has room for a group.
    let mut unacked: Option<(lapin::Acker, usize)> = None;
    let linger = tokio::time::sleep(ACK_LINGER);
    tokio::pin!(linger);
    loop {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                return Ok(match ack(unacked.take(), lost_watch.as_mut()).await {
                    Ok(()) => Ended::Shutdown,
                    Err(error) => Ended::Lost(error),
                });
            }
            () = &mut linger, if unacked.is_some() => {
                if let Err(error) = ack(unacked.take(), lost_watch.as_mut()).await {
                    return Ok(Ended::Lost(error));
                }
                continue;
            }
            next = subscription.deliveries.next() => next,
        };
        let why = match first {
            Some(Ok(delivery)) => {
                group.push(delivery);
                None
            }
            Some(Err(e)) => Some(anyhow::Error::new(e).context("the result stream failed")),
            None => Some(cancelled()),
        };
        if let Some(why) = why {
            // What is stored is acked first if the channel still takes it (a cancelled
            // consumer), so that it is not delivered again.
            let _ = ack(unacked.take(), lost_watch.as_mut()).await;
            return Ok(Ended::Lost(why));
        }
        let deadline = tokio::time::sleep(flush_every);
        tokio::pin!(deadline);
        let mut lost = None;
        while group.len() < max {
            // What has arrived already joins the group; then wait for more until the deadline
            // (none by default: under load, results gather while the previous group commits).
            let next = match subscription.deliveries.next().now_or_never() {
                Some(next) => next,
                // A zero-length sleep still waits for the timer's next 1 ms tick.
                None if flush_every.is_zero() => break,
                None => tokio::select! {
                    () = &mut deadline => break,
                    next = subscription.deliveries.next() => next,
                },
            };
            match next {
                Some(Ok(delivery)) => group.push(delivery),
                Some(Err(e)) => {
                    lost = Some(anyhow::Error::new(e).context("the result stream failed"));
                    break;
                }
                None => {
                    lost = Some(cancelled());
                    break;
                }
            }
        }
        pending.store(group.len() as u64, Ordering::Relaxed);
        let stored = group.len();
        let flushed = tokio::select! {
            flushed = flush(writer, &subscription.publisher, metrics, &mut group) => flushed,
            why = &mut lost_watch => Err(Flush::Broker(why)),
        };
        match flushed {
            Ok(acker) => {
                pending.store(0, Ordering::Relaxed);
                let waiting = unacked.as_ref().map_or(0, |(_, n)| *n) + stored;
                if unacked.is_none() {
                    linger
                        .as_mut()
                        .reset(tokio::time::Instant::now() + ACK_LINGER);
                }
                if let Some(acker) = acker {
                    unacked = Some((acker, waiting));
                }
                if let Some(why) = lost {
                    // As above: what is stored is acked first if the channel still takes it.
                    let _ = ack(unacked.take(), lost_watch.as_mut()).await;
                    return Ok(Ended::Lost(why));
                }
                if (waiting > max || linger.is_elapsed())
                    && let Err(error) = ack(unacked.take(), lost_watch.as_mut()).await
                {
                    return Ok(Ended::Lost(error));
                }
            }
            Err(Flush::Store(error) | Flush::Refused(error)) => return Err(error),
            Err(Flush::Broker(error)) => return Ok(Ended::Lost(error)),
        }
    }
}

fn cancelled() -> anyhow::Error {
    anyhow::anyhow!(
        "the broker cancelled our consumer on {}",
        topology::RESULTS_QUEUE
    )
}

/// Why a flush failed: the store or a refused permission (fatal), or the broker (reconnect; the
/// group is redelivered).
enum Flush {
    Store(anyhow::Error),
    Refused(anyhow::Error),
    Broker(anyhow::Error),
}

/// Accepts a result only from `fleet.results` and a manifest only from `fleet.batches`, so a
/// producer cannot forge results nor a consumer manifests. Not the default exchange either: an
/// admin tool that republishes what another role wrote (`dlq replay`) must never make it trusted.
fn admit(exchange: &str, message: ResultMessage) -> Result<ResultMessage, DeadReason> {
    let (what, allowed) = match &message {
        ResultMessage::Result(_) => ("result", topology::RESULTS_EXCHANGE),
        ResultMessage::Results(_) => ("result group", topology::RESULTS_EXCHANGE),
        ResultMessage::Manifest(_) => ("batch manifest", topology::BATCHES_EXCHANGE),
    };
    if exchange == allowed {
        Ok(message)
    } else {
        Err(DeadReason::Misrouted {
            what,
            exchange: exchange.to_owned(),
            allowed,
        })
    }
}

/// Acks everything stored so far with one multiple ack of the last stored delivery, unless
/// `lost` (the session's [`amqp::Subscription::lost_watch`]) resolves first: an ack on a
/// connection cut at that moment may never resolve.
async fn ack(
    unacked: Option<(lapin::Acker, usize)>,
    lost: Pin<&mut impl Future<Output = anyhow::Error>>,
) -> anyhow::Result<()> {
    let Some((acker, _)) = unacked else {
        return Ok(());
    };
    tokio::select! {
        acked = acker.ack(BasicAckOptions { multiple: true }) => {
            acked.context("acking stored results")?;
            Ok(())
        }
        why = lost => Err(why),
    }
}

/// Stores a group in one transaction and returns the acker of its last delivery, whose multiple
/// ack covers the group. Undecodable messages, and results or manifests from the wrong
/// exchange, are dead-lettered (confirmed) before that ack can cover them.
async fn flush(
    writer: &mut Store,
    dead: &Publisher,
    metrics: &Metrics,
    group: &mut Vec<Delivery>,
) -> Result<Option<lapin::Acker>, Flush> {
    if group.is_empty() {
        return Ok(None);
    }
    let mut messages = Vec::with_capacity(group.len());
    for delivery in group.iter() {
        let admitted = envelope::decode_result(&delivery.data)
            .map_err(|e| DeadReason::Invalid(e.to_string()))
            .and_then(|message| admit(delivery.exchange.as_str(), message));
        match admitted {
            Ok(message) => messages.push(message),
            Err(reason) => {
                tracing::warn!(
                    task_id = delivery.properties.message_id().as_ref().map_or("-", |id| id.as_str()),
                    trace_id = TraceParent::of(&delivery.properties).map_or_else(String::new, |t| t.trace_id()),
                    reason = %fleet_shared::telemetry::printable(&reason.to_string()),
                    "dead-lettering a message on the result path"
                );
                metrics.dead_lettered.inc();
                dead.publish(Outgoing::forward(
                    topology::DEAD_EXCHANGE,
                    topology::RESULTS_QUEUE,
                    delivery.data.clone(),
                    &delivery.properties,
                    vec![(HEADER_ERROR, header_str(&reason.header()))],
                ))
                .await
                .map_err(|e| match e.permission() {
                    Some(refused) => Flush::Refused(refused.into()),
                    None => Flush::Broker(
                        anyhow::Error::new(e).context("dead-lettering an undecodable result"),
                    ),
                })?;
            }
        }
    }
    // On the collector's own thread (see `run`): the commit holds up nothing else.
    let began = Instant::now();
    let stored = writer.store(&messages);
    metrics.store_seconds.observe(began.elapsed().as_secs_f64());
    let stored = stored
        .context("writing results to the store")
        .map_err(Flush::Store)?;
    if stored.duplicates > 0 {
        tracing::info!(duplicates = stored.duplicates, "duplicate results ignored");
    }
    for batch in &stored.completed {
        tracing::info!(%batch, "batch complete");
    }
    metrics.record(&stored);
    tracing::debug!(
        results = stored.results,
        manifests = stored.manifests,
        "stored"
    );
    // Committed: now the broker may forget them.
    let acker = group.last().map(|d| d.acker.clone());
    group.clear();
    Ok(acker)
}

#[cfg(test)]
mod tests {
    use super::admit;
    use fleet_shared::envelope::{BatchManifest, ResultMessage};
    use fleet_shared::topology;

    #[test]
    fn results_and_manifests_are_admitted_only_through_their_own_exchange() {
        let result = || {
            let now = chrono::Utc::now();
            fleet_shared::envelope::TaskResult {
                v: 1,
                task_id: "t".into(),
                batch: None,
                kind: "square".into(),
                status: fleet_shared::envelope::Status::Ok,
                output: None,
                error: None,
                attempts: 1,
                worker: "h/1/0".into(),
                started_at: now,
                finished_at: now,
                published_by: None,
                traceparent: None,
            }
        };
        // Every exchange a role can write, the default one and those of other names.
        let exchanges = [
            "",
            "amq.direct",
            "amq.fanout",
            topology::TASKS_EXCHANGE,
            "fleet.tasks.1",
            topology::RETRY_EXCHANGE,
            topology::DEAD_EXCHANGE,
            topology::RESULTS_EXCHANGE,
            topology::BATCHES_EXCHANGE,
            topology::STATUS_EXCHANGE,
        ];
        for exchange in exchanges {
            let messages = [
                (ResultMessage::Result(result()), topology::RESULTS_EXCHANGE),
                (
                    ResultMessage::Results(vec![result()]),
                    topology::RESULTS_EXCHANGE,
                ),
                (
                    ResultMessage::Manifest(BatchManifest::new("b".into(), 1, "square".into())),
                    topology::BATCHES_EXCHANGE,
                ),
            ];
            for (message, own) in messages {
                let admitted = admit(exchange, message).is_ok();
                assert_eq!(admitted, exchange == own, "through `{exchange}`");
            }
        }
    }
}
