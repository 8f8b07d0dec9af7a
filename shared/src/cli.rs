//! What every binary's `main` shares: settings first (exit 2 on error, before any I/O),
//! then tracing, the shutdown token, the library's `run`, and an exit code from the outcome.

use crate::error::{SettingsError, exit_code};
use crate::settings::Settings;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Loads settings from `config` and the environment, or prints one line naming the bad key.
pub fn load_settings(config: Option<&Path>) -> Result<Settings, ExitCode> {
    Settings::load(config).map_err(|e: SettingsError| {
        eprintln!("error: {e}");
        ExitCode::from(crate::error::EXIT_USAGE)
    })
}

/// Runs `service` on a multi-threaded tokio runtime with tracing and a shutdown token, and maps
/// its outcome to an exit code (DESIGN.md "Exit codes"). Errors are printed with their causes.
pub fn run<F, Fut>(settings: Settings, service: F) -> ExitCode
where
    F: FnOnce(Settings, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_with(
        tokio::runtime::Builder::new_multi_thread(),
        settings,
        service,
    )
}

/// As [`run`], on a runtime of one thread: for the pipelines (consumer, collector, submit),
/// whose heavy work already runs elsewhere (lapin's I/O thread, the compute pool, SQLite on the
/// blocking pool). Each task hand-off between runtime threads is a futex wake-up; with one
/// thread there are none, and the consumer spends less CPU per task (docs/BENCHMARKS.md).
pub fn run_on_one_thread<F, Fut>(settings: Settings, service: F) -> ExitCode
where
    F: FnOnce(Settings, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_with(
        tokio::runtime::Builder::new_current_thread(),
        settings,
        service,
    )
}

fn run_with<F, Fut>(
    mut builder: tokio::runtime::Builder,
    settings: Settings,
    service: F,
) -> ExitCode
where
    F: FnOnce(Settings, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let name = std::env::args()
        .next()
        .and_then(|arg0| {
            Path::new(&arg0)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "fleet".to_owned());
    let _telemetry =
        crate::telemetry::init_with(&settings.log, crate::telemetry::DEFAULT_FILTER, &name);
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(crate::error::EXIT_RUNTIME);
        }
    };
    let outcome = runtime.block_on(async {
        let shutdown = crate::shutdown::on_signals()?;
        service(settings, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            exit_code(&error)
        }
    }
}
