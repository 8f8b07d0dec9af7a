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

/// Reads JSON lines, one payload per line (`-` is stdin); blank lines are skipped. Each line
/// is checked and kept as text (a parsed value takes several times the memory).
///
/// Fails with a [`UsageError`] naming the line of the first payload that is not JSON.
pub fn read_payloads(path: &Path) -> anyhow::Result<Vec<String>> {
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
        fleet_shared::envelope::decode_json::<serde::de::IgnoredAny>(line.as_bytes())
            .map_err(|e| UsageError(format!("{} line {}: not JSON: {e}", path.display(), i + 1)))?;
        payloads.push(line);
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
    let (batch, messages) = lazy_batch(kind, payloads.into_iter(), trace);
    let messages: Vec<Outgoing> = messages.collect();
    let task_ids = messages
        .iter()
        .skip(1)
        .filter_map(|m| m.properties.message_id().as_ref().map(|id| id.to_string()))
        .collect();
    Batch {
        receipt: Receipt { batch, task_ids },
        messages,
    }
}

/// The batch id and its messages (the manifest, then the tasks) for `payloads`, each message
/// built only when the iterator reaches it, so a large batch is never held as messages all at
/// once (they are several times larger than the payloads).
pub fn lazy_batch(
    kind: &str,
    payloads: impl ExactSizeIterator<Item = Value>,
    trace: &TraceParent,
) -> (String, impl Iterator<Item = Outgoing>) {
    let batch = uuid::Uuid::now_v7().to_string();
    let messages = batch_messages(&batch, TaskIds::Fresh, kind, payloads, trace);
    (batch, messages)
}

/// How the tasks of a batch get their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskIds {
    /// A new UUIDv7 each: a batch published twice is two sets of tasks.
    Fresh,
    /// `<batch>-<n>` for the n-th payload (from 1): the same batch and input give the same
    /// tasks, so publishing it again only adds duplicates, which the collector counts once.
    OfBatch,
}

/// The longest batch id given with [`TaskIds::OfBatch`]: its task ids add `-` and up to 20
/// digits and must stay names ([`fleet_shared::envelope::check_name`]).
pub const MAX_GIVEN_BATCH_BYTES: usize = fleet_shared::envelope::MAX_NAME_BYTES - 21;

