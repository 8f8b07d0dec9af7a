//! Least privilege: each role's broker user (patterns from `fleet_shared::roles`) may do what its
//! service needs and the broker refuses everything else; and the fleet runs end to end with each
//! service as its own role after an admin's `fleet-producer setup`.

use fleet_producer::client::CollectorClient;
use fleet_producer::submit;
use fleet_shared::roles::{self, Role};
use fleet_shared::settings::Settings;
use fleet_shared::topology;
use fleet_tests::{Service, User, Vhost, complete, settings_of};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;
use std::time::Duration;

/// A role's user on the test vhost, and settings that connect as it.
struct Member {
    role: Role,
    _user: User,
    settings: Settings,
}

fn member(vhost: &Vhost, role: Role) -> Member {
    member_with(vhost, role, &[])
}

fn member_with(vhost: &Vhost, role: Role, extra: &[(&str, &str)]) -> Member {
    let user = User::new();
    user.permit(&vhost.name, role.configure, role.write, role.read);
    let env = vhost.env_as(&user, extra);
    Member {
        role,
        _user: user,
        settings: settings_of(&env),
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    DeclareExchange(&'static str),
    DeclareQueue(&'static str),
    Publish(&'static str),
    Consume(&'static str),
    /// basic.get: read on the queue.
    Get(&'static str),
    /// queue.purge: read on the queue.
    Purge(&'static str),
    /// Delete a queue or exchange of this name that the admin has just declared.
    DeleteQueue(&'static str),
    DeleteExchange(&'static str),
    /// queue.bind: write on the queue, read on the exchange.
    BindQueue {
        queue: &'static str,
        exchange: &'static str,
    },
    /// exchange.bind: write on the destination, read on the source.
    BindExchange {
        destination: &'static str,
        source: &'static str,
    },
}

/// Declares, as `admin`, what `op` is about to try to delete.
async fn prepare(admin: &Member, op: Op) {
    let connection = fleet_shared::amqp::connect(&admin.settings, "test-prepare")
        .await
        .expect("the admin connects");
    let channel = connection.create_channel().await.expect("channel");
    match op {
        Op::DeleteQueue(name) => {
            channel
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("declared");
        }
        Op::DeleteExchange(name) => {
            channel
                .exchange_declare(
                    name.into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("declared");
        }
        _ => {}
    }
    let _ = connection.close(200, "prepared".into()).await;
}

/// Tries `op` as `member` on a connection of its own; true if the broker allowed it.
async fn allowed(member: &Member, op: Op) -> bool {
    let connection = fleet_shared::amqp::connect(&member.settings, "test-probe")
        .await
        .expect("every role may connect");
    let channel = connection.create_channel().await.expect("channel");
    let outcome = match op {
        Op::DeclareExchange(name) => {
            // One of fleet's as fleet declares it, or a new fanout.
            let (kind, arguments) = topology::exchanges(&member.settings)
                .into_iter()
                .find(|e| e.name == name)
                .map_or((ExchangeKind::Fanout, FieldTable::default()), |e| {
                    (e.kind.clone(), e.arguments())
                });
            channel
                .exchange_declare(
                    name.into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    arguments,
                )
                .await
                .map(drop)
        }
        Op::DeclareQueue(name) => channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        Op::Publish(exchange) => {
            // A refused publish closes the channel; a confirm makes the answer wait for it.
            channel
                .confirm_select(Default::default())
                .await
                .expect("confirm mode");
            match channel
                .basic_publish(
                    exchange.into(),
                    "probe".into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await
            {
                Ok(confirm) => confirm.await.map(drop),
                Err(error) => Err(error),
            }
        }
        Op::Consume(queue) => channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        Op::Get(queue) => channel
            .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
            .await
            .map(drop),
        Op::Purge(queue) => channel
            .queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default())
            .await
            .map(drop),
        Op::DeleteQueue(name) => channel
            .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .map(drop),
        Op::DeleteExchange(name) => channel
            .exchange_delete(
                name.into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .map(drop),
        Op::BindQueue { queue, exchange } => channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "probe".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        Op::BindExchange {
            destination,
            source,
        } => channel
            .exchange_bind(
                destination.into(),
                source.into(),
                "probe".into(),
                lapin::options::ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
    };
    let _ = connection.close(200, "probed".into()).await;
    match outcome {
        Ok(()) => true,
        Err(error) => {
            assert!(
                format!("{error}").contains("ACCESS_REFUSED")
                    || format!("{error:?}").contains("ACCESSREFUSED"),
                "{} {op:?}: refused for another reason: {error}",
                member.role.name
            );
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_may_do_what_it_needs_and_nothing_else() {
    let vhost = Vhost::new();
    let members: Vec<Member> = roles::ALL.iter().map(|r| member(&vhost, *r)).collect();
    let admin = &members[0];
    fleet_producer::setup::run(admin.settings.clone())
        .await
        .expect("the admin declares the topology");
    let retry_queue = topology::retry_queue(1000);
    let retry_queue: &'static str = Box::leak(retry_queue.into_boxed_str());

    // (operation, admin, producer, consumer, collector)
    let matrix = [
        (
            Op::DeclareExchange(topology::TASKS_EXCHANGE),
            [true, false, false, false],
        ),
        (
            Op::DeclareExchange("fleet.extra"),
            [true, false, false, false],
        ),
        (Op::DeclareQueue("fleet.extra"), [true, false, false, false]),
        (
            Op::Publish(topology::TASKS_EXCHANGE),
            [true, true, false, false],
        ),
        (
            Op::Publish(topology::BATCHES_EXCHANGE),
            [true, true, false, false],
        ),
        (
            Op::Publish(topology::RESULTS_EXCHANGE),
            [true, false, true, false],
        ),
        (
            Op::Publish(topology::RETRY_EXCHANGE),
            [true, false, true, false],
        ),
        (
            Op::Publish(topology::DEAD_EXCHANGE),
            [true, false, true, true],
        ),
        (Op::Publish(""), [true, false, false, false]),
        (
            Op::Publish(topology::STATUS_EXCHANGE),
            [true, false, true, true],
        ),
        (
            Op::DeclareQueue("fleet.status.probe"),
            [true, false, false, false],
        ),
        (
            Op::Consume(topology::WORK_QUEUE),
            [true, false, true, false],
        ),
        (
            Op::Consume(topology::RESULTS_QUEUE),
            [true, false, false, true],
        ),
        (
            Op::Consume(topology::DEAD_QUEUE),
            [true, false, false, false],
        ),
        (Op::Consume(retry_queue), [true, false, false, false]),
        (Op::Get(topology::WORK_QUEUE), [true, false, true, false]),
        // No basic.get on fleet.results: a quorum queue with a single active consumer refuses
        // it to everyone (RESOURCE_LOCKED); Consume above covers reading it.
        (Op::Get(topology::DEAD_QUEUE), [true, false, false, false]),
        (Op::Get(retry_queue), [true, false, false, false]),
        // Purging needs only read: the consumer can purge the queue it takes tasks from
        // (SECURITY.md, "Not covered yet").
        (Op::Purge(topology::WORK_QUEUE), [true, false, true, false]),
        (
            Op::Purge(topology::RESULTS_QUEUE),
            [true, false, false, true],
        ),
        (Op::Purge(topology::DEAD_QUEUE), [true, false, false, false]),
        (Op::Purge(retry_queue), [true, false, false, false]),
        (
            Op::DeleteQueue("fleet.probe-queue"),
            [true, false, false, false],
        ),
        (
            Op::DeleteExchange("fleet.probe-exchange"),
            [true, false, false, false],
        ),
        // Queue and exchange share the names fleet.results and fleet.dead: the collector may
        // read the one and write the other, so it can bind them (SECURITY.md, "Not covered yet").
        (
            Op::BindQueue {
                queue: topology::DEAD_QUEUE,
                exchange: topology::RESULTS_EXCHANGE,
            },
            [true, false, false, true],
        ),
        (
            Op::BindExchange {
                destination: topology::DEAD_EXCHANGE,
                source: topology::RESULTS_EXCHANGE,
            },
            [true, false, false, true],
        ),
        (
            Op::BindQueue {
                queue: topology::RESULTS_QUEUE,
                exchange: topology::TASKS_EXCHANGE,
            },
            [true, false, false, false],
        ),
        (
            Op::BindQueue {
                queue: topology::WORK_QUEUE,
                exchange: topology::RESULTS_EXCHANGE,
            },
            [true, false, false, false],
        ),
        (
            Op::BindQueue {
                queue: topology::RESULTS_QUEUE,
                exchange: topology::BATCHES_EXCHANGE,
            },
            [true, false, false, false],
        ),
        (
            Op::BindExchange {
                destination: topology::RESULTS_EXCHANGE,
                source: topology::TASKS_EXCHANGE,
            },
            [true, false, false, false],
        ),
        (
            Op::BindExchange {
                destination: topology::TASKS_EXCHANGE,
                source: topology::STATUS_EXCHANGE,
            },
            [true, false, false, false],
        ),
    ];
    let mut wrong = Vec::new();
    for (op, expected) in matrix {
        for (member, expected) in members.iter().zip(expected) {
            prepare(admin, op).await;
            if allowed(member, op).await != expected {
                wrong.push(format!(
                    "{} {op:?}: expected allowed={expected}",
                    member.role.name
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the permission matrix differs:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_runs_with_each_service_as_its_own_role() {
    let vhost = Vhost::new();
    // `sleep` gets a short time limit and two attempts, so one task is retried once. The admin's
    // setup reads the same kinds, so it declares the 100 ms delay queue they need.
    let kinds = [
        ("FLEET_CONSUMER__KINDS__SLEEP__TIME_LIMIT_MS", "100"),
        ("FLEET_CONSUMER__KINDS__SLEEP__MAX_ATTEMPTS", "2"),
        ("FLEET_CONSUMER__KINDS__SLEEP__RETRY_DELAYS_MS", "100"),
    ];
    let admin = member_with(&vhost, roles::ADMIN, &kinds);
    let producer = member(&vhost, roles::PRODUCER);
    let consumer = member_with(&vhost, roles::CONSUMER, &kinds);
    let collector = member(&vhost, roles::COLLECTOR);
    fleet_producer::setup::run(admin.settings.clone())
        .await
        .expect("the admin declares the topology");
    // The collector's HTTP settings must be the ones the producer's client reads.
    let mut collector_settings = collector.settings.clone();
    collector_settings.collector = consumer.settings.collector.clone();
    let client = CollectorClient::new(&consumer.settings.producer.collector_url);

    let collector_service = Service::collector(&collector_settings);
    let consumer_service = Service::builtin_consumer(&consumer.settings);
    // Squares, one of which overflows (a failed result and a dead letter), and an unknown kind.
    let mut payloads: Vec<serde_json::Value> = (0..200).map(|n| json!({ "n": n })).collect();
    payloads.push(json!({ "n": i64::MAX }));
    let submit::Batch { receipt, messages } = submit::batch("square", payloads);
    submit::publish_reliably(&producer.settings, "test-producer", messages)
        .await
        .expect("the producer publishes tasks and the manifest");
    let status = complete(&client, &receipt.batch, Duration::from_secs(60)).await;
    assert_eq!((status.ok, status.failed, status.duplicates), (200, 1, 0));
    let slow = submit::batch("sleep", vec![json!({ "ms": 5000 })]);
    let slow_batch = slow.receipt.batch.clone();
    submit::publish_reliably(&producer.settings, "test-producer", slow.messages)
        .await
        .expect("published");
    complete(&client, &slow_batch, Duration::from_secs(60)).await;

    // Every result names the producer's broker user, retried ones too: the broker checked the
    // user_id, and the consumer carried it through the retry.
    let producer_user = producer.settings.broker_user().expect("a user name");
    let mut results = client.results(&receipt.batch).await.expect("results");
    results.extend(client.results(&slow_batch).await.expect("results"));
    assert_eq!(results.len(), 202);
    let retried = results
        .iter()
        .find(|r| r.kind == "sleep")
        .expect("the sleep task");
    assert_eq!(retried.attempts, 2, "it was retried");
    assert!(
        results
            .iter()
            .all(|r| r.published_by.as_deref() == Some(producer_user.as_str())),
        "published_by: {:?}",
        results
            .iter()
            .map(|r| r.published_by.clone())
            .collect::<std::collections::BTreeSet<_>>()
    );

    let dead = fleet_producer::dlq::list(&admin.settings)
        .await
        .expect("the admin lists");
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter().any(|d| d.reason.starts_with("overflow")),
        "{dead:?}"
    );
    assert!(
        dead.iter().any(|d| d.reason.starts_with("timeout")),
        "{dead:?}"
    );

    // A publisher claiming to be another user is refused by the broker.
    let connection = fleet_shared::amqp::connect(&producer.settings, "test-forger")
        .await
        .expect("connect");
    let forger = fleet_shared::publisher::Publisher::new(&connection, 8)
        .await
        .expect("publisher");
    let mut forged = fleet_shared::publisher::Outgoing::task(&fleet_shared::envelope::Task::new(
        "forged-1".into(),
        "square".into(),
        None,
        json!({ "n": 1 }),
    ));
    forged.properties = forged.properties.with_user_id("fleet-admin".into());
    let refused = forger.publish(forged).await.expect_err("a forged user_id");
    assert!(
        format!("{refused:?}").contains("PRECONDITION"),
        "{refused:?}"
    );
    let _ = connection.close(200, "done".into()).await;
    assert!(
        fleet_producer::dlq::list(&producer.settings).await.is_err(),
        "only the admin reads dead letters"
    );
    consumer_service
        .stop()
        .await
        .expect("consumer drains cleanly");
    collector_service
        .stop()
        .await
        .expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_definitions_load_into_a_broker_and_their_passwords_work() {
    use std::os::unix::fs::PermissionsExt as _;
    let node = fleet_tests::node::Node::start();
    let out = node.dir().join("generated");
    let output = std::process::Command::new(fleet_tests::process::binary("fleet-producer"))
        .args(["definitions", "--out", out.to_str().expect("utf-8")])
        .env_clear()
        .output()
        .expect("running fleet-producer definitions");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let definitions = std::fs::read_to_string(out.join("definitions.json")).expect("definitions");
    // A second run never replaces them: an error, or with --if-missing (compose) a no-op.
    let again = |extra: &[&str]| {
        std::process::Command::new(fleet_tests::process::binary("fleet-producer"))
            .args(["definitions", "--out", out.to_str().expect("utf-8")])
            .args(extra)
            .env_clear()
            .output()
            .expect("running fleet-producer definitions")
    };
    assert!(!again(&[]).status.success(), "refuses to overwrite");
    assert!(again(&["--if-missing"]).status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("definitions.json")).expect("definitions"),
        definitions,
        "kept as they were"
    );
    let password = |role: &Role| {
        let path = out.join(format!("fleet-{}.password", role.name));
        let mode = std::fs::metadata(&path)
            .expect("password file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{} is private", path.display());
        (
            path.clone(),
            std::fs::read_to_string(&path)
                .expect("password")
                .trim()
                .to_owned(),
        )
    };
    for role in roles::ALL {
        let (_, secret) = password(&role);
        assert!(secret.len() >= 32, "a long random password");
        assert!(
            !definitions.contains(&secret),
            "only hashes in the definitions"
        );
    }
    // rabbitmqctl runs as the rabbitmq user: let it read the file.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(
        out.join("definitions.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    node.ctl(&[
        "import_definitions",
        out.join("definitions.json").to_str().expect("utf-8"),
    ])
    .expect("the broker imports the definitions");

    let settings_as = |role: &Role, password_file: &std::path::Path| {
        let url = format!(
            "amqp://fleet-{}@127.0.0.1:{}/{}",
            role.name,
            node.port,
            fleet_producer::definitions::VHOST
        );
        settings_of(&fleet_tests::fleet_env(
            &url,
            node.dir(),
            &[(
                "FLEET_AMQP__PASSWORD_FILE",
                password_file.to_str().expect("utf-8"),
            )],
        ))
    };
    let (admin_file, _) = password(&roles::ADMIN);
    fleet_producer::setup::run(settings_as(&roles::ADMIN, &admin_file))
        .await
        .expect("the generated admin declares the topology");
    let (consumer_file, _) = password(&roles::CONSUMER);
    let consumer = settings_as(&roles::CONSUMER, &consumer_file);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let common = fleet_shared::observe::Observer::new(Default::default()).common;
    let subscribed = fleet_shared::amqp::subscribe(
        &consumer,
        "test",
        topology::WORK_QUEUE,
        1,
        &common,
        &shutdown,
    )
    .await
    .expect("the generated consumer consumes")
    .expect("not shut down");
    subscribed.close().await;
    // Another role's password is refused.
    let (producer_file, _) = password(&roles::PRODUCER);
    let error = fleet_shared::amqp::connect(&settings_as(&roles::CONSUMER, &producer_file), "test")
        .await
        .expect_err("the wrong password");
    assert!(error.is::<fleet_shared::error::AuthError>(), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_without_permissions_exits_3_naming_what_was_refused() {
    let vhost = Vhost::new();
    fleet_producer::setup::run(vhost.settings(&[]))
        .await
        .expect("the topology, declared as an admin");
    let nobody = Role {
        name: "nobody",
        configure: roles::NOTHING,
        write: roles::NOTHING,
        read: roles::NOTHING,
    };
    let user = User::new();
    user.permit(&vhost.name, nobody.configure, nobody.write, nobody.read);
    let api_listen = fleet_tests::free_address();
    let env = vhost.env_as(
        &user,
        &[
            ("FLEET_CONSUMER__LISTEN", "127.0.0.1:0"),
            ("FLEET_PRODUCER__LISTEN", &api_listen),
            ("FLEET_COLLECTOR__LISTEN", "127.0.0.1:0"),
        ],
    );
    for (binary, queue) in [
        ("fleet-consumer", topology::WORK_QUEUE),
        ("fleet-collector", topology::RESULTS_QUEUE),
    ] {
        let log = vhost.dir.join(format!("{binary}.log"));
        let started = std::time::Instant::now();
        let status = fleet_tests::process::Process::spawn_logged(binary, &[], &env, &log)
            .wait(Duration::from_secs(30));
        let output = std::fs::read_to_string(&log).expect("its log");
        assert_eq!(status.code(), Some(3), "{binary}: {output}");
        assert!(
            output.contains(&format!("the broker refused to consume from `{queue}`")),
            "{binary}: {output}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no retrying for minutes"
        );
    }

    // The API: a refused publish is a 503 and the API is not ready until one goes through.
    let log = vhost.dir.join("serve.log");
    let api = fleet_tests::process::Process::spawn_logged("fleet-producer", &["serve"], &env, &log);
    let http = reqwest::Client::new();
    let base = format!("http://{api_listen}");
    fleet_tests::eventually("the API to answer", Duration::from_secs(30), || async {
        http.get(format!("{base}/healthz")).send().await.ok()
    })
    .await;
    let refused = http
        .post(format!("{base}/v1/tasks"))
        .json(&json!({ "kind": "square", "payload": { "n": 2 } }))
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), 503);
    let ready = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("answered");
    assert_eq!(ready.status(), 503);
    let report: serde_json::Value = ready.json().await.expect("JSON");
    assert_eq!(report["permitted"], false, "{report}");
    assert!(api.terminate(Duration::from_secs(30)).success());
    let output = std::fs::read_to_string(&log).expect("its log");
    assert!(
        output.contains("the broker refused to publish the task"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_publish_of_results_or_dead_letters_exits_3_naming_the_exchange() {
    let vhost = Vhost::new();
    let admin = vhost.settings(&[]);
    fleet_producer::setup::run(admin.clone())
        .await
        .expect("the topology, declared as an admin");
    let (connection, publisher) = submit::connect_publisher(&admin, "test")
        .await
        .expect("publisher");
    // A task for the consumer, and a body no collector can read.
    submit::publish_batch(&publisher, "square", vec![json!({ "n": 3 })])
        .await
        .expect("published");
    publisher
        .publish(fleet_shared::publisher::Outgoing {
            exchange: topology::RESULTS_EXCHANGE.to_owned(),
            routing_key: String::new(),
            body: b"not json".to_vec(),
            properties: BasicProperties::default(),
        })
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;

    // Each may read its queue but not write where its outcome goes.
    let cases = [
        (
            "fleet-consumer",
            roles::CONSUMER.read,
            topology::RESULTS_EXCHANGE,
        ),
        (
            "fleet-collector",
            roles::COLLECTOR.read,
            topology::DEAD_EXCHANGE,
        ),
    ];
    for (binary, read, exchange) in cases {
        let user = User::new();
        user.permit(&vhost.name, roles::NOTHING, r"^fleet\.status$", read);
        let env = vhost.env_as(
            &user,
            &[
                ("FLEET_CONSUMER__LISTEN", "127.0.0.1:0"),
                ("FLEET_COLLECTOR__LISTEN", "127.0.0.1:0"),
            ],
        );
        let log = vhost.dir.join(format!("{binary}.log"));
        let status = fleet_tests::process::Process::spawn_logged(binary, &[], &env, &log)
            .wait(Duration::from_secs(60));
        let output = std::fs::read_to_string(&log).expect("its log");
        assert_eq!(status.code(), Some(3), "{binary}: {output}");
        assert!(
            output.contains(&format!("the broker refused to publish to `{exchange}`")),
            "{binary}: {output}"
        );
    }
}
