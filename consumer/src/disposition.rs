//! The one mapping from a task's outcome to what happens to its delivery
//! (DESIGN.md "Delivery semantics").

use crate::registry::HandlerError;

/// What the handler run came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The handler returned an output.
    Ok,
    /// The handler failed.
    Failed(HandlerError),
}

/// What the worker does with the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Publish an ok result (confirmed), then ack.
    Complete,
    /// Publish to the delay queue `delay_ms` with attempt + 1 (confirmed), then ack.
    Retry {
        /// Which delay queue.
        delay_ms: u64,
    },
    /// Publish a failed result (confirmed), dead-letter the task with the reason, then ack.
    Fail,
}

/// Decides the disposition of a task on attempt `attempt` (0-based) given `max_attempts` in all
/// and the retry schedule `delays_ms` (retry N waits `delays_ms[N]`, the last one repeating).
pub fn decide(
    outcome: &Outcome,
    attempt: u32,
    max_attempts: u32,
    delays_ms: &[u64],
) -> Disposition {
    match outcome {
        Outcome::Ok => Disposition::Complete,
        Outcome::Failed(error) if error.retryable && attempt.saturating_add(1) < max_attempts => {
            let index = usize::try_from(attempt).unwrap_or(usize::MAX);
            let delay_ms = delays_ms
                .get(index)
                .or(delays_ms.last())
                .copied()
                .unwrap_or(1000);
            Disposition::Retry { delay_ms }
        }
        Outcome::Failed(_) => Disposition::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disposition_table_holds() {
        let retryable = Outcome::Failed(HandlerError::retryable("busy", "try later"));
        let permanent = Outcome::Failed(HandlerError::permanent("overflow", "too big"));
        let delays = [100, 500, 2000];
        let table = [
            (&Outcome::Ok, 0, 5, Disposition::Complete),
            (&Outcome::Ok, 4, 5, Disposition::Complete),
            (&retryable, 0, 5, Disposition::Retry { delay_ms: 100 }),
            (&retryable, 1, 5, Disposition::Retry { delay_ms: 500 }),
            (&retryable, 2, 5, Disposition::Retry { delay_ms: 2000 }),
            (&retryable, 3, 5, Disposition::Retry { delay_ms: 2000 }),
            (&retryable, 4, 5, Disposition::Fail),
            (&retryable, 0, 1, Disposition::Fail),
            (&permanent, 0, 5, Disposition::Fail),
            (&retryable, u32::MAX, 5, Disposition::Fail),
        ];
        for (outcome, attempt, max, expected) in table {
            assert_eq!(
                decide(outcome, attempt, max, &delays),
                expected,
                "{outcome:?} attempt {attempt} of {max}"
            );
        }
    }
}
