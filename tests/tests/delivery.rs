//! At-least-once without holes: what happens to a task when the topology cannot route it, when
//! its consumer drains, and when its dead-lettering cannot go through at once.

use fleet_consumer::registry::Registry;
use fleet_consumer::registry::{HandlerError, Work};
use fleet_producer::client::CollectorClient;
use fleet_producer::dlq;
use fleet_producer::submit::{self, Receipt};
use fleet_shared::envelope::BatchManifest;
use fleet_shared::publisher::{Outgoing, Publisher};
use fleet_shared::settings::Settings;
use fleet_shared::topology;
use fleet_tests::proxy::Proxy;
use fleet_tests::{Service, Vhost, complete, eventually, ready};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// Publishes a batch without declaring the topology (which would undo what a test broke).
async fn publish(settings: &Settings, kind: &str, payloads: Vec<Value>) -> Receipt {
    let connection = fleet_shared::amqp::connect(settings, "test")
        .await
        .expect("connect");
    let publisher = Publisher::new(&connection, settings.amqp.publish_window)
        .await
        .expect("publisher");
    let receipt = submit::publish_batch(&publisher, kind, payloads)
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    receipt
}

/// Declares the topology and runs one task through it.
async fn warm_up(settings: &Settings, client: &CollectorClient) {
    let (connection, publisher) = submit::connect_publisher(settings, "test")
        .await
        .expect("publisher");
    let receipt = submit::publish_batch(&publisher, "square", vec![json!({ "n": 1 })])
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    complete(client, &receipt.batch, Duration::from_secs(30)).await;
}