/// The manifest, then the tasks, of batch `batch`: each message built only when the iterator
/// reaches it.
pub fn batch_messages<P: ExactSizeIterator<Item = Value>>(
    batch: &str,
    ids: TaskIds,
    kind: &str,
    payloads: P,
    trace: &TraceParent,
) -> impl Iterator<Item = Outgoing> + use<P> {
    let total = u64::try_from(payloads.len()).unwrap_or(u64::MAX);
    let manifest = Outgoing::manifest(&BatchManifest::new(
        batch.to_owned(),
        total,
        kind.to_owned(),
    ));
    let (kind, trace, of_batch) = (kind.to_owned(), *trace, batch.to_owned());
    let tasks = payloads.enumerate().map(move |(n, payload)| {
        let id = match ids {
            TaskIds::Fresh => uuid::Uuid::now_v7().to_string(),
            TaskIds::OfBatch => format!("{of_batch}-{}", n + 1),
        };
        let task = Task::new(id, kind.clone(), Some(of_batch.clone()), payload);
        Outgoing::task(&task).traced(&trace)
    });
    std::iter::once(manifest).chain(tasks)
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

/// Messages built and published at a time by [`publish_reliably`].
const CHUNK: usize = 2_048;

/// Publishes `messages` through connection losses: connects as `name`, publishes, and when the
/// connection or channel fails, connects again with backoff and sends every message whose
/// confirm did not arrive again, with the same task ids. A message that was in fact enqueued
/// before the loss is then delivered twice, and the collector counts the duplicate. Messages
/// are taken from the iterator a few thousand at a time, so memory does not grow with the batch.
///
/// Fails on refused credentials, on a nack or return (another attempt would repeat it), and
/// when the broker stays unreachable for `amqp.reconnect_timeout_secs`.
pub async fn publish_reliably(
    settings: &Settings,
    name: &str,
    messages: impl IntoIterator<Item = Outgoing>,
) -> anyhow::Result<()> {
    use backon::BackoffBuilder as _;
    let mut messages = messages.into_iter();
    // Taken from the iterator and not confirmed yet.
    let mut pending: Vec<Outgoing> = Vec::new();
    let mut waits = amqp::backoff(settings).build();
    loop {
        let error = match connect_publisher(settings, name).await {
            Ok((connection, publisher)) => {
                let outcome = loop {
                    if pending.is_empty() {
                        pending.extend(messages.by_ref().take(CHUNK));
                    }
                    if pending.is_empty() {
                        break Ok(());
                    }
                    match publisher.publish_all(std::mem::take(&mut pending)).await {
                        Ok(_) => waits = amqp::backoff(settings).build(),
                        Err(unconfirmed) => break Err(unconfirmed),
                    }
                };
                // A broker that stopped confirming may not answer a close either.
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    connection.close(200, "published".into()),
                )
                .await;
                match outcome {
                    Ok(()) => return Ok(()),
                    Err(unconfirmed) if unconfirmed.is_connection_loss() => {
                        tracing::warn!(
                            unconfirmed = unconfirmed.messages.len(),
                            confirmed = unconfirmed.confirmed,
                            error = %unconfirmed.error,
                            "lost the broker while publishing; sending the unconfirmed again"
                        );
                        pending = unconfirmed.messages;
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
        .confirm_timeout(settings.confirm_timeout())
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
    /// The batch id to publish under, with task ids derived from it ([`TaskIds::OfBatch`]);
    /// `None` for a fresh one.
    pub batch: Option<String>,
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
    let tasks = payloads.len();
    // Each line was checked when read; parsed again only as its task is built.
    let values = payloads
        .into_iter()
        .map(|line| fleet_shared::envelope::decode_json(line.as_bytes()).unwrap_or(Value::Null));
    let (batch, ids) = match &submission.batch {
        Some(given) => (given.clone(), TaskIds::OfBatch),
        None => (uuid::Uuid::now_v7().to_string(), TaskIds::Fresh),
    };
    let mut messages = batch_messages(&batch, ids, &submission.kind, values, &trace);
    // Said before anything is sent, so the id is known however this ends.
    eprintln!(
        "publishing {tasks} tasks of kind {} as batch {batch}",
        submission.kind
    );
    // The manifest alone first: if it is not confirmed, no task is published under a batch
    // that could never complete.
    let manifest = messages.next().into_iter();
    publish_reliably(&settings, "fleet-producer-submit", manifest)
        .instrument(span.clone())
        .await
        .with_context(|| {
            format!("publishing the manifest of batch {batch} (no task was published)")
        })?;
    publish_reliably(&settings, "fleet-producer-submit", messages)
        .instrument(span)
        .await
        .with_context(|| match ids {
            TaskIds::OfBatch => format!(
                "publishing the tasks of batch {batch}: some may be published; the same submit \
                 with --batch {batch} sends them again under the same ids, and the batch \
                 completes with each task stored once"
            ),
            TaskIds::Fresh => format!(
                "publishing the tasks of batch {batch}: some may be published, and the batch \
                 cannot complete without the rest; give submit --batch ID so that running it \
                 again finishes the same batch"
            ),
        })?;
    tracing::info!(%batch, trace_id = %trace.trace_id(), tasks, "batch published");
    println!("{batch}");
    if !(submission.wait || submission.output.is_some()) {
        return Ok(());
    }
    let client = crate::client::CollectorClient::new(&submission.collector);
    let total = u64::try_from(tasks).unwrap_or(u64::MAX);
    let status = crate::progress::follow(&client, &batch, Some(total), &shutdown).await?;
    if let Some(path) = &submission.output {
        let results = client.results(&batch).await?;
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
