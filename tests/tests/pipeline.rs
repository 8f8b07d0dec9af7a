//! The fleet end to end against the real broker: producer -> consumers -> results -> collector.

use fleet_consumer::registry::{HandlerError, TaskContext, Work};
use fleet_producer::client::CollectorClient;
use fleet_producer::submit;
use fleet_shared::envelope::{self, Status, Task, TaskResult};
use fleet_shared::publisher::Outgoing;
use fleet_shared::topology;
use fleet_tests::{Service, Vhost, complete, drain_dead, eventually, ready, unacked};
use serde_json::{Value, json};
use std::time::Duration;

async fn one_result(client: &CollectorClient, batch: &str) -> TaskResult {
    complete(client, batch, Duration::from_secs(60)).await;
    let mut results = client.results(batch).await.expect("reading results");
    assert_eq!(results.len(), 1, "one result for a one-task batch");
    results.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_squares_through_two_consumers_are_stored_exactly_once() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[("FLEET_CONSUMER__WORKERS", "2")]);
    let collector = Service::collector(&settings);
    let consumers = [
        Service::builtin_consumer(&settings),
        Service::builtin_consumer(&settings),
    ];

    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let payloads: Vec<Value> = (0..10_000i64).map(|n| json!({ "n": n })).collect();
    let receipt = submit::publish_batch(&publisher, "square", payloads)
        .await
        .expect("published");
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(240)).await;

    assert_eq!(status.total, Some(10_000));
    assert_eq!(
        (status.done, status.ok, status.failed, status.duplicates),
        (10_000, 10_000, 0, 0)
    );
    let results = client.results(&receipt.batch).await.expect("results");
    assert_eq!(results.len(), 10_000);
    let mut workers = std::collections::HashSet::new();
    for result in &results {
        let output = result.output.as_ref().expect("ok results carry output");
        let n = output["n"].as_i64().expect("n");
        assert_eq!(
            output["square"].as_i64(),
            Some(n * n),
            "task {}",
            result.task_id
        );
        assert_eq!(result.attempts, 1);
        workers.insert(
            result
                .worker
                .rsplit_once('/')
                .map(|(process, _)| process.to_owned()),
        );
    }
    let ids: std::collections::HashSet<_> = results.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(ids.len(), 10_000, "one result per task id");
    assert!(receipt.task_ids.iter().all(|id| ids.contains(id.as_str())));

    let _ = connection.close(200, "done".into()).await;
    for consumer in consumers {
        consumer.stop().await.expect("consumer drains cleanly");
    }
    collector.stop().await.expect("collector drains cleanly");
}

