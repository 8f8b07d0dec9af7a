//! `square`: the seed's n*n. `{"n": 3411}` -> `{"n": 3411, "square": 11634921}`.

use crate::registry::{HandlerError, TaskContext};
use serde::{Deserialize, Serialize};

/// Input.
#[derive(Debug, Deserialize)]
pub struct Payload {
    /// The number to square.
    pub n: i64,
}

/// Output.
#[derive(Debug, Serialize)]
pub struct Output {
    /// The input.
    pub n: i64,
    /// n * n.
    pub square: i64,
}

/// Squares `n`; an overflow is a permanent failure.
pub async fn run(payload: Payload, _ctx: TaskContext) -> Result<Output, HandlerError> {
    let square = payload.n.checked_mul(payload.n).ok_or_else(|| {
        HandlerError::permanent(
            "overflow",
            format!("{} squared does not fit in 64 bits", payload.n),
        )
    })?;
    Ok(Output {
        n: payload.n,
        square,
    })
}
