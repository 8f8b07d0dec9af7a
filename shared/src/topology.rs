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

/// Every queue the topology has: work, delay queues, dead letters, results, unroutable.
pub fn queues(settings: &Settings) -> Vec<String> {
    Topology::of(settings)
        .queues
        .into_iter()
        .map(|queue| queue.name)
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

/// A binding to a queue or an exchange: what `source` routes there, by routing key or, for a
/// headers exchange, by `arguments`.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The exchange it routes from.
    pub source: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its arguments (the headers a headers exchange matches).
    pub arguments: FieldTable,
}

/// One exchange of the topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// Its name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Where the broker routes what this exchange cannot route (`alternate-exchange`).
    pub alternate: Option<&'static str>,
    /// Exchanges bound to route into this one.
    pub bindings: Vec<Binding>,
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

/// One queue of the topology: its arguments and what it is bound to.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// Its declaration's arguments.
    pub arguments: FieldTable,
    /// The exchanges that route into it.
    pub bindings: Vec<Binding>,
}

/// Every exchange, queue, binding and argument of fleet's topology for some settings, each
/// written once: [`declare`], [`check`], `fleet-producer setup` and `status` read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// In the order they are declared.
    pub exchanges: Vec<Exchange>,
    /// Work queues, delay queues, dead letters, results, unroutable: the order `status` shows.
    pub queues: Vec<Queue>,
}

fn bound(source: &str, routing_key: &str, arguments: FieldTable) -> Binding {
    Binding {
        source: source.to_owned(),
        routing_key: routing_key.to_owned(),
        arguments,
    }
}

/// The headers binding of `fleet.retry` that matches `fleet-delay-ms` = `key`.
fn delay_binding(key: &str) -> Binding {
    bound(
        RETRY_EXCHANGE,
        "",
        args([
            ("x-match", long("all")),
            (crate::envelope::HEADER_DELAY, long(key)),
        ]),
    )
}

impl Topology {
    /// The topology of `settings`.
    ///
    /// Every exchange fleet publishes to with `mandatory` has an alternate exchange, so that the
    /// broker never returns a message (docs/DELIVERY.md, "Publishing"): lapin hands a
    /// `basic.return` to whichever confirm it completes next, which need not be the returned
    /// publish's, so a return could fail the wrong publish and let the unroutable one pass as
    /// confirmed. Unroutable tasks, retries, results and manifests land in `fleet.dead` instead,
    /// where `dlq list` shows them and `dlq replay` can send the tasks again; what `fleet.dead`
    /// itself cannot route lands in `fleet.unroutable`. Status beats are neither mandatory nor
    /// kept.
    ///
    /// Every quorum queue that dead-letters does it at-least-once (docs/DELIVERY.md,
    /// "Dead-lettering").
    pub fn of(all: &Settings) -> Self {
        let settings = &all.topology;
        let quorum = settings.queue_type == QueueType::Quorum;
        let exchange = |name: &str, kind, alternate| Exchange {
            name: name.to_owned(),
            kind,
            alternate,
            bindings: Vec::new(),
        };
        let dead = Some(DEAD_EXCHANGE);
        let mut exchanges = vec![
            exchange(UNROUTABLE_EXCHANGE, ExchangeKind::Fanout, None),
            exchange(
                DEAD_EXCHANGE,
                ExchangeKind::Fanout,
                Some(UNROUTABLE_EXCHANGE),
            ),
        ];
        for name in tasks_exchanges(all) {
            let mut tasks = exchange(&name, ExchangeKind::Topic, dead);
            if name == TASKS_EXCHANGE {
                // A task handed back undelayed (a draining consumer's unstarted tasks) goes
                // straight back to the work queue.
                tasks.bindings.push(delay_binding(NO_DELAY));
            }
            exchanges.push(tasks);
        }
        exchanges.extend([
            exchange(RETRY_EXCHANGE, ExchangeKind::Headers, dead),
            exchange(RESULTS_EXCHANGE, ExchangeKind::Fanout, dead),
            exchange(BATCHES_EXCHANGE, ExchangeKind::Fanout, dead),
            exchange(STATUS_EXCHANGE, ExchangeKind::Fanout, None),
        ]);

        let qtype = queue_type(settings.queue_type);
        let mut queues = Vec::new();
        let mut work = args([
            ("x-queue-type", qtype.clone()),
            ("x-dead-letter-exchange", long(DEAD_EXCHANGE)),
        ]);
        if quorum {
            work.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(settings.delivery_limit).unwrap_or(i32::MAX)),
            );
            at_least_once(&mut work);
        }
        for shard in 0..settings.work_queues {
            queues.push(Queue {
                name: work_queue(shard),
                arguments: work.clone(),
                bindings: vec![bound(&tasks_exchange(shard), "#", FieldTable::default())],
            });
        }
        for delay in all.all_retry_delays() {
            // No x-dead-letter-routing-key: an expired retry goes back to fleet.tasks with the
            // routing key it was published with, which is the task kind.
            let mut arguments = args([
                ("x-queue-type", qtype.clone()),
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(i64::try_from(delay).unwrap_or(i64::MAX)),
                ),
                ("x-dead-letter-exchange", long(TASKS_EXCHANGE)),
            ]);
            if quorum {
                at_least_once(&mut arguments);
            }
            queues.push(Queue {
                name: retry_queue(delay),
                arguments,
                bindings: vec![delay_binding(&delay_key(delay))],
            });
        }
        queues.push(Queue {
            name: DEAD_QUEUE.to_owned(),
            arguments: args([("x-queue-type", qtype.clone())]),
            bindings: vec![bound(DEAD_EXCHANGE, "", FieldTable::default())],
        });
        let mut results = args([
            ("x-queue-type", qtype.clone()),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ]);
        if quorum {
            // A result handed back often enough (collector restarts) goes to fleet.dead, not
            // away: RabbitMQ 4.x would drop it at its default delivery limit of 20 with no
            // target set.
            results.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(RESULTS_DELIVERY_LIMIT),
            );
            results.insert("x-dead-letter-exchange".into(), long(DEAD_EXCHANGE));
            at_least_once(&mut results);
        }
        queues.push(Queue {
            name: RESULTS_QUEUE.to_owned(),
            arguments: results,
            bindings: vec![
                bound(RESULTS_EXCHANGE, "", FieldTable::default()),
                bound(BATCHES_EXCHANGE, "", FieldTable::default()),
            ],
        });
        queues.push(Queue {
            name: UNROUTABLE_QUEUE.to_owned(),
            arguments: args([("x-queue-type", qtype)]),
            bindings: vec![bound(UNROUTABLE_EXCHANGE, "", FieldTable::default())],
        });
        Self { exchanges, queues }
    }
}

