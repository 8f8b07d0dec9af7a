//! Fault tests: nothing lost, nothing stuck. Processes killed with SIGKILL, connections cut by a
//! proxy, a broker of the test's own restarted, handlers that overrun, panic or abort.
//!
//! Each test is bounded in time; anything that stops a broker uses its own node ([`Node`]).

use fleet_producer::client::CollectorClient;
use fleet_producer::collector::store::BatchStatus;
use fleet_producer::submit::{self, Receipt};
use fleet_shared::envelope::{Status, TaskResult};
use fleet_shared::settings::Settings;
use fleet_shared::topology;
use fleet_tests::node::Node;
use fleet_tests::process::Process;
use fleet_tests::proxy::Proxy;
use fleet_tests::{Service, Vhost, complete, eventually, ready, settings_of};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};

async fn publish(settings: &Settings, kind: &str, payloads: Vec<Value>) -> Receipt {
    let (connection, publisher) = submit::connect_publisher(settings, "test")
        .await
        .expect("publisher");
    let receipt = submit::publish_batch(&publisher, kind, payloads)
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    receipt
}

async fn squares(settings: &Settings, n: i64) -> Receipt {
    publish(
        settings,
        "square",
        (0..n).map(|n| json!({ "n": n })).collect(),
    )
    .await
}

/// Waits until at least `done` results of `batch` are stored.
async fn progress(client: &CollectorClient, batch: &str, done: u64, limit: Duration) {
    eventually(&format!("{done} results of {batch}"), limit, || async {
        client
            .batch(batch)
            .await
            .ok()
            .flatten()
            .filter(|s| s.done >= done)
    })
    .await;
}

