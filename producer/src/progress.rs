//! Following a batch to its end: a progress bar (done/total, rate, ETA) while it runs, one
//! summary line when it completes. `submit --wait` and `fleet-collector watch` both use it.

use crate::client::CollectorClient;
use crate::collector::store::BatchStatus;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Polls the collector every 200 ms, showing progress on stderr (when it is a terminal), until
/// `batch` is complete; then prints the summary line ([`summary`]) and returns the final status.
/// The total comes from the batch's manifest when `total` is not given.
///
/// Fails when the collector cannot be reached, or when `shutdown` is cancelled first.
pub async fn follow(
    client: &CollectorClient,
    batch: &str,
    total: Option<u64>,
    shutdown: &CancellationToken,
) -> anyhow::Result<BatchStatus> {
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(total.unwrap_or(0)).with_style(
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
            if let Some(total) = status.total {
                bar.set_length(total);
            }
            bar.set_position(status.done);
            bar.set_message(format!("ok {} failed {}", status.ok, status.failed));
            if status.complete {
                bar.finish_and_clear();
                eprintln!("{}", summary(&status, started.elapsed()));
                return Ok(status);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `batch B: 1000 ok, 2 failed, 0 duplicates in 4.2s (238 tasks/s)`, over `wall` time.
pub fn summary(status: &BatchStatus, wall: Duration) -> String {
    let seconds = wall.as_secs_f64();
    let rate = if seconds > 0.0 {
        format!("{:.0} tasks/s", status.done as f64 / seconds)
    } else {
        "-".to_owned()
    };
    format!(
        "batch {}: {} ok, {} failed, {} duplicates in {:.1}s ({rate})",
        status.batch, status.ok, status.failed, status.duplicates, seconds
    )
}
