//! What the services show about themselves: `/metrics` counts that match the work done, and
//! `/healthz` and `/readyz` that follow the broker. Every service runs as its binary.

use fleet_producer::client::CollectorClient;
use fleet_producer::submit::connect_publisher;
use fleet_shared::envelope::Status;
use fleet_shared::publisher::Outgoing;
use fleet_shared::topology;
use fleet_tests::node::Node;
use fleet_tests::process::Process;
use fleet_tests::{Vhost, complete, eventually, free_address, metric_in, settings_of};
use serde_json::json;
use std::time::Duration;

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
            metric_in(&text, series),
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
        // A message per result, so that the counts below do not depend on timing.
        ("FLEET_CONSUMER__RESULTS_PER_MESSAGE", "1"),
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
            (metric_in(
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
            // One message per result with results_per_message = 1: 300 ok and 3 failed.
            ("fleet_result_messages_total", 303.0),
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
    // Every result and the manifest went through a store transaction; several may share one.
    let text = scrape(&collector_base).await;
    let transactions =
        metric_in(&text, "fleet_store_seconds_count").expect("fleet_store_seconds_count");
    assert!(
        (1.0..=304.0).contains(&transactions),
        "store transactions: {transactions}"
    );
    let seconds = metric_in(&text, "fleet_store_seconds_sum").expect("fleet_store_seconds_sum");
    assert!(seconds > 0.0, "time in the store: {seconds}");
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
            metric_in(&text, "fleet_reconnects_total").is_some_and(|n| n >= 1.0),
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
            &["queues", "workers", "io_concurrency", "prefetch", "listen"][..],
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

/// `fleet-producer status --json` with `env`: one reading.
async fn status_json(env: &[(String, String)]) -> (fleet_shared::status::Status, String) {
    let env = env.to_vec();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(fleet_tests::process::binary("fleet-producer"))
            .args(["status", "--json"])
            .env_clear()
            .envs(env)
            .output()
            .expect("running fleet-producer status")
    })
    .await
    .expect("the blocking task ran");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let status = serde_json::from_slice(&output.stdout).expect("one JSON object");
    (status, stderr)
}

fn queue<'a>(
    status: &'a fleet_shared::status::Status,
    name: &str,
) -> &'a fleet_shared::status::QueueStatus {
    status
        .queues
        .iter()
        .find(|q| q.queue == name)
        .unwrap_or_else(|| panic!("{name} in the status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_ready_unacked_and_consumers_of_every_queue_over_amqp() {
    let vhost = Vhost::new();
    let env = vhost.env(&[
        ("FLEET_CONSUMER__WORKERS", "1"),
        ("FLEET_CONSUMER__PREFETCH_PER_WORKER", "4"),
        ("FLEET_CONSUMER__IO_CONCURRENCY", "4"),
    ]);
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let (connection, publisher) = connect_publisher(&settings, "test-status")
        .await
        .expect("connect");
    let slow: Vec<_> = (0..40).map(|_| json!({ "ms": 4_000 })).collect();
    let receipt = fleet_producer::submit::publish_batch(&publisher, "sleep", slow)
        .await
        .expect("published");
    let _ = connection.close(200, "done".into()).await;
    let client = CollectorClient::new(&settings.producer.collector_url);
    let done = || async {
        client
            .batch(&receipt.batch)
            .await
            .expect("the collector answers")
            .map_or(0, |s| s.done)
    };

    // As guest (an administrator here): the consumer holds its full prefetch (1 worker x 4 +
    // 4 I/O slots), four run, the rest wait; each queue shows its consumers. (Right after the slow start a second, cancelled
    // consumer may still hold a delivery until it is acked; the broker counts it till then.)
    let (status, before, after) = eventually(
        "one consumer holding its full prefetch",
        Duration::from_secs(30),
        || async {
            let before = done().await;
            let (status, _) = status_json(&env).await;
            let after = done().await;
            let work = queue(&status, topology::WORK_QUEUE);
            (work.unacked == Some(8) && work.consumers == 1).then_some((status, before, after))
        },
    )
    .await;
    let work = queue(&status, topology::WORK_QUEUE);
    let implied_done = 40 - 8 - i64::from(work.ready);
    assert!(
        (i64::try_from(before).expect("small")..=i64::try_from(after).expect("small"))
            .contains(&implied_done),
        "ready + unacked + done = 40: {work:?}, {before} to {after} done"
    );
    let results = queue(&status, topology::RESULTS_QUEUE);
    assert_eq!((results.consumers, results.unacked), (1, Some(0)));
    let dead = queue(&status, topology::DEAD_QUEUE);
    assert_eq!((dead.ready, dead.unacked, dead.consumers), (0, Some(0), 0));
    let unroutable = queue(&status, topology::UNROUTABLE_QUEUE);
    assert_eq!(
        (unroutable.ready, unroutable.unacked, unroutable.consumers),
        (0, Some(0), 0)
    );
    assert_eq!(
        status.queues.len(),
        4 + settings.all_retry_delays().len(),
        "work, dead, results, unroutable and every delay queue: {status:?}"
    );
    let mut services: Vec<(&str, u16)> = status
        .services
        .iter()
        .map(|b| (b.service.as_str(), b.prefetch))
        .collect();
    services.sort_unstable();
    assert_eq!(services, [("collector", 2_000), ("consumer", 8)]);

    // A user that may not listen to beats gets the counts, and `?` for unacked.
    let producer = fleet_tests::User::new();
    let role = fleet_shared::roles::PRODUCER;
    producer.permit(&vhost.name, role.configure, role.write, role.read);
    let (status, note) = status_json(&vhost.env_as(&producer, &[])).await;
    assert!(note.contains("unacked counts need"), "{note}");
    let work = queue(&status, topology::WORK_QUEUE);
    assert_eq!((work.consumers, work.unacked), (1, None));

    // --watch prints a reading every two seconds until a signal.
    let log = vhost.dir.join("status-watch.log");
    let watch = Process::spawn_logged(
        "fleet-producer",
        &["status", "--json", "--watch"],
        &env,
        &log,
    );
    eventually("two readings", Duration::from_secs(20), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.lines().filter(|l| l.starts_with('{')).count() >= 2).then_some(())
    })
    .await;
    assert!(watch.terminate(Duration::from_secs(10)).success());

    for service in [consumer, collector] {
        assert!(service.terminate(Duration::from_secs(40)).success());
    }
}

