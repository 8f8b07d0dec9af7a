//! `scripts/run-local 8` (`make run CONSUMERS=8`): the compose topology as local processes, for
//! machines without Docker. Eight consumer processes share one batch, and one signal stops all.

use fleet_producer::client::CollectorClient;
use fleet_tests::{Vhost, complete, eventually, settings_of};
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_local_starts_eight_consumers_that_share_the_work() {
    let vhost = Vhost::new();
    let env = vhost.env(&[("FLEET_CONSUMER__WORKERS", "1")]);
    let settings = settings_of(&env);
    let bin_dir = fleet_tests::process::binary("fleet-consumer")
        .parent()
        .expect("a directory")
        .to_path_buf();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run-local");
    let mut fleet = Command::new(&script)
        .arg("8")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUN_LOCAL_BIN_DIR", &bin_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("running scripts/run-local");

    // Through the producer HTTP API the script started, as a user would.
    let http = reqwest::Client::new();
    // Short I/O tasks, so every consumer is busy at once and the broker spreads them.
    let body = serde_json::json!({ "kind": "sleep", "payloads": vec![serde_json::json!({ "ms": 20 }); 4000] });
    let accepted = eventually(
        "the API started by run-local",
        Duration::from_secs(60),
        || async {
            http.post(format!("http://{}/v1/batches", settings.producer.listen))
                .json(&body)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 202)
        },
    )
    .await;
    let batch = accepted.json::<serde_json::Value>().await.expect("JSON")["batch"]
        .as_str()
        .expect("a batch id")
        .to_owned();
    let client = CollectorClient::new(&settings.producer.collector_url);
    let status = complete(&client, &batch, Duration::from_secs(120)).await;
    assert_eq!((status.ok, status.failed), (4000, 0));
    let results = client.results(&batch).await.expect("results");
    let processes: HashSet<String> = results
        .iter()
        .filter_map(|r| {
            r.worker
                .rsplit_once('/')
                .map(|(process, _)| process.to_owned())
        })
        .collect();
    assert_eq!(
        processes.len(),
        8,
        "eight consumer processes took part: {processes:?}"
    );

    Command::new("kill")
        .args(["-TERM", &fleet.id().to_string()])
        .status()
        .expect("kill");
    let stopped = tokio::task::spawn_blocking(move || {
        for _ in 0..600 {
            if let Ok(Some(status)) = fleet.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = fleet.kill();
        None
    })
    .await
    .expect("waiting");
    assert!(
        stopped.is_some(),
        "run-local stopped within 30 s of SIGTERM"
    );
    // Every process it started is gone: no consumer is left on the queue.
    eventually("no consumers left", Duration::from_secs(10), || async {
        let connection = fleet_shared::amqp::connect(&settings, "test-probe")
            .await
            .ok()?;
        let channel = connection.create_channel().await.ok()?;
        let queue = channel
            .queue_declare(
                fleet_shared::topology::WORK_QUEUE.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = connection.close(200, "done".into()).await;
        (queue.consumer_count() == 0).then_some(())
    })
    .await;
}
