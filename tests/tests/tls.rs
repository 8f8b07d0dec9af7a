//! `amqps://` against a RabbitMQ node of the test's own with a TLS listener and a CA the test
//! makes with openssl: the right CA connects and the fleet runs; a wrong CA or a name the
//! certificate does not carry fails with a clear error; a client certificate logs in with
//! EXTERNAL as the user it names.

use fleet_producer::client::CollectorClient;
use fleet_producer::submit;
use fleet_tests::node::Node;
use fleet_tests::{Service, complete, settings_of};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for `localhost` and a client certificate for `client_cn`, signed
/// by it; and a second CA that signed nothing.
fn make_certificates(dir: &Path, client_cn: &str) {
    let day = ["-days", "2"];
    for ca in ["ca", "wrong-ca"] {
        openssl(
            dir,
            &[
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-subj",
                    &format!("/CN=fleet test {ca}"),
                ][..],
                &day,
            ]
            .concat(),
        );
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for (name, cn) in [("server", "localhost"), ("client", client_cn)] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-extfile",
                    &format!("{name}.ext"),
                ][..],
                &day,
            ]
            .concat(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_with_the_right_ca_works_and_a_wrong_one_or_name_is_refused_clearly() {
    let client_cn = "fleet-tls-client";
    let mut tls_port = 0;
    let node = Node::start_with(&["rabbitmq_auth_mechanism_ssl"], |dir, port| {
        make_certificates(dir, client_cn);
        tls_port = port;
        let d = dir.display();
        format!(
            "listeners.ssl.1 = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {d}/ca.pem\n\
             ssl_options.certfile = {d}/server.pem\n\
             ssl_options.keyfile = {d}/server.key\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             auth_mechanisms.1 = PLAIN\n\
             auth_mechanisms.2 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n"
        )
    });
    let certs = node.dir().to_path_buf();
    let scratch = tempdir();
    let file = |name: &str| certs.join(name).display().to_string();
    let tls_env = |url: String, extra: &[(&str, String)]| {
        let mut env = fleet_tests::fleet_env(&url, &scratch, &[]);
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env
    };

    // The right CA, the broker's own name: the whole fleet works over TLS.
    let good = settings_of(&tls_env(
        format!("amqps://guest:guest@localhost:{tls_port}/%2f"),
        &[("FLEET_AMQP__TLS_CA_FILE", file("ca.pem"))],
    ));
    let collector = Service::collector(&good);
    let consumer = Service::builtin_consumer(&good);
    let (connection, publisher) = submit::connect_publisher(&good, "test")
        .await
        .expect("TLS connect");
    let receipt = submit::publish_batch(
        &publisher,
        "square",
        (0..10).map(|n| json!({ "n": n })).collect(),
    )
    .await
    .expect("published over TLS");
    let _ = connection.close(200, "done".into()).await;
    let client = CollectorClient::new(&good.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(60)).await;
    assert_eq!((status.ok, status.failed), (10, 0));
    // The HTTP API's pooled connections use TLS too.
    let api = Service::producer_api(&good);
    let http = reqwest::Client::new();
    let accepted = fleet_tests::eventually("the API over TLS", Duration::from_secs(30), || async {
        http.post(format!("http://{}/v1/tasks", good.producer.listen))
            .json(&json!({ "kind": "square", "payload": { "n": 5 }, "id": "over-tls" }))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 202)
    })
    .await;
    assert_eq!(accepted.status(), 202);
    let stored = fleet_tests::eventually("its result", Duration::from_secs(30), || async {
        client.task("over-tls").await.ok().flatten()
    })
    .await;
    assert_eq!(stored.output.expect("output")["square"], 25);
    api.stop().await.expect("the API stops cleanly");
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");

    // A CA that did not sign the broker's certificate.
    let wrong_ca = settings_of(&tls_env(
        format!("amqps://guest:guest@localhost:{tls_port}/%2f"),
        &[("FLEET_AMQP__TLS_CA_FILE", file("wrong-ca.pem"))],
    ));
    let error = fleet_shared::amqp::connect(&wrong_ca, "test")
        .await
        .expect_err("wrong CA");
    let text = format!("{error:#}");
    assert!(
        text.contains("certificate") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(
        text.contains(&format!("localhost:{tls_port}")),
        "names the broker: {text}"
    );
    assert_eq!(
        fleet_shared::error::exit_code(&error),
        std::process::ExitCode::from(1)
    );

    // The right CA, but an address the certificate does not name.
    let wrong_name = settings_of(&tls_env(
        format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f"),
        &[("FLEET_AMQP__TLS_CA_FILE", file("ca.pem"))],
    ));
    let error = fleet_shared::amqp::connect(&wrong_name, "test")
        .await
        .expect_err("wrong name");
    let text = format!("{error:#}");
    assert!(
        text.contains("certificate not valid for name \"127.0.0.1\""),
        "{text}"
    );

    // Mutual TLS: no password at all; the broker takes the user from the certificate.
    node.ctl(&[
        "add_user",
        client_cn,
        &uuid::Uuid::new_v4().simple().to_string(),
    ])
    .expect("user");
    node.ctl(&["clear_password", client_cn])
        .expect("no password");
    node.ctl(&["set_permissions", "-p", "/", client_cn, ".*", ".*", ".*"])
        .expect("permissions");
    let mutual = settings_of(&tls_env(
        format!("amqps://localhost:{tls_port}/%2f?auth_mechanism=external"),
        &[
            ("FLEET_AMQP__TLS_CA_FILE", file("ca.pem")),
            ("FLEET_AMQP__TLS_CERT_FILE", file("client.pem")),
            ("FLEET_AMQP__TLS_KEY_FILE", file("client.key")),
        ],
    ));
    let (connection, publisher) = submit::connect_publisher(&mutual, "test-mtls")
        .await
        .expect("mutual TLS");
    publisher
        .publish_all(vec![fleet_shared::publisher::Outgoing::task(
            &fleet_shared::envelope::Task::new(
                "mtls-1".into(),
                "square".into(),
                None,
                json!({ "n": 4 }),
            ),
        )])
        .await
        .expect("published as the certificate's user");
    let users = node
        .ctl(&["list_connections", "user", "auth_mechanism"])
        .expect("connections");
    assert!(
        users
            .lines()
            .any(|l| l.contains(client_cn) && l.contains("EXTERNAL")),
        "{users}"
    );
    let _ = connection.close(200, "done".into()).await;
    let _ = std::fs::remove_dir_all(&scratch);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