/// An OTLP/HTTP receiver of the test's own: every JSON body posted to `/v1/traces`.
async fn otlp_receiver() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = std::sync::Arc::clone(&received);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let store = std::sync::Arc::clone(&store);
            async move {
                store.lock().expect("not poisoned").push(body);
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/v1/traces"), received)
}

/// `(service, name, trace id, span id, parent span id)` of every span received.
fn spans(bodies: &[serde_json::Value]) -> Vec<(String, String, String, String, String)> {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let mut all = Vec::new();
    for body in bodies {
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .map(|a| text(&a["value"]["stringValue"]))
                .unwrap_or_default();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    all.push((
                        service.clone(),
                        text(&span["name"]),
                        text(&span["traceId"]),
                        text(&span["spanId"]),
                        text(&span["parentSpanId"]),
                    ));
                }
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_otlp_endpoint_the_spans_of_a_task_are_exported_in_the_callers_trace() {
    let (endpoint, received) = otlp_receiver().await;
    let vhost = Vhost::new();
    let env = vhost.env(&[("FLEET_LOG__OTLP_ENDPOINT", &endpoint)]);
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let producer = Process::spawn("fleet-producer", &["serve"], &env);
    let consumer = Process::spawn("fleet-consumer", &[], &env);
    let producer_base = format!("http://{}", settings.producer.listen);
    eventually("the API", Duration::from_secs(30), || async {
        (status_of(&producer_base, "/readyz").await == Some(200)).then_some(())
    })
    .await;

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let id = format!("otlp-{}", uuid::Uuid::new_v4());
    let accepted = reqwest::Client::new()
        .post(format!("{producer_base}/v1/tasks"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({ "kind": "square", "payload": { "n": 3 }, "id": id }))
        .send()
        .await
        .expect("POST /v1/tasks");
    assert_eq!(accepted.status(), 202);
    let publish_span = accepted.headers()["traceparent"]
        .to_str()
        .expect("ASCII")
        .split('-')
        .nth(2)
        .expect("a span id")
        .to_owned();
    let client = CollectorClient::new(&settings.producer.collector_url);
    let result = eventually("the result", Duration::from_secs(30), || async {
        client.task(&id).await.ok().flatten()
    })
    .await;
    let task_span = result
        .traceparent
        .expect("a traceparent")
        .split('-')
        .nth(2)
        .expect("a span id")
        .to_owned();
    // Stopping flushes what is left to export.
    for service in [consumer, producer, collector] {
        assert!(service.terminate(Duration::from_secs(30)).success());
    }

    let spans = spans(&received.lock().expect("not poisoned"));
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.1 == name && s.2 == trace_id)
            .unwrap_or_else(|| panic!("a {name} span in trace {trace_id}: {spans:?}"))
            .clone()
    };
    let publish = find("publish");
    assert_eq!(
        (publish.0.as_str(), publish.3.as_str(), publish.4.as_str()),
        ("fleet-producer", publish_span.as_str(), caller_span),
        "the producer's span, child of the caller's"
    );
    let task = find("task");
    assert_eq!(
        (task.0.as_str(), task.3.as_str(), task.4.as_str()),
        ("fleet-consumer", task_span.as_str(), publish_span.as_str()),
        "the consumer's span, child of the producer's, parent of the result"
    );
}
