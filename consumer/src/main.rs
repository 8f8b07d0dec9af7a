//! `fleet-consumer`: run the worker process. Settings from `--config PATH` / `FLEET_CONFIG` and
//! `FLEET_*` variables; see the README for every key.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Run a fleet worker process: one slot per CPU core by default.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Settings file (TOML); also `FLEET_CONFIG`.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match fleet_shared::cli::load_settings(args.config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let registry = match fleet_consumer::handlers::registry(&settings) {
        Ok(registry) => registry,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(fleet_shared::error::EXIT_USAGE);
        }
    };
    fleet_shared::cli::run_on_one_thread(settings, |settings, shutdown| {
        fleet_consumer::run(settings, registry, shutdown)
    })
}