/// The consumer's and the collector's acks wait a moment to share a frame, but never for more
/// work: once a batch is stored and nothing else comes, the broker holds nothing unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_acks_go_out_without_more_work() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[("FLEET_CONSUMER__WORKERS", "2")]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let client = CollectorClient::new(&settings.producer.collector_url);
    // Once with a single task, once with a few settled close together.
    for tasks in [1u64, 5] {
        let payloads: Vec<Value> = (0..tasks).map(|n| json!({ "n": n })).collect();
        let receipt = submit::publish_batch(&publisher, "square", payloads)
            .await
            .expect("published");
        let status = complete(&client, &receipt.batch, Duration::from_secs(30)).await;
        assert_eq!((status.done, status.ok), (tasks, tasks));
        eventually("every ack sent", Duration::from_secs(10), || async {
            (unacked(&vhost.name) == 0).then_some(())
        })
        .await;
        assert_eq!(ready(&settings, topology::WORK_QUEUE).await, 0);
        assert_eq!(ready(&settings, topology::RESULTS_QUEUE).await, 0);
    }
    assert!(consumer.is_running() && collector.is_running());
    let _ = connection.close(200, "done".into()).await;
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_results_reach_the_store_exactly_once_in_fewer_messages() {
    let vhost = Vhost::new();
    let listen = fleet_tests::free_address();
    let settings = vhost.settings(&[
        ("FLEET_CONSUMER__WORKERS", "2"),
        ("FLEET_CONSUMER__RESULTS_PER_MESSAGE", "64"),
        ("FLEET_CONSUMER__LISTEN", &listen),
    ]);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    // 2,000 squares, and 2 whose square overflows: failed results travel in groups too.
    let payloads: Vec<Value> = (0..2_000i64)
        .map(|n| json!({ "n": n }))
        .chain([
            json!({ "n": 4_000_000_000i64 }),
            json!({ "n": -4_000_000_000i64 }),
        ])
        .collect();
    let receipt = submit::publish_batch(&publisher, "square", payloads)
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;

    // The consumer alone first, so that what it sent waits in fleet.results to be looked at.
    let consumer = Service::builtin_consumer(&settings);
    let base = format!("http://{listen}");
    let series =
        |outcome: &str| format!(r#"fleet_tasks_total{{kind="square",outcome="{outcome}"}}"#);
    let (ok, failed) = (series("ok"), series("failed"));
    eventually("2,002 tasks settled", Duration::from_secs(120), || async {
        let done = (
            fleet_tests::metric(&base, &ok).await?,
            fleet_tests::metric(&base, &failed).await?,
        );
        (done == (2_000.0, 2.0)).then_some(())
    })
    .await;
    let sent = fleet_tests::metric(&base, "fleet_result_messages_total")
        .await
        .expect("the consumer's message count");
    // Every message it sent is in the queue, with the batch's manifest.
    let waiting = eventually(
        "the results in fleet.results",
        Duration::from_secs(30),
        || async {
            let waiting = ready(&settings, topology::RESULTS_QUEUE).await;
            (f64::from(waiting) == sent + 1.0).then_some(waiting)
        },
    )
    .await;
    println!("2,002 results in {sent} messages");
    assert!(
        sent <= 1_001.0,
        "results ready together share messages: 2,002 results in {sent} messages"
    );
    assert!(
        sent >= (2_002.0 / 64.0_f64).ceil(),
        "at most 64 in one: {sent}"
    );
    // On the wire: some message is a v1 result group of 2 to 64 results.
    let groups = peek_result_messages(&settings, waiting).await;
    let sizes: Vec<usize> = groups
        .iter()
        .filter_map(|(_, message)| match message {
            envelope::ResultMessage::Results(results) => Some(results.len()),
            _ => None,
        })
        .collect();
    assert!(
        !sizes.is_empty(),
        "no group among {} messages",
        groups.len()
    );
    assert!(sizes.iter().all(|n| (2..=64).contains(n)), "{sizes:?}");

    let collector = Service::collector(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(120)).await;
    assert_eq!(
        (status.done, status.ok, status.failed, status.duplicates),
        (2_002, 2_000, 2, 0)
    );
    let results = client.results(&receipt.batch).await.expect("results");
    let ids: std::collections::HashSet<_> = results.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(ids.len(), 2_002, "one result per task id");
    assert!(receipt.task_ids.iter().all(|id| ids.contains(id.as_str())));
    for result in &results {
        assert!(result.traceparent.is_some(), "each result keeps its trace");
        match result.status {
            Status::Ok => {
                let output = result.output.as_ref().expect("ok results carry output");
                let n = output["n"].as_i64().expect("n");
                assert_eq!(output["square"].as_i64(), Some(n * n));
            }
            Status::Failed => {
                let error = result.error.as_ref().expect("failed results say why");
                assert_eq!(error.kind, "overflow");
            }
        }
    }
    let dead = drain_dead(&settings).await;
    assert_eq!(dead.len(), 2, "the two overflowing tasks are dead-lettered");
    assert_eq!(ready(&settings, topology::RESULTS_QUEUE).await, 0);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

/// A handler whose output is `kib` KiB of text.
async fn big(payload: Value, _: TaskContext) -> Result<Value, HandlerError> {
    let kib = payload["kib"].as_u64().unwrap_or(0);
    Ok(json!({ "blob": "x".repeat(usize::try_from(kib * 1024).unwrap_or(0)) }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_of_large_results_is_split_below_the_message_limit() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[("FLEET_CONSUMER__RESULTS_PER_MESSAGE", "256")]);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    // 40 results of 300 KiB: 12 MB, so a group of them must be split at 1 MiB.
    let payloads: Vec<Value> = (0..40).map(|_| json!({ "kib": 300 })).collect();
    let receipt = submit::publish_batch(&publisher, "big", payloads)
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    let mut registry = fleet_consumer::handlers::registry(&settings).expect("built-ins");
    registry
        .register("big", Work::Inline, big)
        .expect("a new kind");
    let consumer = Service::consumer(&settings, registry);
    // Every task's result waits in fleet.results (with the manifest) before the collector runs.
    let waiting = eventually(
        "40 results in fleet.results",
        Duration::from_secs(60),
        || async {
            let waiting = ready(&settings, topology::RESULTS_QUEUE).await;
            let messages = peek_result_messages(&settings, waiting).await;
            let results: usize = messages
                .iter()
                .map(|(_, message)| match message {
                    envelope::ResultMessage::Result(_) => 1,
                    envelope::ResultMessage::Results(group) => group.len(),
                    envelope::ResultMessage::Manifest(_) => 0,
                })
                .sum();
            (results == 40).then_some(messages)
        },
    )
    .await;
    let limit = fleet_consumer::settle::MAX_GROUP_BYTES;
    assert!(
        waiting
            .iter()
            .any(|(_, m)| matches!(m, envelope::ResultMessage::Results(_))),
        "results ready together were grouped"
    );
    for (bytes, message) in &waiting {
        if let envelope::ResultMessage::Results(group) = message {
            assert!(
                *bytes <= limit,
                "a group of {} is {bytes} bytes, over {limit}",
                group.len()
            );
        }
    }
    println!("40 results of 300 KiB in {} messages", waiting.len() - 1);

    let collector = Service::collector(&settings);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(60)).await;
    assert_eq!(
        (status.done, status.ok, status.failed, status.duplicates),
        (40, 40, 0, 0)
    );
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

/// Reads (and leaves in the queue) the first `count` messages of `fleet.results`, decoded. A
/// consumer, not `basic.get`, which a single-active-consumer quorum queue refuses.
async fn peek_result_messages(
    settings: &fleet_shared::settings::Settings,
    count: u32,
) -> Vec<(usize, envelope::ResultMessage)> {
    use futures_util::StreamExt as _;
    use lapin::options::BasicConsumeOptions;
    let connection = fleet_shared::amqp::connect(settings, "test-results-reader")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut deliveries = channel
        .basic_consume(
            topology::RESULTS_QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    let mut messages = Vec::new();
    while messages.len() < count as usize {
        let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .expect("a message within 10 s")
            .expect("the stream goes on")
            .expect("a delivery");
        let message = envelope::decode_result(&delivery.data).expect("a v1 message");
        messages.push((delivery.data.len(), message));
    }
    // Unacked: closing the connection puts every one of them back.
    let _ = connection.close(200, "done".into()).await;
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_work_queues_tasks_are_spread_over_both_and_one_consumer_takes_them_all() {
    let vhost = Vhost::new();
    let sharded = [("FLEET_TOPOLOGY__WORK_QUEUES", "2")];
    let settings = vhost.settings(&sharded);
    // The admin (guest) declares the topology; the producer and consumer roles do the rest, so
    // their permissions cover the shards' exchange and queue.
    let (connection, _) = submit::connect_publisher(&settings, "test-setup")
        .await
        .expect("topology");
    let _ = connection.close(200, "declared".into()).await;
    let as_role = |role: fleet_shared::roles::Role| {
        let user = fleet_tests::User::new();
        user.permit(&vhost.name, role.configure, role.write, role.read);
        let settings = fleet_tests::settings_of(&vhost.env_as(&user, &sharded));
        (user, settings)
    };
    let (_producer, producer) = as_role(fleet_shared::roles::PRODUCER);
    let (_consumer, consumer) = as_role(fleet_shared::roles::CONSUMER);
    let (connection, publisher) = submit::connect_publisher(&producer, "test")
        .await
        .expect("publisher");
    let payloads: Vec<Value> = (0..2_000i64).map(|n| json!({ "n": n })).collect();
    let receipt = submit::publish_batch(&publisher, "square", payloads)
        .await
        .expect("published");
    // A task published without shards (an outside publisher, or a retry coming back) goes to
    // fleet.tasks, which is shard 0.
    let plain = Task::new("plain-1".into(), "square".into(), None, json!({ "n": 7 }));
    publisher
        .publish(Outgoing::task(&plain))
        .await
        .expect("published to fleet.tasks");
    let _ = connection.close(200, "done".into()).await;
    assert_eq!(topology::work_queue(1), "fleet.tasks.default.1");
    let (first, second) = (
        ready(&settings, topology::WORK_QUEUE).await,
        ready(&settings, &topology::work_queue(1)).await,
    );
    assert_eq!(first + second, 2_001, "every task in one of the two queues");
    // By a hash of the task id: about half each.
    assert!((850..=1_150).contains(&second), "{first} and {second}");

    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&consumer);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(120)).await;
    assert_eq!(
        (status.done, status.ok, status.failed, status.duplicates),
        (2_000, 2_000, 0, 0)
    );
    let square = eventually(
        "the unsharded task's result",
        Duration::from_secs(30),
        || async { client.task("plain-1").await.ok().flatten() },
    )
    .await;
    assert_eq!(square.output, Some(json!({ "n": 7, "square": 49 })));
    assert_eq!(ready(&settings, topology::WORK_QUEUE).await, 0);
    assert_eq!(ready(&settings, &topology::work_queue(1)).await, 0);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_unknown_and_oversized_messages_are_dead_lettered_with_reasons() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[("FLEET_CONSUMER__MAX_MESSAGE_BYTES", "65536")]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");

    let raw = |routing_key: &str, body: Vec<u8>| Outgoing {
        exchange: topology::TASKS_EXCHANGE.to_owned(),
        routing_key: routing_key.to_owned(),
        body,
        properties: lapin::BasicProperties::default(),
    };
    let mut bad = Vec::new();
    for i in 0..100 {
        bad.push(raw("square", format!("{{not json {i}").into_bytes()));
        let unknown = Task::new(
            format!("unknown-{i}"),
            "no-such-kind".into(),
            None,
            json!({}),
        );
        bad.push(Outgoing::task(&unknown));
    }
    for i in 0..10 {
        let huge = Task::new(
            format!("huge-{i}"),
            "square".into(),
            None,
            json!({ "pad": "x".repeat(100_000), "n": 1 }),
        );
        bad.push(Outgoing::task(&huge));
        let future =
            json!({ "v": 2, "id": format!("future-{i}"), "kind": "square", "payload": {} });
        bad.push(raw("square", serde_json::to_vec(&future).expect("JSON")));
    }
    let payloads: Vec<Value> = (0..1000i64).map(|n| json!({ "n": n })).collect();
    let (published_bad, receipt) = tokio::join!(
        publisher.publish_all(bad),
        submit::publish_batch(&publisher, "square", payloads)
    );
    assert_eq!(published_bad.expect("bad messages published"), 220);
    let receipt = receipt.expect("good batch published");

    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(120)).await;
    assert_eq!((status.done, status.ok, status.failed), (1000, 1000, 0));

    let dead = eventually("220 dead letters", Duration::from_secs(30), {
        let mut all = Vec::new();
        let settings = settings.clone();
        move || {
            let settings = settings.clone();
            let mut so_far = std::mem::take(&mut all);
            async move {
                so_far.extend(drain_dead(&settings).await);
                if so_far.len() >= 220 {
                    Some(so_far)
                } else {
                    None
                }
            }
        }
    })
    .await;
    assert_eq!(dead.len(), 220, "exactly the bad messages are dead");
    let count = |needle: &str| {
        dead.iter()
            .filter(|(reason, _)| reason.contains(needle))
            .count()
    };
    assert_eq!(count("undecodable body"), 100);
    assert_eq!(count("unknown kind `no-such-kind`"), 100);
    assert_eq!(count("too large"), 10);
    assert_eq!(
        count("unsupported envelope version 2 (this build reads 1)"),
        10
    );
    assert!(
        dead.iter().any(|(_, body)| body.len() > 100_000),
        "dead letters keep the whole body"
    );

    // Still consuming after all that.
    let after = submit::publish_batch(&publisher, "square", vec![json!({ "n": 12 })])
        .await
        .expect("published");
    let result = one_result(&client, &after.batch).await;
    assert_eq!(result.output, Some(json!({ "n": 12, "square": 144 })));
    assert!(consumer.is_running());

    let _ = connection.close(200, "done".into()).await;
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_runs_allow_listed_programs_with_argv_and_stdin_and_nothing_else() {
    let vhost = Vhost::new();
    let marker = vhost.dir.join("must-not-exist");
    let settings = vhost.settings(&[
        ("FLEET_CONSUMER__EXEC__PROGRAMS__ECHO", "/bin/echo"),
        ("FLEET_CONSUMER__EXEC__PROGRAMS__CAT", "/bin/cat"),
        (
            "FLEET_CONSUMER__EXEC__PROGRAMS__PRINTENV",
            "/usr/bin/printenv",
        ),
        ("FLEET_CONSUMER__EXEC__PROGRAMS__SLEEP", "/bin/sleep"),
        ("FLEET_CONSUMER__EXEC__TIMEOUT_MS", "300"),
        ("FLEET_CONSUMER__EXEC__MAX_OUTPUT_BYTES", "1000"),
        ("FLEET_CONSUMER__KINDS__EXEC__MAX_ATTEMPTS", "1"),
    ]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let client = CollectorClient::new(&settings.producer.collector_url);
    let run = |payload: Value| {
        let (publisher, client) = (publisher.clone(), client.clone());
        async move {
            let receipt = submit::publish_batch(&publisher, "exec", vec![payload])
                .await
                .expect("published");
            one_result(&client, &receipt.batch).await
        }
    };

    let echo = run(json!({ "program": "echo", "args": ["hello", "two words", "$HOME"] })).await;
    assert_eq!(echo.status, Status::Ok);
    let out = echo.output.expect("output");
    assert_eq!(out["exit_code"], 0);
    assert_eq!(
        out["stdout"], "hello two words $HOME\n",
        "argv passes through no shell"
    );

    let cat = run(json!({ "program": "cat", "stdin": "piped in\nsecond line" })).await;
    assert_eq!(
        cat.output.expect("output")["stdout"],
        "piped in\nsecond line"
    );

    // printenv, not env: env runs other programs, and settings refuse it on the allow-list.
    let env = run(json!({ "program": "printenv" })).await;
    assert_eq!(
        env.output.expect("output")["stdout"],
        "",
        "the environment is cleared"
    );

    let sh = run(json!({ "program": "sh", "args": ["-c", format!("touch {}", marker.display())] }))
        .await;
    assert_eq!(sh.status, Status::Failed);
    let error = sh.error.expect("a failed result says why");
    assert_eq!(error.kind, "not_allowed");
    assert!(
        error
            .message
            .contains("`sh` is not on this consumer's exec allow-list"),
        "{}",
        error.message
    );
    assert!(!marker.exists(), "nothing ran");

    let big = run(json!({ "program": "cat", "stdin": "x".repeat(200_000) })).await;
    let out = big.output.expect("output");
    assert_eq!(
        out["stdout"].as_str().map(str::len),
        Some(1000),
        "output capped"
    );
    assert_eq!(out["truncated"], true);

    let started = std::time::Instant::now();
    let slow = run(json!({ "program": "sleep", "args": ["5"] })).await;
    assert_eq!((slow.status, slow.attempts), (Status::Failed, 1));
    let error = slow.error.expect("why");
    assert_eq!(error.kind, "timeout");
    assert!(error.message.contains("was killed"), "{}", error.message);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "killed, not waited for"
    );

    let _ = connection.close(200, "done".into()).await;
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[derive(serde::Deserialize)]
struct Flaky {
    fail_times: u32,
}

async fn flaky(payload: Flaky, ctx: TaskContext) -> Result<Value, HandlerError> {
    if ctx.attempt < payload.fail_times {
        return Err(HandlerError::retryable(
            "flaky",
            format!("attempt {} fails on purpose", ctx.attempt),
        ));
    }
    Ok(json!({ "succeeded_on_attempt": ctx.attempt }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_failing_retryably_twice_then_succeeding_gives_one_ok_result_with_three_attempts()
{
    let vhost = Vhost::new();
    let settings = vhost.settings(&[("FLEET_TOPOLOGY__RETRY_DELAYS_MS", "100,200")]);
    let collector = Service::collector(&settings);
    let mut registry = fleet_consumer::handlers::registry(&settings).expect("registry");
    registry
        .register("flaky", Work::Io, flaky)
        .expect("new kind");
    let consumer = Service::consumer(&settings, registry);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let client = CollectorClient::new(&settings.producer.collector_url);

    let receipt = submit::publish_batch(&publisher, "flaky", vec![json!({ "fail_times": 2 })])
        .await
        .expect("published");
    let result = one_result(&client, &receipt.batch).await;
    assert_eq!(result.status, Status::Ok);
    assert_eq!(result.attempts, 3);
    assert_eq!(result.output, Some(json!({ "succeeded_on_attempt": 2 })));
    let status = client
        .batch(&receipt.batch)
        .await
        .expect("status")
        .expect("known");
    assert_eq!((status.done, status.ok, status.duplicates), (1, 1, 0));

    // More failures than attempts allow: a failed result and a dead letter saying why.
    let receipt = submit::publish_batch(&publisher, "flaky", vec![json!({ "fail_times": 99 })])
        .await
        .expect("published");
    let result = one_result(&client, &receipt.batch).await;
    assert_eq!(result.status, Status::Failed);
    assert_eq!(result.attempts, settings.consumer.max_attempts);
    let dead = drain_dead(&settings).await;
    let reasons: Vec<&str> = dead.iter().map(|(reason, _)| reason.as_str()).collect();
    assert_eq!(dead.len(), 1, "dead letters: {reasons:?}");
    assert!(
        dead[0].0.starts_with("flaky: attempt 4 fails on purpose"),
        "{}",
        dead[0].0
    );

    let _ = connection.close(200, "done".into()).await;
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_batches_and_tasks_are_read_back_from_the_collector_and_bad_json_is_400() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[
        ("FLEET_PRODUCER__MAX_BATCH", "50"),
        ("FLEET_PRODUCER__MAX_BODY_BYTES", "20000"),
    ]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let api = Service::producer_api(&settings);
    let http = reqwest::Client::new();
    let base = format!("http://{}", settings.producer.listen);
    let client = CollectorClient::new(&settings.producer.collector_url);

    let body = json!({ "kind": "square", "payloads": [{ "n": 3411 }, { "n": 1605 }, { "n": 68 }] });
    let response = eventually(
        "the producer API to answer",
        Duration::from_secs(20),
        || {
            let request = http.post(format!("{base}/v1/batches")).json(&body);
            async move { request.send().await.ok() }
        },
    )
    .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.expect("JSON");
    assert_eq!(accepted["total"], 3);
    let batch = accepted["batch"].as_str().expect("batch id").to_owned();
    let status = complete(&client, &batch, Duration::from_secs(60)).await;
    assert_eq!((status.total, status.ok, status.failed), (Some(3), 3, 0));
    let mut squares: Vec<i64> = client
        .results(&batch)
        .await
        .expect("results")
        .iter()
        .map(|r| {
            r.output.as_ref().expect("output")["square"]
                .as_i64()
                .expect("number")
        })
        .collect();
    squares.sort_unstable();
    assert_eq!(squares, vec![4624, 2_576_025, 11_634_921]);

    let response = http
        .post(format!("{base}/v1/tasks"))
        .json(&json!({ "kind": "square", "payload": { "n": 3_037_000_500i64 }, "id": "my-key-1" }))
        .send()
        .await
        .expect("POST /v1/tasks");
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<Value>().await.expect("JSON"),
        json!({ "id": "my-key-1" })
    );
    let stored = eventually(
        "task my-key-1 to be stored",
        Duration::from_secs(60),
        || {
            let request = http.get(format!(
                "{}/v1/tasks/my-key-1",
                settings.producer.collector_url
            ));
            async move {
                let response = request.send().await.ok()?;
                if response.status() != 200 {
                    return None;
                }
                envelope::decode_result(&response.bytes().await.ok()?).ok()
            }
        },
    )
    .await;
    let envelope::ResultMessage::Result(stored) = stored else {
        panic!("a result, not a manifest")
    };
    assert_eq!(
        stored.status,
        Status::Failed,
        "3037000500 squared overflows i64"
    );
    assert_eq!(stored.error.expect("why").kind, "overflow");

    let missing = http
        .get(format!(
            "{}/v1/tasks/no-such-task",
            settings.producer.collector_url
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);

    for bad in [
        r#"{"kind": "square", "payloads": [1,2"#,
        r#"{"kind": "square"}"#,
        "[]",
    ] {
        let response = http
            .post(format!("{base}/v1/batches"))
            .header("content-type", "application/json")
            .body(bad)
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status().as_u16() / 100, 4, "{bad}");
        let error: Value = response.json().await.expect("errors are JSON");
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {error}"
        );
    }
    let malformed = http
        .post(format!("{base}/v1/tasks"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST");
    assert_eq!(malformed.status(), 400);

    // Caps: more tasks than producer.max_batch is a 400; a body over max_body_bytes a 413.
    let many = json!({ "kind": "square", "payloads": vec![json!({ "n": 1 }); 51] });
    let response = http
        .post(format!("{base}/v1/batches"))
        .json(&many)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("errors are JSON");
    assert_eq!(error["error"], "`payloads` must hold 1 to 50 payloads");
    let huge = json!({ "kind": "square", "payload": { "pad": "x".repeat(30_000) } });
    let response = http
        .post(format!("{base}/v1/tasks"))
        .json(&huge)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 413);

    api.stop().await.expect("API stops cleanly");
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_in_exactly_one_delay_queue() {
    let vhost = Vhost::new();
    // Long delays, so the retry is still waiting when the queues are counted.
    let settings = vhost.settings(&[("FLEET_TOPOLOGY__RETRY_DELAYS_MS", "60000,120000")]);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let task = Task::new("retry-1".into(), "square".into(), None, json!({ "n": 2 }));
    let retry = Outgoing::forward(
        topology::RETRY_EXCHANGE,
        "square",
        envelope::encode(&task),
        &Outgoing::task(&task).properties,
        vec![(
            envelope::HEADER_DELAY,
            fleet_shared::publisher::header_str(&topology::delay_key(60_000)),
        )],
    );
    publisher.publish(retry).await.expect("retry published");
    let count = |queue: String| {
        let channel = publisher.channel().clone();
        async move {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("queue exists")
                .message_count()
        }
    };
    assert_eq!(count(topology::retry_queue(60_000)).await, 1);
    assert_eq!(count(topology::retry_queue(120_000)).await, 0);
    assert_eq!(count(topology::WORK_QUEUE.to_owned()).await, 0);
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_and_manifests_count_only_from_their_own_exchange() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = Service::collector(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let result = |id: &str| TaskResult {
        v: envelope::VERSION,
        task_id: id.to_owned(),
        batch: Some("forged".to_owned()),
        kind: "square".to_owned(),
        status: Status::Ok,
        output: Some(json!({ "n": 1, "square": 1 })),
        error: None,
        attempts: 1,
        worker: "nowhere/0/0".to_owned(),
        started_at: chrono::Utc::now(),
        finished_at: chrono::Utc::now(),
        published_by: None,
        traceparent: None,
    };
    let mut forged = Outgoing::result(&result("forged-1"));
    forged.exchange = topology::BATCHES_EXCHANGE.to_owned();
    let mut wrong_manifest = Outgoing::manifest(&fleet_shared::envelope::BatchManifest::new(
        "forged".into(),
        1,
        "square".into(),
    ));
    wrong_manifest.exchange = topology::RESULTS_EXCHANGE.to_owned();
    let genuine = Outgoing::result(&result("genuine-1"));
    let group = |ids: &[&str]| {
        let encoded: Vec<_> = ids
            .iter()
            .map(|id| envelope::encode_result(&result(id)))
            .collect();
        Outgoing::results(&encoded.iter().map(|r| &**r).collect::<Vec<_>>())
    };
    let genuine_group = group(&["genuine-2", "genuine-3"]);
    let mut forged_group = group(&["forged-2"]);
    forged_group.exchange = topology::BATCHES_EXCHANGE.to_owned();
    let mut empty_group = group(&[]);
    empty_group.body = br#"{"v":1,"type":"results","results":[]}"#.to_vec();
    publisher
        .publish_all(vec![
            forged,
            wrong_manifest,
            genuine,
            genuine_group,
            forged_group,
            empty_group,
        ])
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;

    let client = CollectorClient::new(&settings.producer.collector_url);
    for id in ["genuine-1", "genuine-2", "genuine-3"] {
        eventually(
            &format!("the genuine result {id}"),
            Duration::from_secs(30),
            || async { client.task(id).await.ok().flatten() },
        )
        .await;
    }
    let mut reasons: Vec<String> = Vec::new();
    let waited = std::time::Instant::now();
    while reasons.len() < 4 && waited.elapsed() < Duration::from_secs(30) {
        reasons.extend(drain_dead(&settings).await.into_iter().map(|(r, _)| r));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "a batch manifest arrived through exchange `fleet.results`; only `fleet.batches` may carry one",
            "a result arrived through exchange `fleet.batches`; only `fleet.results` may carry one",
            "a result group arrived through exchange `fleet.batches`; only `fleet.results` may carry one",
            "undecodable body: a result group holds no results",
        ]
    );
    for id in ["forged-1", "forged-2"] {
        assert!(client.task(id).await.expect("ask").is_none(), "{id} stored");
    }
    assert!(
        client
            .batch("forged")
            .await
            .expect("ask")
            .is_some_and(|b| b.total.is_none())
    );
    collector.stop().await.expect("collector drains cleanly");
}
