//! The consumer's Prometheus metrics, beside [`fleet_shared::observe::Common`].
//!
//! - `fleet_tasks_received_total{kind}`: deliveries taken from the queue.
//! - `fleet_tasks_total{kind,outcome}`: how each delivery ended: `ok`, `failed` (for good: a
//!   failed result and a copy in `fleet.dead`), `retried` (sent to a delay queue) or `rejected`
//!   (undecodable, too large or of an unknown kind: dead-lettered without running).
//! - `fleet_tasks_dead_lettered_total{kind}`: copies sent to `fleet.dead` (failed and rejected).
//! - `fleet_task_duration_seconds{kind}`: handler run time, whatever the outcome.
//! - `fleet_tasks_in_flight`: deliveries being handled now (waiting for a slot, running or
//!   settling).
//! - `fleet_worker_slots{work}` and `fleet_worker_slots_busy{work}`: compute and I/O slots, and
//!   how many are taken.
//!
//! A kind the registry does not know is counted as `unknown`, so a stray routing key cannot grow
//! the number of series.

use fleet_shared::observe::duration_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `{kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The task kind, or `unknown`.
    pub kind: String,
}

/// `{kind,outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindOutcome {
    /// The task kind, or `unknown`.
    pub kind: String,
    /// `ok`, `failed`, `retried` or `rejected`.
    pub outcome: &'static str,
}

/// `{work}`: `compute` or `io`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkLabel {
    /// `compute` or `io`.
    pub work: &'static str,
}

/// How a delivery ended, as `fleet_tasks_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    /// Ran and succeeded.
    Ok,
    /// Failed for good.
    Failed,
    /// Sent to a delay queue for another attempt.
    Retried,
    /// Dead-lettered without running.
    Rejected,
}

impl TaskOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Rejected => "rejected",
        }
    }
}

/// The consumer's metrics; cheap to clone (each metric is shared).
#[derive(Clone)]
pub struct Metrics {
    received: Family<Kind, Counter>,
    tasks: Family<KindOutcome, Counter>,
    dead_lettered: Family<Kind, Counter>,
    duration: Family<Kind, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
    slots: Family<WorkLabel, Gauge>,
    busy: Family<WorkLabel, Gauge>,
}

impl Metrics {
    /// Registers the consumer's metrics in `registry`, with `compute` and `io` slots.
    pub fn register(registry: &mut Registry, compute: usize, io: usize) -> Self {
        let metrics = Self {
            received: Family::default(),
            tasks: Family::default(),
            dead_lettered: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
            in_flight: Gauge::default(),
            slots: Family::default(),
            busy: Family::default(),
        };
        registry.register(
            "fleet_tasks_received",
            "Deliveries taken from the task queue",
            metrics.received.clone(),
        );
        registry.register(
            "fleet_tasks",
            "Deliveries by how they ended: ok, failed, retried or rejected",
            metrics.tasks.clone(),
        );
        registry.register(
            "fleet_tasks_dead_lettered",
            "Copies sent to fleet.dead",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "fleet_task_duration_seconds",
            "Handler run time",
            metrics.duration.clone(),
        );
        registry.register(
            "fleet_tasks_in_flight",
            "Deliveries being handled now",
            metrics.in_flight.clone(),
        );
        registry.register(
            "fleet_worker_slots",
            "Compute and I/O slots",
            metrics.slots.clone(),
        );
        registry.register(
            "fleet_worker_slots_busy",
            "Slots taken now",
            metrics.busy.clone(),
        );
        for (work, n) in [("compute", compute), ("io", io)] {
            metrics
                .slots
                .get_or_create(&WorkLabel { work })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            metrics.busy.get_or_create(&WorkLabel { work }).set(0);
        }
        metrics
    }

    /// A delivery of `kind` arrived.
    pub fn received(&self, kind: &str) {
        self.received
            .get_or_create(&Kind {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// A delivery of `kind` ended with `outcome`.
    pub fn ended(&self, kind: &str, outcome: TaskOutcome) {
        self.tasks
            .get_or_create(&KindOutcome {
                kind: kind.to_owned(),
                outcome: outcome.label(),
            })
            .inc();
    }

    /// A copy of a delivery of `kind` went to `fleet.dead`.
    pub fn dead_lettered(&self, kind: &str) {
        self.dead_lettered
            .get_or_create(&Kind {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// A handler of `kind` ran for `seconds`.
    pub fn ran(&self, kind: &str, seconds: f64) {
        self.duration
            .get_or_create(&Kind {
                kind: kind.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts a delivery in `fleet_tasks_in_flight` until the returned guard drops.
    pub fn handling(&self) -> Busy {
        self.in_flight.inc();
        Busy(self.in_flight.clone())
    }

    /// Marks one `work` slot taken until the returned guard drops.
    pub fn busy(&self, work: &'static str) -> Busy {
        let gauge = self.busy.get_or_create(&WorkLabel { work }).clone();
        gauge.inc();
        Busy(gauge)
    }
}

/// One count in a gauge (a delivery in flight, a slot taken), given back when dropped.
pub struct Busy(Gauge);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.dec();
    }
}
