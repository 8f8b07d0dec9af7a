//! Every exchange and queue name fleet uses, and their idempotent declaration
//! (DESIGN.md "Topology"). Every service calls [`ensure`] at start: it declares the topology, or,
//! when its broker user has no configure permission (least privilege), checks that an admin
//! declared it (`fleet-producer setup`).
//!
//! ```text
//! fleet.tasks (topic) --#--> fleet.tasks.default --(reject / delivery limit)--> fleet.dead (fanout) -> fleet.dead
//! fleet.retry (headers, fleet-delay-ms=<ms>) -> fleet.retry.<ms>ms --(TTL expires)--> fleet.tasks, same routing key
//! fleet.retry (headers, fleet-delay-ms=0) --> fleet.tasks (a draining consumer's unstarted tasks)
//! unroutable at fleet.tasks, fleet.retry, fleet.results, fleet.batches --> fleet.dead --(unroutable)--> fleet.unroutable
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
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
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
/// What no other exchange could route lands here (the alternate exchange of `fleet.dead`)...
pub const UNROUTABLE_EXCHANGE: &str = "fleet.unroutable";
/// ...and in this queue.
pub const UNROUTABLE_QUEUE: &str = "fleet.unroutable";
/// The `fleet-delay-ms` value of a task handed back without delay: `fleet.retry` routes it
/// straight to `fleet.tasks` (no retry delay may be 0).
pub const NO_DELAY: &str = "0";
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
        .chain([
            DEAD_QUEUE.to_owned(),
            RESULTS_QUEUE.to_owned(),
            UNROUTABLE_QUEUE.to_owned(),
        ])
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

/// One exchange of the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// Its name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Where the broker routes what this exchange cannot route (`alternate-exchange`).
    pub alternate: Option<&'static str>,
}

impl Exchange {
    /// Its declaration's arguments.
    pub fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if let Some(alternate) = self.alternate {
            arguments.insert("alternate-exchange".into(), long(alternate));
        }
        arguments
    }
}

/// Every exchange, in the order they are declared.
///
/// Every exchange fleet publishes to with `mandatory` has an alternate exchange, so that the
/// broker never returns a message (docs/DELIVERY.md, "Publishing"): lapin hands a
/// `basic.return` to whichever confirm it completes next, which need not be the returned
/// publish's, so a return could fail the wrong publish and let the unroutable one pass as
/// confirmed. Unroutable tasks, retries, results and manifests land in `fleet.dead` instead,
/// where `dlq list` shows them and `dlq replay` can send the tasks again; what `fleet.dead`
/// itself cannot route lands in `fleet.unroutable`. Status beats are neither mandatory nor kept.
pub fn exchanges(settings: &Settings) -> Vec<Exchange> {
    let exchange = |name: &str, kind, alternate| Exchange {
        name: name.to_owned(),
        kind,
        alternate,
    };
    let dead = Some(DEAD_EXCHANGE);
    let mut all = vec![
        exchange(UNROUTABLE_EXCHANGE, ExchangeKind::Fanout, None),
        exchange(
            DEAD_EXCHANGE,
            ExchangeKind::Fanout,
            Some(UNROUTABLE_EXCHANGE),
        ),
    ];
    all.extend(
        tasks_exchanges(settings)
            .iter()
            .map(|name| exchange(name, ExchangeKind::Topic, dead)),
    );
    all.extend([
        exchange(RETRY_EXCHANGE, ExchangeKind::Headers, dead),
        exchange(RESULTS_EXCHANGE, ExchangeKind::Fanout, dead),
        exchange(BATCHES_EXCHANGE, ExchangeKind::Fanout, dead),
        exchange(STATUS_EXCHANGE, ExchangeKind::Fanout, None),
    ]);
    all
}

/// Something [`declare`] changed in a topology that was already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// The exchange existed without its alternate exchange (declared by an earlier fleet) and
    /// was deleted and declared again; fleet's own bindings to it are made again, anyone
    /// else's must be.
    Exchange {
        /// Its name.
        name: String,
        /// Its alternate exchange now.
        alternate: &'static str,
    },
    /// The queue existed with the arguments of an earlier release, empty and unused, and was
    /// deleted and declared again with this release's (and bound again).
    Queue {
        /// Its name.
        name: String,
    },
    /// The queue exists with the arguments of an earlier release but holds messages or has
    /// consumers (or only `setup` may recreate it), so it was left as it is.
    QueuePending {
        /// Its name.
        name: String,
        /// Messages ready in it.
        messages: u32,
        /// Its consumers.
        consumers: u32,
    },
}