/// Every task of the receipt has exactly one stored result, ok and correct.
async fn assert_every_square_once(
    client: &CollectorClient,
    receipt: &Receipt,
    status: &BatchStatus,
) {
    let total = receipt.task_ids.len() as u64;
    assert_eq!(
        (status.total, status.done, status.ok, status.failed),
        (Some(total), total, total, 0)
    );
    let results: Vec<TaskResult> = client.results(&receipt.batch).await.expect("results");
    assert_eq!(results.len() as u64, total, "one stored result per task");
    let ids: HashSet<&str> = results.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(ids.len() as u64, total, "no task stored twice");
    assert!(receipt.task_ids.iter().all(|id| ids.contains(id.as_str())));
    for result in &results {
        let output = result.output.as_ref().expect("ok results carry output");
        let n = output["n"].as_i64().expect("n");
        assert_eq!(output["square"].as_i64(), Some(n * n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_one_of_two_consumers_loses_nothing() {
    let vhost = Vhost::new();
    let env = vhost.env(&[("FLEET_CONSUMER__WORKERS", "2")]);
    let settings = settings_of(&env);
    let collector = Service::collector(&settings);
    let victim = Process::spawn("fleet-consumer", &[], &env);
    let other = Process::spawn("fleet-consumer", &[], &env);
    let receipt = squares(&settings, 12_000).await;
    let client = CollectorClient::new(&settings.producer.collector_url);

    progress(&client, &receipt.batch, 1_000, Duration::from_secs(60)).await;
    let status = client
        .batch(&receipt.batch)
        .await
        .expect("status")
        .expect("known");
    assert!(
        12_000 - status.done >= 10_000,
        "at least 10,000 outstanding at the kill"
    );
    victim.kill9();
    let restarted = Process::spawn("fleet-consumer", &[], &env);

    let status = complete(&client, &receipt.batch, Duration::from_secs(240)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    eprintln!("kill -9 of a consumer: duplicates={}", status.duplicates);

    for consumer in [other, restarted] {
        assert!(consumer.terminate(Duration::from_secs(30)).success());
    }
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_collector_loses_nothing_and_stores_nothing_twice() {
    let vhost = Vhost::new();
    let env = vhost.env(&[("FLEET_CONSUMER__WORKERS", "2")]);
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let consumer = Service::builtin_consumer(&settings);
    let receipt = squares(&settings, 10_000).await;
    let client = CollectorClient::new(&settings.producer.collector_url);

    progress(&client, &receipt.batch, 2_000, Duration::from_secs(60)).await;
    collector.kill9();
    let collector = Process::spawn("fleet-collector", &[], &env);

    let status = complete(&client, &receipt.batch, Duration::from_secs(240)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    eprintln!("kill -9 of the collector: duplicates={}", status.duplicates);
    consumer.stop().await.expect("consumer drains cleanly");
    assert!(collector.terminate(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_consumer_connection_loses_nothing_and_the_consumer_comes_back() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[
        ("FLEET_CONSUMER__WORKERS", "2"),
        ("FLEET_CONSUMER__IO_CONCURRENCY", "20"),
    ]);
    let proxy = Proxy::start(fleet_tests::broker_host()).await;
    let mut through_proxy = settings.clone();
    through_proxy.amqp.url = format!("amqp://guest:guest@{}/{}", proxy.addr, vhost.name);
    let collector = Service::collector(&settings);
    let cut = Service::builtin_consumer(&through_proxy);
    let client = CollectorClient::new(&settings.producer.collector_url);

    // Only the consumer behind the proxy runs at first, so it holds unacked tasks at the cut.
    let slow = publish(
        &settings,
        "sleep",
        (0..200).map(|_| json!({ "ms": 50 })).collect(),
    )
    .await;
    progress(&client, &slow.batch, 20, Duration::from_secs(60)).await;
    proxy.cut();
    let status = complete(&client, &slow.batch, Duration::from_secs(60)).await;
    assert_eq!((status.done, status.ok, status.failed), (200, 200, 0));
    let results = client.results(&slow.batch).await.expect("results");
    let ids: HashSet<&str> = results.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(
        (results.len(), ids.len()),
        (200, 200),
        "one result per task"
    );
    assert!(
        proxy.accepted() >= 2,
        "the consumer connected again through the proxy"
    );
    assert!(cut.is_running(), "the consumer survived the cut");

    // A second round with a direct consumer beside it, cut twice mid-run.
    let direct = Service::builtin_consumer(&settings);
    let receipt = squares(&settings, 5_000).await;
    progress(&client, &receipt.batch, 1_000, Duration::from_secs(60)).await;
    proxy.cut();
    progress(&client, &receipt.batch, 2_500, Duration::from_secs(60)).await;
    proxy.cut();
    let status = complete(&client, &receipt.batch, Duration::from_secs(120)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    assert!(proxy.accepted() >= 3);

    cut.stop().await.expect("consumer drains cleanly");
    direct.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_broker_restarts_lose_nothing_and_every_service_resumes_by_itself() {
    let mut node = Node::start();
    let dir = std::env::temp_dir().join(format!("fleet-restart-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let env = fleet_tests::fleet_env(
        &node.url(),
        &dir,
        &[
            ("FLEET_CONSUMER__WORKERS", "2"),
            ("FLEET_AMQP__HEARTBEAT_SECS", "5"),
        ],
    );
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let consumers = [
        Process::spawn("fleet-consumer", &[], &env),
        Process::spawn("fleet-consumer", &[], &env),
    ];
    let api = Service::producer_api(&settings);
    let http = reqwest::Client::new();
    let post_task = || {
        http.post(format!("http://{}/v1/tasks", settings.producer.listen))
            .json(&json!({ "kind": "square", "payload": { "n": 7 } }))
            .send()
    };
    let accepted = eventually(
        "the HTTP API to accept a task",
        Duration::from_secs(30),
        || async { post_task().await.ok().filter(|r| r.status() == 202) },
    )
    .await;
    assert_eq!(accepted.status(), 202);

    let receipt = squares(&settings, 6_000).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    let mut done = 0;
    for restart in 0..2 {
        done += 1_000;
        progress(&client, &receipt.batch, done, Duration::from_secs(60)).await;
        node.stop();
        let refused = post_task()
            .await
            .expect("the API answers while the broker is down");
        assert_eq!(
            refused.status(),
            503,
            "no confirm, no 202 (restart {restart})"
        );
        node.restart();
        // Every service must resume on its own within 30 s of the broker answering.
        let resumed = Instant::now();
        let before = client
            .batch(&receipt.batch)
            .await
            .expect("status")
            .expect("known")
            .done;
        done = before + 200;
        progress(
            &client,
            &receipt.batch,
            done.min(6_000),
            Duration::from_secs(30),
        )
        .await;
        eprintln!(
            "restart {restart}: work resumed after {:?}",
            resumed.elapsed()
        );
        eventually(
            "the HTTP API to accept again",
            Duration::from_secs(30),
            || async { post_task().await.ok().filter(|r| r.status() == 202) },
        )
        .await;
    }
    let status = complete(&client, &receipt.batch, Duration::from_secs(240)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    eprintln!("two broker restarts: duplicates={}", status.duplicates);

    for consumer in consumers {
        assert!(consumer.terminate(Duration::from_secs(30)).success());
    }
    assert!(collector.terminate(Duration::from_secs(30)).success());
    api.stop().await.expect("the API stops cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_running_tasks_finish_and_returns_the_rest() {
    let vhost = Vhost::new();
    // Two 5-second tasks run, two more are prefetched and wait for a slot.
    let env = vhost.env(&[
        ("FLEET_CONSUMER__WORKERS", "1"),
        ("FLEET_CONSUMER__PREFETCH_PER_WORKER", "4"),
        ("FLEET_CONSUMER__IO_CONCURRENCY", "2"),
    ]);
    let settings = settings_of(&env);
    let collector = Service::collector(&settings);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let receipt = publish(
        &settings,
        "sleep",
        (0..4).map(|_| json!({ "ms": 5000 })).collect(),
    )
    .await;
    eventually(
        "all four tasks delivered",
        Duration::from_secs(30),
        || async { (ready(&settings, topology::WORK_QUEUE).await == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stopping = Instant::now();
    let status = tokio::task::spawn_blocking(move || consumer.terminate(Duration::from_secs(30)))
        .await
        .expect("waiting for the consumer");
    assert!(status.success(), "a drained consumer exits 0: {status:?}");
    assert!(
        stopping.elapsed() >= Duration::from_secs(3),
        "it waited for the running tasks ({:?})",
        stopping.elapsed()
    );
    let client = CollectorClient::new(&settings.producer.collector_url);
    let finished = eventually(
        "the two running tasks' results",
        Duration::from_secs(10),
        || async {
            client
                .batch(&receipt.batch)
                .await
                .ok()
                .flatten()
                .filter(|s| s.done == 2)
        },
    )
    .await;
    assert_eq!((finished.ok, finished.duplicates), (2, 0));
    assert_eq!(
        ready(&settings, topology::WORK_QUEUE).await,
        2,
        "the unstarted two went back"
    );

    // Another consumer finishes the two returned tasks; the first two are never run again.
    let second = Service::builtin_consumer(&settings);
    let status = complete(&client, &receipt.batch, Duration::from_secs(30)).await;
    assert_eq!((status.done, status.ok, status.duplicates), (4, 4, 0));
    let results = client.results(&receipt.batch).await.expect("results");
    assert!(
        results
            .iter()
            .all(|r| r.attempts == 1 && r.status == Status::Ok)
    );
    second.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_exits_at_once_and_the_tasks_are_redelivered() {
    let vhost = Vhost::new();
    let env = vhost.env(&[("FLEET_CONSUMER__IO_CONCURRENCY", "4")]);
    let settings = settings_of(&env);
    let collector = Service::collector(&settings);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let receipt = publish(
        &settings,
        "sleep",
        (0..4).map(|_| json!({ "ms": 5000 })).collect(),
    )
    .await;
    eventually(
        "all four tasks delivered",
        Duration::from_secs(30),
        || async { (ready(&settings, topology::WORK_QUEUE).await == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    consumer.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    consumer.signal("TERM");
    let status = tokio::task::spawn_blocking(move || consumer.wait(Duration::from_secs(5)))
        .await
        .expect("waiting for the consumer");
    assert_eq!(status.code(), Some(130));
    assert!(stopping.elapsed() < Duration::from_secs(3));

    let second = Service::builtin_consumer(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(30)).await;
    assert_eq!((status.done, status.ok), (4, 4));
    second.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}
