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
    let user = User::new();
    user.permit(&vhost.name, role.configure, role.write, role.read);
    let password_file = vhost.dir.join(format!("{}-password", role.name));
    std::fs::write(&password_file, format!("{}\n", user.password)).expect("password file");
    let url = format!(
        "amqp://{}@{}/{}",
        user.name,
        fleet_tests::broker_host(),
        vhost.name
    );
    let env = vhost.env(&[
        ("FLEET_AMQP__URL", &url),
        (
            "FLEET_AMQP__PASSWORD_FILE",
            password_file.to_str().expect("utf-8"),
        ),
    ]);
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
}

/// Tries `op` as `member` on a connection of its own; true if the broker allowed it.
async fn allowed(member: &Member, op: Op) -> bool {
    let connection = fleet_shared::amqp::connect(&member.settings, "test-probe")
        .await
        .expect("every role may connect");
    let channel = connection.create_channel().await.expect("channel");
    let outcome = match op {
        Op::DeclareExchange(name) => channel
            .exchange_declare(
                name.into(),
                if name == topology::TASKS_EXCHANGE {
                    ExchangeKind::Topic
                } else {
                    ExchangeKind::Fanout
                },
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(drop),
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
    ];
    let mut wrong = Vec::new();
    for (op, expected) in matrix {
        for (member, expected) in members.iter().zip(expected) {
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
    let [admin, producer, consumer, collector] = roles::ALL.map(|r| member(&vhost, r));
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
    let dead = fleet_producer::dlq::list(&admin.settings)
        .await
        .expect("the admin lists");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.starts_with("overflow"), "{}", dead[0].reason);
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
