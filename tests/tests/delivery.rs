//! At-least-once without holes: what happens to a task when the topology cannot route it, when
//! its consumer drains, and when its dead-lettering cannot go through at once.

use fleet_producer::client::CollectorClient;
use fleet_producer::dlq;
use fleet_producer::submit::{self, Receipt};
use fleet_shared::publisher::Publisher;
use fleet_shared::settings::Settings;
use fleet_shared::topology;
use fleet_tests::{Service, Vhost, complete, eventually, ready};
use serde_json::{Value, json};
use std::collections::HashSet;
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
