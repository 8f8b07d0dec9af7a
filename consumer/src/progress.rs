//! Whether the consumer makes progress, for `/readyz`: a consumer holding deliveries that none of
//! them settles for longer than any task may run (the longest time limit, plus the grace period)
//! is stuck, whatever its connection says, and reports `"progressing": false` until one settles.

use crate::worker::Worker;
use fleet_shared::observe::Health;
use fleet_shared::settings::Settings;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

/// Readings of deliveries in hand and deliveries settled, and since when nothing settled.
#[derive(Debug)]
pub struct Progress {
    stall_after: Duration,
    settled: u64,
    since: Instant,
}

impl Progress {
    /// Nothing settled for `stall_after` while deliveries are in hand counts as stuck.
    pub fn new(stall_after: Duration, now: Instant) -> Self {
        Self {
            stall_after,
            settled: 0,
            since: now,
        }
    }

    /// Takes a reading at `now`: `in_hand` deliveries being handled, `settled` in all so far.
    /// True while the consumer makes progress (or has nothing to do).
    pub fn observe(&mut self, in_hand: usize, settled: u64, now: Instant) -> bool {
        if in_hand == 0 || settled != self.settled {
            self.settled = settled;
            self.since = now;
            return true;
        }
        now.duration_since(self.since) <= self.stall_after
    }
}

/// How long a consumer may hold deliveries without settling one: the longest time limit of any
/// kind, plus the grace period.
pub fn stall_after(settings: &Settings) -> Duration {
    let longest = settings
        .consumer
        .kinds
        .values()
        .filter_map(|k| k.time_limit_ms)
        .chain([settings.consumer.time_limit_ms])
        .max()
        .unwrap_or(settings.consumer.time_limit_ms);
    Duration::from_millis(longest) + settings.consumer_grace()
}

/// Reads the worker's progress every second into `health`, until the task is dropped.
pub async fn watch(
    worker: Arc<Worker>,
    in_flight: TaskTracker,
    health: Arc<Health>,
    stall_after: Duration,
) {
    let mut progress = Progress::new(stall_after, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let progressing = progress.observe(in_flight.len(), worker.settled(), Instant::now());
        health.progressing(progressing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_deliveries_in_hand_that_do_not_settle_count_as_stuck() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut progress = Progress::new(Duration::from_secs(10), start);
        assert!(progress.observe(0, 0, at(100)), "idle is not stuck");
        assert!(progress.observe(3, 0, at(105)), "within the bound");
        assert!(progress.observe(3, 0, at(110)), "at the bound");
        assert!(!progress.observe(3, 0, at(111)), "past it");
        assert!(progress.observe(3, 1, at(112)), "one settled: moving again");
        assert!(!progress.observe(3, 1, at(123)), "stuck again");
        assert!(progress.observe(0, 1, at(124)), "nothing in hand");
    }
}
