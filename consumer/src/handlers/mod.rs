//! Built-in handlers, one file each, and [`registry`], the function that registers them.

pub mod exec;
pub mod primes;
pub mod sleep;
pub mod square;

use crate::registry::{DuplicateKind, Registry, Work};
use fleet_shared::settings::Settings;

/// The built-in handlers: `square`, `primes` (compute), `sleep`, `exec` (I/O).
///
/// Fails only if two of them claim one kind.
pub fn registry(settings: &Settings) -> Result<Registry, DuplicateKind> {
    let mut registry = Registry::new();
    let exec = exec::Exec::new(&settings.consumer.exec);
    registry
        .register("square", Work::Inline, square::run)?
        .register("primes", Work::Compute, primes::run)?
        .register("sleep", Work::Io, sleep::run)?
        .register("exec", Work::Io, move |payload, ctx| {
            exec.clone().run(payload, ctx)
        })?;
    Ok(registry)
}
