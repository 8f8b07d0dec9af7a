//! `fleet-collector`: store results and serve the read API, or (`watch BATCH`) follow one batch
//! to its end. Settings from `--config PATH` / `FLEET_CONFIG` and `FLEET_*` variables; see the
//! README for every key.

use clap::{Parser, Subcommand};
use fleet_producer::client::CollectorClient;
use std::path::PathBuf;
use std::process::ExitCode;

/// Consume fleet.results into SQLite and answer "is batch X done, and what came out?".
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Settings file (TOML); also `FLEET_CONFIG`.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Follow one batch to its end: done/total, rate and ETA, then a summary; exit 4 if any
    /// task failed.
    Watch {
        /// The batch id (`submit` prints it).
        batch: String,
        /// The collector's read API [default: http://collector.listen].
        #[arg(long)]
        collector: Option<String>,
    },
}

async fn watch(
    base: String,
    batch: String,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let client = CollectorClient::new(&base);
    let status = fleet_producer::progress::follow(&client, &batch, None, &shutdown).await?;
    if status.failed > 0 {
        return Err(fleet_shared::error::TasksFailed {
            failed: status.failed,
            total: status.done,
        }
        .into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match fleet_shared::cli::load_settings(args.config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    match args.command {
        None => fleet_shared::cli::run_on_one_thread(settings, fleet_producer::collector::run),
        Some(Command::Watch { batch, collector }) => {
            let base = collector.unwrap_or_else(|| format!("http://{}", settings.collector.listen));
            fleet_shared::cli::run(settings, |_, shutdown| watch(base, batch, shutdown))
        }
    }
}
