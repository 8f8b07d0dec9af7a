//! The collector service: consumes `fleet.results` (as its single active consumer, so a standby
//! can take over), stores each group of results in one SQLite transaction, acks after the
//! commit, and serves the read API.
//!
//! - [`store`]: the SQLite store.
//! - [`http`]: the read API.

pub mod http;
pub mod store;

use anyhow::Context as _;
use fleet_shared::envelope::{self, HEADER_ERROR};
use fleet_shared::publisher::{Outgoing, Publisher, header_str};
use fleet_shared::settings::Settings;
use fleet_shared::telemetry::redact;
use fleet_shared::{amqp, topology};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Store;
use tokio_util::sync::CancellationToken;

/// Runs the collector until `shutdown` is cancelled; results already received are stored and
/// acked before it returns.
///
/// Fails when the database cannot be opened or written, the HTTP address cannot be bound, the
/// broker cannot be reached or refuses us, or the result stream ends.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = &settings.collector.db;
    let writer =
        Store::open(db).with_context(|| format!("opening the result store {}", db.display()))?;
    let reader =
        Store::open(db).with_context(|| format!("opening the result store {}", db.display()))?;
    let listener = tokio::net::TcpListener::bind(&settings.collector.listen)
        .await
        .with_context(|| format!("listening on {}", settings.collector.listen))?;

    let prefetch =
        u16::try_from(settings.collector.batch_size.saturating_mul(2)).unwrap_or(u16::MAX);
    let mut subscription = amqp::subscribe(
        &settings,
        "fleet-collector",
        topology::RESULTS_QUEUE,
        prefetch,
    )
    .await?;
    let dead = subscription.publisher.clone();

    let http_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, http::router(reader))
            .with_graceful_shutdown(http_shutdown.cancelled_owned())
            .await
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        broker = %redact(&settings.amqp.url),
        queue = topology::RESULTS_QUEUE,
        db = %db.display(),
        listen = %settings.collector.listen,
        "fleet-collector started"
    );

    let writer = Arc::new(Mutex::new(writer));
    let flush_every = Duration::from_millis(settings.collector.flush_interval_ms);
    let max = settings.collector.batch_size;
    let mut group: Vec<Delivery> = Vec::with_capacity(max);
    let outcome: anyhow::Result<()> = loop {
        // Wait for the first result of a group, then gather more for up to `flush_every`.
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            next = subscription.deliveries.next() => next,
        };
        match first {
            Some(Ok(delivery)) => group.push(delivery),
            Some(Err(e)) => break Err(anyhow::Error::new(e).context("the result stream failed")),
            None => {
                break Err(anyhow::anyhow!(
                    "the broker cancelled our consumer on {}",
                    topology::RESULTS_QUEUE
                ));
            }
        }
        let deadline = tokio::time::sleep(flush_every);
        tokio::pin!(deadline);
        let mut failed = None;
        while group.len() < max {
            tokio::select! {
                () = &mut deadline => break,
                next = subscription.deliveries.next() => match next {
                    Some(Ok(delivery)) => group.push(delivery),
                    Some(Err(e)) => { failed = Some(anyhow::Error::new(e).context("the result stream failed")); break }
                    None => { failed = Some(anyhow::anyhow!("the broker cancelled our consumer")); break }
                },
            }
        }
        if let Err(e) = flush(&writer, &dead, &mut group).await {
            break Err(e);
        }
        if let Some(e) = failed {
            break Err(e);
        }
    };

    subscription.cancel().await;
    // Whatever arrived before the cancel is stored and acked; the rest is redelivered.
    if outcome.is_ok() && !group.is_empty() {
        flush(&writer, &dead, &mut group).await?;
    }
    shutdown.cancel();
    let _ = server.await;
    subscription.close().await;
    tracing::info!("fleet-collector stopped");
    outcome
}

/// Stores a group in one transaction, then acks all of it with one multiple-ack.
/// Undecodable messages are dead-lettered (confirmed) before the ack covers them.
async fn flush(
    writer: &Arc<Mutex<Store>>,
    dead: &Publisher,
    group: &mut Vec<Delivery>,
) -> anyhow::Result<()> {
    if group.is_empty() {
        return Ok(());
    }
    let mut messages = Vec::with_capacity(group.len());
    for delivery in group.iter() {
        match envelope::decode_result(&delivery.data) {
            Ok(message) => messages.push(message),
            Err(error) => {
                let reason = error.to_string();
                tracing::warn!(%reason, "dead-lettering an undecodable result");
                dead.publish(Outgoing::forward(
                    topology::DEAD_EXCHANGE,
                    topology::RESULTS_QUEUE,
                    delivery.data.clone(),
                    &delivery.properties,
                    vec![(HEADER_ERROR, header_str(&reason))],
                ))
                .await
                .context("dead-lettering an undecodable result")?;
            }
        }
    }
    let writer = Arc::clone(writer);
    let stored = tokio::task::spawn_blocking(move || {
        let mut store = writer
            .lock()
            .map_err(|_| anyhow::anyhow!("store lock poisoned"))?;
        store
            .store(&messages)
            .context("writing results to the store")
    })
    .await
    .context("the store thread failed")??;
    if stored.duplicates > 0 {
        tracing::info!(duplicates = stored.duplicates, "duplicate results ignored");
    }
    tracing::debug!(
        results = stored.results,
        manifests = stored.manifests,
        "stored"
    );
    // Committed: now the broker may forget them. One ack covers the whole group.
    let acker = group.last().map(|d| d.acker.clone());
    group.clear();
    if let Some(acker) = acker {
        acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .context("acking stored results")?;
    }
    Ok(())
}
