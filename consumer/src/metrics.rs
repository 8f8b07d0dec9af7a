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
//! - `fleet_tasks_handed_back_total`: unstarted deliveries a draining consumer sent back to the
//!   work queue (`Worker::give_back`), whatever their kind.
//! - `fleet_result_messages_total`: messages sent to `fleet.results`; below the results sent
//!   (ok and failed tasks) when `consumer.results_per_message` groups them.
//!
//! A kind the registry does not know is counted as [`UNKNOWN`], so a stray routing key cannot
//! grow the number of series. Every series of every known kind exists from the start (at 0), and
//! the per-task updates touch counters looked up once, without allocating.

use fleet_shared::observe::{duration_buckets, register};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Arc;

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

/// The `kind` label of deliveries that are not a task of a known kind.
pub const UNKNOWN: &str = "unknown";

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
    const ALL: [Self; 4] = [Self::Ok, Self::Failed, Self::Retried, Self::Rejected];

    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Rejected => "rejected",
        }
    }
}

/// The series of one kind, looked up once.
#[derive(Clone)]
struct KindSeries {
    received: Counter,
    /// In [`TaskOutcome::ALL`] order.
    ended: [Counter; 4],
    dead_lettered: Counter,
    duration: Histogram,
}

/// The consumer's metrics; cheap to clone (each metric is shared).
#[derive(Clone)]
pub struct Metrics {
    /// Every known kind and [`UNKNOWN`].
    by_kind: Arc<HashMap<String, KindSeries>>,
    in_flight: Gauge,
    /// `fleet_worker_slots_busy{work="compute"}` and `{work="io"}`.
    busy_compute: Gauge,
    busy_io: Gauge,
    result_messages: Counter,
    handed_back: Counter,
}

impl Metrics {
    /// Registers the consumer's metrics in `registry`, with `compute` and `io` slots and the
    /// series of every kind in `kinds` (and [`UNKNOWN`]).
    pub fn register(registry: &mut Registry, compute: usize, io: usize, kinds: &[&str]) -> Self {
        let received: Family<Kind, Counter> = register(
            registry,
            "fleet_tasks_received",
            "Deliveries taken from the task queue",
            Family::default(),
        );
        let tasks: Family<KindOutcome, Counter> = register(
            registry,
            "fleet_tasks",
            "Deliveries by how they ended: ok, failed, retried or rejected",
            Family::default(),
        );
        let dead_lettered: Family<Kind, Counter> = register(
            registry,
            "fleet_tasks_dead_lettered",
            "Copies sent to fleet.dead",
            Family::default(),
        );
        let duration: Family<Kind, Histogram, fn() -> Histogram> = register(
            registry,
            "fleet_task_duration_seconds",
            "Handler run time",
            Family::new_with_constructor(|| Histogram::new(duration_buckets())),
        );
        let in_flight = register(
            registry,
            "fleet_tasks_in_flight",
            "Deliveries being handled now",
            Gauge::default(),
        );
        let result_messages = register(
            registry,
            "fleet_result_messages",
            "Messages sent to fleet.results (a group of results counts once)",
            Counter::default(),
        );
        let handed_back = register(
            registry,
            "fleet_tasks_handed_back",
            "Unstarted deliveries a draining consumer sent back to the work queue",
            Counter::default(),
        );
        let slots: Family<WorkLabel, Gauge> = register(
            registry,
            "fleet_worker_slots",
            "Compute and I/O slots",
            Family::default(),
        );
        let busy: Family<WorkLabel, Gauge> = register(
            registry,
            "fleet_worker_slots_busy",
            "Slots taken now",
            Family::default(),
        );
        for (work, n) in [("compute", compute), ("io", io)] {
            slots
                .get_or_create(&WorkLabel { work })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let series = |kind: &str| {
            let label = Kind {
                kind: kind.to_owned(),
            };
            KindSeries {
                received: received.get_or_create(&label).clone(),
                ended: TaskOutcome::ALL.map(|outcome| {
                    tasks
                        .get_or_create(&KindOutcome {
                            kind: kind.to_owned(),
                            outcome: outcome.label(),
                        })
                        .clone()
                }),
                dead_lettered: dead_lettered.get_or_create(&label).clone(),
                duration: duration.get_or_create(&label).clone(),
            }
        };
        let by_kind = kinds
            .iter()
            .copied()
            .chain([UNKNOWN])
            .map(|kind| (kind.to_owned(), series(kind)))
            .collect();
        // One statement each: a family's read guard lives to the end of its statement, and a
        // second new label in the same statement would wait on it for ever.
        let busy_compute = busy.get_or_create(&WorkLabel { work: "compute" }).clone();
        let busy_io = busy.get_or_create(&WorkLabel { work: "io" }).clone();
        Self {
            by_kind: Arc::new(by_kind),
            in_flight,
            busy_compute,
            busy_io,
            result_messages,
            handed_back,
        }
    }

    /// The series of `kind`, or of [`UNKNOWN`] for a kind not registered at start.
    fn of(&self, kind: &str) -> &KindSeries {
        self.by_kind
            .get(kind)
            .or_else(|| self.by_kind.get(UNKNOWN))
            .expect("the unknown kind's series exist from the start")
    }

    /// A delivery of `kind` arrived.
    pub fn received(&self, kind: &str) {
        self.of(kind).received.inc();
    }

    /// A delivery of `kind` ended with `outcome`.
    pub fn ended(&self, kind: &str, outcome: TaskOutcome) {
        // `ALL` lists the variants in declaration order.
        self.of(kind).ended[outcome as usize].inc();
    }

    /// A copy of a delivery of `kind` went to `fleet.dead`.
    pub fn dead_lettered(&self, kind: &str) {
        self.of(kind).dead_lettered.inc();
    }

    /// A handler of `kind` ran for `seconds`.
    pub fn ran(&self, kind: &str, seconds: f64) {
        self.of(kind).duration.observe(seconds);
    }

    /// A message of results (one or a group) is sent to `fleet.results`.
    pub fn result_message(&self) {
        self.result_messages.inc();
    }

    /// A draining consumer sent an unstarted delivery back to the work queue.
    pub fn handed_back(&self) {
        self.handed_back.inc();
    }

    /// Counts a delivery in `fleet_tasks_in_flight` until the returned guard drops.
    pub fn handling(&self) -> Busy {
        self.in_flight.inc();
        Busy(self.in_flight.clone())
    }

    /// Marks one compute (or I/O) slot taken until the returned guard drops.
    pub fn busy(&self, compute: bool) -> Busy {
        let gauge = if compute {
            self.busy_compute.clone()
        } else {
            self.busy_io.clone()
        };
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
