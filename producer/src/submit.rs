//! Publishing a batch: a manifest on the result path, then every task with windowed confirms.

use anyhow::Context as _;
use fleet_shared::envelope::{BatchManifest, Task};
use fleet_shared::error::UsageError;
use fleet_shared::publisher::{Outgoing, PublishError, Publisher};
use fleet_shared::settings::Settings;
use fleet_shared::{amqp, topology};
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;

/// A published batch.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The batch id.
    pub batch: String,
    /// Task ids in input order.
    pub task_ids: Vec<String>,
}

/// Reads JSON lines, one payload per line (`-` is stdin); blank lines are skipped.
///
/// Fails with a [`UsageError`] naming the line of the first payload that is not JSON.
pub fn read_payloads(path: &Path) -> anyhow::Result<Vec<Value>> {
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| UsageError(format!("cannot open {}: {e}", path.display())))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut payloads = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let payload = fleet_shared::envelope::decode_json(line.as_bytes())
            .map_err(|e| UsageError(format!("{} line {}: not JSON: {e}", path.display(), i + 1)))?;
        payloads.push(payload);
    }
    Ok(payloads)
}

/// Publishes `payloads` as one batch of `kind` and returns when every message is confirmed.
///
/// The manifest goes first so the collector knows the total before results arrive. Fails on the
/// first publish that is nacked, returned or lost with the channel.
pub async fn publish_batch(
    publisher: &Publisher,
    kind: &str,
    payloads: Vec<Value>,
) -> Result<Receipt, PublishError> {
    let batch = uuid::Uuid::now_v7().to_string();
    let total = u64::try_from(payloads.len()).unwrap_or(u64::MAX);
    publisher
        .publish(Outgoing::manifest(&BatchManifest::new(
            batch.clone(),
            total,
            kind.to_owned(),
        )))
        .await?;
    let tasks: Vec<Task> = payloads
        .into_iter()
        .map(|payload| {
            Task::new(
                uuid::Uuid::now_v7().to_string(),
                kind.to_owned(),
                Some(batch.clone()),
                payload,
            )
        })
        .collect();
    let task_ids = tasks.iter().map(|t| t.id.clone()).collect();
    publisher
        .publish_all(tasks.iter().map(Outgoing::task))
        .await?;
    Ok(Receipt { batch, task_ids })
}

/// Connects, declares topology and opens a confirmed publisher.
///
/// Fails when the broker is unreachable or refuses us, or topology cannot be declared.
pub async fn connect_publisher(
    settings: &Settings,
    name: &str,
) -> anyhow::Result<(lapin::Connection, Publisher)> {
    let connection = amqp::connect(settings, name).await?;
    let publisher = Publisher::new(&connection, settings.amqp.publish_window)
        .await
        .context("opening a publish channel")?;
    topology::declare(publisher.channel(), settings)
        .await
        .context("declaring topology")?;
    Ok((connection, publisher))
}

/// What `fleet-producer submit` was asked to do.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Task kind.
    pub kind: String,
    /// JSON-lines file of payloads, `-` for stdin.
    pub input: std::path::PathBuf,
    /// Wait for every result, showing progress.
    pub wait: bool,
    /// Write the results as JSON lines here (implies waiting).
    pub output: Option<std::path::PathBuf>,
    /// The collector's read API.
    pub collector: String,
}

/// Publishes the batch, prints its id, and with `wait` follows it to the end.
///
/// Fails with [`UsageError`] for unreadable input, [`fleet_shared::error::TasksFailed`] when
/// waiting and a task failed, and otherwise when the broker or collector fails us.
pub async fn run(
    settings: Settings,
    submission: Submission,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let payloads = read_payloads(&submission.input)?;
    if payloads.is_empty() {
        return Err(UsageError(format!("{} holds no payloads", submission.input.display())).into());
    }
    let (connection, publisher) = connect_publisher(&settings, "fleet-producer-submit").await?;
    let receipt = publish_batch(&publisher, &submission.kind, payloads)
        .await
        .context("publishing the batch")?;
    let _ = connection.close(200, "published".into()).await;
    println!("{}", receipt.batch);
    if !(submission.wait || submission.output.is_some()) {
        return Ok(());
    }
    let client = crate::client::CollectorClient::new(&submission.collector);
    let total = u64::try_from(receipt.task_ids.len()).unwrap_or(u64::MAX);
    let status = follow(&client, &receipt.batch, total, &shutdown).await?;
    if let Some(path) = &submission.output {
        let results = client.results(&receipt.batch).await?;
        let mut text = String::new();
        for result in &results {
            text.push_str(
                std::str::from_utf8(&fleet_shared::envelope::encode(result)).unwrap_or_default(),
            );
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if status.failed > 0 {
        return Err(fleet_shared::error::TasksFailed {
            failed: status.failed,
            total,
        }
        .into());
    }
    Ok(())
}

/// Polls the collector with a progress bar until the batch is complete.
async fn follow(
    client: &crate::client::CollectorClient,
    batch: &str,
    total: u64,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<crate::collector::store::BatchStatus> {
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
        )
        .expect("the progress template is valid"),
    );
    loop {
        if shutdown.is_cancelled() {
            bar.abandon_with_message("interrupted");
            anyhow::bail!("interrupted while waiting for batch {batch}");
        }
        if let Some(status) = client.batch(batch).await? {
            bar.set_position(status.done);
            bar.set_message(format!("ok {} failed {}", status.ok, status.failed));
            if status.complete {
                bar.finish();
                eprintln!(
                    "batch {batch}: {} ok, {} failed, {} duplicates",
                    status.ok, status.failed, status.duplicates
                );
                return Ok(status);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
