//! What the services show about themselves: `/metrics` counts that match the work done, and
//! `/healthz` and `/readyz` that follow the broker. Every service runs as its binary.

use fleet_producer::client::CollectorClient;
use fleet_producer::submit::connect_publisher;
use fleet_shared::envelope::Status;
use fleet_shared::publisher::Outgoing;
use fleet_shared::topology;
use fleet_tests::node::Node;
use fleet_tests::process::Process;
use fleet_tests::{Vhost, complete, eventually, free_address, settings_of};
use serde_json::json;
use std::time::Duration;

/// The value of the series `series` (name and labels exactly as exposed) in `text`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Scrapes `/metrics` at `base`.
async fn scrape(base: &str) -> String {
    let response = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.expect("a body")
}

/// Asserts every `(series, value)` in `expected` against a scrape of `base`.
async fn assert_metrics(base: &str, expected: &[(&str, f64)]) {
    let text = scrape(base).await;
    for (series, want) in expected {
        assert_eq!(
            value(&text, series),
            Some(*want),
            "{series} at {base}; the scrape was:\n{text}"
        );
    }
}

async fn status_of(base: &str, path: &str) -> Option<u16> {
    reqwest::get(format!("{base}{path}"))
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_counts_the_work_it_did() {
    let vhost = Vhost::new();
    let consumer_listen = free_address();
    let env = vhost.env(&[
        ("FLEET_CONSUMER__WORKERS", "2"),
        ("FLEET_CONSUMER__LISTEN", &consumer_listen),
        ("FLEET_CONSUMER__KINDS__SLEEP__TIME_LIMIT_MS", "50"),
        ("FLEET_CONSUMER__KINDS__SLEEP__MAX_ATTEMPTS", "2"),
        ("FLEET_CONSUMER__KINDS__SLEEP__RETRY_DELAYS_MS", "100"),
    ]);
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let producer = Process::spawn("fleet-producer", &["serve"], &env);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let (consumer_base, collector_base, producer_base) = (
        format!("http://{consumer_listen}"),
        settings.producer.collector_url.clone(),
        format!("http://{}", settings.producer.listen),
    );
    for base in [&consumer_base, &collector_base, &producer_base] {
        eventually(
            &format!("{base}/readyz to answer 200"),
            Duration::from_secs(30),
            || async { (status_of(base, "/readyz").await == Some(200)).then_some(()) },
        )
        .await;
        assert_eq!(status_of(base, "/healthz").await, Some(200));
    }

    // Through the API: a batch of 300 squares, three single tasks that overrun their time
    // limit twice (retried once, then failed), and one request that is not JSON.
    let http = reqwest::Client::new();
    let squares: Vec<_> = (0..300).map(|n| json!({ "n": n })).collect();
    let accepted = http
        .post(format!("{producer_base}/v1/batches"))
        .json(&json!({ "kind": "square", "payloads": squares }))
        .send()
        .await
        .expect("POST /v1/batches");
    assert_eq!(accepted.status(), 202);
    let batch = accepted.json::<serde_json::Value>().await.expect("JSON")["batch"]
        .as_str()
        .expect("a batch id")
        .to_owned();
    let mut slow = Vec::new();
    for i in 0..3 {
        let id = format!("slow-{i}-{}", uuid::Uuid::new_v4());
        let accepted = http
            .post(format!("{producer_base}/v1/tasks"))
            .json(&json!({ "kind": "sleep", "payload": { "ms": 5_000 }, "id": id }))
            .send()
            .await
            .expect("POST /v1/tasks");
        assert_eq!(accepted.status(), 202);
        slow.push(id);
    }
    let refused = http
        .post(format!("{producer_base}/v1/tasks"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST /v1/tasks");
    assert_eq!(refused.status(), 400);
    // Two messages no consumer can read, straight to the exchange.
    let (connection, publisher) = connect_publisher(&settings, "test-garbage")
        .await
        .expect("connect");
    for i in 0..2 {
        publisher
            .publish(Outgoing {
                exchange: topology::TASKS_EXCHANGE.to_owned(),
                routing_key: "square".to_owned(),
                body: format!("not json {i}").into_bytes(),
                properties: lapin::BasicProperties::default(),
            })
            .await
            .expect("published");
    }
    let _ = connection.close(200, "done".into()).await;

    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &batch, Duration::from_secs(60)).await;
    assert_eq!((status.ok, status.failed, status.duplicates), (300, 0, 0));
    for id in &slow {
        let result = eventually(
            &format!("the failed result of {id}"),
            Duration::from_secs(30),
            || async { client.task(id).await.ok().flatten() },
        )
        .await;
        assert_eq!((result.status, result.attempts), (Status::Failed, 2));
    }
    eventually(
        "both unreadable messages rejected",
        Duration::from_secs(30),
        || async {
            let text = scrape(&consumer_base).await;
            (value(
                &text,
                r#"fleet_tasks_total{kind="unknown",outcome="rejected"}"#,
            ) == Some(2.0))
            .then_some(())
        },
    )
    .await;

    // Every publish the consumer made was confirmed and timed: 300 ok results, for each slow
    // task one retry, one failed result and one dead letter, and two dead letters for the
    // unreadable messages.
    assert_metrics(
        &consumer_base,
        &[
            (r#"fleet_tasks_received_total{kind="square"}"#, 300.0),
            (r#"fleet_tasks_total{kind="square",outcome="ok"}"#, 300.0),
            (r#"fleet_task_duration_seconds_count{kind="square"}"#, 300.0),
            (r#"fleet_tasks_received_total{kind="sleep"}"#, 6.0),
            (r#"fleet_tasks_total{kind="sleep",outcome="retried"}"#, 3.0),
            (r#"fleet_tasks_total{kind="sleep",outcome="failed"}"#, 3.0),
            (r#"fleet_tasks_dead_lettered_total{kind="sleep"}"#, 3.0),
            (r#"fleet_task_duration_seconds_count{kind="sleep"}"#, 6.0),
            (r#"fleet_tasks_received_total{kind="unknown"}"#, 2.0),
            (r#"fleet_tasks_dead_lettered_total{kind="unknown"}"#, 2.0),
            ("fleet_tasks_in_flight", 0.0),
            (r#"fleet_worker_slots{work="compute"}"#, 2.0),
            (r#"fleet_worker_slots_busy{work="compute"}"#, 0.0),
            (r#"fleet_worker_slots_busy{work="io"}"#, 0.0),
            ("fleet_publish_confirm_seconds_count", 311.0),
            ("fleet_reconnects_total", 0.0),
        ],
    )
    .await;
    assert_metrics(
        &collector_base,
        &[
            ("fleet_results_stored_total", 303.0),
            ("fleet_results_duplicates_total", 0.0),
            ("fleet_batches_completed_total", 1.0),
            ("fleet_results_dead_lettered_total", 0.0),
            ("fleet_reconnects_total", 0.0),
        ],
    )
    .await;
    assert_metrics(
        &producer_base,
        &[
            (r#"fleet_tasks_published_total{kind="square"}"#, 300.0),
            (r#"fleet_tasks_published_total{kind="sleep"}"#, 3.0),
            (
                r#"fleet_http_requests_total{method="POST",route="/v1/batches",status="202"}"#,
                1.0,
            ),
            (
                r#"fleet_http_requests_total{method="POST",route="/v1/tasks",status="202"}"#,
                3.0,
            ),
            (
                r#"fleet_http_requests_total{method="POST",route="/v1/tasks",status="400"}"#,
                1.0,
            ),
            ("fleet_reconnects_total", 0.0),
        ],
    )
    .await;

    for service in [consumer, producer, collector] {
        assert!(service.terminate(Duration::from_secs(30)).success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_the_broker_and_liveness_does_not() {
    let mut node = Node::start();
    let dir = std::env::temp_dir().join(format!("fleet-ready-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let consumer_listen = free_address();
    let env = fleet_tests::fleet_env(
        &node.url(),
        &dir,
        &[("FLEET_CONSUMER__LISTEN", &consumer_listen)],
    );
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let producer = Process::spawn("fleet-producer", &["serve"], &env);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let bases = [
        format!("http://{consumer_listen}"),
        settings.producer.collector_url.clone(),
        format!("http://{}", settings.producer.listen),
    ];
    let all_answer = |path: &'static str, code: u16| {
        let bases = bases.clone();
        async move {
            for base in &bases {
                eventually(
                    &format!("{base}{path} to answer {code}"),
                    Duration::from_secs(30),
                    || async { (status_of(base, path).await == Some(code)).then_some(()) },
                )
                .await;
            }
        }
    };

    all_answer("/readyz", 200).await;
    node.stop();
    all_answer("/readyz", 503).await;
    all_answer("/healthz", 200).await;
    let report: serde_json::Value = reqwest::get(format!("{}/readyz", bases[0]))
        .await
        .expect("GET /readyz")
        .json()
        .await
        .expect("JSON");
    assert_eq!(report["ready"], false);
    assert_eq!(report["connected"], false);
    node.restart();
    all_answer("/readyz", 200).await;
    for base in &bases[..2] {
        let text = scrape(base).await;
        assert!(
            value(&text, "fleet_reconnects_total").is_some_and(|n| n >= 1.0),
            "{base} counted its reconnect"
        );
    }

    for service in [consumer, producer, collector] {
        assert!(service.terminate(Duration::from_secs(30)).success());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callers_traceparent_reaches_the_result_and_every_log_line_about_the_task() {
    let vhost = Vhost::new();
    let log = std::env::temp_dir().join(format!("fleet-trace-{}.log", uuid::Uuid::new_v4()));
    let env = vhost.env(&[
        ("FLEET_LOG__FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("FLEET_CONSUMER__KINDS__SLEEP__TIME_LIMIT_MS", "50"),
        ("FLEET_CONSUMER__KINDS__SLEEP__MAX_ATTEMPTS", "2"),
        ("FLEET_CONSUMER__KINDS__SLEEP__RETRY_DELAYS_MS", "100"),
    ]);
    let settings = settings_of(&env);
    let logs = ["collector", "producer", "consumer"].map(|s| log.with_extension(s));
    let collector = Process::spawn_logged("fleet-collector", &[], &env, &logs[0]);
    let producer = Process::spawn_logged("fleet-producer", &["serve"], &env, &logs[1]);
    let consumer = Process::spawn_logged("fleet-consumer", &[], &env, &logs[2]);
    let producer_base = format!("http://{}", settings.producer.listen);
    eventually("the API", Duration::from_secs(30), || async {
        (status_of(&producer_base, "/readyz").await == Some(200)).then_some(())
    })
    .await;

    // The caller's trace; a task that fails (its time limit, twice) and one that succeeds.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let http = reqwest::Client::new();
    let mut sent = Vec::new();
    for (kind, payload) in [
        ("sleep", json!({ "ms": 5_000 })),
        ("square", json!({ "n": 7 })),
    ] {
        let id = format!("traced-{kind}-{}", uuid::Uuid::new_v4());
        let accepted = http
            .post(format!("{producer_base}/v1/tasks"))
            .header("traceparent", &caller)
            .json(&json!({ "kind": kind, "payload": payload, "id": id }))
            .send()
            .await
            .expect("POST /v1/tasks");
        assert_eq!(accepted.status(), 202);
        let ours = accepted.headers()["traceparent"]
            .to_str()
            .expect("ASCII")
            .to_owned();
        assert!(
            ours.starts_with(&format!("00-{trace_id}-")) && ours != caller,
            "the producer continues the caller's trace with a span of its own: {ours}"
        );
        sent.push((id, ours));
    }

    let client = CollectorClient::new(&settings.producer.collector_url);
    for (id, producer_span) in &sent {
        let result = eventually(
            &format!("the result of {id}"),
            Duration::from_secs(30),
            || async { client.task(id).await.ok().flatten() },
        )
        .await;
        let traceparent = result.traceparent.expect("the result carries the trace");
        assert!(traceparent.starts_with(&format!("00-{trace_id}-")));
        assert_ne!(&traceparent, producer_span, "the consumer's own span");
    }
    assert!(consumer.terminate(Duration::from_secs(30)).success());

    // Every line the consumer logged about either task is in its span with the trace id, and
    // the failing one was logged about (its time limit, the failure, the dead letter).
    let text = std::fs::read_to_string(&logs[2]).expect("the consumer's log");
    let mut about_the_failing_task = 0;
    for line in text.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("a JSON log line: {e}: {line}"));
        for (id, _) in &sent {
            if !line.contains(id.as_str()) {
                continue;
            }
            assert_eq!(entry["span"]["task_id"], id.as_str(), "{line}");
            assert_eq!(entry["span"]["trace_id"], trace_id, "{line}");
            if id.starts_with("traced-sleep") {
                about_the_failing_task += 1;
            }
        }
    }
    assert!(
        about_the_failing_task >= 4,
        "two time limits, the failure and the dead letter were logged:\n{text}"
    );

    for service in [producer, collector] {
        assert!(service.terminate(Duration::from_secs(30)).success());
    }

    // Each service's first line is its banner: version, the broker with the password hidden,
    // and what it serves. No line anywhere holds the password.
    for (file, banner, fields) in [
        (
            &logs[0],
            "fleet-collector started",
            &["queue", "db", "listen"][..],
        ),
        (
            &logs[1],
            "fleet-producer serving",
            &["exchange", "listen", "pool"][..],
        ),
        (
            &logs[2],
            "fleet-consumer started",
            &["queue", "workers", "io_concurrency", "prefetch", "listen"][..],
        ),
    ] {
        let text = std::fs::read_to_string(file).expect("a service log");
        let first: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("a first line")).expect("JSON");
        assert_eq!(first["message"], banner, "{text}");
        assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
        let broker = first["broker"].as_str().expect("the broker");
        assert!(broker.starts_with("amqp://guest:***@"), "{broker}");
        for field in fields {
            assert!(!first[field].is_null(), "{banner} shows {field}: {first}");
        }
        assert!(
            !text.contains("guest:guest"),
            "a password in {}",
            file.display()
        );
        let _ = std::fs::remove_file(file);
    }
}
