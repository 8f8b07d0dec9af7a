//! Fault tests: nothing lost, nothing stuck. Processes killed with SIGKILL, connections cut by a
//! proxy, a broker of the test's own restarted, handlers that overrun, panic or abort.
//!
//! Each test is bounded in time; anything that stops a broker uses its own node ([`Node`]).

use fleet_consumer::registry::{HandlerError, TaskContext, Work};
use fleet_producer::client::CollectorClient;
use fleet_producer::collector::store::BatchStatus;
use fleet_producer::submit::{self, Receipt};
use fleet_shared::envelope::{Status, TaskResult};
use fleet_shared::publisher::Outgoing;
use fleet_shared::settings::Settings;
use fleet_shared::topology;
use fleet_tests::node::Node;
use fleet_tests::process::Process;
use fleet_tests::proxy::Proxy;
use fleet_tests::{Service, Vhost, complete, drain_dead, eventually, ready, settings_of};
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

/// Runs one quick task so a new consumer ends its slow start (prefetch 1 until one settles).
async fn warm_up(settings: &Settings) {
    let receipt = publish(settings, "sleep", vec![json!({ "ms": 1 })]).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    complete(&client, &receipt.batch, Duration::from_secs(30)).await;
    // The widening happens on the consumer's next 100 ms tick.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Starts a consumer process, warms it up, publishes four 5-second `sleep` tasks and returns once
/// the broker has delivered all four to it.
async fn four_long_tasks_delivered(
    env: &[(String, String)],
    settings: &Settings,
) -> (Process, Receipt) {
    let consumer = Process::spawn("fleet-consumer", &[], env);
    warm_up(settings).await;
    let tasks = (0..4).map(|_| json!({ "ms": 5000 })).collect();
    let receipt = publish(settings, "sleep", tasks).await;
    eventually(
        "all four tasks delivered",
        Duration::from_secs(30),
        || async { (ready(settings, topology::WORK_QUEUE).await == 0).then_some(()) },
    )
    .await;
    (consumer, receipt)
}

/// Waits until at least `done` results of `batch` are stored.
/// Waits until at least `done` results of `batch` are stored; returns the status that showed it.
async fn progress(
    client: &CollectorClient,
    batch: &str,
    done: u64,
    limit: Duration,
) -> BatchStatus {
    eventually(&format!("{done} results of {batch}"), limit, || async {
        client
            .batch(batch)
            .await
            .ok()
            .flatten()
            .filter(|s| s.done >= done)
    })
    .await
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
    // A window of 9 per consumer (no room for I/O tasks, which this test has none of), so the
    // kill comes while most of the batch is outstanding.
    let env = vhost.env(&[
        ("FLEET_CONSUMER__WORKERS", "2"),
        ("FLEET_CONSUMER__IO_CONCURRENCY", "1"),
    ]);
    let settings = settings_of(&env);
    let collector = Service::collector(&settings);
    // The whole batch is queued before the consumers start, so the kill below comes a few
    // hundred tasks in, however fast the publish or the consumers are.
    let receipt = squares(&settings, 12_000).await;
    let victim = Process::spawn("fleet-consumer", &[], &env);
    let other = Process::spawn("fleet-consumer", &[], &env);
    let client = CollectorClient::new(&settings.producer.collector_url);

    // Kill as soon as work is under way. Tasks still in the queue after the kill were
    // outstanding at the kill (so were the victim's unacked ones, which it puts back), so that
    // count bounds the outstanding from below, whatever the collector's flushes have shown.
    progress(&client, &receipt.batch, 1, Duration::from_secs(60)).await;
    victim.kill9();
    let waiting = ready(&settings, topology::WORK_QUEUE).await;
    assert!(
        waiting >= 10_000,
        "at least 10,000 outstanding at the kill, {waiting} still queued after it"
    );
    let restarted = Process::spawn("fleet-consumer", &[], &env);

    let status = complete(&client, &receipt.batch, Duration::from_secs(240)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    eprintln!(
        "kill -9 of a consumer: {waiting} queued after it, duplicates={}",
        status.duplicates
    );

    for consumer in [other, restarted] {
        assert!(consumer.terminate(Duration::from_secs(30)).success());
    }
    collector.stop().await.expect("collector drains cleanly");
}

/// Runs 10,000 squares with the collector as a process, stops it with `stop` after 2,000
/// results, starts it again, and returns the batch's final status once every task has its one
/// result.
async fn collector_stopped_mid_run(stop: fn(Process)) -> BatchStatus {
    let vhost = Vhost::new();
    let env = vhost.env(&[("FLEET_CONSUMER__WORKERS", "2")]);
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let consumer = Service::builtin_consumer(&settings);
    let receipt = squares(&settings, 10_000).await;
    let client = CollectorClient::new(&settings.producer.collector_url);

    progress(&client, &receipt.batch, 2_000, Duration::from_secs(60)).await;
    tokio::task::spawn_blocking(move || stop(collector))
        .await
        .expect("stopping the collector");
    let collector = Process::spawn("fleet-collector", &[], &env);

    let status = complete(&client, &receipt.batch, Duration::from_secs(240)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    consumer.stop().await.expect("consumer drains cleanly");
    assert!(collector.terminate(Duration::from_secs(30)).success());
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_collector_loses_nothing_and_stores_nothing_twice() {
    let status = collector_stopped_mid_run(Process::kill9).await;
    eprintln!("kill -9 of the collector: duplicates={}", status.duplicates);
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
            // A window of 9 (no room for I/O tasks, which this test has none of) keeps the
            // batch running across both restarts.
            ("FLEET_CONSUMER__IO_CONCURRENCY", "1"),
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
    let (consumer, receipt) = four_long_tasks_delivered(&env, &settings).await;
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
    let (consumer, receipt) = four_long_tasks_delivered(&env, &settings).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_sends_unconfirmed_publishes_again_after_a_cut() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let proxy = Proxy::start(fleet_tests::broker_host()).await;
    let mut through_proxy = settings.clone();
    through_proxy.amqp.url = format!("amqp://guest:guest@{}/{}", proxy.addr, vhost.name);

    let fleet_producer::submit::Batch { receipt, messages } = submit::batch(
        "square",
        (0..20_000i64).map(|n| json!({ "n": n })).collect(),
    );
    // Declare the topology first, so the queue can be watched from the start.
    let (connection, _) = submit::connect_publisher(&settings, "test")
        .await
        .expect("topology");
    let _ = connection.close(200, "done".into()).await;
    let publishing = tokio::spawn(async move {
        submit::publish_reliably(&through_proxy, "test-submit", messages).await
    });
    // Nothing consumes yet, so the work queue shows how far the publish has got.
    eventually(
        "part of the batch in the queue",
        Duration::from_secs(60),
        || async { (ready(&settings, topology::WORK_QUEUE).await >= 2_000).then_some(()) },
    )
    .await;
    proxy.cut();
    tokio::time::timeout(Duration::from_secs(120), publishing)
        .await
        .expect("the publish finishes")
        .expect("the publish task did not panic")
        .expect("every message confirmed in the end");
    assert!(proxy.accepted() >= 2, "the producer connected again");
    assert!(ready(&settings, topology::WORK_QUEUE).await >= 20_000);

    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(240)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    eprintln!("publish cut: duplicates={}", status.duplicates);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_over_its_time_limit_is_retried_then_failed_and_frees_its_slot() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[
        ("FLEET_CONSUMER__WORKERS", "1"),
        ("FLEET_CONSUMER__IO_CONCURRENCY", "1"),
        ("FLEET_CONSUMER__KINDS__SLEEP__TIME_LIMIT_MS", "300"),
        ("FLEET_CONSUMER__KINDS__SLEEP__MAX_ATTEMPTS", "2"),
        ("FLEET_CONSUMER__KINDS__SLEEP__RETRY_DELAYS_MS", "100"),
        ("FLEET_CONSUMER__KINDS__PRIMES__TIME_LIMIT_MS", "300"),
        ("FLEET_CONSUMER__KINDS__PRIMES__MAX_ATTEMPTS", "1"),
    ]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let started = Instant::now();

    // An I/O task of a minute on the only I/O slot, then quick ones behind it.
    let long = publish(&settings, "sleep", vec![json!({ "ms": 60_000 })]).await;
    let quick = publish(
        &settings,
        "sleep",
        (0..5).map(|_| json!({ "ms": 10 })).collect(),
    )
    .await;
    let status = complete(&client, &quick.batch, Duration::from_secs(20)).await;
    assert_eq!((status.ok, status.failed), (5, 0));
    complete(&client, &long.batch, Duration::from_secs(20)).await;
    let result = client
        .results(&long.batch)
        .await
        .expect("results")
        .remove(0);
    assert_eq!(result.status, Status::Failed);
    assert_eq!(
        result.attempts, 2,
        "retried once, per the kind's max_attempts"
    );
    let error = result.error.expect("a failed result says why");
    assert_eq!(error.kind, "timeout");
    assert!(error.message.contains("300 ms"), "{}", error.message);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(30),
        "the one-minute task should have been stopped at its limit twice, but this took {elapsed:?}"
    );

    // A compute task over its limit stops and gives its slot back to the next one.
    let big = publish(&settings, "primes", vec![json!({ "below": 50_000_000 })]).await;
    let small = publish(&settings, "square", vec![json!({ "n": 12 })]).await;
    let status = complete(&client, &small.batch, Duration::from_secs(20)).await;
    assert_eq!(status.ok, 1);
    complete(&client, &big.batch, Duration::from_secs(20)).await;
    let result = client.results(&big.batch).await.expect("results").remove(0);
    assert_eq!((result.status, result.attempts), (Status::Failed, 1));
    assert_eq!(result.error.expect("why").kind, "timeout");

    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

async fn panics(payload: Value, _: TaskContext) -> Result<Value, HandlerError> {
    panic!("asked to panic with {payload}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_handler_fails_its_task_and_the_worker_goes_on() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[("FLEET_CONSUMER__WORKERS", "1")]);
    let mut registry = fleet_consumer::handlers::registry(&settings).expect("built-ins");
    registry
        .register("panic-compute", Work::Compute, panics)
        .and_then(|r| r.register("panic-io", Work::Io, panics))
        .and_then(|r| r.register("panic-inline", Work::Inline, panics))
        .map(drop)
        .expect("distinct kinds");
    let collector = Service::collector(&settings);
    let consumer = Service::consumer(&settings, registry);
    let client = CollectorClient::new(&settings.producer.collector_url);

    for kind in ["panic-compute", "panic-io", "panic-inline"] {
        let receipt = publish(&settings, kind, vec![json!({ "boom": 1 })]).await;
        complete(&client, &receipt.batch, Duration::from_secs(30)).await;
        let result = client
            .results(&receipt.batch)
            .await
            .expect("results")
            .remove(0);
        assert_eq!(
            (result.status, result.attempts),
            (Status::Failed, 1),
            "{kind}"
        );
        let error = result.error.expect("why");
        assert_eq!(error.kind, "panic");
        assert!(
            error.message.contains("asked to panic with {\"boom\":1}"),
            "{}",
            error.message
        );
    }
    let mut reasons: Vec<String> = Vec::new();
    let waited = Instant::now();
    while reasons.len() < 3 && waited.elapsed() < Duration::from_secs(10) {
        reasons.extend(drain_dead(&settings).await.into_iter().map(|(r, _)| r));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .all(|r| r.starts_with("panic: handler panicked")),
        "{reasons:?}"
    );

    // The same worker slot goes on working.
    let receipt = squares(&settings, 100).await;
    let status = complete(&client, &receipt.batch, Duration::from_secs(30)).await;
    assert_every_square_once(&client, &receipt, &status).await;
    assert!(consumer.is_running());
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_kills_its_process_ends_in_fleet_dead_and_the_rest_is_done() {
    let vhost = Vhost::new();
    let env = vhost.env(&[
        ("FLEET_CONSUMER__WORKERS", "1"),
        ("FLEET_TOPOLOGY__DELIVERY_LIMIT", "3"),
    ]);
    let settings = settings_of(&env);
    let collector = Service::collector(&settings);
    let poison = publish(&settings, "abort", vec![json!({ "why": "poison" })]).await;
    let receipt = squares(&settings, 300).await;
    let client = CollectorClient::new(&settings.producer.collector_url);

    // A supervisor, as systemd or compose would be: start the consumer again whenever it dies.
    let mut consumer = Process::spawn("fleet-test-consumer", &[], &env);
    let mut restarts = 0;
    let started = Instant::now();
    let status = loop {
        if !consumer.is_running() {
            restarts += 1;
            consumer = Process::spawn("fleet-test-consumer", &[], &env);
        }
        if let Some(status) = client.batch(&receipt.batch).await.ok().flatten()
            && status.complete
            && ready(&settings, topology::DEAD_QUEUE).await == 1
        {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let status = client.batch(&receipt.batch).await;
            let dead = ready(&settings, topology::DEAD_QUEUE).await;
            panic!("stuck after {restarts} restarts: {status:?}, {dead} dead");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_every_square_once(&client, &receipt, &status).await;
    assert!(
        (3..=4).contains(&restarts),
        "one crash per delivery up to the limit: {restarts}"
    );

    let dead = fleet_producer::dlq::list(&settings)
        .await
        .expect("listing fleet.dead");
    assert_eq!(dead.len(), 1, "only the poison task is dead: {dead:?}");
    assert_eq!(dead[0].id.as_deref(), Some(poison.task_ids[0].as_str()));
    assert_eq!(dead[0].kind, "abort");
    assert!(
        dead[0]
            .reason
            .starts_with("delivery_limit (broker, queue fleet.tasks.default)"),
        "the broker says why: {}",
        dead[0].reason
    );
    assert!(consumer.terminate(Duration::from_secs(30)).success());
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_past_its_deadline_is_not_run_and_fails_as_expired() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let mut late = fleet_shared::envelope::Task::new(
        "late-1".into(),
        "sleep".into(),
        None,
        json!({ "ms": 5000 }),
    );
    late.deadline = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
    let mut timely = late.clone();
    timely.id = "timely-1".into();
    timely.payload = json!({ "ms": 1 });
    timely.deadline = Some(chrono::Utc::now() + chrono::Duration::minutes(5));
    publisher
        .publish_all(vec![Outgoing::task(&late), Outgoing::task(&timely)])
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;

    let client = CollectorClient::new(&settings.producer.collector_url);
    let result = eventually(
        "the late task's result",
        Duration::from_secs(30),
        || async { client.task("late-1").await.ok().flatten() },
    )
    .await;
    assert_eq!((result.status, result.attempts), (Status::Failed, 1));
    let error = result.error.expect("why");
    assert_eq!(error.kind, "expired");
    assert!(
        result.finished_at - result.started_at < chrono::Duration::seconds(1),
        "the 5-second handler never ran"
    );
    let result = eventually(
        "the timely task's result",
        Duration::from_secs(30),
        || async { client.task("timely-1").await.ok().flatten() },
    )
    .await;
    assert_eq!(result.status, Status::Ok);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_the_collector_mid_run_acks_all_it_stored() {
    let status = collector_stopped_mid_run(|collector| {
        let exit = collector.terminate(Duration::from_secs(15));
        assert!(exit.success(), "a drained collector exits 0: {exit:?}");
    })
    .await;
    assert_eq!(
        status.duplicates, 0,
        "everything stored before the stop was acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_cancelled_by_the_broker_subscribes_again() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let first = squares(&settings, 100).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    complete(&client, &first.batch, Duration::from_secs(30)).await;

    // Deleting the work queue makes the broker send basic.cancel to its consumers.
    let connection = fleet_shared::amqp::connect(&settings, "test-admin")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete(
            topology::WORK_QUEUE.into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("deleting the work queue");
    let _ = connection.close(200, "done".into()).await;

    // The consumer declares the queue again and takes new work without a restart.
    eventually(
        "the work queue to be back",
        Duration::from_secs(30),
        || async {
            let connection = fleet_shared::amqp::connect(&settings, "test-probe")
                .await
                .ok()?;
            let channel = connection.create_channel().await.ok()?;
            let back = channel
                .queue_declare(
                    topology::WORK_QUEUE.into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .ok()
                .filter(|q| q.consumer_count() == 1);
            let _ = connection.close(200, "done".into()).await;
            back.map(drop)
        },
    )
    .await;
    let second = squares(&settings, 100).await;
    let status = complete(&client, &second.batch, Duration::from_secs(30)).await;
    assert_every_square_once(&client, &second, &status).await;
    assert!(consumer.is_running());
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

/// A subscription's lost-watch, made once and raced again and again (as the collector's flushes
/// race it), stays pending while the connection lives and resolves, naming the connection,
/// within its poll interval after the connection is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriptions_lost_watch_resolves_after_a_cut() {
    let vhost = Vhost::new();
    let proxy = Proxy::start(fleet_tests::broker_host()).await;
    let mut settings = vhost.settings(&[]);
    settings.amqp.url = format!("amqp://guest:guest@{}/{}", proxy.addr, vhost.name);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let common = fleet_shared::observe::Observer::new(Default::default()).common;
    let subscription = fleet_shared::amqp::subscribe(
        &settings,
        "test-watch",
        topology::RESULTS_QUEUE,
        1,
        &common,
        &shutdown,
    )
    .await
    .expect("subscribed")
    .expect("not shut down");
    let watch = subscription.lost_watch();
    tokio::pin!(watch);
    for _ in 0..3 {
        assert!(
            tokio::time::timeout(Duration::from_millis(150), &mut watch)
                .await
                .is_err(),
            "the watch resolved on a live connection"
        );
    }
    assert!(subscription.lost().is_none());
    proxy.cut();
    let why = tokio::time::timeout(Duration::from_secs(5), &mut watch)
        .await
        .expect("the watch resolves within 5 s of the cut");
    assert_eq!(why.to_string(), "the connection is closed");
    subscription.close().await;
}
