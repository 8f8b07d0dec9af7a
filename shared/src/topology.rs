//! Every exchange and queue name fleet uses, and their idempotent declaration
//! (DESIGN.md "Topology"). Every service calls [`ensure`] at start: it declares the topology, or,
//! when its broker user has no configure permission (least privilege), checks that an admin
//! declared it (`fleet-producer setup`).
//!
//! ```text
//! fleet.tasks (topic) --#--> fleet.tasks.default --(reject / delivery limit)--> fleet.dead (fanout) -> fleet.dead
//! fleet.retry (headers, fleet-delay-ms=<ms>) -> fleet.retry.<ms>ms --(TTL expires)--> fleet.tasks, same routing key
//! fleet.results (fanout, results from consumers) ---\
//!                                                     >--> fleet.results  (single active consumer: the collector)
//! fleet.batches (fanout, manifests from producers) ---/
//! ```
//!
//! Results and manifests have exchanges of their own (rather than the default exchange) so that
//! write permission can be granted per role: a producer may write `fleet.tasks` and
//! `fleet.batches` but not results, a consumer `fleet.results` but not manifests; nobody but an
//! admin needs `amq.default`, which reaches every queue.

use crate::settings::{QueueType, Settings};
use anyhow::Context as _;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

/// Tasks are published here with routing key = task kind.
pub const TASKS_EXCHANGE: &str = "fleet.tasks";
/// The default work queue, bound to [`TASKS_EXCHANGE`] with `#`.
pub const WORK_QUEUE: &str = "fleet.tasks.default";
/// Dead letters go through this exchange...
pub const DEAD_EXCHANGE: &str = "fleet.dead";
/// ...into this queue.
pub const DEAD_QUEUE: &str = "fleet.dead";
/// Retries are published here with header `fleet-delay-ms` naming the delay queue.
pub const RETRY_EXCHANGE: &str = "fleet.retry";
/// Results and batch manifests, consumed by the collector.
pub const RESULTS_QUEUE: &str = "fleet.results";
/// Consumers publish results here (fanout to [`RESULTS_QUEUE`]).
pub const RESULTS_EXCHANGE: &str = "fleet.results";
/// Producers publish batch manifests here (fanout to [`RESULTS_QUEUE`]).
pub const BATCHES_EXCHANGE: &str = "fleet.batches";
/// Consumers and the collector publish a status beat here every few seconds (fanout, bound to
/// nothing until `fleet-producer status` listens; see [`crate::status`]).
pub const STATUS_EXCHANGE: &str = "fleet.status";

/// The exchange for the tasks of work queue `shard`: [`TASKS_EXCHANGE`] for shard 0, then
/// `fleet.tasks.1`, `fleet.tasks.2`, ... With `topology.work_queues` = K > 1 each shard is its
/// own topic exchange bound to its own queue; producers spread tasks over them by task id.
/// Shard 0 is the topology of K = 1 unchanged, so publishers that know nothing of shards, and
/// retries coming back from the delay queues, still reach a queue every consumer reads.
pub fn tasks_exchange(shard: usize) -> String {
    match shard {
        0 => TASKS_EXCHANGE.to_owned(),
        n => format!("{TASKS_EXCHANGE}.{n}"),
    }
}

/// Work queue `shard`: [`WORK_QUEUE`] for shard 0, then `fleet.tasks.default.1`, ...
pub fn work_queue(shard: usize) -> String {
    match shard {
        0 => WORK_QUEUE.to_owned(),
        n => format!("{WORK_QUEUE}.{n}"),
    }
}

/// The exchanges tasks are published to, one per work queue, [`TASKS_EXCHANGE`] first.
pub fn tasks_exchanges(settings: &Settings) -> Vec<String> {
    (0..settings.topology.work_queues)
        .map(tasks_exchange)
        .collect()
}

/// The work queues of `settings` (`topology.work_queues` of them).
pub fn work_queues(settings: &Settings) -> Vec<String> {
    (0..settings.topology.work_queues).map(work_queue).collect()
}

/// Every queue the topology has: work, delay queues, dead letters, results.
pub fn queues(settings: &Settings) -> Vec<String> {
    work_queues(settings)
        .into_iter()
        .chain(settings.all_retry_delays().into_iter().map(retry_queue))
        .chain([DEAD_QUEUE.to_owned(), RESULTS_QUEUE.to_owned()])
        .collect()
}

/// The delay queue holding retries that wait `delay_ms`.
pub fn retry_queue(delay_ms: u64) -> String {
    format!("fleet.retry.{delay_ms}ms")
}

/// The `fleet-delay-ms` header value that routes a retry to the queue for `delay_ms`.
pub fn delay_key(delay_ms: u64) -> String {
    delay_ms.to_string()
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn args<const N: usize>(pairs: [(&str, AMQPValue); N]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(ShortString::from(k), v);
    }
    table
}

