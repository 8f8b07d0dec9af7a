//! `fleet-bench`: the real fleet (producer, one consumer process with default workers, collector)
//! against the local broker, and in the same run a plain lapin pipeline as the baseline.
//!
//! Both sides use persistent messages on quorum queues, up to 1,024 confirms outstanding when
//! publishing tasks, one confirmed result publish per task, and an ack only after that confirm;
//! the baseline's consumer has the fleet consumer's prefetch. The last line printed is:
//! `fleet-bench tasks=N fleet_tps=X baseline_tps=Y ratio=R p50_ms=A p99_ms=B client_cpu_us_per_task=C baseline_client_cpu_us_per_task=D`
//! and the lines before it give CPU per task of each process and of the broker, and the peak
//! RSS of each fleet process. Latency there is submit to stored, from each task id's UUIDv7
//! timestamp (millisecond precision) to the collector's commit time.
//!
//! Other modes (docs/BENCHMARKS.md): `--paced RATE` (latency at a steady rate, submit time
//! taken to the microsecond, and its three legs; then in the same run the baseline at that rate,
//! with plain messages and with the fleet's), `--workers` (the worker model, in rounds, with the
//! cores each process kept busy),
//! `--paced RATE --hops N` (the broker alone: N plain lapin streams at RATE through quorum
//! queues, the floor under `--paced`),
//! `--shapes` (the baseline with one feature of the fleet's messages and queues at a time: the
//! broker's CPU per task for each; `--rounds R`, medians),
//! `--work-queues K`, `--strace DIR` (syscalls per task), `--soak` (nothing lost under chaos),
//! and `--own-broker ERL_ARGS` (any of these against a private node with those VM flags).
//! `--results-per-message N` and `--set FLEET_SECTION__KEY=VALUE` set the services' settings in
//! every mode.
//! Build the binaries in release mode first (`make bench` does).

use anyhow::{Context as _, bail};
use clap::Parser;
use fleet_producer::client::CollectorClient;
use fleet_producer::collector::store::Store;
use fleet_producer::submit;
use fleet_shared::envelope::{self, Status, Task, TaskResult};
use fleet_shared::publisher::Outgoing;
use fleet_shared::settings::Settings;
use fleet_shared::trace::TraceParent;
use fleet_tests::Vhost;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Benchmark the fleet against a plain lapin pipeline.
#[derive(Parser)]
struct Args {
    /// `square` tasks per side.
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Prefetch of the baseline's consumer [default: the fleet consumer's, workers x 4].
    #[arg(long)]
    baseline_prefetch: Option<u16>,
    /// Instead of the comparison, soak: steady load for this long (e.g. `5m`), then count
    /// lost and duplicated results and report each process's RSS at start and end.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// With --soak: kill -9 a consumer (and start it again) or cut every broker connection,
    /// at random every 3 to 10 seconds.
    #[arg(long, requires = "soak")]
    chaos: bool,
    /// With --soak: tasks per second offered.
    #[arg(long, default_value_t = 500, requires = "soak")]
    rate: u64,
    /// With --soak: consumer processes.
    #[arg(long, default_value_t = 2, requires = "soak")]
    consumers: usize,
    /// Spread the fleet's tasks over this many work queues (`topology.work_queues`).
    #[arg(long, default_value_t = 1)]
    work_queues: usize,
    /// Results the consumer may send in one message (`consumer.results_per_message`; the
    /// services' default).
    #[arg(long, default_value_t = 256)]
    results_per_message: usize,
    /// Any other setting of the fleet's services, as `FLEET_SECTION__KEY=VALUE` (repeatable).
    #[arg(long = "set", value_name = "FLEET_SECTION__KEY=VALUE", value_parser = env_setting)]
    settings: Vec<(String, String)>,
    /// Run the fleet's three processes under `strace -f -c` (summaries in this directory) and
    /// report syscalls per task; times and CPU are then not comparable.
    #[arg(long)]
    strace: Option<PathBuf>,
    /// Instead of the comparison: latency at this many tasks a second, for --seconds; then the
    /// baseline at the same rate, with plain messages and with the fleet's.
    #[arg(long)]
    paced: Option<u64>,
    /// With --paced: how long.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// With --paced: instead of the fleet, the broker alone, as the floor under the fleet's
    /// latency: this many plain lapin streams at once, each publishing RATE persistent
    /// messages a second to its own quorum queue and consuming them, timed publish to delivery.
    #[arg(long, requires = "paced")]
    hops: Option<usize>,
    /// Instead of the comparison: the worker model (compute tasks with 1 and 2 workers, 100 ms
    /// I/O tasks from one consumer, both at once).
    #[arg(long)]
    workers: bool,
    /// With --workers: `primes` below this (11-15 ms of CPU each on the first machine of
    /// docs/BENCHMARKS.md, 7.4-9 ms on the one of sessions 13-14, where 26,000,000 takes about
    /// 10 ms).
    #[arg(long, default_value_t = 20_000_000)]
    below: u64,
    /// Run against a RabbitMQ node of the bench's own, started with these Erlang VM flags
    /// (e.g. `"+sbwt none +sbwtdcpu none +sbwtdio none"`), instead of the local broker.
    #[arg(long, value_name = "ERL_ARGS")]
    own_broker: Option<String>,
    /// With --workers: rounds of 1 and then 2 workers (600 compute tasks each; 3 rounds unless
    /// given). With --shapes: rounds of every variant (3). With --paced: rounds of the fleet and
    /// both baselines (1).
    #[arg(long)]
    rounds: Option<u64>,
    /// Instead of the comparison: the plain pipeline with one feature of the fleet's messages
    /// and queues at a time (exchanges, properties, user_id, bodies, mandatory, queue
    /// arguments), then all of them, --tasks each: the broker's CPU per task for each.
    #[arg(long)]
    shapes: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(erl_args) = &args.own_broker {
        return on_own_broker(erl_args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(duration) = args.soak {
        return runtime.block_on(soak(fleet_tests::soak::Plan {
            duration,
            rate: args.rate,
            consumers: args.consumers,
            chaos: args.chaos,
            settings: settings_of(&args),
        }));
    }
    let owned = settings_of(&args);
    let extra = borrowed(&owned);
    if let Some(rate) = args.paced {
        if let Some(streams) = args.hops {
            return runtime.block_on(hops(&Vhost::new(), streams, rate, args.seconds));
        }
        let rounds = args.rounds.unwrap_or(1);
        return runtime.block_on(paced(&Vhost::new(), rate, args.seconds, rounds, &extra));
    }
    if args.workers {
        return runtime.block_on(workers(
            &Vhost::new(),
            args.below,
            600,
            args.rounds.unwrap_or(3),
            6_000,
            &extra,
        ));
    }
    if args.shapes {
        return runtime.block_on(shapes(
            args.tasks,
            args.rounds.unwrap_or(3),
            args.baseline_prefetch,
        ));
    }
    runtime.block_on(bench(args))
}

/// `--shapes`: rounds of [`Shape::variants`], each in a vhost of its own; prints each run, then
/// the median tasks/s and CPU per task of each variant over the rounds (medians, because a
/// single run on a noisy machine can be far off).
async fn shapes(tasks: u64, rounds: u64, prefetch: Option<u16>) -> anyhow::Result<()> {
    let broker = Some(broker_pid().context("the broker's pid (rabbitmqctl eval)")?);
    let variants = Shape::variants();
    // Per variant: tasks/s, client and broker CPU per task, one entry per round.
    let mut runs = vec![[Vec::new(), Vec::new(), Vec::new()]; variants.len()];
    for round in 1..=rounds {
        // Each round starts one variant later, so none always runs first (or right after
        // the same neighbour) on a machine whose speed drifts.
        let start = usize::try_from(round).unwrap_or(0) % variants.len();
        for i in (start..variants.len()).chain(0..start) {
            let ((name, shape), figures) = (&variants[i], &mut runs[i]);
            let vhost = Vhost::new();
            let settings = vhost.settings(&[]);
            let prefetch = prefetch.unwrap_or_else(|| settings.prefetch());
            let (own_before, busy) = (own_cpu_us()?, Busy::of(broker));
            let (elapsed, _) = baseline(&settings, tasks, prefetch, *shape, None)
                .await
                .with_context(|| format!("shape {name}"))?;
            let per_task = |us: f64| us / tasks as f64;
            let client = per_task(own_cpu_us()? - own_before);
            let broker_us = per_task(busy.cpu_us());
            let tps = rate(tasks, elapsed);
            println!(
                "round {round} {name:<10} {tasks} tasks: {tps:.0} tasks/s; CPU us/task client {client:.1} broker {broker_us:.1}"
            );
            for (figure, value) in figures.iter_mut().zip([tps, client, broker_us]) {
                figure.push(value);
            }
        }
    }
    let plain_broker = median(&mut runs[0][2]);
    for ((name, _), [tps, client, broker]) in variants.iter().zip(&mut runs) {
        let broker = median(broker);
        println!(
            "fleet-bench shapes variant={name} rounds={rounds} tps={:.0} client_us={:.1} broker_us={broker:.1} broker_over_plain_us={:.1}",
            median(tps),
            median(client),
            broker - plain_broker,
        );
    }
    Ok(())
}

/// Starts a private node and runs this bench again against it (the same arguments but
/// `--own-broker`): the tests' helpers find the broker through `FLEET_TEST_AMQP_HOST`, and
/// rabbitmqctl through `RABBITMQ_NODENAME`.
fn on_own_broker(erl_args: &str) -> anyhow::Result<()> {
    let node = fleet_tests::node::Node::start_with_erl_args(erl_args);
    println!(
        "own broker {} with `{erl_args}` on {}",
        node.name,
        node.host()
    );
    let mut skip_value = false;
    let rest: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|arg| {
            let own = arg.to_string_lossy();
            let keep = !skip_value && own != "--own-broker" && !own.starts_with("--own-broker=");
            skip_value = own == "--own-broker";
            keep
        })
        .collect();
    let status = Command::new(std::env::current_exe()?)
        .args(rest)
        .env("FLEET_TEST_AMQP_HOST", node.host())
        .env("RABBITMQ_NODENAME", &node.name)
        .status()?;
    anyhow::ensure!(status.success(), "the bench failed: {status}");
    Ok(())
}

