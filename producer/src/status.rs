//! `fleet-producer status`: every queue's ready, unacked and consumer counts over AMQP, without
//! the management plugin (see [`fleet_shared::status`]).

use anyhow::Context as _;
use fleet_shared::amqp;
use fleet_shared::settings::Settings;
use fleet_shared::status::{self, BEAT_EVERY, Listener};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How `status` shows what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A table (redrawn in place with `--watch`).
    Table,
    /// One JSON object per reading.
    Json,
}

/// Listens to the services' beats for a little over one interval, reads every queue, and prints
/// the status; with `watch`, again every interval until `shutdown`.
///
/// Unacked counts need a user that may declare a `fleet.status.*` queue (the admin); any other
/// user gets the ready and consumer counts, and `?` for unacked.
///
/// Fails when the broker cannot be reached or refuses us, or a queue is missing.
pub async fn run(
    settings: Settings,
    output: Output,
    watch: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let connection = amqp::connect(&settings, "fleet-producer-status").await?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    let listening = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    let mut listener = match Listener::start(&listening).await {
        Ok(listener) => Some(listener),
        Err(error) if amqp::is_refusal(&error) => {
            eprintln!(
                "note: unacked counts need a user that may declare fleet.status.* queues (fleet-admin); showing ready and consumers only"
            );
            None
        }
        Err(error) => return Err(anyhow::Error::new(error).context("listening for status beats")),
    };
    let mut heard = BTreeMap::new();
    let window = BEAT_EVERY + Duration::from_millis(500);
    loop {
        let waited = async {
            match &mut listener {
                Some(listener) => listener.listen(window, &mut heard).await,
                None => tokio::time::sleep(window).await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = waited => {}
        }
        let status = status::read(&channel, &settings, &heard)
            .await
            .context("reading the queues (has `fleet-producer setup` run?)")?;
        match output {
            Output::Json => println!("{}", serde_json::to_string(&status)?),
            Output::Table if watch => print!("\x1b[2J\x1b[H{status}"),
            Output::Table => print!("{status}"),
        }
        if !watch {
            break;
        }
    }
    let _ = connection.close(200, "status read".into()).await;
    Ok(())
}
