//! Publishing a batch: a manifest on the result path, then every task with windowed confirms.

use anyhow::Context as _;
use fleet_shared::envelope::{BatchManifest, Task};
use fleet_shared::error::UsageError;
use fleet_shared::publisher::{Outgoing, PublishError, Publisher};
use fleet_shared::settings::Settings;
use fleet_shared::trace::TraceParent;
use fleet_shared::{amqp, topology};
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;
use tracing::Instrument as _;

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

/// A batch ready to publish: the manifest first, then one message per task.
pub struct Batch {
    /// Batch and task ids.
    pub receipt: Receipt,
    /// The manifest, then the tasks.
    pub messages: Vec<Outgoing>,
}

/// Builds a batch of `kind` with a fresh batch id and one task (with a fresh id) per payload, in
/// a new trace.
///
/// The manifest goes first so the collector usually knows the total before results arrive (it
/// copes with either order).
pub fn batch(kind: &str, payloads: Vec<Value>) -> Batch {
    batch_in(kind, payloads, &TraceParent::root())
}

/// As [`batch`], every task carrying `trace` as its `traceparent` header.
pub fn batch_in(kind: &str, payloads: Vec<Value>, trace: &TraceParent) -> Batch {
    let batch = uuid::Uuid::now_v7().to_string();
    let total = u64::try_from(payloads.len()).unwrap_or(u64::MAX);
    let mut messages = Vec::with_capacity(payloads.len() + 1);
    messages.push(Outgoing::manifest(&BatchManifest::new(
        batch.clone(),
        total,
        kind.to_owned(),
    )));
    let mut task_ids = Vec::with_capacity(payloads.len());
    for payload in payloads {
        let task = Task::new(
            uuid::Uuid::now_v7().to_string(),
            kind.to_owned(),
            Some(batch.clone()),
            payload,
        );
        messages.push(Outgoing::task(&task).traced(trace));
        task_ids.push(task.id);
    }
    Batch {
        receipt: Receipt { batch, task_ids },
        messages,
    }
}

/// Publishes `payloads` as one batch of `kind` on one channel and returns when every message is
/// confirmed. Fails on the first publish that is nacked, returned or lost with the channel;
/// some of the batch may then be published (the HTTP API answers 503 and the caller retries).
pub async fn publish_batch(
    publisher: &Publisher,
    kind: &str,
    payloads: Vec<Value>,
) -> Result<Receipt, PublishError> {
    let Batch { receipt, messages } = batch(kind, payloads);
    publisher
        .publish_all(messages)
        .await
        .map_err(|unconfirmed| unconfirmed.error)?;
    Ok(receipt)
}

/// Publishes `messages` through connection losses: connects as `name`, publishes, and when the
/// connection or channel fails, connects again with backoff and sends every message whose
/// confirm did not arrive again, with the same task ids. A message that was in fact enqueued
/// before the loss is then delivered twice, and the collector counts the duplicate.
///
/// Fails on refused credentials, on a nack or return (another attempt would repeat it), and
/// when the broker stays unreachable for `amqp.reconnect_timeout_secs`.
pub async fn publish_reliably(
    settings: &Settings,
    name: &str,
    mut messages: Vec<Outgoing>,
) -> anyhow::Result<()> {
    use backon::BackoffBuilder as _;
    let mut waits = amqp::backoff(settings).build();
    loop {
        let error = match connect_publisher(settings, name).await {
            Ok((connection, publisher)) => {
                let outcome = publisher.publish_all(messages).await;
                let _ = connection.close(200, "published".into()).await;
                match outcome {
                    Ok(_) => return Ok(()),
                    Err(unconfirmed) if unconfirmed.is_connection_loss() => {
                        tracing::warn!(
                            unconfirmed = unconfirmed.messages.len(),
                            confirmed = unconfirmed.confirmed,
                            error = %unconfirmed.error,
                            "lost the broker while publishing; sending the unconfirmed again"
                        );
                        messages = unconfirmed.messages;
                        if unconfirmed.confirmed > 0 {
                            waits = amqp::backoff(settings).build();
                        }
                        anyhow::Error::new(unconfirmed.error)
                    }
                    Err(unconfirmed) => return Err(unconfirmed.error.into()),
                }
            }
            Err(error) if amqp::is_fatal(&error) => return Err(error),
            Err(error) => error,
        };
        let Some(wait) = waits.next() else {
            return Err(error.context(format!(
                "gave up publishing after {:?} without the broker",
                settings.reconnect_timeout()
            )));
        };
        tracing::warn!(error = %format!("{error:#}"), ?wait, "cannot publish; trying again");
        tokio::time::sleep(wait).await;
    }
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
        .context("opening a publish channel")?
        .identified_as(settings.broker_user())
        .sharded(settings.topology.work_queues);
    topology::ensure(&connection, settings).await?;
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
    // One trace for the batch: the caller's, from $TRACEPARENT (as other W3C tools pass it), or
    // a new one; this `submit` is its span.
    let span = tracing::info_span!("submit", kind = %submission.kind, tasks = payloads.len());
    let incoming = std::env::var("TRACEPARENT")
        .ok()
        .and_then(|t| TraceParent::parse(&t));
    let trace = TraceParent::continue_in(&span, incoming);
    let Batch { receipt, messages } = batch_in(&submission.kind, payloads, &trace);
    publish_reliably(&settings, "fleet-producer-submit", messages)
        .instrument(span)
        .await
        .context("publishing the batch")?;
    tracing::info!(batch = %receipt.batch, trace_id = %trace.trace_id(), tasks = receipt.task_ids.len(), "batch published");
    println!("{}", receipt.batch);
    if !(submission.wait || submission.output.is_some()) {
        return Ok(());
    }
    let client = crate::client::CollectorClient::new(&submission.collector);
    let total = u64::try_from(receipt.task_ids.len()).unwrap_or(u64::MAX);
    let status = crate::progress::follow(&client, &receipt.batch, Some(total), &shutdown).await?;
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
