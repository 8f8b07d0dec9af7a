//! Secrets and access: the broker password never leaves its file (not on a command line, not in
//! any log line at the most verbose level, through start, work, reconnects and shutdown of every
//! service), and the HTTP API asks for its bearer token when one is configured.

use fleet_tests::process::{Process, binary};
use fleet_tests::proxy::Proxy;
use fleet_tests::{User, Vhost, eventually, settings_of};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_password_is_in_no_output_and_no_command_line() {
    let vhost = Vhost::new();
    let user = User::new();
    user.permit(&vhost.name, ".*", ".*", ".*");
    let password_file = vhost.dir.join("amqp-password");
    fleet_tests::write_secret(&password_file, &format!("{}\n", user.password));
    // The consumer reads it the systemd way, from $CREDENTIALS_DIRECTORY/amqp-password.
    let credentials = vhost.dir.join("credentials");
    std::fs::create_dir_all(&credentials).expect("credentials dir");
    std::fs::copy(&password_file, credentials.join("amqp-password")).expect("credential");

    // Everything goes through a proxy, so the test can also make every service reconnect.
    let proxy = Proxy::start(fleet_tests::broker_host()).await;
    let url = format!("amqp://{}@{}/{}", user.name, proxy.addr, vhost.name);
    let base = vhost.env(&[("FLEET_AMQP__URL", &url), ("RUST_LOG", "trace")]);
    let with = |extra: (&str, String)| {
        let mut env = base.clone();
        env.push((extra.0.to_owned(), extra.1));
        env
    };
    let file_env = with((
        "FLEET_AMQP__PASSWORD_FILE",
        password_file.display().to_string(),
    ));
    let systemd_env = with(("CREDENTIALS_DIRECTORY", credentials.display().to_string()));
    let settings = settings_of(&file_env);
    let log = vhost.dir.join("all.log");

    let collector = Process::spawn_logged("fleet-collector", &[], &file_env, &log);
    let consumer = Process::spawn_logged("fleet-consumer", &[], &systemd_env, &log);
    let api = Process::spawn_logged("fleet-producer", &["serve"], &file_env, &log);
    let http = reqwest::Client::new();
    let accepted = eventually(
        "the API to accept a task",
        Duration::from_secs(30),
        || async {
            http.post(format!("http://{}/v1/tasks", settings.producer.listen))
                .json(&serde_json::json!({ "kind": "square", "payload": { "n": 9 }, "id": "t-1" }))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 202)
        },
    )
    .await;
    assert_eq!(accepted.status(), 202);
    let client = fleet_producer::client::CollectorClient::new(&settings.producer.collector_url);
    eventually("the task's result", Duration::from_secs(30), || async {
        client.task("t-1").await.ok().flatten()
    })
    .await;

    let input = vhost.dir.join("in.jsonl");
    std::fs::write(&input, "{\"n\": 2}\n{\"n\": 3}\n").expect("input");
    let mut commands = Vec::new();
    for args in [
        vec![
            "submit",
            "square",
            "--input",
            input.to_str().expect("utf-8"),
            "--wait",
        ],
        vec!["dlq", "list"],
        vec!["demo"],
    ] {
        let output = Command::new(binary("fleet-producer"))
            .args(&args)
            .env_clear()
            .envs(file_env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("running fleet-producer");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        commands.push(String::from_utf8_lossy(&output.stdout).into_owned());
        commands.push(String::from_utf8_lossy(&output.stderr).into_owned());
    }

    // Reconnect logging is on the path too.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for process in [&collector, &consumer, &api] {
        assert!(
            !process.cmdline().contains(&user.password),
            "{} argv",
            process.name
        );
        assert!(
            process.cmdline().contains(&process.name),
            "read the real cmdline"
        );
    }
    for process in [consumer, api, collector] {
        assert!(process.terminate(Duration::from_secs(30)).success());
    }

    let logs = std::fs::read_to_string(&log).expect("the services' logs");
    assert!(
        logs.contains("fleet-consumer started"),
        "the logs were captured"
    );
    // RUST_LOG=trace reaches lapin, which then logs at debug and never its frames (the login
    // frame's SASL response holds the password as a list of bytes).
    assert!(
        logs.lines()
            .any(|l| l.contains("DEBUG") && l.contains("lapin::")),
        "lapin's debug lines are there"
    );
    assert!(!logs.contains("AMQPFrame"), "no frame of lapin's is logged");
    assert!(logs.contains("consuming again"), "the services reconnected");
    assert!(logs.contains(&user.name), "the user is named");
    let forms = encodings(&user.name, &user.password);
    for form in &forms {
        assert!(
            !logs.contains(form),
            "a service logged the password as {form}"
        );
    }
    for output in &commands {
        for form in &forms {
            assert!(
                !output.contains(form),
                "a command printed the password as {form}"
            );
        }
    }
}

