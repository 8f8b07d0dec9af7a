//! `primes`: CPU-bound. `{"below": 100000}` -> `{"below": 100000, "count": 9592}`.

use crate::registry::{HandlerError, TaskContext};
use serde::{Deserialize, Serialize};

/// The largest `below` accepted (the sieve needs little memory at any size; this bounds time).
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
    let count = count_primes(payload.below, &|| ctx.cancel.is_cancelled())
        .ok_or_else(|| HandlerError::retryable("timeout", "stopped at its time limit"))?;
    Ok(Output {
        below: payload.below,
        count,
    })
}

/// Odd numbers sieved at a time: 64 KiB of flags, so a segment stays in the core's own cache
/// whatever `below` is, and two workers do not fight over memory bandwidth.
const SEGMENT: usize = 1 << 16;

/// Primes below `below`, or `None` if `stop` said so (it is asked before every segment).
///
/// A segmented sieve over odd numbers: memory is one segment plus the primes up to the square
/// root of `below`, not `below` bytes. Not generic over `stop`, so this crate compiles it once
/// and fleet-bench's bare threads run the consumer's own code, not a copy compiled into the bench.
fn count_primes(below: u64, stop: &dyn Fn() -> bool) -> Option<u64> {
    if below < 3 {
        return Some(0);
    }
    // Index i stands for the odd number 2i + 1; there are below / 2 of them below `below`.
    let odds = below / 2;
    let base: Vec<u64> = small_primes(below.isqrt() + 1)
        .into_iter()
        .filter(|&p| p > 2)
        .collect();
    let mut composite = vec![false; SEGMENT];
    // 2, and the odd primes counted below (1, at index 0, is not one).
    let mut count = 1;
    let mut lo = 0;
    while lo < odds {
        if stop() {
            return None;
        }
        let hi = (lo + SEGMENT as u64).min(odds);
        let flags = &mut composite[..usize::try_from(hi - lo).unwrap_or(SEGMENT)];
        flags.fill(false);
        let first = 2 * lo + 1;
        for &p in &base {
            let square = p * p;
            if square >= 2 * hi {
                break;
            }
            // The first odd multiple of p in the segment, not below p²: smaller multiples
            // have a smaller prime factor that marks them.
            let multiple = if square >= first {
                square
            } else {
                let k = first.div_ceil(p);
                (k | 1) * p
            };
            let mut i = (multiple - 1) / 2;
            while i < hi {
                flags[usize::try_from(i - lo).unwrap_or(0)] = true;
                i += p;
            }
        }
        count += flags.iter().filter(|c| !**c).count() as u64;
        if lo == 0 {
            count -= 1;
        }
        lo = hi;
    }
    Some(count)
}

/// Every prime up to and including `limit` (a plain sieve; `limit` is a square root here).
fn small_primes(limit: u64) -> Vec<u64> {
    let n = usize::try_from(limit).unwrap_or(0) + 1;
    let mut composite = vec![false; n];
    let mut primes = Vec::new();
    for i in 2..n {
        if !composite[i] {
            primes.push(i as u64);
            let mut j = i * i;
            while j < n {
                composite[j] = true;
                j += i;
            }
        }
    }
    primes
}

#[cfg(test)]
mod tests {
    use super::count_primes;

    #[test]
    fn counts_match_known_values() {
        let go = &|| false;
        assert_eq!(count_primes(0, go), Some(0));
        assert_eq!(count_primes(2, go), Some(0));
        assert_eq!(count_primes(3, go), Some(1));
        assert_eq!(count_primes(10, go), Some(4));
        assert_eq!(count_primes(100_000, go), Some(9592));
        assert_eq!(count_primes(100_000, &|| true), None);
        // Across segment boundaries (131,072 numbers each) and a square of a base prime.
        assert_eq!(count_primes(1_000_000, go), Some(78_498));
        assert_eq!(count_primes(10_000_000, go), Some(664_579));
    }

    #[test]
    fn every_small_count_matches_trial_division() {
        let is_prime = |n: u64| {
            n >= 2
                && (2..n)
                    .take_while(|d| d * d <= n)
                    .all(|d| !n.is_multiple_of(d))
        };
        let mut expected = 0;
        for below in 0..3_000u64 {
            assert_eq!(
                count_primes(below, &|| false),
                Some(expected),
                "below {below}"
            );
            if is_prime(below) {
                expected += 1;
            }
        }
    }
}
