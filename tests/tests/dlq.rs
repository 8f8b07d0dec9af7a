//! `fleet-producer dlq list | replay | purge` against the real broker, through the binary.

use fleet_consumer::registry::{HandlerError, TaskContext, Work};
use fleet_producer::client::CollectorClient;
use fleet_producer::dlq::DeadLetter;
use fleet_producer::submit;
use fleet_shared::envelope::BatchManifest;
use fleet_shared::envelope::{Status, Task};
use fleet_shared::publisher::Outgoing;
use fleet_shared::roles::{self, Role};
use fleet_shared::topology;
use fleet_tests::process::binary;
use fleet_tests::{Service, User, Vhost, eventually, ready, settings_of};
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

/// Runs `fleet-producer dlq ARGS` with `env`; returns stdout, asserting exit 0.
fn dlq(env: &[(String, String)], args: &[&str]) -> String {
    let output = Command::new(binary("fleet-producer"))
        .arg("dlq")
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .expect("running fleet-producer dlq");
    assert!(
        output.status.success(),
        "dlq {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

fn listed(env: &[(String, String)]) -> Vec<DeadLetter> {
    dlq(env, &["list", "--json"])
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("one JSON object per line");
            DeadLetter {
                id: v["id"].as_str().map(str::to_owned),
                kind: v["kind"].as_str().expect("kind").to_owned(),
                reason: v["reason"].as_str().expect("reason").to_owned(),
                attempts: u32::try_from(v["attempts"].as_u64().expect("attempts")).expect("u32"),
                when: v["when"].as_str().map(|w| w.parse().expect("RFC 3339")),
            }
        })
        .collect()
}

