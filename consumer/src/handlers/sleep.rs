//! `sleep`: the I/O-bound stand-in. `{"ms": 100}` -> `{"slept_ms": 100}`.

use crate::registry::{HandlerError, TaskContext};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Input.
#[derive(Debug, Deserialize)]
pub struct Payload {
    /// How long to wait.
    pub ms: u64,
}

/// Output.
#[derive(Debug, Serialize)]
pub struct Output {
    /// How long it waited.
    pub slept_ms: u64,
}

/// Waits `ms` milliseconds without holding a thread.
pub async fn run(payload: Payload, _ctx: TaskContext) -> Result<Output, HandlerError> {
    tokio::time::sleep(Duration::from_millis(payload.ms)).await;
    Ok(Output {
        slept_ms: payload.ms,
    })
}
