//! `fleet-collector`: store results and serve the read API. Settings from `--config PATH` /
//! `FLEET_CONFIG` and `FLEET_*` variables; see the README for every key.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Consume fleet.results into SQLite and answer "is batch X done, and what came out?".
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Settings file (TOML); also `FLEET_CONFIG`.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match fleet_shared::cli::load_settings(args.config.as_deref()) {
        Ok(settings) => fleet_shared::cli::run(settings, fleet_producer::collector::run),
        Err(code) => code,
    }
}
