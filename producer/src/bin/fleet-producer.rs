//! `fleet-producer`: submit tasks (`submit`), serve the HTTP API (`serve`), or run the seed's
//! master demo (`demo`). Settings from `--config PATH` / `FLEET_CONFIG` and `FLEET_*` variables.

use clap::{Parser, Subcommand};
use fleet_producer::submit::Submission;
use std::path::PathBuf;
use std::process::ExitCode;

/// The master side of fleet: publish tasks to the broker.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Settings file (TOML); also `FLEET_CONFIG`.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish one batch: one task per JSON line of INPUT; prints the batch id.
    Submit {
        /// Task kind (routing key), e.g. `square`.
        kind: String,
        /// JSON lines, one payload per line; `-` for stdin.
        #[arg(long)]
        input: PathBuf,
        /// Wait for every result with a progress bar; exit 4 if any task failed.
        #[arg(long)]
        wait: bool,
        /// Write the results as JSON lines to this file (waits).
        #[arg(long)]
        output: Option<PathBuf>,
        /// The collector's read API [default: producer.collector_url].
        #[arg(long)]
        collector: Option<String>,
    },
    /// Serve the HTTP API on producer.listen.
    Serve,
    /// The seed's task_master.py: ten random `square` tasks, results printed as they arrive.
    Demo,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match fleet_shared::cli::load_settings(args.config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    match args.command {
        Command::Submit {
            kind,
            input,
            wait,
            output,
            collector,
        } => {
            let submission = Submission {
                kind,
                input,
                wait,
                output,
                collector: collector.unwrap_or_else(|| settings.producer.collector_url.clone()),
            };
            fleet_shared::cli::run(settings, |s, shutdown| {
                fleet_producer::submit::run(s, submission, shutdown)
            })
        }
        Command::Serve => fleet_shared::cli::run(settings, fleet_producer::api::serve),
        Command::Demo => fleet_shared::cli::run(settings, fleet_producer::demo::run),
    }
}
