//! The seed's task_master.py, on the real broker: ten random integers as `square` tasks, and
//! each result printed as it reaches the collector.

use crate::client::CollectorClient;
use crate::submit;
use anyhow::Context as _;
use fleet_shared::envelope::Status;
use fleet_shared::settings::Settings;
use rand::Rng;
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the demo waits for all ten results, like the seed's `result.get(timeout=10)` per result.
const WAIT: Duration = Duration::from_secs(100);

/// Runs the demo: needs a consumer and a collector running.
///
/// Fails when the broker or the collector cannot be reached, or the results do not all arrive
/// within 100 seconds.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (connection, publisher) =
        submit::connect_publisher(&settings, "fleet-producer-demo").await?;
    let numbers: Vec<i64> = {
        let mut rng = rand::rng();
        (0..10).map(|_| rng.random_range(0..=10_000)).collect()
    };
    for n in &numbers {
        println!("Put task {n}...");
    }
    let payloads = numbers
        .iter()
        .map(|n| serde_json::json!({ "n": n }))
        .collect();
    let receipt = submit::publish_batch(&publisher, "square", payloads).await?;
    let _ = connection.close(200, "published".into()).await;
    println!("Try get results...");

    let client = CollectorClient::new(&settings.producer.collector_url);
    let mut seen = HashSet::new();
    let waited = tokio::time::timeout(WAIT, async {
        while seen.len() < numbers.len() {
            if shutdown.is_cancelled() {
                anyhow::bail!("interrupted");
            }
            for result in client.results(&receipt.batch).await? {
                if !seen.insert(result.task_id.clone()) {
                    continue;
                }
                match (result.status, &result.output) {
                    (Status::Ok, Some(output)) => {
                        println!("Result: {n} * {n} = {}", output["square"], n = output["n"]);
                    }
                    _ => println!("Result: task {} failed: {:?}", result.task_id, result.error),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    })
    .await;
    waited
        .context("not every result arrived in time: are a consumer and the collector running?")??;
    println!("master exit.");
    Ok(())
}