async fn later(payload: Value, _: TaskContext) -> Result<Value, HandlerError> {
    Ok(json!({ "got": payload }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_replayed_once_and_purged() {
    let vhost = Vhost::new();
    let env = vhost.env(&[]);
    let settings = settings_of(&env);
    let collector = Service::collector(&settings);
    // This consumer does not know `later`, so those tasks are dead-lettered.
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let tasks: Vec<Task> = (0..3)
        .map(|i| {
            Task::new(
                format!("later-{i}"),
                "later".into(),
                None,
                json!({ "i": i }),
            )
        })
        .collect();
    let mut messages: Vec<Outgoing> = tasks.iter().map(Outgoing::task).collect();
    for i in 0..2 {
        messages.push(Outgoing {
            exchange: topology::TASKS_EXCHANGE.to_owned(),
            routing_key: "square".to_owned(),
            body: format!("not json {i}").into_bytes(),
            properties: lapin::BasicProperties::default(),
        });
    }
    publisher.publish_all(messages).await.expect("published");
    let _ = connection.close(200, "done".into()).await;
    eventually("five dead letters", Duration::from_secs(30), || async {
        (ready(&settings, topology::DEAD_QUEUE).await == 5).then_some(())
    })
    .await;
    consumer.stop().await.expect("consumer drains cleanly");

    // list shows all five and removes none.
    let letters = listed(&env);
    assert_eq!(letters.len(), 5);
    assert_eq!(listed(&env), letters, "listing twice shows the same");
    assert_eq!(ready(&settings, topology::DEAD_QUEUE).await, 5);
    let unknown: Vec<&DeadLetter> = letters.iter().filter(|l| l.kind == "later").collect();
    assert_eq!(unknown.len(), 3);
    for letter in &unknown {
        assert_eq!(letter.reason, "unknown kind `later`");
        assert_eq!(letter.attempts, 0);
        assert!(letter.when.is_some());
    }
    let undecodable = letters
        .iter()
        .filter(|l| l.reason.contains("undecodable"))
        .count();
    assert_eq!(undecodable, 2);
    let table = dlq(&env, &["list"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("later-0") && table.contains("unknown kind `later`"),
        "{table}"
    );

    // A consumer that knows `later` now; replay one by id.
    let mut registry = fleet_consumer::handlers::registry(&settings).expect("built-ins");
    registry
        .register("later", Work::Io, later)
        .expect("new kind");
    let consumer = Service::consumer(&settings, registry);
    assert_eq!(dlq(&env, &["replay", "later-1"]).trim(), "replayed 1");
    assert_eq!(ready(&settings, topology::DEAD_QUEUE).await, 4);
    let client = CollectorClient::new(&settings.producer.collector_url);
    let result = eventually(
        "the replayed task's result",
        Duration::from_secs(30),
        || async { client.task("later-1").await.ok().flatten() },
    )
    .await;
    assert_eq!(
        (result.status, result.attempts),
        (Status::Ok, 1),
        "attempts start again"
    );

    // Replay the rest: the two `later` tasks run; the undecodable ones are no tasks and stay.
    assert_eq!(dlq(&env, &["replay", "--all"]).trim(), "replayed 2");
    for id in ["later-0", "later-2"] {
        let result = eventually(id, Duration::from_secs(30), || async {
            client.task(id).await.ok().flatten()
        })
        .await;
        assert_eq!(result.status, Status::Ok);
    }
    eventually(
        "the undecodable two still in fleet.dead",
        Duration::from_secs(30),
        || async { (ready(&settings, topology::DEAD_QUEUE).await == 2).then_some(()) },
    )
    .await;
    let left = listed(&env);
    assert!(
        left.iter().all(|l| l.reason.contains("undecodable")),
        "{left:?}"
    );

    assert_eq!(dlq(&env, &["purge", "--all"]).trim(), "purged 2");
    assert!(listed(&env).is_empty());
    assert_eq!(ready(&settings, topology::DEAD_QUEUE).await, 0);
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

/// A connection as `role`'s user, and its confirmed publisher.
async fn as_role(
    vhost: &Vhost,
    role: Role,
) -> (User, lapin::Connection, fleet_shared::publisher::Publisher) {
    let user = User::new();
    user.permit(&vhost.name, role.configure, role.write, role.read);
    let settings = settings_of(&vhost.env_as(&user, &[]));
    let (connection, publisher) = submit::connect_publisher(&settings, "test-forger")
        .await
        .expect("every role may connect and publish somewhere");
    (user, connection, publisher)
}

/// A result-shaped body claiming task `id` of `batch` ended ok, published by the admin.
fn forged_result(id: &str, batch: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"v": 1, "task_id": id, "batch": batch, "kind": "square",
        "status": "ok", "output": {"forged": true}, "error": null, "attempts": 1,
        "worker": "x/1/0", "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:00Z", "published_by": "fleet-admin"}),
    )
    .expect("JSON")
}

fn to(exchange: &str, routing_key: &str, body: Vec<u8>) -> Outgoing {
    Outgoing {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        body,
        properties: lapin::BasicProperties::default(),
    }
}

/// Publishes as `role`, waits for `n` dead letters, replays them all as the admin, and checks
/// none was replayed.
async fn forged_then_replayed(vhost: &Vhost, role: Role, forgeries: Vec<Outgoing>) {
    let env = vhost.env(&[]);
    let settings = settings_of(&env);
    let n = forgeries.len();
    let (_user, connection, publisher) = as_role(vhost, role).await;
    publisher
        .publish_all(forgeries)
        .await
        .expect("the role may publish these");
    let _ = connection.close(200, "done".into()).await;
    eventually(
        "the forgeries dead-lettered",
        Duration::from_secs(30),
        || async { (ready(&settings, topology::DEAD_QUEUE).await == n as u32).then_some(()) },
    )
    .await;
    let replay = Command::new(binary("fleet-producer"))
        .args(["dlq", "replay", "--all"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "off")
        .output()
        .expect("running dlq replay");
    assert!(replay.status.success());
    assert_eq!(String::from_utf8_lossy(&replay.stdout).trim(), "replayed 0");
    assert!(
        String::from_utf8_lossy(&replay.stderr)
            .contains(&format!("kept {n} dead messages that are not tasks")),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(
        ready(&settings, topology::DEAD_QUEUE).await,
        n as u32,
        "kept in fleet.dead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_cannot_get_a_forged_result_stored_not_even_through_replay() {
    let vhost = Vhost::new();
    let settings = settings_of(&vhost.env(&[]));
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    // The victim: a batch of one task that has not run.
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    publisher
        .publish(Outgoing::manifest(&BatchManifest::new(
            "victim".into(),
            1,
            "square".into(),
        )))
        .await
        .expect("manifest");
    let _ = connection.close(200, "done".into()).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    eventually(
        "the victim batch known",
        Duration::from_secs(30),
        || async { client.batch("victim").await.ok().flatten() },
    )
    .await;

    // A result into the task path with the result queue's name as its routing key (the consumer
    // dead-letters it keeping that key), and one through the exchange of manifests.
    forged_then_replayed(
        &vhost,
        roles::PRODUCER,
        vec![
            to(
                topology::TASKS_EXCHANGE,
                topology::RESULTS_QUEUE,
                forged_result("forged-1", "victim"),
            ),
            to(
                topology::BATCHES_EXCHANGE,
                "",
                forged_result("forged-2", "victim"),
            ),
        ],
    )
    .await;
    // The admin may write the default exchange; the collector still trusts only fleet.results.
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    publisher
        .publish(to(
            "",
            topology::RESULTS_QUEUE,
            forged_result("forged-3", "victim"),
        ))
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    eventually(
        "the third forgery dead-lettered",
        Duration::from_secs(30),
        || async { (ready(&settings, topology::DEAD_QUEUE).await == 3).then_some(()) },
    )
    .await;

    for id in ["forged-1", "forged-2", "forged-3"] {
        assert!(
            client.task(id).await.expect("collector answers").is_none(),
            "{id} stored"
        );
    }
    let victim = client
        .batch("victim")
        .await
        .expect("answers")
        .expect("known");
    assert_eq!((victim.done, victim.complete), (0, false));
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_cannot_get_a_forged_manifest_counted_not_even_through_replay() {
    let vhost = Vhost::new();
    let settings = settings_of(&vhost.env(&[]));
    let collector = Service::collector(&settings);
    let manifest = |batch: &str| {
        fleet_shared::envelope::encode(&BatchManifest::new(batch.into(), 0, "square".into()))
    };
    // A manifest on the result path, and one put straight into fleet.dead as if the collector
    // had set it aside.
    forged_then_replayed(
        &vhost,
        roles::CONSUMER,
        vec![
            to(topology::RESULTS_EXCHANGE, "", manifest("forged-batch-1")),
            to(
                topology::DEAD_EXCHANGE,
                topology::RESULTS_QUEUE,
                manifest("forged-batch-2"),
            ),
        ],
    )
    .await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    for batch in ["forged-batch-1", "forged-batch-2"] {
        assert!(
            client.batch(batch).await.expect("answers").is_none(),
            "{batch} counted"
        );
    }
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dlq_list_escapes_what_a_publisher_put_in_a_dead_letter() {
    let vhost = Vhost::new();
    let env = vhost.env(&[]);
    let settings = settings_of(&env);
    fleet_producer::setup::run(settings.clone())
        .await
        .expect("topology");
    let (_user, connection, publisher) = as_role(&vhost, roles::CONSUMER).await;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        fleet_shared::envelope::HEADER_ERROR.into(),
        lapin::types::AMQPValue::LongString("bad\nfake-id  square  0  -  fake row".into()),
    );
    let mut dead = to(topology::DEAD_EXCHANGE, "square", b"{}".to_vec());
    dead.properties = lapin::BasicProperties::default()
        .with_message_id("x\u{1b}[2Jy".into())
        .with_headers(headers);
    publisher
        .publish(dead)
        .await
        .expect("the consumer role may dead-letter");
    let _ = connection.close(200, "done".into()).await;
    eventually("the dead letter", Duration::from_secs(30), || async {
        (ready(&settings, topology::DEAD_QUEUE).await == 1).then_some(())
    })
    .await;
    let table = dlq(&env, &["list"]);
    assert!(!table.contains('\u{1b}'), "{table:?}");
    assert_eq!(table.lines().count(), 2, "a header and one row: {table:?}");
    assert!(
        table.contains("x\\u{1b}[2Jy") && table.contains("bad\\nfake-id"),
        "{table}"
    );
}

/// A dead letter as the broker writes one when a task passes its delivery limit.
fn broker_dead_letter(id: &str) -> Outgoing {
    let mut death = lapin::types::FieldTable::default();
    death.insert(
        "reason".into(),
        fleet_shared::publisher::header_str("delivery_limit"),
    );
    death.insert(
        "queue".into(),
        fleet_shared::publisher::header_str("fleet.tasks.default"),
    );
    death.insert(
        "time".into(),
        lapin::types::AMQPValue::Timestamp(1_800_000_000),
    );
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-death".into(),
        lapin::types::AMQPValue::FieldArray(
            vec![lapin::types::AMQPValue::FieldTable(death)].into(),
        ),
    );
    let task = Task::new(id.into(), "square".into(), None, json!(2));
    Outgoing {
        exchange: topology::DEAD_EXCHANGE.to_owned(),
        routing_key: "square".to_owned(),
        body: serde_json::to_vec(&task).expect("JSON"),
        properties: lapin::BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_dead_letters_never_returns_them_to_the_queue() {
    let vhost = Vhost::new();
    let env = vhost.env(&[]);
    let settings = settings_of(&env);
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let mut messages: Vec<Outgoing> = (0..3)
        .map(|i| {
            Outgoing::task(&Task::new(
                format!("later-{i}"),
                "later".into(),
                None,
                json!(i),
            ))
        })
        .collect();
    messages.push(broker_dead_letter("limited-0"));
    publisher.publish_all(messages).await.expect("published");
    let _ = connection.close(200, "done".into()).await;
    eventually("four dead letters", Duration::from_secs(30), || async {
        (ready(&settings, topology::DEAD_QUEUE).await == 4).then_some(())
    })
    .await;
    consumer.stop().await.expect("consumer drains cleanly");

    let first = listed(&env);
    assert_eq!(first.len(), 4, "{first:?}");
    let limited = first
        .iter()
        .find(|l| l.id.as_deref() == Some("limited-0"))
        .expect("the broker's dead letter");
    assert_eq!(
        limited.reason,
        "delivery_limit (broker, queue fleet.tasks.default)"
    );
    // Reads that select nothing, each of which used to return every letter to the queue.
    for _ in 0..5 {
        assert_eq!(listed(&env), first, "a read changes nothing it shows");
    }
    assert_eq!(dlq(&env, &["replay", "nobody"]).trim(), "replayed 0");
    assert_eq!(dlq(&env, &["purge", "nobody"]).trim(), "purged 0");
    assert_eq!(listed(&env), first, "in the same order, described the same");
    assert_eq!(ready(&settings, topology::DEAD_QUEUE).await, 4);

    // The broker saw no letter come back: none carries a delivery count.
    let connection = fleet_shared::amqp::connect(&settings, "test-dead-reader")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for _ in 0..4 {
        let got = channel
            .basic_get(
                topology::DEAD_QUEUE.into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .expect("get")
            .expect("a dead letter");
        let count = got
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        assert!(
            matches!(count, None | Some(lapin::types::AMQPValue::LongLongInt(0))),
            "{:?} was returned to fleet.dead: x-delivery-count {count:?}",
            got.delivery.properties.message_id()
        );
    }
    let _ = connection.close(200, "done".into()).await;
}