/// Whether [`declare`] may recreate a queue that has the arguments of an earlier release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrate {
    /// Yes, when it is empty and unused (`fleet-producer setup`).
    WhenEmpty,
    /// No, only say so (the services, which may be many and start at once).
    Never,
}

/// The dead-letter behaviour of every fleet quorum queue that dead-letters: a message past its
/// limit (or TTL) is moved to its target only once the target confirmed it, and kept until
/// then. Quorum queues dead-letter at-most-once unless told otherwise, dropping what the target
/// cannot take; at-least-once needs `reject-publish` overflow.
fn at_least_once(arguments: &mut FieldTable) {
    arguments.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    arguments.insert("x-overflow".into(), long("reject-publish"));
}

/// How often a result may be handed back to `fleet.results` before it is dead-lettered.
pub const RESULTS_DELIVERY_LIMIT: i32 = 1000;

/// Arguments a release added to fleet's queues: an existing queue that lacks one was declared
/// by an earlier release and can be recreated ([`Upgrade::Queue`]).
const ADDED_QUEUE_ARGUMENTS: [&str; 4] = [
    "x-dead-letter-strategy",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-delivery-limit",
];

/// One queue of the topology and the exchanges (with routing keys) it is bound to.
struct Queue {
    name: String,
    arguments: FieldTable,
    bindings: Vec<(String, &'static str)>,
}

/// Messages ready in `queue`, and its consumers.
async fn usage(channel: &Channel, queue: &str) -> lapin::Result<(u32, u32)> {
    let found = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((found.message_count(), found.consumer_count()))
}

/// Declares `queue` and its bindings on `channel`. One that exists with the arguments of an
/// earlier release is recreated when `migrate` allows and it is empty and unused, else left
/// as it is and reported; the refusal closed `channel`, so the rest goes on a new one.
async fn declare_queue(
    connection: &Connection,
    channel: &mut Channel,
    queue: &Queue,
    migrate: Migrate,
) -> lapin::Result<Option<Upgrade>> {
    let name = queue.name.as_str();
    let declared = channel
        .queue_declare(name.into(), durable(), queue.arguments.clone())
        .await;
    let upgrade = match declared {
        Ok(_) => None,
        Err(error)
            if ADDED_QUEUE_ARGUMENTS
                .iter()
                .any(|arg| inequivalent(&error, arg)) =>
        {
            *channel = connection.create_channel().await?;
            let (mut messages, mut consumers) = usage(channel, name).await?;
            if migrate == Migrate::WhenEmpty && messages == 0 && consumers == 0 {
                // Quorum queues cannot be deleted `if-empty`: unbind it first so that nothing
                // new reaches it (a publish meanwhile goes to the alternate exchange), and
                // look again.
                for (exchange, routing_key) in &queue.bindings {
                    channel
                        .queue_unbind(
                            name.into(),
                            exchange.as_str().into(),
                            (*routing_key).into(),
                            FieldTable::default(),
                        )
                        .await?;
                }
                (messages, consumers) = usage(channel, name).await?;
            }
            if migrate == Migrate::WhenEmpty && messages == 0 && consumers == 0 {
                channel
                    .queue_delete(name.into(), QueueDeleteOptions::default())
                    .await?;
                channel
                    .queue_declare(name.into(), durable(), queue.arguments.clone())
                    .await?;
                Some(Upgrade::Queue {
                    name: name.to_owned(),
                })
            } else {
                Some(Upgrade::QueuePending {
                    name: name.to_owned(),
                    messages,
                    consumers,
                })
            }
        }
        Err(error) => return Err(error),
    };
    for (exchange, routing_key) in &queue.bindings {
        channel
            .queue_bind(
                name.into(),
                exchange.as_str().into(),
                (*routing_key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(upgrade)
}

impl std::fmt::Display for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Queue { name } => write!(
                f,
                "recreated queue {name} (it was empty and unused) with the arguments of this \
                 release: it dead-letters at-least-once"
            ),
            Self::QueuePending {
                name,
                messages,
                consumers,
            } => write!(
                f,
                "queue {name} still has the arguments of an earlier release and dead-letters \
                 at-most-once; it holds {messages} messages and {consumers} consumers, so it \
                 was left alone: let it drain, stop its consumers and run `fleet-producer \
                 setup` again, or apply the policy of docs/DELIVERY.md"
            ),
            Self::Exchange { name, alternate } => write!(
                f,
                "recreated exchange {name} with alternate exchange {alternate} \
                 (fleet's bindings to it are made again; bind other queues to it again)"
            ),
        }
    }
}

/// Whether `error` is the broker refusing a declaration because the exchange or queue exists
/// with another value of argument `arg`.
fn inequivalent(error: &lapin::Error, arg: &str) -> bool {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => {
            matches!(
                e.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) && e
                .get_message()
                .as_str()
                .contains(&format!("inequivalent arg '{arg}'"))
        }
        _ => false,
    }
}