async fn soak(plan: fleet_tests::soak::Plan) -> anyhow::Result<()> {
    let r = fleet_tests::soak::run(plan.clone()).await?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "fleet-soak duration_s={} chaos={} settings={:?} rate={} tasks={} lost={} duplicates={} failed={} kills={} cuts={} settle_s={:.1} rss_mib consumer={:.1}->{:.1} collector={:.1}->{:.1} producer={:.1}->{:.1}",
        plan.duration.as_secs(),
        plan.chaos,
        plan.settings,
        plan.rate,
        r.tasks,
        r.lost,
        r.duplicates,
        r.failed,
        r.kills,
        r.cuts,
        r.settle.as_secs_f64(),
        mib(r.rss_kib[0].0),
        mib(r.rss_kib[0].1),
        mib(r.rss_kib[1].0),
        mib(r.rss_kib[1].1),
        mib(r.rss_kib[2].0),
        mib(r.rss_kib[2].1),
    );
    if r.lost > 0 {
        bail!("{} tasks lost", r.lost);
    }
    Ok(())
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let prefetch = args
        .baseline_prefetch
        .unwrap_or_else(|| settings.prefetch());
    let broker = broker_pid();
    let (own_before, busy) = (own_cpu_us()?, Busy::of(broker));
    let (baseline, _) = baseline(&settings, args.tasks, prefetch, Shape::default(), None)
        .await
        .context("baseline")?;
    let per_task = |us: f64| us / args.tasks as f64;
    let baseline_cpu = per_task(own_cpu_us()? - own_before);
    let baseline_broker = per_task(busy.cpu_us());
    println!(
        "baseline: {} tasks in {:.2}s = {:.0} tasks/s; prefetch {prefetch}; CPU us/task client {baseline_cpu:.1} broker {baseline_broker:.1}",
        args.tasks,
        baseline.as_secs_f64(),
        rate(args.tasks, baseline)
    );
    let owned = settings_of(&args);
    let extra = borrowed(&owned);
    let busy = Busy::of(broker);
    let fleet = fleet(&vhost, args.tasks, &extra, args.strace.as_deref())
        .await
        .context("fleet")?;
    let fleet_broker = per_task(busy.cpu_us());
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "fleet: {} tasks in {:.2}s = {:.0} tasks/s; work queues {}; results per message {} (mean {:.1}); results per store transaction {:.1}; CPU us/task producer {:.1} consumer {:.1} collector {:.1} broker {fleet_broker:.1}; peak RSS MiB producer {:.1} consumer {:.1} collector {:.1}",
        args.tasks,
        fleet.elapsed.as_secs_f64(),
        rate(args.tasks, fleet.elapsed),
        args.work_queues,
        args.results_per_message,
        fleet
            .result_messages
            .map_or(f64::NAN, |messages| args.tasks as f64 / messages),
        fleet
            .transactions
            .map_or(f64::NAN, |transactions| args.tasks as f64 / transactions),
        per_task(fleet.cpu_us[0]),
        per_task(fleet.cpu_us[1]),
        per_task(fleet.cpu_us[2]),
        mib(fleet.peak_kib[0]),
        mib(fleet.peak_kib[1]),
        mib(fleet.peak_kib[2]),
    );
    if let Some([producer, consumer, collector]) = fleet.syscalls {
        let per = |n: u64| n as f64 / args.tasks as f64;
        println!(
            "syscalls/task producer {:.2} consumer {:.2} collector {:.2} (strace -c summaries in {})",
            per(producer),
            per(consumer),
            per(collector),
            args.strace.as_deref().unwrap_or(Path::new("?")).display()
        );
    }
    let (fleet_tps, baseline_tps) = (rate(args.tasks, fleet.elapsed), rate(args.tasks, baseline));
    println!(
        "fleet-bench tasks={} fleet_tps={:.0} baseline_tps={:.0} ratio={:.2} p50_ms={:.1} p99_ms={:.1} client_cpu_us_per_task={:.1} baseline_client_cpu_us_per_task={baseline_cpu:.1}",
        args.tasks,
        fleet_tps,
        baseline_tps,
        fleet_tps / baseline_tps,
        fleet.p50_ms,
        fleet.p99_ms,
        per_task(fleet.cpu_us.iter().sum::<f64>()),
    );
    Ok(())
}