fn queue_type(t: QueueType) -> AMQPValue {
    long(match t {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    })
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares every exchange, queue and binding. Safe to call again with the same settings.
///
/// Fails when the broker refuses (permissions, or a queue that exists with other arguments:
/// a `PRECONDITION_FAILED` channel error).
/// Declares a delay queue for every retry delay any kind uses ([`Settings::all_retry_delays`]).
pub async fn declare(channel: &Channel, all: &Settings) -> lapin::Result<()> {
    let settings = &all.topology;
    let exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for name in tasks_exchanges(all) {
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                exchange,
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .exchange_declare(
            DEAD_EXCHANGE.into(),
            ExchangeKind::Fanout,
            exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            RETRY_EXCHANGE.into(),
            ExchangeKind::Headers,
            exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            STATUS_EXCHANGE.into(),
            ExchangeKind::Fanout,
            exchange,
            FieldTable::default(),
        )
        .await?;

    let qtype = queue_type(settings.queue_type);
    channel
        .queue_declare(
            DEAD_QUEUE.into(),
            durable(),
            args([("x-queue-type", qtype.clone())]),
        )
        .await?;
    channel
        .queue_bind(
            DEAD_QUEUE.into(),
            DEAD_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let mut work = args([
        ("x-queue-type", qtype.clone()),
        ("x-dead-letter-exchange", long(DEAD_EXCHANGE)),
    ]);
    if settings.queue_type == QueueType::Quorum {
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(settings.delivery_limit).unwrap_or(i32::MAX)),
        );
    }
    for shard in 0..settings.work_queues {
        let queue = work_queue(shard);
        channel
            .queue_declare(queue.as_str().into(), durable(), work.clone())
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                tasks_exchange(shard).as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }

    for delay in all.all_retry_delays() {
        let name = retry_queue(delay);
        // No x-dead-letter-routing-key: an expired retry goes back to fleet.tasks with the
        // routing key it was published with, which is the task kind.
        let mut delay_args = args([
            ("x-queue-type", qtype.clone()),
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(i64::try_from(delay).unwrap_or(i64::MAX)),
            ),
            ("x-dead-letter-exchange", long(TASKS_EXCHANGE)),
        ]);
        if settings.queue_type == QueueType::Quorum {
            // Quorum queues dead-letter at-most-once unless told otherwise.
            delay_args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
            delay_args.insert("x-overflow".into(), long("reject-publish"));
        }
        channel
            .queue_declare(name.as_str().into(), durable(), delay_args)
            .await?;
        channel
            .queue_bind(
                name.as_str().into(),
                RETRY_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                args([
                    ("x-match", long("all")),
                    (crate::envelope::HEADER_DELAY, long(&delay_key(delay))),
                ]),
            )
            .await?;
    }

    channel
        .queue_declare(
            RESULTS_QUEUE.into(),
            durable(),
            args([
                ("x-queue-type", qtype),
                ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ]),
        )
        .await?;
    for source in [RESULTS_EXCHANGE, BATCHES_EXCHANGE] {
        channel
            .exchange_declare(
                source.into(),
                ExchangeKind::Fanout,
                exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                RESULTS_QUEUE.into(),
                source.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Who declared the topology a service found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// This service did (its user may configure).
    Here,
    /// An admin did; this service's user may not configure, and checked it all exists.
    ByAdmin,
}

/// Declares the topology on a channel of its own; if the broker refuses (no configure
/// permission), checks on another channel that every exchange and queue exists.
///
/// Fails when declaring fails for another reason, or when something is missing and this user
/// may not create it (the message says to run `fleet-producer setup` as an admin).
pub async fn ensure(connection: &Connection, settings: &Settings) -> anyhow::Result<Declared> {
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    match declare(&channel, settings).await {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(Declared::Here)
        }
        Err(error) if access_refused(&error) => {
            let checking = connection
                .create_channel()
                .await
                .context("opening a channel")?;
            check(&checking, settings).await.with_context(|| {
                format!(
                    "this user may not declare the topology ({error}) and it is not all there: \
                     run `fleet-producer setup` as an admin"
                )
            })?;
            let _ = checking.close(200, "checked".into()).await;
            Ok(Declared::ByAdmin)
        }
        Err(error) => Err(anyhow::Error::new(error).context("declaring topology")),
    }
}

fn access_refused(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
    )
}

/// Passive declares of every exchange and queue (they need no permission).
async fn check(channel: &Channel, settings: &Settings) -> lapin::Result<()> {
    let passive_exchange = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let tasks = tasks_exchanges(settings);
    let tasks = tasks
        .iter()
        .map(|name| (name.as_str(), ExchangeKind::Topic));
    for (name, kind) in tasks.chain([
        (DEAD_EXCHANGE, ExchangeKind::Fanout),
        (RETRY_EXCHANGE, ExchangeKind::Headers),
        (RESULTS_EXCHANGE, ExchangeKind::Fanout),
        (BATCHES_EXCHANGE, ExchangeKind::Fanout),
        (STATUS_EXCHANGE, ExchangeKind::Fanout),
    ]) {
        channel
            .exchange_declare(name.into(), kind, passive_exchange, FieldTable::default())
            .await?;
    }
    let passive_queue = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for name in queues(settings) {
        channel
            .queue_declare(name.as_str().into(), passive_queue, FieldTable::default())
            .await?;
    }
    Ok(())
}