/// Declares `exchange` on `channel`; one that exists without its alternate exchange is
/// deleted and declared again (an exchange holds no messages), on a new channel of
/// `connection` since the refusal closed this one.
async fn declare_exchange(
    connection: &Connection,
    channel: &mut Channel,
    exchange: &Exchange,
) -> lapin::Result<Option<Upgrade>> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let arguments = exchange.arguments();
    let name = exchange.name.as_str();
    let declared = channel
        .exchange_declare(
            name.into(),
            exchange.kind.clone(),
            options,
            arguments.clone(),
        )
        .await;
    match (declared, exchange.alternate) {
        (Ok(()), _) => Ok(None),
        (Err(error), Some(alternate)) if inequivalent(&error, "alternate-exchange") => {
            *channel = connection.create_channel().await?;
            channel
                .exchange_delete(name.into(), ExchangeDeleteOptions::default())
                .await?;
            channel
                .exchange_declare(name.into(), exchange.kind.clone(), options, arguments)
                .await?;
            Ok(Some(Upgrade::Exchange {
                name: name.to_owned(),
                alternate,
            }))
        }
        (Err(error), _) => Err(error),
    }
}

/// Declares every exchange, queue and binding, and says what it had to change in a topology
/// an earlier fleet declared, or could not change yet ([`Upgrade`]). Safe to call again with the
/// same settings.
///
/// Declares a delay queue for every retry delay any kind uses ([`Settings::all_retry_delays`]).
///
/// Fails when the broker refuses (permissions, or a queue that exists with other arguments:
/// a `PRECONDITION_FAILED` channel error).
pub async fn declare(
    connection: &Connection,
    all: &Settings,
    migrate: Migrate,
) -> lapin::Result<Vec<Upgrade>> {
    let settings = &all.topology;
    let mut channel = connection.create_channel().await?;
    let mut upgrades = Vec::new();
    for exchange in exchanges(all) {
        upgrades.extend(declare_exchange(connection, &mut channel, &exchange).await?);
    }
    channel
        .queue_declare(
            UNROUTABLE_QUEUE.into(),
            durable(),
            args([("x-queue-type", queue_type(settings.queue_type))]),
        )
        .await?;
    channel
        .queue_bind(
            UNROUTABLE_QUEUE.into(),
            UNROUTABLE_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // A task handed back undelayed (a draining consumer's unstarted tasks) goes straight back
    // to the work queue.
    channel
        .exchange_bind(
            TASKS_EXCHANGE.into(),
            RETRY_EXCHANGE.into(),
            "".into(),
            ExchangeBindOptions::default(),
            args([
                ("x-match", long("all")),
                (crate::envelope::HEADER_DELAY, long(NO_DELAY)),
            ]),
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
        at_least_once(&mut work);
    }
    for shard in 0..settings.work_queues {
        let queue = Queue {
            name: work_queue(shard),
            arguments: work.clone(),
            bindings: vec![(tasks_exchange(shard), "#")],
        };
        upgrades.extend(declare_queue(connection, &mut channel, &queue, migrate).await?);
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
            at_least_once(&mut delay_args);
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

    let mut results = args([
        ("x-queue-type", qtype),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
    ]);
    if settings.queue_type == QueueType::Quorum {
        // A result handed back often enough (collector restarts) goes to fleet.dead, not away:
        // RabbitMQ 4.x would drop it at its default delivery limit of 20 with no target set.
        results.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(RESULTS_DELIVERY_LIMIT),
        );
        results.insert("x-dead-letter-exchange".into(), long(DEAD_EXCHANGE));
        at_least_once(&mut results);
    }
    let queue = Queue {
        name: RESULTS_QUEUE.to_owned(),
        arguments: results,
        bindings: vec![
            (RESULTS_EXCHANGE.to_owned(), ""),
            (BATCHES_EXCHANGE.to_owned(), ""),
        ],
    };
    upgrades.extend(declare_queue(connection, &mut channel, &queue, migrate).await?);
    let _ = channel.close(200, "declared".into()).await;
    Ok(upgrades)
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
    match declare(connection, settings, Migrate::Never).await {
        Ok(upgrades) => {
            for upgrade in upgrades {
                tracing::warn!(%upgrade, "upgraded the topology");
            }
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
    for exchange in exchanges(settings) {
        channel
            .exchange_declare(
                exchange.name.as_str().into(),
                exchange.kind,
                passive_exchange,
                FieldTable::default(),
            )
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
