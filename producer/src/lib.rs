//! fleet-producer: the master side of the fleet.
//!
//! - [`submit`]: publish one batch of tasks (the `submit` CLI and the seed's `demo`).
//! - [`api`]: the producer's HTTP API (`serve`), publishing through a deadpool pool of fleet connections.
//! - [`client`]: a client of the collector's read API (`submit --wait`, `demo`).
//! - [`progress`]: a batch followed to its end with a progress bar (`submit --wait`, `watch`).
//! - [`dlq`]: list, replay and purge dead letters (`dlq`).
//! - [`definitions`]: RabbitMQ definitions with a user per role and fresh passwords.
//! - [`demo`]: the seed's task_master.py: ten random `square` tasks, results printed as they come.
//! - [`setup`]: the admin step that declares the topology (`setup`).
//! - [`status`]: every queue's ready, unacked and consumer counts over AMQP (`status`).
//! - [`problem`]: the JSON error answer of both HTTP APIs.
//! - [`hosts`]: the `Host` check of both HTTP APIs (against DNS rebinding).
//! - [`collector`]: the `fleet-collector` service: results into SQLite, and its read API.

pub mod api;
pub mod client;
pub mod collector;
pub mod definitions;
pub mod demo;
pub mod dlq;
pub mod hosts;
pub mod problem;
pub mod progress;
pub mod setup;
pub mod status;
pub mod submit;