/// Every exchange, in the order they are declared ([`Topology::of`]).
pub fn exchanges(settings: &Settings) -> Vec<Exchange> {
    Topology::of(settings).exchanges
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
                for binding in &queue.bindings {
                    channel
                        .queue_unbind(
                            name.into(),
                            binding.source.as_str().into(),
                            binding.routing_key.as_str().into(),
                            binding.arguments.clone(),
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
    for binding in &queue.bindings {
        channel
            .queue_bind(
                name.into(),
                binding.source.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                binding.arguments.clone(),
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
    let topology = Topology::of(all);
    let mut channel = connection.create_channel().await?;
    let mut upgrades = Vec::new();
    for exchange in &topology.exchanges {
        upgrades.extend(declare_exchange(connection, &mut channel, exchange).await?);
    }
    for queue in &topology.queues {
        upgrades.extend(declare_queue(connection, &mut channel, queue, migrate).await?);
    }
    for exchange in &topology.exchanges {
        for binding in &exchange.bindings {
            channel
                .exchange_bind(
                    exchange.name.as_str().into(),
                    binding.source.as_str().into(),
                    binding.routing_key.as_str().into(),
                    ExchangeBindOptions::default(),
                    binding.arguments.clone(),
                )
                .await?;
        }
    }
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
    let topology = Topology::of(settings);
    for exchange in topology.exchanges {
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
    for queue in topology.queues {
        channel
            .queue_declare(
                queue.name.as_str().into(),
                passive_queue,
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table's entries as `key=value` text, sorted, for comparing at a glance.
    fn entries(table: &FieldTable) -> Vec<String> {
        let mut entries: Vec<String> = table
            .inner()
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::LongInt(n) => n.to_string(),
                    AMQPValue::LongLongInt(n) => n.to_string(),
                    AMQPValue::Boolean(b) => b.to_string(),
                    other => format!("{other:?}"),
                };
                format!("{key}={value}")
            })
            .collect();
        entries.sort();
        entries
    }

    fn binding(binding: &Binding) -> String {
        let mut text = format!("{} {:?}", binding.source, binding.routing_key);
        for entry in entries(&binding.arguments) {
            text.push(' ');
            text.push_str(&entry);
        }
        text
    }

    #[test]
    fn the_default_topology_is_pinned() {
        let settings = Settings::load_from(None, Vec::new()).expect("defaults");
        let topology = Topology::of(&settings);
        let exchanges: Vec<(String, String, Option<&str>, Vec<String>)> = topology
            .exchanges
            .iter()
            .map(|e| {
                (
                    e.name.clone(),
                    format!("{:?}", e.kind),
                    e.alternate,
                    e.bindings.iter().map(binding).collect(),
                )
            })
            .collect();
        let none = Vec::<String>::new;
        assert_eq!(
            exchanges,
            [
                ("fleet.unroutable", "Fanout", None, none()),
                ("fleet.dead", "Fanout", Some("fleet.unroutable"), none()),
                (
                    "fleet.tasks",
                    "Topic",
                    Some("fleet.dead"),
                    vec![r#"fleet.retry "" fleet-delay-ms=0 x-match=all"#.to_owned()],
                ),
                ("fleet.retry", "Headers", Some("fleet.dead"), none()),
                ("fleet.results", "Fanout", Some("fleet.dead"), none()),
                ("fleet.batches", "Fanout", Some("fleet.dead"), none()),
                ("fleet.status", "Fanout", None, none()),
            ]
            .map(|(name, kind, alternate, bindings)| (
                name.to_owned(),
                kind.to_owned(),
                alternate,
                bindings
            ))
        );

        let at_least_once = [
            "x-dead-letter-strategy=at-least-once",
            "x-overflow=reject-publish",
        ];
        let queue = |name: &str| {
            topology
                .queues
                .iter()
                .find(|q| q.name == name)
                .unwrap_or_else(|| panic!("{name} is in the topology"))
        };
        let names: Vec<&str> = topology.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "fleet.tasks.default",
                "fleet.retry.1000ms",
                "fleet.retry.5000ms",
                "fleet.retry.30000ms",
                "fleet.retry.120000ms",
                "fleet.retry.600000ms",
                "fleet.dead",
                "fleet.results",
                "fleet.unroutable",
            ]
        );
        // Each queue's arguments (with the two of at-least-once dead-lettering) and bindings.
        let pinned = [
            (
                "fleet.tasks.default",
                vec![
                    "x-dead-letter-exchange=fleet.dead",
                    "x-delivery-limit=5",
                    "x-queue-type=quorum",
                ],
                vec![r##"fleet.tasks "#""##],
            ),
            (
                "fleet.retry.5000ms",
                vec![
                    "x-dead-letter-exchange=fleet.tasks",
                    "x-message-ttl=5000",
                    "x-queue-type=quorum",
                ],
                vec![r#"fleet.retry "" fleet-delay-ms=5000 x-match=all"#],
            ),
            (
                "fleet.results",
                vec![
                    "x-dead-letter-exchange=fleet.dead",
                    "x-delivery-limit=1000",
                    "x-queue-type=quorum",
                    "x-single-active-consumer=true",
                ],
                vec![r#"fleet.results """#, r#"fleet.batches """#],
            ),
        ];
        for (name, mut arguments, bindings) in pinned {
            arguments.extend(at_least_once);
            arguments.sort_unstable();
            assert_eq!(entries(&queue(name).arguments), arguments, "{name}");
            let bound: Vec<String> = queue(name).bindings.iter().map(binding).collect();
            assert_eq!(bound, bindings, "{name}");
        }
        for name in ["fleet.dead", "fleet.unroutable"] {
            assert_eq!(entries(&queue(name).arguments), ["x-queue-type=quorum"]);
        }
    }

    #[test]
    fn shards_and_classic_queues_change_only_what_they_name() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let sharded =
            Settings::load_from(None, env(&[("FLEET_TOPOLOGY__WORK_QUEUES", "3")])).expect("valid");
        let topology = Topology::of(&sharded);
        let tasks: Vec<&str> = topology
            .exchanges
            .iter()
            .filter(|e| e.kind == ExchangeKind::Topic)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(tasks, ["fleet.tasks", "fleet.tasks.1", "fleet.tasks.2"]);
        for shard in 1..3 {
            let queue = topology
                .queues
                .iter()
                .find(|q| q.name == work_queue(shard))
                .expect("a work queue per shard");
            assert_eq!(queue.bindings[0].source, tasks_exchange(shard));
        }
        let classic = Settings::load_from(None, env(&[("FLEET_TOPOLOGY__QUEUE_TYPE", "classic")]))
            .expect("valid");
        for queue in Topology::of(&classic).queues {
            let entries = entries(&queue.arguments);
            assert!(
                entries.contains(&"x-queue-type=classic".to_owned()),
                "{entries:?}"
            );
            assert!(
                !entries.iter().any(|e| e.starts_with("x-delivery-limit")
                    || e.starts_with("x-dead-letter-strategy")),
                "quorum-only arguments on {}: {entries:?}",
                queue.name
            );
        }
    }
}
