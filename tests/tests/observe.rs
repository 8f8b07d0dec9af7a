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