/// The fleet's settings from `--set`, `--work-queues` and `--results-per-message`, the last two
/// left out at their default, so that binaries from before a setting existed can be measured with this bench too.
fn settings_of(args: &Args) -> Vec<(String, String)> {
    let mut settings = args.settings.clone();
    if args.work_queues != 1 {
        settings.push((
            "FLEET_TOPOLOGY__WORK_QUEUES".to_owned(),
            args.work_queues.to_string(),
        ));
    }
    settings.push((
        "FLEET_CONSUMER__RESULTS_PER_MESSAGE".to_owned(),
        args.results_per_message.to_string(),
    ));
    settings
}

fn borrowed(settings: &[(String, String)]) -> Vec<(&str, &str)> {
    settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// `--set FLEET_SECTION__KEY=VALUE`.
fn env_setting(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if key.starts_with("FLEET_") => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not FLEET_SECTION__KEY=VALUE")),
    }
}

fn rate(tasks: u64, elapsed: Duration) -> f64 {
    tasks as f64 / elapsed.as_secs_f64()
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// What the plain pipeline's messages borrow from the fleet's, one thing at a time, for
/// `--shapes`: where the broker's extra work per fleet task comes from. The default is the
/// plain baseline of the comparison.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    /// Tasks through a topic exchange bound with `#`, results through a fanout exchange, as
    /// `fleet.tasks` and `fleet.results` (instead of the default exchange).
    exchanges: bool,
    /// The fleet's AMQP properties and headers on tasks and results.
    properties: bool,
    /// AMQP `user_id` on every message (the broker checks it against the login).
    user_id: bool,
    /// The fleet's JSON bodies (a `square` task, its result) instead of a few digits.
    bodies: bool,
    /// Every publish `mandatory`.
    mandatory: bool,
    /// The fleet's queue arguments: delivery limit and dead-letter exchange on the task queue,
    /// single active consumer on the result queue.
    queue_args: bool,
}

impl Shape {
    const ALL: Self = Self {
        exchanges: true,
        properties: true,
        user_id: true,
        bodies: true,
        mandatory: true,
        queue_args: true,
    };

    /// Each variant `--shapes` runs: the plain pipeline, each feature alone, all of them.
    fn variants() -> [(&'static str, Self); 8] {
        let only = |set: fn(&mut Self)| {
            let mut shape = Self::default();
            set(&mut shape);
            shape
        };
        [
            ("plain", Self::default()),
            ("exchanges", only(|s| s.exchanges = true)),
            ("properties", only(|s| s.properties = true)),
            ("user_id", only(|s| s.user_id = true)),
            ("bodies", only(|s| s.bodies = true)),
            ("mandatory", only(|s| s.mandatory = true)),
            ("queue_args", only(|s| s.queue_args = true)),
            ("all", Self::ALL),
        ]
    }
}

/// What a shape's pipeline sends: a fleet `square` task and its result, built once and sent
/// for every task where the shape borrows their bodies or properties (the broker does not look
/// at ids), so that every variant's clients do about the same work per task and the broker's
/// figures differ by the messages alone.
struct Messages {
    shape: Shape,
    task: Outgoing,
    result: Outgoing,
    user: String,
    /// Paced runs time each task: its number goes in the task's `message_id` (36 digits, the
    /// length of the fleet's ids) and comes back in its result's `correlation_id`.
    numbered: bool,
}

impl Messages {
    fn new(shape: Shape, user: String, numbered: bool) -> Self {
        let trace = TraceParent::root();
        let batch = uuid::Uuid::now_v7().to_string();
        let task = Task::new(
            uuid::Uuid::now_v7().to_string(),
            "square".to_owned(),
            Some(batch.clone()),
            serde_json::json!({ "n": 3411 }),
        );
        let now = chrono::Utc::now();
        let result = TaskResult {
            v: envelope::VERSION,
            task_id: task.id.clone(),
            batch: Some(batch),
            kind: "square".to_owned(),
            status: Status::Ok,
            output: Some(serde_json::json!({ "n": 3411, "square": 11_634_921 })),
            error: None,
            attempts: 1,
            worker: format!("{}/0", fleet_shared::status::process_id()),
            started_at: now,
            finished_at: now,
            published_by: Some(user.clone()),
            traceparent: Some(trace.to_string()),
        };
        Self {
            shape,
            task: Outgoing::task(&task).traced(&trace),
            result: Outgoing::result(&result),
            user,
            numbered,
        }
    }

    /// Body and properties (persistent) of task `n`.
    fn task(&self, n: u64) -> (Vec<u8>, BasicProperties) {
        let (body, properties) = self.message(&self.task, || n.to_string().into_bytes());
        if self.numbered {
            return (body, properties.with_message_id(format!("{n:036}").into()));
        }
        (body, properties)
    }

    /// Body and properties (persistent) of the result of `task`.
    fn result(&self, task: &lapin::message::Delivery) -> (Vec<u8>, BasicProperties) {
        let (body, properties) = self.message(&self.result, || {
            let n: u64 = std::str::from_utf8(&task.data)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            format!("{n} {}", n.wrapping_mul(n)).into_bytes()
        });
        match task.properties.message_id() {
            Some(id) if self.numbered => (body, properties.with_correlation_id(id.clone())),
            _ => (body, properties),
        }
    }

    /// The number of the task whose result has these properties (paced runs).
    fn number_of(result: &BasicProperties) -> Option<usize> {
        result.correlation_id().as_ref()?.as_str().parse().ok()
    }