/// Deletes `queue` as the vhost's admin.
async fn delete_queue(settings: &Settings, queue: &str) {
    let connection = fleet_shared::amqp::connect(settings, "test-deleter")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .expect("queue.delete");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_with_no_delay_queue_ends_in_fleet_dead_and_no_result_is_failed_by_it() {
    let vhost = Vhost::new();
    // Every sleep attempt runs past its limit, so each is retried through fleet.retry.1000ms.
    let settings = vhost.settings(&[
        ("FLEET_CONSUMER__KINDS__SLEEP__TIME_LIMIT_MS", "1"),
        ("FLEET_CONSUMER__KINDS__SLEEP__MAX_ATTEMPTS", "3"),
        ("FLEET_CONSUMER__KINDS__SLEEP__RETRY_DELAYS_MS", "1000"),
    ]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    warm_up(&settings, &client).await;
    // An operator deletes the delay queue: its binding goes with it, and every retry is
    // unroutable while results and other retries share the consumer's confirm channel.
    delete_queue(&settings, &topology::retry_queue(1000)).await;
    let sleeps = publish(
        &settings,
        "sleep",
        (0..300).map(|_| json!({ "ms": 2000 })).collect(),
    )
    .await;
    let squares = publish(
        &settings,
        "square",
        (0..1000).map(|n| json!({ "n": n })).collect(),
    )
    .await;

    let status = complete(&client, &squares.batch, Duration::from_secs(120)).await;
    assert_eq!(
        (status.ok, status.failed),
        (1000, 0),
        "no square is failed by another publish's return"
    );
    eventually(
        "every sleep task in fleet.dead",
        Duration::from_secs(60),
        || async { (ready(&settings, topology::DEAD_QUEUE).await >= 300).then_some(()) },
    )
    .await;
    let stored = client.results(&sleeps.batch).await.expect("results");
    assert!(stored.is_empty(), "no sleep task ended: {stored:?}");
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");

    let dead = dlq::list(&settings).await.expect("dlq list");
    let ids: HashSet<&str> = dead.iter().filter_map(|l| l.id.as_deref()).collect();
    let sent: HashSet<&str> = sleeps.task_ids.iter().map(String::as_str).collect();
    assert_eq!(ids, sent, "every sleep task is in fleet.dead");
    assert_eq!(dead.len(), 300, "once each");
    for letter in &dead {
        assert_eq!(
            letter.reason, "unroutable: published to `fleet.retry` with routing key `sleep`",
            "{letter:?}"
        );
    }
    assert_eq!(ready(&settings, topology::UNROUTABLE_QUEUE).await, 0);
}

/// Runs `fleet-producer setup` with `env`; returns stdout, asserting exit 0.
fn setup(env: &[(String, String)]) -> String {
    let output = std::process::Command::new(fleet_tests::process::binary("fleet-producer"))
        .arg("setup")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .expect("running fleet-producer setup");
    assert!(
        output.status.success(),
        "setup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setup_gives_an_earlier_fleets_exchanges_their_alternate_and_keeps_every_task() {
    use lapin::ExchangeKind;
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let vhost = Vhost::new();
    let env = vhost.env(&[]);
    let settings = fleet_tests::settings_of(&env);
    // The exchanges as an earlier fleet declared them (no arguments), its work queue, and a task
    // waiting in it.
    let connection = fleet_shared::amqp::connect(&settings, "test-old-fleet")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for (name, kind) in [
        (topology::TASKS_EXCHANGE, ExchangeKind::Topic),
        (topology::RETRY_EXCHANGE, ExchangeKind::Headers),
        (topology::DEAD_EXCHANGE, ExchangeKind::Fanout),
        (topology::RESULTS_EXCHANGE, ExchangeKind::Fanout),
        (topology::BATCHES_EXCHANGE, ExchangeKind::Fanout),
        (topology::STATUS_EXCHANGE, ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(name.into(), kind, durable, FieldTable::default())
            .await
            .expect("an old exchange");
    }
    let mut work = FieldTable::default();
    work.insert(
        "x-queue-type".into(),
        fleet_shared::publisher::header_str("quorum"),
    );
    work.insert(
        "x-dead-letter-exchange".into(),
        fleet_shared::publisher::header_str(topology::DEAD_EXCHANGE),
    );
    work.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
    channel
        .queue_declare(
            topology::WORK_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            work,
        )
        .await
        .expect("the old work queue");
    channel
        .queue_bind(
            topology::WORK_QUEUE.into(),
            topology::TASKS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("its binding");
    let mut results = FieldTable::default();
    results.insert(
        "x-queue-type".into(),
        fleet_shared::publisher::header_str("quorum"),
    );
    results.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    channel
        .queue_declare(
            topology::RESULTS_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            results,
        )
        .await
        .expect("the old results queue");
    for source in [topology::RESULTS_EXCHANGE, topology::BATCHES_EXCHANGE] {
        channel
            .queue_bind(
                topology::RESULTS_QUEUE.into(),
                source.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("its bindings");
    }
    let _ = connection.close(200, "done".into()).await;
    let waiting = publish(&settings, "square", vec![json!({ "n": 7 })]).await;
    assert_eq!(ready(&settings, topology::WORK_QUEUE).await, 1);

    let said = setup(&env);
    for name in [
        topology::DEAD_EXCHANGE,
        topology::TASKS_EXCHANGE,
        topology::RETRY_EXCHANGE,
        topology::RESULTS_EXCHANGE,
        topology::BATCHES_EXCHANGE,
    ] {
        assert!(
            said.contains(&format!(
                "recreated exchange {name} with alternate exchange"
            )),
            "{said}"
        );
    }
    assert!(!said.contains("recreated exchange fleet.status"), "{said}");
    // The queues hold a task and a manifest: they keep their old arguments for now.
    for name in [topology::WORK_QUEUE, topology::RESULTS_QUEUE] {
        assert!(
            said.contains(&format!(
                "queue {name} still has the arguments of an earlier release"
            )),
            "{said}"
        );
    }
    assert_eq!(
        ready(&settings, topology::WORK_QUEUE).await,
        1,
        "the task waits on"
    );
    let again = setup(&env);
    assert!(
        !again.contains("recreated"),
        "a second setup changes nothing: {again}"
    );

    // The waiting task and a new batch both run: every binding is back.
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &waiting.batch, Duration::from_secs(30)).await;
    assert_eq!(status.ok, 1);
    let fresh = publish(
        &settings,
        "square",
        (0..10).map(|n| json!({ "n": n })).collect(),
    )
    .await;
    let status = complete(&client, &fresh.batch, Duration::from_secs(30)).await;
    assert_eq!(status.ok, 10);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");

    // Drained and unused, both queues are recreated with this release's arguments.
    eventually("the consumers gone", Duration::from_secs(30), || async {
        (consumers(&vhost.name) == 0).then_some(())
    })
    .await;
    let said = setup(&env);
    for name in [topology::WORK_QUEUE, topology::RESULTS_QUEUE] {
        assert!(said.contains(&format!("recreated queue {name}")), "{said}");
    }
    let arguments = queue_arguments(&vhost.name);
    for (name, wanted) in [
        (topology::WORK_QUEUE, "at-least-once"),
        (topology::RESULTS_QUEUE, "at-least-once"),
        (topology::RESULTS_QUEUE, "fleet.dead"),
    ] {
        let found = arguments.get(name).map_or("", String::as_str);
        assert!(found.contains(wanted), "{name}: {found}");
    }
    let last_said = setup(&env);
    assert!(
        !last_said.contains("recreated") && !last_said.contains("still has"),
        "nothing left to change: {last_said}"
    );
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let last = publish(&settings, "square", vec![json!({ "n": 3 })]).await;
    assert_eq!(
        complete(&client, &last.batch, Duration::from_secs(30))
            .await
            .ok,
        1
    );
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

/// `rabbitmqctl list_queues` of `vhost` with `columns`, one tab-separated line a queue.
fn list_queues(vhost: &str, columns: &[&str]) -> String {
    let mut argv = vec!["list_queues", "-p", vhost, "-q", "--no-table-headers"];
    argv.extend_from_slice(columns);
    rabbitmqctl(&argv)
}

/// Consumers of every queue in `vhost`.
fn consumers(vhost: &str) -> u64 {
    list_queues(vhost, &["consumers"])
        .lines()
        .filter_map(|line| line.trim().parse::<u64>().ok())
        .sum()
}

/// Each queue of `vhost` and its arguments as `rabbitmqctl` prints them.
fn queue_arguments(vhost: &str) -> std::collections::HashMap<String, String> {
    list_queues(vhost, &["name", "arguments"])
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(name, arguments)| (name.to_owned(), arguments.to_owned()))
        .collect()
}

fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("running rabbitmqctl");
    assert!(output.status.success(), "rabbitmqctl {args:?}");
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_clean_restarts_over_a_backlog_dead_letter_nothing() {
    use fleet_tests::process::Process;
    let vhost = Vhost::new();
    // Two I/O slots and a deep prefetch: at each stop about a hundred prefetched tasks have not
    // started. The work queue's delivery limit is the default 5.
    let env = vhost.env(&[
        ("FLEET_CONSUMER__WORKERS", "2"),
        ("FLEET_CONSUMER__IO_CONCURRENCY", "2"),
        ("FLEET_CONSUMER__PREFETCH_PER_WORKER", "50"),
    ]);
    let settings = fleet_tests::settings_of(&env);
    let collector = Service::collector(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let backlog = submit::publish_batch(
        &publisher,
        "sleep",
        (0..1500).map(|_| json!({ "ms": 50 })).collect(),
    )
    .await
    .expect("published");
    let _ = connection.close(200, "done".into()).await;

    for restart in 0..20 {
        let consumer = Process::spawn("fleet-consumer", &[], &env);
        eventually(
            "the consumer to hold a full prefetch",
            Duration::from_secs(30),
            || async { (fleet_tests::unacked(&vhost.name) >= 60).then_some(()) },
        )
        .await;
        let status = consumer.terminate(Duration::from_secs(30));
        assert!(status.success(), "restart {restart}: {status:?}");
        assert_eq!(
            ready(&settings, topology::DEAD_QUEUE).await,
            0,
            "restart {restart} dead-lettered a task that never ran"
        );
    }

    // One consumer with room to finish the backlog.
    let env = vhost.env(&[("FLEET_CONSUMER__IO_CONCURRENCY", "200")]);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let status = complete(&client, &backlog.batch, Duration::from_secs(120)).await;
    assert_eq!((status.ok, status.failed), (1500, 0));
    assert_eq!(ready(&settings, topology::DEAD_QUEUE).await, 0);
    assert!(consumer.terminate(Duration::from_secs(30)).success());
    collector.stop().await.expect("collector drains cleanly");
}

/// Hands every task in the work queue back, as a consumer crashing on them would, until none
/// is left to take; returns how many deliveries that was.
async fn hand_back_until_none(settings: &Settings) -> usize {
    let connection = fleet_shared::amqp::connect(settings, "test-crasher")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let (mut returns, mut idle) = (0, 0);
    while idle < 20 {
        let got = channel
            .basic_get(
                topology::WORK_QUEUE.into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .expect("get");
        if let Some(message) = got {
            idle = 0;
            returns += 1;
            message
                .delivery
                .nack(lapin::options::BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .expect("nack");
        } else {
            idle += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = connection.close(200, "done".into()).await;
    returns
}

/// Declares the topology (a service starting would).
async fn declare(settings: &Settings) {
    let (connection, _) = submit::connect_publisher(settings, "test")
        .await
        .expect("the topology");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_past_its_delivery_limit_is_kept_until_fleet_dead_can_take_it() {
    // A broker of the test's own, whose dead-letter worker tries again after 2 s (3 min by
    // default) once a dead letter found no route.
    let node = fleet_tests::node::Node::start_with_erl_args(
        "-rabbit dead_letter_worker_publisher_confirm_timeout 2000",
    );
    let dir = std::env::temp_dir().join(format!("fleet-dlx-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let env = fleet_tests::fleet_env(&node.url(), &dir, &[]);
    let settings = fleet_tests::settings_of(&env);
    declare(&settings).await;

    // Without fleet.dead, a task past the work queue's delivery limit (5) lands in the last
    // resort, fleet.unroutable (fleet.dead's alternate exchange).
    delete_queue(&settings, topology::DEAD_QUEUE).await;
    publish(
        &settings,
        "square",
        (0..4).map(|n| json!({ "n": n })).collect(),
    )
    .await;
    assert!(hand_back_until_none(&settings).await >= 4 * 6);
    eventually(
        "four in fleet.unroutable",
        Duration::from_secs(30),
        || async { (ready(&settings, topology::UNROUTABLE_QUEUE).await == 4).then_some(()) },
    )
    .await;

    // Without that either, the work queue keeps them (at-least-once dead-lettering) until
    // fleet.dead is back, and then delivers them there.
    delete_queue(&settings, topology::UNROUTABLE_QUEUE).await;
    let receipt = publish(
        &settings,
        "square",
        (0..4).map(|n| json!({ "n": n })).collect(),
    )
    .await;
    assert!(hand_back_until_none(&settings).await >= 4 * 6);
    assert_eq!(ready(&settings, topology::WORK_QUEUE).await, 0);
    declare(&settings).await;
    eventually("four dead letters", Duration::from_secs(60), || async {
        (ready(&settings, topology::DEAD_QUEUE).await == 4).then_some(())
    })
    .await;
    let dead = dlq::list(&settings).await.expect("dlq list");
    let ids: HashSet<&str> = dead.iter().filter_map(|l| l.id.as_deref()).collect();
    let sent: HashSet<&str> = receipt.task_ids.iter().map(String::as_str).collect();
    assert_eq!(ids, sent);
    for letter in &dead {
        assert_eq!(
            letter.reason, "delivery_limit (broker, queue fleet.tasks.default)",
            "{letter:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Makes `queue` of `vhost` refuse publishes (a negative confirm) once it holds a message, as a
/// full or broken queue would: a quorum queue refuses a publish while it is over its limit.
fn refuse_publishes(vhost: &Vhost, queue: &str) {
    fleet_tests::ctl(&[
        "set_policy",
        "-p",
        &vhost.name,
        "refuse",
        &format!("^{}$", queue.replace('.', "\\.")),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
}

/// Built-in kinds and `flaky`, which fails at its first run and succeeds at every later one once
/// `release` is set; and the count of its runs so far.
fn flaky(settings: &Settings, release: Arc<AtomicBool>) -> (Registry, Arc<AtomicU32>) {
    let runs = Arc::new(AtomicU32::new(0));
    let mut registry = fleet_consumer::handlers::registry(settings).expect("built-ins");
    let counted = runs.clone();
    registry
        .register("flaky", Work::Io, move |_: Value, _| {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            let release = release.clone();
            async move {
                if run == 0 {
                    return Err(HandlerError::permanent("first", "the first run fails"));
                }
                while !release.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(json!("a later run"))
            }
        })
        .expect("new kind");
    (registry, runs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_whose_dead_letter_is_refused_is_not_stored_and_its_next_run_is() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    refuse_publishes(&vhost, topology::DEAD_QUEUE);
    let (registry, runs) = flaky(&settings, Arc::new(AtomicBool::new(true)));
    let collector = Service::collector(&settings);
    let consumer = Service::consumer(&settings, registry);
    let client = CollectorClient::new(&settings.producer.collector_url);
    warm_up(&settings, &client).await;
    // The first letter fills fleet.dead.
    publish(&settings, "nobody", vec![json!(null)]).await;
    eventually("the first dead letter", Duration::from_secs(30), || async {
        (ready(&settings, topology::DEAD_QUEUE).await == 1).then_some(())
    })
    .await;
    let sent = publish(&settings, "flaky", vec![json!(null)]).await;

    let status = complete(&client, &sent.batch, Duration::from_secs(30)).await;
    assert_eq!(
        (status.ok, status.failed, status.duplicates),
        (1, 0, 0),
        "the failure that could not be dead-lettered is not the stored outcome"
    );
    let stored = client
        .task(&sent.task_ids[0])
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.output, Some(json!("a later run")));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
    assert_eq!(
        ready(&settings, topology::DEAD_QUEUE).await,
        1,
        "only the first letter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_whose_result_is_refused_runs_again_and_its_next_run_is_stored() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    warm_up(&settings, &client).await;
    collector.stop().await.expect("collector drains cleanly");
    consumer.stop().await.expect("consumer drains cleanly");
    // With no collector, the batch's manifest fills fleet.results.
    let sent = publish(&settings, "flaky", vec![json!(null)]).await;
    assert_eq!(ready(&settings, topology::RESULTS_QUEUE).await, 1);
    refuse_publishes(&vhost, topology::RESULTS_QUEUE);
    let release = Arc::new(AtomicBool::new(false));
    let (registry, runs) = flaky(&settings, release.clone());
    let consumer = Service::consumer(&settings, registry);
    // The first run failed, its dead letter went through, its result was refused: it runs again.
    eventually("a second run", Duration::from_secs(30), || async {
        (runs.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    assert_eq!(ready(&settings, topology::DEAD_QUEUE).await, 1);
    // The queue takes publishes again once a collector has read it below its limit.
    let collector = Service::collector(&settings);
    eventually("fleet.results read", Duration::from_secs(30), || async {
        (ready(&settings, topology::RESULTS_QUEUE).await == 0).then_some(())
    })
    .await;
    fleet_tests::ctl(&["clear_policy", "-p", &vhost.name, "refuse"]);
    release.store(true, Ordering::SeqCst);
    let status = complete(&client, &sent.batch, Duration::from_secs(30)).await;
    assert_eq!(
        (status.ok, status.failed, status.duplicates),
        (1, 0, 0),
        "the run after the refused result is the stored outcome"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
    // The first run's letter stays: a replay of it would be counted as a duplicate.
    let dead = dlq::list(&settings).await.expect("dlq list");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id.as_deref(), Some(sent.task_ids[0].as_str()));
    assert_eq!(dead[0].reason, "first: the first run fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_confirm_that_never_comes_drops_the_connection_and_the_work_is_done_again() {
    let vhost = Vhost::new();
    let listen = fleet_tests::free_address();
    let settings = vhost.settings(&[
        ("FLEET_AMQP__CONFIRM_TIMEOUT_SECS", "2"),
        ("FLEET_CONSUMER__LISTEN", &listen),
    ]);
    let proxy = Proxy::confirm_filter(fleet_tests::broker_host()).await;
    let mut through_proxy = settings.clone();
    through_proxy.amqp.url = format!("amqp://guest:guest@{}/{}", proxy.addr, vhost.name);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&through_proxy);
    let client = CollectorClient::new(&settings.producer.collector_url);
    warm_up(&settings, &client).await;
    let base = format!("http://{listen}");
    let timeouts = "fleet_publish_confirm_timeouts_total";
    assert_eq!(fleet_tests::metric(&base, timeouts).await, Some(0.0));

    // The broker takes the consumer's results and never confirms them.
    proxy.withhold_confirms(true);
    let sent = publish(
        &settings,
        "square",
        (0..50).map(|n| json!({ "n": n })).collect(),
    )
    .await;
    eventually("a confirm timeout", Duration::from_secs(30), || async {
        (fleet_tests::metric(&base, timeouts).await? >= 1.0).then_some(())
    })
    .await;
    eventually(
        "the consumer connected again",
        Duration::from_secs(30),
        || async { (proxy.accepted() >= 2).then_some(()) },
    )
    .await;
    assert!(proxy.withheld() >= 1);
    proxy.withhold_confirms(false);

    let status = complete(&client, &sent.batch, Duration::from_secs(60)).await;
    assert_eq!((status.ok, status.failed), (50, 0));
    let stored = client.results(&sent.batch).await.expect("results");
    assert_eq!(stored.len(), 50);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
    assert_eq!(ready(&settings, topology::DEAD_QUEUE).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_sends_again_what_the_broker_never_confirmed() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[("FLEET_AMQP__CONFIRM_TIMEOUT_SECS", "2")]);
    declare(&settings).await;
    let proxy = Proxy::confirm_filter(fleet_tests::broker_host()).await;
    let mut through_proxy = settings.clone();
    through_proxy.amqp.url = format!("amqp://guest:guest@{}/{}", proxy.addr, vhost.name);
    proxy.withhold_confirms(true);
    let submit::Batch { receipt, messages } =
        submit::batch("square", (0..1000i64).map(|n| json!({ "n": n })).collect());
    let publishing = tokio::spawn(async move {
        submit::publish_reliably(&through_proxy, "test-submit", messages).await
    });
    eventually(
        "submit connected again",
        Duration::from_secs(30),
        || async { (proxy.accepted() >= 2).then_some(()) },
    )
    .await;
    assert!(!publishing.is_finished(), "nothing was confirmed yet");
    proxy.withhold_confirms(false);
    tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("submit ends once confirms come")
        .expect("submit did not panic")
        .expect("every task confirmed");

    // Every task is there, some twice (sent again after the lost confirms).
    let ready_tasks = ready(&settings, topology::WORK_QUEUE).await;
    assert!(ready_tasks >= 1000, "{ready_tasks} tasks in the queue");
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(60)).await;
    assert_eq!((status.ok, status.failed), (1000, 0));
    let twice = u64::from(ready_tasks) - 1000;
    eventually("every copy counted", Duration::from_secs(60), || async {
        let status = client.batch(&receipt.batch).await.ok().flatten()?;
        (status.duplicates == twice).then_some(())
    })
    .await;
    assert_eq!(ready(&settings, topology::WORK_QUEUE).await, 0);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

/// Runs `fleet-producer submit square --input INPUT --batch BATCH` with `env`.
async fn submit_as(env: &[(String, String)], batch: &str, input: &std::path::Path) -> Output {
    tokio::process::Command::new(fleet_tests::process::binary("fleet-producer"))
        .args(["submit", "square", "--batch", batch, "--input"])
        .arg(input)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("running fleet-producer submit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_manifest_publishes_no_task_and_the_same_submit_completes_the_batch_later() {
    let vhost = Vhost::new();
    let env = vhost.env(&[]);
    let settings = fleet_tests::settings_of(&env);
    let input = vhost.dir.join("in.jsonl");
    std::fs::write(&input, "{\"n\": 1}\n{\"n\": 2}\n\n{\"n\": 3}\n").expect("input");
    let long = "b".repeat(235);
    let refused = submit_as(&env, &long, &input).await;
    assert_eq!(refused.status.code(), Some(2), "a batch id too long");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--batch"));

    // With no collector, another batch's manifest fills fleet.results, which then refuses.
    declare(&settings).await;
    let connection = fleet_shared::amqp::connect(&settings, "test")
        .await
        .expect("connect");
    let publisher = Publisher::new(&connection, 8).await.expect("publisher");
    let other = BatchManifest::new("another".to_owned(), 1, "square".to_owned());
    publisher
        .publish(Outgoing::manifest(&other))
        .await
        .expect("the filler");
    let _ = connection.close(200, "done".into()).await;
    refuse_publishes(&vhost, topology::RESULTS_QUEUE);

    let failed = submit_as(&env, "nightly-7", &input).await;
    let said = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{said}");
    assert_eq!(
        said.lines().next(),
        Some("publishing 3 tasks of kind square as batch nightly-7"),
        "the batch is named before anything is sent: {said}"
    );
    assert!(said.contains("no task was published"), "{said}");
    assert!(failed.stdout.is_empty());
    assert_eq!(
        ready(&settings, topology::WORK_QUEUE).await,
        0,
        "no orphan task"
    );

    fleet_tests::ctl(&["clear_policy", "-p", &vhost.name, "refuse"]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let done = submit_as(&env, "nightly-7", &input).await;
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&done.stdout).trim(), "nightly-7");
    let status = complete(&client, "nightly-7", Duration::from_secs(30)).await;
    assert_eq!((status.total, status.ok, status.failed), (Some(3), 3, 0));
    let mut ids: Vec<String> = client
        .results("nightly-7")
        .await
        .expect("results")
        .into_iter()
        .map(|r| r.task_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["nightly-7-1", "nightly-7-2", "nightly-7-3"]);

    // Once more, as a retry after an unclear end would: the same tasks, each stored once.
    let again = submit_as(&env, "nightly-7", &input).await;
    assert_eq!(again.status.code(), Some(0));
    eventually("the copies counted", Duration::from_secs(30), || async {
        let status = client.batch("nightly-7").await.ok().flatten()?;
        (status.duplicates == 3).then_some(status)
    })
    .await;
    let status = client
        .batch("nightly-7")
        .await
        .expect("read")
        .expect("known");
    assert_eq!((status.ok, status.failed), (3, 0));
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_alarm_is_waited_out_and_not_taken_for_a_lost_confirm() {
    let node = fleet_tests::node::Node::start();
    let dir = std::env::temp_dir().join(format!("fleet-alarm-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let listen = fleet_tests::free_address();
    let env = fleet_tests::fleet_env(
        &node.url(),
        &dir,
        &[
            ("FLEET_AMQP__CONFIRM_TIMEOUT_SECS", "2"),
            ("FLEET_CONSUMER__LISTEN", &listen),
        ],
    );
    let settings = fleet_tests::settings_of(&env);
    declare(&settings).await;
    let collector = Service::collector(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let sent = publish(
        &settings,
        "square",
        (0..20).map(|n| json!({ "n": n })).collect(),
    )
    .await;

    // A memory alarm: the broker blocks every connection that publishes until it clears.
    node.ctl(&["set_vm_memory_high_watermark", "0"])
        .expect("raising the alarm");
    let consumer = Service::builtin_consumer(&settings);
    eventually("a blocked connection", Duration::from_secs(30), || async {
        let states = node.ctl(&["list_connections", "state"]).ok()?;
        states.contains("blocked").then_some(())
    })
    .await;
    // Three confirm timeouts' worth of flow control is waited out, not taken for a loss.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let base = format!("http://{listen}");
    let counted = |series: &'static str| {
        let base = base.clone();
        async move { fleet_tests::metric(&base, series).await }
    };
    assert_eq!(
        counted("fleet_publish_confirm_timeouts_total").await,
        Some(0.0)
    );
    assert_eq!(counted("fleet_reconnects_total").await, Some(0.0));
    node.ctl(&["set_vm_memory_high_watermark", "0.4"])
        .expect("clearing the alarm");

    let status = complete(&client, &sent.batch, Duration::from_secs(60)).await;
    assert_eq!((status.ok, status.failed, status.duplicates), (20, 0, 0));
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}
