//! Input from a hostile or careless publisher, sent as an attacker with one role's credentials
//! would: past every documented bound, straight to the exchange or through the HTTP API. Nothing
//! of it may stall a worker, and every refusal names what was wrong.

use fleet_producer::client::CollectorClient;
use fleet_producer::submit;
use fleet_shared::publisher::Outgoing;
use fleet_shared::topology;
use fleet_tests::{Service, Vhost, complete, drain_dead, eventually, unacked};
use serde_json::{Value, json};
use std::time::Duration;

/// A task body with these fields, published with no AMQP properties at all, as raw AMQP from
/// another language may.
fn raw_task(id: &str, batch: Option<&str>) -> Outgoing {
    let body = json!({"v": 1, "id": id, "kind": "square", "batch": batch,
        "payload": {"n": 2}, "created_at": "2026-01-01T00:00:00Z"});
    Outgoing {
        exchange: topology::TASKS_EXCHANGE.to_owned(),
        routing_key: "square".to_owned(),
        body: serde_json::to_vec(&body).expect("JSON"),
        properties: lapin::BasicProperties::default(),
    }
}

/// Waits for the service at `base` to answer `/readyz` with 200.
async fn until_ready(http: &reqwest::Client, base: &str) {
    eventually(
        "the service to be ready",
        Duration::from_secs(30),
        || async {
            let ready = http.get(format!("{base}/readyz")).send().await.ok()?;
            ready.status().is_success().then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_and_batches_past_their_bounds_are_dead_lettered_and_the_consumer_goes_on() {
    let vhost = Vhost::new();
    // One slot and a small prefetch: twelve stuck deliveries used to stop such a consumer, and
    // grouped results took the panic into the publishing task of every result.
    let settings = vhost.settings(&[
        ("FLEET_CONSUMER__WORKERS", "1"),
        ("FLEET_CONSUMER__IO_CONCURRENCY", "1"),
        ("FLEET_CONSUMER__RESULTS_PER_MESSAGE", "256"),
    ]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");

    let long = "i".repeat(256);
    let mut bad = Vec::new();
    for i in 0..20 {
        bad.push(raw_task(&format!("{long}{i}"), None));
        bad.push(raw_task(&format!("ok-id-{i}"), Some(&"b".repeat(300))));
    }
    bad.push(raw_task("", None));
    bad.push(raw_task("a\u{1b}[2Jfake row", None));
    let sent = bad.len();
    assert_eq!(
        publisher.publish_all(bad).await.expect("published"),
        sent as u64
    );

    let good = submit::publish_batch(
        &publisher,
        "square",
        (0..100i64).map(|n| json!({ "n": n })).collect(),
    )
    .await
    .expect("published");
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &good.batch, Duration::from_secs(60)).await;
    assert_eq!((status.done, status.ok), (100, 100));

    let dead = eventually("every bad task dead-lettered", Duration::from_secs(30), {
        let settings = settings.clone();
        let mut all = Vec::new();
        move || {
            let settings = settings.clone();
            let mut so_far = std::mem::take(&mut all);
            async move {
                so_far.extend(drain_dead(&settings).await);
                (so_far.len() >= sent).then_some(so_far)
            }
        }
    })
    .await;
    assert_eq!(dead.len(), sent, "exactly the bad tasks are dead");
    let count = |needle: &str| dead.iter().filter(|(r, _)| r.contains(needle)).count();
    assert_eq!(
        count("invalid field: `id` is 257 bytes; the most is 255"),
        10
    );
    assert_eq!(
        count("invalid field: `id` is 258 bytes; the most is 255"),
        10
    );
    assert_eq!(
        count("invalid field: `batch` is 300 bytes; the most is 255"),
        20
    );
    assert_eq!(count("invalid field: `id` must not be empty"), 1);
    assert_eq!(count("invalid field: `id` holds a control character"), 1);
    assert_eq!(unacked(&vhost.name), 0, "nothing left unsettled");
    assert!(consumer.is_running());

    let _ = connection.close(200, "done".into()).await;
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_refuses_names_past_their_bounds_with_a_400_naming_the_field() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let api = Service::producer_api(&settings);
    let base = format!("http://{}", settings.producer.listen);
    let http = reqwest::Client::new();
    until_ready(&http, &base).await;

    let post = |path: &'static str, body: Value| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let answer = http.post(url).json(&body).send().await.expect("answered");
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.expect("a JSON body");
            (
                status,
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    let task = |id: &str, kind: &str| json!({"kind": kind, "payload": {"n": 1}, "id": id});
    let cases = [
        (
            post("/v1/tasks", task(&"i".repeat(256), "square")).await,
            "`id` is 256 bytes; the most is 255",
        ),
        (
            post("/v1/tasks", task("", "square")).await,
            "`id` must not be empty",
        ),
        (
            post("/v1/tasks", task("x\ny", "square")).await,
            "`id` holds a control character",
        ),
        (
            post("/v1/tasks", task("fine", &"k".repeat(256))).await,
            "`kind` is 256 bytes; the most is 255",
        ),
        (
            post("/v1/batches", json!({"kind": "", "payloads": [{}]})).await,
            "`kind` must not be empty",
        ),
    ];
    for ((status, error), expected) in cases {
        assert_eq!((status, error.as_str()), (400, expected));
    }
    let (status, _) = post("/v1/tasks", task(&"i".repeat(255), "square")).await;
    assert_eq!(status, 202, "255 bytes is within the bound");
    api.stop().await.expect("API stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn careless_files_and_pages_get_a_clear_answer() {
    use std::os::unix::fs::PermissionsExt as _;
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = Service::collector(&settings);
    let base = settings.producer.collector_url.clone();
    let http = reqwest::Client::new();
    until_ready(&http, &base).await;

    // An offset past SQLite's integers is the caller's mistake, not the collector's.
    let answer = http
        .get(format!(
            "{base}/v1/batches/b/results?offset=9223372036854775808"
        ))
        .send()
        .await
        .expect("answered");
    assert_eq!(answer.status(), 400);
    let body: Value = answer.json().await.expect("a JSON error");
    assert_eq!(
        body["error"],
        "`offset` must be at most 9223372036854775807"
    );

    // A page that rebound its own name to 127.0.0.1 still sends that name.
    let rebound = http
        .get(format!("{base}/v1/batches/b"))
        .header("host", "evil.example:8081")
        .send()
        .await
        .expect("answered");
    assert_eq!(rebound.status(), 403);
    let body: Value = rebound.json().await.expect("a JSON error");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("loopback")),
        "{body}"
    );

    // The result store is the collector's alone.
    let mode = std::fs::metadata(&settings.collector.db)
        .expect("the store")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "results.db mode {mode:o}");

    // A password file others can read still works, with a warning naming it.
    let password = vhost.dir.join("guest.password");
    std::fs::write(&password, "guest\n").expect("password file");
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut env = vhost.env(&[]);
    env.push((
        "FLEET_AMQP__PASSWORD_FILE".into(),
        password.display().to_string(),
    ));
    let listed = std::process::Command::new(fleet_tests::process::binary("fleet-producer"))
        .args(["dlq", "list"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("dlq list");
    assert!(listed.status.success());
    let stderr = String::from_utf8_lossy(&listed.stderr);
    assert!(
        stderr.contains(&format!(
            "warning: amqp.password_file {} can be read by other users (mode 644)",
            password.display()
        )),
        "{stderr}"
    );
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_results_come_in_pages_bounded_by_bytes_and_all_arrive() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = Service::collector(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let now = chrono::Utc::now();
    let big = |i: usize| fleet_shared::envelope::TaskResult {
        v: 1,
        task_id: format!("big-{i}"),
        batch: Some("big".into()),
        kind: "square".into(),
        status: fleet_shared::envelope::Status::Ok,
        output: Some(json!({ "pad": "x".repeat(1 << 20) })),
        error: None,
        attempts: 1,
        worker: "h/1/0".into(),
        started_at: now,
        finished_at: now,
        published_by: None,
        traceparent: None,
    };
    let messages: Vec<Outgoing> = (0..10).map(|i| Outgoing::result(&big(i))).collect();
    publisher.publish_all(messages).await.expect("published");
    let _ = connection.close(200, "done".into()).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    eventually("ten results stored", Duration::from_secs(60), || async {
        let status = client.batch("big").await.ok().flatten()?;
        (status.done == 10).then_some(())
    })
    .await;

    let page = reqwest::get(format!(
        "{}/v1/batches/big/results?limit=10",
        settings.producer.collector_url
    ))
    .await
    .expect("answered");
    assert_eq!(page.headers()["x-fleet-truncated"], "true");
    let body = page.bytes().await.expect("body");
    let lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert!(
        body.len() <= 4 << 20 && (1..10).contains(&lines),
        "{} bytes, {lines} results",
        body.len()
    );
    let all = client.results("big").await.expect("every page");
    assert_eq!(all.len(), 10, "the client follows cut pages to the end");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arbitrary_kinds_over_http_do_not_grow_the_metrics_without_end() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let api = Service::producer_api(&settings);
    let base = format!("http://{}", settings.producer.listen);
    let http = reqwest::Client::new();
    until_ready(&http, &base).await;
    for i in 0..150 {
        let accepted = http
            .post(format!("{base}/v1/tasks"))
            .json(&json!({ "kind": format!("kind-{i}"), "payload": {} }))
            .send()
            .await
            .expect("answered");
        assert_eq!(accepted.status(), 202);
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("answered")
        .text()
        .await
        .expect("text");
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("fleet_tasks_published_total{"))
        .collect();
    assert_eq!(series.len(), 101, "100 kinds and `other`");
    assert!(
        series
            .iter()
            .any(|l| l.starts_with("fleet_tasks_published_total{kind=\"other\"} 50")),
        "{series:?}"
    );
    api.stop().await.expect("API stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_sent_and_idle_http_connections_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = Service::collector(&settings);
    let address = settings.collector.listen.clone();
    eventually(
        "the collector to listen",
        Duration::from_secs(30),
        || async { tokio::net::TcpStream::connect(&address).await.ok() },
    )
    .await;
    // Closed means the read ends (EOF or reset) before the bound plus a margin.
    let closed_within = |mut stream: tokio::net::TcpStream, limit: Duration| async move {
        let mut rest = Vec::new();
        tokio::time::timeout(limit, stream.read_to_end(&mut rest))
            .await
            .is_ok()
    };
    let limit = fleet_shared::http::HEADER_TIMEOUT + Duration::from_secs(5);
    let mut half = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("half a request head");
    let mut idle = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("a whole request");
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).await.expect("an answer");
    assert_eq!(&answer, b"HTTP/1.1 200");
    let (half, idle) = tokio::join!(closed_within(half, limit), closed_within(idle, limit));
    assert!(half, "a half-sent request head is closed");
    assert!(idle, "an idle keep-alive connection is closed");
    collector.stop().await.expect("collector drains cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_programs_run_as_another_user_cannot_read_the_consumers_secrets() {
    let vhost = Vhost::new();
    let password = vhost.dir.join("guest.password");
    fleet_tests::write_secret(&password, "guest\n");
    let settings = vhost.settings(&[
        (
            "FLEET_AMQP__PASSWORD_FILE",
            password.to_str().expect("utf-8"),
        ),
        ("FLEET_CONSUMER__EXEC__PROGRAMS__CAT", "/bin/cat"),
        ("FLEET_CONSUMER__EXEC__UID", "65534"),
        ("FLEET_CONSUMER__EXEC__GID", "65534"),
    ]);
    let collector = Service::collector(&settings);
    let consumer = Service::builtin_consumer(&settings);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    // The consumer runs in this process: its environ is ours.
    let environ = format!("/proc/{}/environ", std::process::id());
    let files = [
        password.display().to_string(),
        environ,
        "/etc/os-release".to_owned(),
    ];
    let payloads = files
        .iter()
        .map(|file| json!({ "program": "cat", "args": [file] }))
        .collect();
    let receipt = submit::publish_batch(&publisher, "exec", payloads)
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    complete(&client, &receipt.batch, Duration::from_secs(60)).await;
    let results = client.results(&receipt.batch).await.expect("results");
    let by_id: std::collections::HashMap<_, _> =
        results.iter().map(|r| (r.task_id.as_str(), r)).collect();
    let output = |i: usize| {
        by_id[receipt.task_ids[i].as_str()]
            .output
            .clone()
            .expect("cat ran")
    };
    for secret in [0, 1] {
        let out = output(secret);
        assert_eq!(out["exit_code"], 1, "{} was read: {out}", files[secret]);
        assert_eq!(out["stdout"], "");
        assert!(
            out["stderr"]
                .as_str()
                .is_some_and(|e| e.contains("Permission denied")),
            "{out}"
        );
    }
    let public = output(2);
    assert_eq!(public["exit_code"], 0, "the program does run: {public}");
    assert!(
        public["stdout"]
            .as_str()
            .is_some_and(|s| s.contains("PRETTY_NAME"))
    );
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}

async fn fails_at_length(
    _: Value,
    _: fleet_consumer::registry::TaskContext,
) -> Result<Value, fleet_consumer::registry::HandlerError> {
    Err(fleet_consumer::registry::HandlerError::permanent(
        "verbose",
        "why ".repeat(25_000),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100_kb_failure_message_is_dead_lettered_with_its_reason_cut_to_the_bound() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = Service::collector(&settings);
    let mut registry = fleet_consumer::handlers::registry(&settings).expect("built-ins");
    registry
        .register(
            "verbose",
            fleet_consumer::registry::Work::Inline,
            fails_at_length,
        )
        .expect("a new kind");
    let consumer = Service::consumer(&settings, registry);
    let (connection, publisher) = submit::connect_publisher(&settings, "test")
        .await
        .expect("publisher");
    let receipt = submit::publish_batch(&publisher, "verbose", vec![json!({})])
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &receipt.batch, Duration::from_secs(60)).await;
    assert_eq!((status.done, status.failed), (1, 1));
    let dead = eventually("the dead letter", Duration::from_secs(30), || {
        let settings = settings.clone();
        async move {
            let dead = drain_dead(&settings).await;
            (!dead.is_empty()).then_some(dead)
        }
    })
    .await;
    assert_eq!(dead.len(), 1);
    let (reason, _) = &dead[0];
    assert!(reason.starts_with("verbose: why why"), "{reason}");
    assert!(reason.len() <= fleet_shared::envelope::MAX_REASON_BYTES && reason.ends_with('…'));
    let result = client
        .task(&receipt.task_ids[0])
        .await
        .expect("answers")
        .expect("stored");
    let message = result.error.expect("an error").message;
    assert_eq!(message.len(), 100_000, "the result keeps the whole message");
    consumer.stop().await.expect("consumer drains cleanly");
    collector.stop().await.expect("collector drains cleanly");
}
