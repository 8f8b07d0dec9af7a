//! fleet-shared: what every fleet service needs and nothing service-specific.
//!
//! - [`settings`]: layered settings (defaults, file, `FLEET_*` environment), validated before any I/O.
//! - [`telemetry`]: tracing subscriber, pretty or JSON, filtered by `RUST_LOG`.
//! - [`shutdown`]: a cancellation token tripped by SIGINT or SIGTERM; a second signal exits at once.
//! - [`envelope`]: the v1 wire contract: task, result and batch manifest, bytes <-> types.
//! - [`topology`]: every exchange and queue name, declared idempotently.
//! - [`amqp`]: connecting (credentials from files, refusals mapped to exit code 3).
//! - [`roles`]: the broker permissions of each role (admin, producer, consumer, collector).
//! - [`publisher`]: a confirmed, mandatory, persistent publisher with a window of confirms in flight.
//! - [`error`]: the error types callers match on and the process exit codes.
//! - [`cli`]: the few lines every binary's `main` shares.
//! - [`status`]: status beats from the services, and `fleet-producer status` reading them.
//! - [`trace`]: W3C `traceparent`, carried from the submit to the result.
//! - [`observe`]: `/metrics`, `/healthz` and `/readyz`, the metrics every service has.
//! - [`http`]: serving a router with timeouts for slow and idle clients.

pub mod amqp;
pub mod cli;
pub mod envelope;
pub mod error;
pub mod http;
pub mod observe;
pub mod publisher;
pub mod roles;
pub mod settings;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod topology;
pub mod trace;