/// The ways a password can show up in a log: as it is, as the byte lists a `Debug` of a frame or
/// a buffer prints (the SASL PLAIN response `\0user\0password` among them), in hex, in base64.
fn encodings(user: &str, password: &str) -> Vec<String> {
    use base64::Engine as _;
    let mut forms = vec![password.to_owned()];
    for secret in [password.to_owned(), format!("\0{user}\0{password}")] {
        let bytes: Vec<String> = secret.bytes().map(|b| b.to_string()).collect();
        forms.push(bytes.join(", "));
        forms.push(bytes.join(","));
        forms.push(secret.bytes().map(|b| format!("{b:02x}")).collect());
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            forms.push(engine.encode(&secret));
        }
    }
    forms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_api_wants_its_bearer_token_when_one_is_configured() {
    let vhost = Vhost::new();
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let token_file = vhost.dir.join("api-token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let settings = vhost.settings(&[(
        "FLEET_PRODUCER__TOKEN_FILE",
        token_file.to_str().expect("utf-8"),
    )]);
    assert!(
        !format!("{settings:?}").contains(&token),
        "Debug hides the token"
    );
    let api = fleet_tests::Service::producer_api(&settings);
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/tasks", settings.producer.listen);
    let task = serde_json::json!({ "kind": "square", "payload": { "n": 2 } });
    let post = |bearer: Option<String>| {
        let mut request = http.post(&url).json(&task);
        if let Some(bearer) = bearer {
            request = request.header("authorization", bearer);
        }
        request.send()
    };
    eventually("the API to listen", Duration::from_secs(30), || async {
        post(None).await.ok()
    })
    .await;

    for bearer in [None, Some("Bearer wrong".to_owned()), Some(token.clone())] {
        let response = post(bearer.clone()).await.expect("an answer");
        assert_eq!(response.status(), 401, "{bearer:?}");
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        let body: serde_json::Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"], "a valid bearer token is required");
    }
    let response = post(Some(format!("Bearer {token}")))
        .await
        .expect("an answer");
    assert_eq!(response.status(), 202);
    api.stop().await.expect("the API stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_password_is_picked_up_by_the_next_reconnect() {
    let vhost = Vhost::new();
    let mut user = User::new();
    user.permit(&vhost.name, ".*", ".*", ".*");
    let env = vhost.env_as(&user, &[]);
    let password_file = vhost.password_file(&user);
    let settings = settings_of(&env);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let collector = fleet_tests::Service::collector(&settings);
    let squares = |n: i64| {
        let settings = settings.clone();
        async move {
            let fleet_producer::submit::Batch { receipt, messages } = fleet_producer::submit::batch(
                "square",
                (0..n).map(|i| serde_json::json!({ "n": i })).collect(),
            );
            fleet_producer::submit::publish_reliably(&settings, "test", messages)
                .await
                .expect("published");
            receipt
        }
    };
    let client = fleet_producer::client::CollectorClient::new(&settings.producer.collector_url);
    let first = squares(20).await;
    fleet_tests::complete(&client, &first.batch, Duration::from_secs(30)).await;

    // Rotate: new password in the broker and in the file, then cut the user's connections.
    user.change_password();
    fleet_tests::write_secret(&password_file, &format!("{}\n", user.password));
    fleet_tests::ctl(&[
        "close_all_user_connections",
        &user.name,
        "credential rotated",
    ]);
    let second = squares(20).await;
    let status = fleet_tests::complete(&client, &second.batch, Duration::from_secs(30)).await;
    assert_eq!(
        status.ok, 20,
        "the consumer came back with the new password"
    );
    let mut consumer = consumer;
    assert!(consumer.is_running());
    assert!(consumer.terminate(Duration::from_secs(30)).success());
    collector.stop().await.expect("collector drains cleanly");
}
