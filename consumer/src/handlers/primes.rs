//! `primes`: CPU-bound. `{"below": 100000}` -> `{"below": 100000, "count": 9592}`.

use crate::registry::{HandlerError, TaskContext};
use serde::{Deserialize, Serialize};

/// The largest `below` accepted, so one task cannot take a worker's memory.
pub const MAX_BELOW: u64 = 1 << 32;

/// Input.
#[derive(Debug, Deserialize)]
pub struct Payload {
    /// Count primes strictly below this.
    pub below: u64,
}

/// Output.
#[derive(Debug, Serialize)]
pub struct Output {
    /// The input.
    pub below: u64,
    /// Primes below it.
    pub count: u64,
}

/// Counts primes below `below` with a sieve; stops early when the task passes its time limit.
pub async fn run(payload: Payload, ctx: TaskContext) -> Result<Output, HandlerError> {
    if payload.below > MAX_BELOW {
        return Err(HandlerError::permanent(
            "invalid_payload",
            format!("below must be at most {MAX_BELOW}"),
        ));
    }
    let count = count_primes(payload.below, || ctx.cancel.is_cancelled())
        .ok_or_else(|| HandlerError::retryable("timeout", "stopped at its time limit"))?;
    Ok(Output {
        below: payload.below,
        count,
    })
}

/// Primes below `below`, or `None` if `stop` said so (it is asked at every prime found).
fn count_primes(below: u64, stop: impl Fn() -> bool) -> Option<u64> {
    let n = usize::try_from(below).unwrap_or(usize::MAX);
    if n < 3 {
        return Some(0);
    }
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            if stop() {
                return None;
            }
            count += 1;
            let mut j = i.saturating_mul(i);
            while j < n {
                composite[j] = true;
                j += i;
            }
        }
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::count_primes;

    #[test]
    fn counts_match_known_values() {
        let go = || false;
        assert_eq!(count_primes(0, go), Some(0));
        assert_eq!(count_primes(2, go), Some(0));
        assert_eq!(count_primes(3, go), Some(1));
        assert_eq!(count_primes(10, go), Some(4));
        assert_eq!(count_primes(100_000, go), Some(9592));
        assert_eq!(count_primes(100_000, || true), None);
    }
}
