//! Shutdown on SIGINT or SIGTERM: the first signal drains, a second one exits at once.

use tokio_util::sync::CancellationToken;

/// Exit code for a second signal: the conventional 128 + SIGINT.
const EXIT_IMMEDIATE: i32 = 130;

/// A token that the first SIGINT or SIGTERM cancels; a second signal exits the process at once.
///
/// Must be called inside a tokio runtime. Fails if the signal handlers cannot be installed.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let tripped = token.clone();
    tokio::spawn(async move {
        for round in 0..2 {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            if round == 0 {
                tracing::info!("signal received, draining (send it again to exit at once)");
                tripped.cancel();
            }
        }
        tracing::warn!("second signal, exiting now");
        std::process::exit(EXIT_IMMEDIATE);
    });
    Ok(token)
}
