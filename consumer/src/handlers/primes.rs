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

/// Counts primes below `below` with a sieve.
pub async fn run(payload: Payload, _ctx: TaskContext) -> Result<Output, HandlerError> {
    if payload.below > MAX_BELOW {
        return Err(HandlerError::permanent(
            "invalid_payload",
            format!("below must be at most {MAX_BELOW}"),
        ));
    }
    Ok(Output {
        below: payload.below,
        count: count_primes(payload.below),
    })
}

fn count_primes(below: u64) -> u64 {
    let n = usize::try_from(below).unwrap_or(usize::MAX);
    if n < 3 {
        return 0;
    }
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            count += 1;
            let mut j = i.saturating_mul(i);
            while j < n {
                composite[j] = true;
                j += i;
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::count_primes;

    #[test]
    fn counts_match_known_values() {
        assert_eq!(count_primes(0), 0);
        assert_eq!(count_primes(2), 0);
        assert_eq!(count_primes(3), 1);
        assert_eq!(count_primes(10), 4);
        assert_eq!(count_primes(100_000), 9592);
    }
}