    fn message(
        &self,
        fleet: &Outgoing,
        plain_body: impl FnOnce() -> Vec<u8>,
    ) -> (Vec<u8>, BasicProperties) {
        let body = if self.shape.bodies {
            fleet.body.clone()
        } else {
            plain_body()
        };
        let properties = if self.shape.properties {
            fleet.properties.clone()
        } else {
            BasicProperties::default()
        };
        let mut properties = properties.with_delivery_mode(2);
        if self.shape.user_id {
            properties = properties.with_user_id(self.user.as_str().into());
        }
        (body, properties)
    }
}

/// The arguments of the shape's task queue (`of_tasks`) or result queue: quorum, and the
/// fleet's when the shape says so.
fn queue_args(shape: Shape, of_tasks: bool) -> FieldTable {
    let mut args = quorum();
    if shape.queue_args && of_tasks {
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(20));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("bench.dead".into()),
        );
    } else if shape.queue_args {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// Plain lapin: publish N persistent tasks with <= 1024 confirms outstanding; a consumer
/// publishes one confirmed result per task, then acks; a result reader acks each result.
/// `shape` gives the messages and queues features of the fleet's (none for the comparison).
/// With `pace`, tasks go out at that many a second and each task's time from its publish to
/// its result's arrival is returned (in ms, in arrival order).
async fn baseline(
    settings: &Settings,
    tasks: u64,
    prefetch: u16,
    shape: Shape,
    pace: Option<u64>,
) -> anyhow::Result<(Duration, Vec<f64>)> {
    let url = settings.amqp_uri()?.to_string();
    let user = settings.broker_user().unwrap_or_default();
    let connect = || Connection::connect(&url, ConnectionProperties::default());
    let (producer, worker, reader) = (connect().await?, connect().await?, connect().await?);
    let setup = producer.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for (queue, of_tasks) in [("bench.tasks", true), ("bench.results", false)] {
        setup
            .queue_declare(queue.into(), durable, queue_args(shape, of_tasks))
            .await?;
    }
    // Exchanges named as the queues they feed, as fleet.results is.
    let ((task_exchange, task_key), (result_exchange, result_key)) = if shape.exchanges {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (name, kind, key) in [
            ("bench.tasks", ExchangeKind::Topic, "#"),
            ("bench.results", ExchangeKind::Fanout, ""),
        ] {
            setup
                .exchange_declare(name.into(), kind, durable, FieldTable::default())
                .await?;
            setup
                .queue_bind(
                    name.into(),
                    name.into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        (("bench.tasks", "square"), ("bench.results", "square"))
    } else {
        (("", "bench.tasks"), ("", "bench.results"))
    };
    let options = BasicPublishOptions {
        mandatory: shape.mandatory,
        ..BasicPublishOptions::default()
    };

    let work_in = worker.create_channel().await?;
    work_in
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let work_out = worker.create_channel().await?;
    work_out
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut deliveries = work_in
        .basic_consume(
            "bench.tasks".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let messages = std::sync::Arc::new(Messages::new(shape, user, pace.is_some()));
    let for_results = std::sync::Arc::clone(&messages);
    let work_tag = deliveries.tag();
    let work = tokio::spawn(async move {
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery?;
            let out = work_out.clone();
            let messages = std::sync::Arc::clone(&for_results);
            tokio::spawn(async move {
                let (body, properties) = messages.result(&delivery);
                let confirm = out
                    .basic_publish(
                        result_exchange.into(),
                        result_key.into(),
                        options,
                        &body,
                        properties,
                    )
                    .await;
                if let Ok(confirm) = confirm
                    && confirm.await.is_ok_and(|c| c.is_ack())
                {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            });
        }
        anyhow::Ok(())
    });

    let read = reader.create_channel().await?;
    read.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut results = read
        .basic_consume(
            "bench.results".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // With a pace: each task's publish time, µs after `started`, by task number.
    let sent: std::sync::Arc<[std::sync::atomic::AtomicU64]> = (0..pace.map_or(0, |_| tasks))
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let sent_at = std::sync::Arc::clone(&sent);
    let started = Instant::now();
    let publish = producer.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let publishing = tokio::spawn(async move {
        let mut pending = futures_util::stream::FuturesUnordered::new();
        for n in 0..tasks {
            if pending.len() >= 1024 {
                pending.next().await;
            }
            if let Some(rate) = pace {
                let due = started + Duration::from_micros(n * 1_000_000 / rate);
                tokio::time::sleep_until(due.into()).await;
                if let Some(at) = usize::try_from(n).ok().and_then(|i| sent_at.get(i)) {
                    at.store(
                        u64::try_from(started.elapsed().as_micros())?,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }
            let (body, properties) = messages.task(n);
            let confirm = publish
                .basic_publish(
                    task_exchange.into(),
                    task_key.into(),
                    options,
                    &body,
                    properties,
                )
                .await?;
            pending.push(confirm);
        }
        while pending.next().await.is_some() {}
        anyhow::Ok(())
    });
    let mut seen = 0;
    let mut ms = Vec::with_capacity(sent.len());
    while seen < tasks {
        let Some(delivery) = tokio::time::timeout(Duration::from_secs(60), results.next()).await?
        else {
            bail!("result stream ended");
        };
        let delivery = delivery?;
        if pace.is_some() {
            let at = Messages::number_of(&delivery.properties)
                .and_then(|n| sent.get(n))
                .context("a result without its task's number")?
                .load(std::sync::atomic::Ordering::Relaxed);
            let now = u64::try_from(started.elapsed().as_micros())?;
            ms.push(now.saturating_sub(at) as f64 / 1000.0);
        }
        delivery.ack(BasicAckOptions::default()).await?;
        seen += 1;
    }
    let elapsed = started.elapsed();
    publishing.await??;
    // Both consumers cancelled, then their connections closed, before the queues go: a queue
    // deleted under a consumer makes the broker cancel it, which lapin logs as an error.
    work_in
        .basic_cancel(work_tag, BasicCancelOptions::default())
        .await?;
    read.basic_cancel(results.tag(), BasicCancelOptions::default())
        .await?;
    work.await??;
    for connection in [worker, reader] {
        let _ = connection.close(200, "done".into()).await;
    }
    for queue in ["bench.tasks", "bench.results"] {
        setup
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await?;
    }
    if shape.exchanges {
        for exchange in ["bench.tasks", "bench.results"] {
            setup
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await?;
        }
    }
    let _ = producer.close(200, "done".into()).await;
    Ok((elapsed, ms))
}

/// Figures of one fleet batch.
struct FleetRun {
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU (user + sys) in microseconds: producer, consumer, collector.
    cpu_us: [f64; 3],
    /// Peak RSS (VmHWM) in KiB: producer, consumer, collector.
    peak_kib: [u64; 3],
    /// Syscalls made: producer, consumer, collector (with `--strace` only).
    syscalls: Option<[u64; 3]>,
    /// Messages the consumer sent to `fleet.results` (`None` from a consumer without the metric).
    result_messages: Option<f64>,
    /// The collector's store transactions (`None` from a collector without the metric).
    transactions: Option<f64>,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the workspace binaries first",
        path.display()
    );
    Ok(path)
}

/// A service binary, under `strace -f -c` when `strace` names an output file.
fn command(name: &str, strace: Option<&Path>) -> anyhow::Result<Command> {
    let binary = sibling(name)?;
    let mut command = match strace {
        None => Command::new(binary),
        Some(out) => {
            let mut command = Command::new("strace");
            command.args(["-f", "-c", "-o"]).arg(out).arg(binary);
            command
        }
    };
    // The services take every FLEET_* variable as a setting, and this one is the bench's.
    command.env_remove("FLEET_TEST_AMQP_HOST");
    Ok(command)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime (fields 14, 15) or cutime + cstime (16, 17) of /proc/<pid>/stat, in µs.
fn cpu_us(stat: &Path, children: bool) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(stat)?;
    let after_name = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<f64> = after_name
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // after_name starts at field 3 (state), so field k is at index k - 3.
    let (a, b) = if children { (13, 14) } else { (11, 12) };
    Ok(
        (fields.get(a).copied().unwrap_or(0.0) + fields.get(b).copied().unwrap_or(0.0))
            / clock_ticks()
            * 1e6,
    )
}

fn pid_cpu_us(pid: u32) -> f64 {
    cpu_us(&PathBuf::from(format!("/proc/{pid}/stat")), false).unwrap_or(0.0)
}

/// CPU (user + sys) of `pid`'s threads so far, in µs: those named `fleet-worker-*` (the
/// compute pool) and all the others.
fn pool_and_rest_cpu_us(pid: u32) -> (f64, f64) {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0.0, 0.0);
    };
    threads.flatten().fold((0.0, 0.0), |(pool, rest), thread| {
        let dir = thread.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let us = cpu_us(&dir.join("stat"), false).unwrap_or(0.0);
        if name.starts_with("fleet-worker-") {
            (pool + us, rest)
        } else {
            (pool, rest + us)
        }
    })
}

/// This machine's idle and stolen time so far (the `cpu` line of /proc/stat: idle, iowait,
/// steal), in µs.
fn machine_idle_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    [3, 4, 7]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0.0))
        .sum::<f64>()
        / clock_ticks()
        * 1e6
}

/// Peak resident memory (VmHWM) of `pid`, in KiB.
fn peak_kib(pid: u32) -> u64 {
    fleet_tests::process::status_kib(&pid.to_string(), "VmHWM")
}

/// The broker's OS process, to count its CPU beside ours.
fn broker_pid() -> Option<u32> {
    let out = Command::new("rabbitmqctl")
        .args(["eval", "list_to_integer(os:getpid())."])
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// This process's CPU (user + sys) so far, in microseconds.
fn own_cpu_us() -> anyhow::Result<f64> {
    cpu_us(Path::new("/proc/self/stat"), false)
}

/// A process's CPU from a moment on: the broker's (NaN when its pid is unknown), a fleet
/// service's or this one's.
struct Busy {
    pid: Option<u32>,
    cpu_us_then: f64,
    since: Instant,
}

impl Busy {
    /// The broker's from now, finding its pid first (`rabbitmqctl eval`, about a second).
    fn broker() -> Self {
        Self::of(broker_pid())
    }

    /// This process's from now.
    fn this_process() -> Self {
        Self::of(Some(std::process::id()))
    }

    /// From now, for the process `pid`.
    fn of(pid: Option<u32>) -> Self {
        Self {
            pid,
            cpu_us_then: pid.map_or(f64::NAN, pid_cpu_us),
            since: Instant::now(),
        }
    }

    /// The process's CPU (user + sys) since then, in microseconds.
    fn cpu_us(&self) -> f64 {
        self.pid.map_or(f64::NAN, pid_cpu_us) - self.cpu_us_then
    }

    /// The process's CPU seconds per second since then.
    fn cores(&self) -> f64 {
        self.cpu_us() / 1e6 / self.since.elapsed().as_secs_f64()
    }
}

/// The process a `strace` child runs (its only child), or the child itself.
fn service_pid(child: &Child, straced: bool) -> u32 {
    if !straced {
        return child.id();
    }
    for _ in 0..100 {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
            .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.id()
}

/// The calls in the `total` line of an `strace -c` summary.
fn strace_total(summary: &Path) -> u64 {
    std::fs::read_to_string(summary)
        .unwrap_or_default()
        .lines()
        .find(|l| l.trim_end().ends_with(" total"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A running collector and consumer on the bench's vhost.
struct Services {
    /// The consumer's `/metrics` address.
    consumer_base: String,
    env: Vec<(String, String)>,
    settings: Settings,
    collector: Child,
    consumer: Child,
    /// Where `strace -c` summaries go, when counting syscalls.
    strace: Option<PathBuf>,
    client: CollectorClient,
}

impl Services {
    /// Starts the collector and one consumer with `extra` settings and waits for the collector.
    async fn start(
        vhost: &Vhost,
        extra: &[(&str, &str)],
        strace: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let listen = fleet_tests::free_address();
        let mut extra = extra.to_vec();
        extra.push(("FLEET_CONSUMER__LISTEN", &listen));
        let env = vhost.env(&extra);
        let settings = fleet_tests::settings_of(&env);
        let spawn = |name: &str| -> anyhow::Result<Child> {
            let summary = strace.map(|dir| dir.join(format!("{name}.strace")));
            command(name, summary.as_deref())?
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {name}"))
        };
        let collector = spawn("fleet-collector")?;
        let consumer = spawn("fleet-consumer")?;
        let client = CollectorClient::new(&settings.producer.collector_url);
        let up = Instant::now();
        while client.batch("none").await.is_err() {
            anyhow::ensure!(
                up.elapsed() < Duration::from_secs(20),
                "the collector did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            consumer_base: format!("http://{listen}"),
            env,
            settings,
            collector,
            consumer,
            strace: strace.map(Path::to_path_buf),
            client,
        })
    }

    fn pids(&self) -> [u32; 2] {
        let straced = self.strace.is_some();
        [
            service_pid(&self.consumer, straced),
            service_pid(&self.collector, straced),
        ]
    }

    /// Runs `fleet-producer submit KIND` on `lines` (JSON lines) and returns the batch id, the
    /// producer's CPU in µs and its peak RSS in KiB.
    async fn submit(&self, kind: &str, lines: &str) -> anyhow::Result<(String, f64, u64)> {
        let input = self
            .settings
            .collector
            .db
            .with_file_name(format!("{kind}-{}.jsonl", uuid::Uuid::now_v7()));
        std::fs::write(&input, lines)?;
        let summary = self
            .strace
            .as_ref()
            .map(|dir| dir.join("fleet-producer.strace"));
        let before = cpu_us(Path::new("/proc/self/stat"), true)?;
        let mut child = command("fleet-producer", summary.as_deref())?
            .args(["submit", kind, "--input"])
            .arg(&input)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running fleet-producer submit")?;
        let pid = service_pid(&child, summary.is_some());
        let mut peak = 0;
        let status = loop {
            peak = peak.max(peak_kib(pid));
            if let Some(status) = child.try_wait()? {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let output = child.wait_with_output()?;
        anyhow::ensure!(
            status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let cpu = cpu_us(Path::new("/proc/self/stat"), true)? - before;
        let batch = String::from_utf8(output.stdout)?.trim().to_owned();
        Ok((batch, cpu, peak))
    }

    /// Waits until `batch` is complete with `tasks` ok results and no duplicates.
    async fn complete(&self, batch: &str, tasks: u64) -> anyhow::Result<()> {
        self.complete_polling(batch, tasks, Duration::from_millis(20))
            .await
    }

    /// [`Services::complete`], asking the collector every `poll`.
    async fn complete_polling(
        &self,
        batch: &str,
        tasks: u64,
        poll: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.client.batch(batch).await?
                && status.complete
            {
                anyhow::ensure!(
                    status.ok == tasks && status.duplicates == 0,
                    "unexpected outcome: {status:?}"
                );
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the batch did not complete in 10 minutes"
            );
            tokio::time::sleep(poll).await;
        }
    }

    /// Stops both services (SIGTERM, as systemd does) and returns the store.
    fn stop(self) -> anyhow::Result<Store> {
        for pid in self.pids() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        for mut child in [self.consumer, self.collector] {
            child.wait()?;
        }
        Ok(Store::open(&self.settings.collector.db)?)
    }
}

/// Submit-to-stored latencies of `batch` in ms, sorted: `submitted` gives each task's submit
/// time in µs since the epoch (the UUIDv7 time of its id, to the ms, when absent).
fn latencies(
    store: &Store,
    batch: &str,
    submitted: Option<&std::collections::HashMap<String, i64>>,
) -> anyhow::Result<Vec<f64>> {
    let mut ms: Vec<f64> = store
        .stored_times(batch)?
        .into_iter()
        .filter_map(|(id, stored_us)| {
            let created_us = match submitted {
                Some(times) => *times.get(&id)?,
                None => {
                    let (secs, nanos) = uuid::Uuid::parse_str(&id).ok()?.get_timestamp()?.to_unix();
                    i64::try_from(secs).ok()? * 1_000_000 + i64::from(nanos / 1000)
                }
            };
            Some((stored_us - created_us) as f64 / 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// Each task's latency in three legs, sorted, in ms: submit to the consumer's start, the run,
/// and the consumer's finish to the collector's store (as it begins the group's transaction).
fn legs(
    store: &Store,
    batch: &str,
    submitted: &std::collections::HashMap<String, i64>,
) -> anyhow::Result<[Vec<f64>; 3]> {
    let stored: std::collections::HashMap<String, i64> =
        store.stored_times(batch)?.into_iter().collect();
    let mut legs: [Vec<f64>; 3] = Default::default();
    for body in store.results(batch, 0, u64::MAX >> 1)? {
        let result = fleet_producer::collector::store::parse(&body).context("a stored result")?;
        let (Some(&submit), Some(&stored)) =
            (submitted.get(&result.task_id), stored.get(&result.task_id))
        else {
            bail!("task {} has no submit or stored time", result.task_id);
        };
        let (started, finished) = (
            result.started_at.timestamp_micros(),
            result.finished_at.timestamp_micros(),
        );
        for (leg, us) in
            legs.iter_mut()
                .zip([started - submit, finished - started, stored - finished])
        {
            leg.push(us as f64 / 1000.0);
        }
    }
    for leg in &mut legs {
        leg.sort_by(f64::total_cmp);
    }
    Ok(legs)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// The median of `values` (sorted in place).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    quantile(values, 0.5)
}

/// One batch of `tasks` squares through a fresh collector and consumer.
async fn fleet(
    vhost: &Vhost,
    tasks: u64,
    extra: &[(&str, &str)],
    strace: Option<&Path>,
) -> anyhow::Result<FleetRun> {
    let services = Services::start(vhost, extra, strace).await?;
    let lines: String = (0..tasks)
        .map(|n| format!("{{\"n\":{}}}\n", n % 3_000_000))
        .collect();
    let started = Instant::now();
    let (batch, producer_cpu, producer_peak) = services.submit("square", &lines).await?;
    services.complete(&batch, tasks).await?;
    let elapsed = started.elapsed();
    let [consumer, collector] = services.pids();
    let cpu_us = [producer_cpu, pid_cpu_us(consumer), pid_cpu_us(collector)];
    let peak_kib = [producer_peak, peak_kib(consumer), peak_kib(collector)];
    let result_messages =
        fleet_tests::metric(&services.consumer_base, "fleet_result_messages_total").await;
    let transactions = fleet_tests::metric(
        &services.settings.producer.collector_url,
        "fleet_store_seconds_count",
    )
    .await;
    let store = services.stop()?;
    let syscalls = strace.map(|dir| {
        ["fleet-producer", "fleet-consumer", "fleet-collector"]
            .map(|name| strace_total(&dir.join(format!("{name}.strace"))))
    });
    let ms = latencies(&store, &batch, None)?;
    anyhow::ensure!(ms.len() as u64 == tasks, "latency for every task");
    Ok(FleetRun {
        elapsed,
        p50_ms: quantile(&ms, 0.50),
        p99_ms: quantile(&ms, 0.99),
        cpu_us,
        peak_kib,
        syscalls,
        result_messages,
        transactions,
    })
}

/// `--paced`: latency at `rate` tasks a second for `seconds`, of the fleet and, in the same
/// run, of the baseline with plain messages and with the fleet's; `rounds` of the three, each
/// round starting one later (the machine's speed drifts), then the medians of each.
async fn paced(
    vhost: &Vhost,
    rate: u64,
    seconds: u64,
    rounds: u64,
    extra: &[(&str, &str)],
) -> anyhow::Result<()> {
    const RUNS: [&str; 3] = ["fleet", "baseline", "fleet-shaped baseline"];
    let tasks = rate * seconds;
    // Per run: p50s and p99s, one of each per round.
    let mut figures = [
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
    ];
    for round in 0..rounds {
        let first = usize::try_from(round).unwrap_or(0) % RUNS.len();
        for i in (first..RUNS.len()).chain(0..first) {
            let (ms, broker_cores, client_cores) = match i {
                0 => paced_fleet(vhost, rate, seconds, extra).await?,
                1 => paced_baseline(vhost, tasks, rate, Shape::default()).await?,
                _ => paced_baseline(vhost, tasks, rate, Shape::ALL).await?,
            };
            anyhow::ensure!(ms.len() as u64 == tasks, "latency for every task");
            println!(
                "round {} {}: p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2} broker_cores={broker_cores:.2} client_cores={client_cores:.2}",
                round + 1,
                RUNS[i],
                quantile(&ms, 0.50),
                quantile(&ms, 0.90),
                quantile(&ms, 0.99),
                quantile(&ms, 1.0),
            );
            figures[i][0].push(quantile(&ms, 0.50));
            figures[i][1].push(quantile(&ms, 0.99));
        }
    }
    let [[p50, p99], [base_p50, base_p99], [shaped_p50, shaped_p99]] = &mut figures;
    println!(
        "fleet-bench paced rate={rate} tasks={tasks} rounds={rounds} p50_ms={:.2} p99_ms={:.2} baseline_p50_ms={:.2} baseline_p99_ms={:.2} fleet_shaped_baseline_p50_ms={:.2} fleet_shaped_baseline_p99_ms={:.2}",
        median(p50),
        median(p99),
        median(base_p50),
        median(base_p99),
        median(shaped_p50),
        median(shaped_p99),
    );
    Ok(())
}

/// The baseline pipeline (`shape`) at `rate` tasks a second: each task's publish to its
/// result's arrival, sorted, in ms, and the busy cores of the broker and of its clients (this
/// process).
async fn paced_baseline(
    vhost: &Vhost,
    tasks: u64,
    rate: u64,
    shape: Shape,
) -> anyhow::Result<(Vec<f64>, f64, f64)> {
    let settings = vhost.settings(&[]);
    let (broker, clients) = (Busy::broker(), Busy::this_process());
    let (_, mut ms) = baseline(&settings, tasks, settings.prefetch(), shape, Some(rate))
        .await
        .context("paced baseline")?;
    let (broker_cores, client_cores) = (broker.cores(), clients.cores());
    ms.sort_by(f64::total_cmp);
    Ok((ms, broker_cores, client_cores))
}

/// The fleet at a steady rate: this process publishes `rate` squares a second for `seconds`
/// through the fleet's own publisher (each task when its time comes, not waiting for the
/// previous confirm), and compares each task's submit time (µs) with its stored time. Returns
/// those latencies, sorted, in ms, and the busy cores of the broker and of the fleet's three
/// processes (this one publishing, the consumer and the collector).
async fn paced_fleet(
    vhost: &Vhost,
    rate: u64,
    seconds: u64,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Vec<f64>, f64, f64)> {
    let services = Services::start(vhost, extra, None).await?;
    let tasks = rate * seconds;
    let payloads = (0..tasks).map(|n| serde_json::json!({ "n": n })).collect();
    let submit::Batch { receipt, messages } = submit::batch("square", payloads);
    let (connection, publisher) =
        submit::connect_publisher(&services.settings, "fleet-bench-paced").await?;
    // One task through the whole pipeline first ends the consumer's slow start.
    let (warm, _, _) = services.submit("square", "{\"n\":1}\n").await?;
    services.complete(&warm, 1).await?;
    let mut messages = messages.into_iter();
    let manifest = messages.next().context("a manifest")?;
    publisher.publish(manifest).await?;
    let mut submitted = std::collections::HashMap::with_capacity(receipt.task_ids.len());
    let mut confirms = futures_util::stream::FuturesUnordered::new();
    let busy = Busy::broker();
    let [consumer, collector] = services.pids();
    // This process (publishing), the consumer and the collector.
    let clients = [
        Busy::this_process(),
        Busy::of(Some(consumer)),
        Busy::of(Some(collector)),
    ];
    let started = Instant::now();
    for (i, (message, id)) in messages.zip(&receipt.task_ids).enumerate() {
        let due = started + Duration::from_micros(i as u64 * 1_000_000 / rate);
        // Confirms are taken in this task while it waits for the next task's time, as the
        // baseline's publisher does: no hand-off to another runtime thread per publish.
        loop {
            tokio::select! {
                biased;
                // First, so that a publish just pushed is sent even when the next is due.
                Some(confirmed) = confirms.next(), if !confirms.is_empty() => confirmed?,
                () = tokio::time::sleep_until(due.into()) => break,
            }
        }
        submitted.insert(id.clone(), chrono::Utc::now().timestamp_micros());
        confirms.push(publisher.publish(message));
    }
    while let Some(confirmed) = confirms.next().await {
        confirmed?;
    }
    services.complete(&receipt.batch, tasks).await?;
    let broker_cores = busy.cores();
    let [producer, consumer, collector] = clients.map(|process| process.cores());
    println!(
        "busy cores: producer (this process publishing) {producer:.3}, consumer {consumer:.3}, collector {collector:.3}"
    );
    let client_cores = producer + consumer + collector;
    let _ = connection.close(200, "done".into()).await;
    // A result's stored time is taken as its group's transaction begins; the commit (an fsync)
    // comes after it, so its mean is shown beside the figures.
    let scrape = fleet_tests::scrape(&services.settings.producer.collector_url)
        .await
        .unwrap_or_default();
    let store_ms = match (
        fleet_tests::metric_in(&scrape, "fleet_store_seconds_sum"),
        fleet_tests::metric_in(&scrape, "fleet_store_seconds_count"),
    ) {
        (Some(sum), Some(count)) if count > 0.0 => sum / count * 1e3,
        _ => f64::NAN,
    };
    let store = services.stop()?;
    let ms = latencies(&store, &receipt.batch, Some(&submitted))?;
    anyhow::ensure!(ms.len() as u64 == tasks, "latency for every task");
    let [to_start, run, to_store] = legs(&store, &receipt.batch, &submitted)?;
    println!(
        "legs p50/p99 ms: submit to started {:.2}/{:.2}, run {:.2}/{:.2}, finished to stored {:.2}/{:.2}",
        quantile(&to_start, 0.5),
        quantile(&to_start, 0.99),
        quantile(&run, 0.5),
        quantile(&run, 0.99),
        quantile(&to_store, 0.5),
        quantile(&to_store, 0.99),
    );
    println!("store transaction (commit included, after the stored time) mean {store_ms:.2} ms");
    Ok((ms, broker_cores, client_cores))
}

/// The broker's own hop: `streams` plain lapin publishers at once, each sending `rate` persistent
/// messages a second (with confirms) to a quorum queue of its own, read by a consumer on another
/// connection that acks each; prints publish-to-delivery latency over all streams. A fleet task
/// at a paced rate crosses two such queues (tasks, then results), so `--streams 2` at the same
/// rate carries the broker load of the fleet's run.
async fn hops(vhost: &Vhost, streams: usize, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let url = vhost.settings(&[]).amqp_uri()?.to_string();
    let messages = rate * seconds;
    let busy = Busy::broker();
    let started = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for stream in 0..streams {
        let url = url.clone();
        runs.spawn(async move {
            let connect = || Connection::connect(&url, ConnectionProperties::default());
            let (publisher, reader) = (connect().await?, connect().await?);
            let queue = format!("bench.hop.{stream}");
            let publish = publisher.create_channel().await?;
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            publish
                .queue_declare(queue.as_str().into(), durable, quorum())
                .await?;
            publish
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let read = reader.create_channel().await?;
            read.basic_qos(100, BasicQosOptions::default()).await?;
            let mut deliveries = read
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let timing = tokio::spawn(async move {
                let mut ms = Vec::with_capacity(usize::try_from(messages).unwrap_or(0));
                while (ms.len() as u64) < messages {
                    let Some(delivery) = deliveries.next().await else {
                        bail!("the delivery stream ended");
                    };
                    let delivery = delivery?;
                    let sent: u64 = std::str::from_utf8(&delivery.data)?.parse()?;
                    let now = u64::try_from(started.elapsed().as_micros())?;
                    ms.push(now.saturating_sub(sent) as f64 / 1000.0);
                    delivery.ack(BasicAckOptions::default()).await?;
                }
                anyhow::Ok(ms)
            });
            let mut confirms = tokio::task::JoinSet::new();
            let first = Instant::now();
            for i in 0..messages {
                tokio::time::sleep_until(
                    (first + Duration::from_micros(i * 1_000_000 / rate)).into(),
                )
                .await;
                let sent = started.elapsed().as_micros().to_string();
                let confirm = publish
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        sent.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?;
                confirms.spawn(confirm);
            }
            while let Some(confirmed) = confirms.join_next().await {
                anyhow::ensure!(confirmed??.is_ack(), "a publish was nacked");
            }
            let ms = timing.await??;
            publish
                .queue_delete(
                    queue.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await?;
            for connection in [publisher, reader] {
                let _ = connection.close(200, "done".into()).await;
            }
            anyhow::Ok(ms)
        });
    }
    let mut ms = Vec::new();
    while let Some(stream) = runs.join_next().await {
        ms.extend(stream??);
    }
    let broker_cores = busy.cores();
    ms.sort_by(f64::total_cmp);
    println!(
        "fleet-bench hops streams={streams} rate={rate} messages={} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2} broker_cores={broker_cores:.2}",
        ms.len(),
        quantile(&ms, 0.50),
        quantile(&ms, 0.90),
        quantile(&ms, 0.99),
        quantile(&ms, 1.0),
    );
    Ok(())
}

/// The worker model: compute tasks with 1 and 2 workers, I/O tasks from one consumer, and the
/// compute tasks again while the I/O ones run.
async fn workers(
    vhost: &Vhost,
    below: u64,
    compute_tasks: u64,
    rounds: u64,
    sleeps: u64,
    extra: &[(&str, &str)],
) -> anyhow::Result<()> {
    let primes: String = (0..compute_tasks)
        .map(|_| format!("{{\"below\":{below}}}\n"))
        .collect();
    let sleep: String = (0..sleeps).map(|_| "{\"ms\":100}\n").collect();
    // Rounds of 1 then 2 workers, so that a drift in this machine's speed (it shares its
    // host) falls on both alike; each figure is all its rounds' tasks over all their time.
    // Each round also runs the same handler on plain threads, no broker and no fleet: what two
    // threads can give on this machine at that moment, the ceiling the fleet's figure stands
    // beside (this guest shares its host, and two threads rarely make a full 2x here).
    let mut busy = [Duration::ZERO; 2];
    let mut bare = [Duration::ZERO; 2];
    // Each round's own speedups too: their median stands firmer than the sums when this guest's
    // speed drifts between rounds (a slow one-worker round lifts the summed speedup).
    let mut round_speedups = Vec::new();
    let mut round_bare_speedups = Vec::new();
    for round in 1..=rounds {
        let mut elapsed = [Duration::ZERO; 2];
        for (i, workers) in ["1", "2"].into_iter().enumerate() {
            elapsed[i] = compute_round(vhost, workers, below, compute_tasks, round, extra).await?;
            busy[i] += elapsed[i];
        }
        round_speedups.push(elapsed[0].as_secs_f64() / elapsed[1].as_secs_f64());
        for (i, threads) in [1, 2].into_iter().enumerate() {
            elapsed[i] =
                tokio::task::spawn_blocking(move || bare_round(threads, below, compute_tasks))
                    .await??;
            println!(
                "round {round} bare threads={threads} primes below={below}: {:.1} tasks/s",
                rate(compute_tasks, elapsed[i])
            );
            bare[i] += elapsed[i];
        }
        round_bare_speedups.push(elapsed[0].as_secs_f64() / elapsed[1].as_secs_f64());
    }
    let compute_tps = busy.map(|elapsed| rate(compute_tasks * rounds, elapsed));
    let bare_tps = bare.map(|elapsed| rate(compute_tasks * rounds, elapsed));
    let services = Services::start(vhost, extra, None).await?;
    let (warm, _, _) = services.submit("sleep", "{\"ms\":1}\n").await?;
    services.complete(&warm, 1).await?;
    let started = Instant::now();
    let (batch, _, _) = services.submit("sleep", &sleep).await?;
    services.complete(&batch, sleeps).await?;
    let io_tps = rate(sleeps, started.elapsed());
    println!("sleep 100 ms x {sleeps}, one consumer: {io_tps:.0} tasks/s");
    // Both at once, published side by side (two submits), so the queue interleaves them.
    let started = Instant::now();
    let (io, compute) = tokio::join!(
        services.submit("sleep", &sleep),
        services.submit("primes", &primes)
    );
    let ((io_batch, _, _), (compute_batch, _, _)) = (io?, compute?);
    let (io_done, compute_done) = tokio::join!(
        async {
            services.complete(&io_batch, sleeps).await?;
            anyhow::Ok(started.elapsed())
        },
        async {
            services.complete(&compute_batch, compute_tasks).await?;
            anyhow::Ok(started.elapsed())
        }
    );
    let mixed_tps = rate(compute_tasks, compute_done?);
    let mixed_io_tps = rate(sleeps, io_done?);
    services.stop()?;
    let speedup = compute_tps[1] / compute_tps[0];
    let bare_speedup = bare_tps[1] / bare_tps[0];
    println!(
        "fleet-bench workers compute_tps_1={:.1} compute_tps_2={:.1} speedup={speedup:.2} bare_tps_1={:.1} bare_tps_2={:.1} bare_speedup={bare_speedup:.2} of_bare={:.2} io_tps={io_tps:.0} compute_tps_beside_io={mixed_tps:.1} io_tps_beside_compute={mixed_io_tps:.0} speedup_round_median={:.2} bare_speedup_round_median={:.2}",
        compute_tps[0],
        compute_tps[1],
        bare_tps[0],
        bare_tps[1],
        speedup / bare_speedup,
        median(&mut round_speedups),
        median(&mut round_bare_speedups),
    );
    Ok(())
}

/// The worker model's compute half without the fleet: `tasks` runs of the `primes` handler on
/// `threads` plain threads taking them from a shared count. Returns the time they took.
fn bare_round(threads: u64, below: u64, tasks: u64) -> anyhow::Result<Duration> {
    use fleet_consumer::handlers::primes;
    use futures_util::FutureExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    let left = AtomicU64::new(tasks);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    while left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let ctx = fleet_consumer::registry::TaskContext {
                            id: "bare".into(),
                            attempt: 0,
                            deadline: None,
                            cancel: Default::default(),
                        };
                        // The handler never waits, so one poll runs it to the end.
                        let output = primes::run(primes::Payload { below }, ctx)
                            .now_or_never()
                            .context("primes waited")?
                            .map_err(|e| anyhow::anyhow!("primes failed: {e:?}"))?;
                        anyhow::ensure!(output.count > 0, "primes counted none below {below}");
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|worker| worker.join().expect("a bare worker panicked"))
    })?;
    Ok(started.elapsed())
}

/// One round of the worker model's compute half: `tasks` primes with `workers` workers, after
/// a warm-up task. Returns the time the batch took.
async fn compute_round(
    vhost: &Vhost,
    workers: &str,
    below: u64,
    tasks: u64,
    round: u64,
    extra: &[(&str, &str)],
) -> anyhow::Result<Duration> {
    let primes: String = (0..tasks)
        .map(|_| format!("{{\"below\":{below}}}\n"))
        .collect();
    let mut settings = extra.to_vec();
    settings.push(("FLEET_CONSUMER__WORKERS", workers));
    let services = Services::start(vhost, &settings, None).await?;
    // One task first: the consumer's slow start is over before the clock starts.
    let (warm, _, _) = services
        .submit("primes", &format!("{{\"below\":{below}}}\n"))
        .await?;
    services.complete(&warm, 1).await?;
    let busy = Busy::broker();
    let [consumer, collector] = services.pids();
    let (pool_then, rest_then) = pool_and_rest_cpu_us(consumer);
    let collector_then = pid_cpu_us(collector);
    let idle_then = machine_idle_us();
    let started_us = chrono::Utc::now().timestamp_micros();
    let (batch, producer_us, _) = services.submit("primes", &primes).await?;
    // The round ends when its last result is stored (read from the store below), not when a
    // poll notices: polls are rare, so asking takes next to nothing from the workers' cores.
    services
        .complete_polling(&batch, tasks, Duration::from_millis(250))
        .await?;
    // Cores the broker kept busy meanwhile: it shares this machine's cores.
    let broker_cores = busy.cores();
    // The same for the fleet's own processes: the pool, the consumer's other threads (its
    // runtime and lapin's), the collector and the producer.
    let window_us = busy.since.elapsed().as_secs_f64() * 1e6;
    let (pool_now, rest_now) = pool_and_rest_cpu_us(consumer);
    let pool_cores = (pool_now - pool_then) / window_us;
    let consumer_rest_cores = (rest_now - rest_then) / window_us;
    let collector_cores = (pid_cpu_us(collector) - collector_then) / window_us;
    let producer_cores = producer_us / window_us;
    let idle_cores = (machine_idle_us() - idle_then) / window_us;
    let store = services.stop()?;
    let last_stored_us = store
        .stored_times(&batch)?
        .into_iter()
        .map(|(_, us)| us)
        .max()
        .context("stored results")?;
    let elapsed = Duration::from_micros(u64::try_from(last_stored_us - started_us)?);
    let results: Vec<_> = store
        .results(&batch, 0, tasks)?
        .iter()
        .filter_map(|body| fleet_producer::collector::store::parse(body))
        .collect();
    let ran_ms = results
        .iter()
        .map(|r| {
            (r.finished_at - r.started_at)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1e3
        })
        .sum::<f64>()
        / results.len().max(1) as f64;
    let slots: std::collections::BTreeSet<&str> =
        results.iter().map(|r| r.worker.as_str()).collect();
    println!(
        "round {round} workers={workers} primes below={below} ({ran_ms:.1} ms each on average, slots {slots:?}): {:.1} tasks/s; cores busy: broker {broker_cores:.3}, pool {pool_cores:.3}, consumer's other threads {consumer_rest_cores:.3}, collector {collector_cores:.3}, producer {producer_cores:.3}; idle {idle_cores:.3}",
        rate(tasks, elapsed)
    );
    Ok(elapsed)
}
