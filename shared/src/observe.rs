//! What every service shows about itself over HTTP: Prometheus metrics on `/metrics`, liveness on
//! `/healthz` and readiness on `/readyz`.
//!
//! Each service builds one [`Observer`]: a registry it adds its own metrics to, the metrics every
//! service has ([`Common`]), and its [`Health`]. [`Observer::router`] serves the three routes;
//! the producer API and the collector merge them into their own router, the consumer serves them
//! alone on `consumer.listen`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Buckets for durations in seconds: 1 ms to about 8 min, doubling.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 20)
}

/// Registers `metric` in `registry` as `name` and hands it back, for the service to keep.
pub fn register<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// Metrics every service has.
#[derive(Clone)]
pub struct Common {
    /// `fleet_reconnects_total`: sessions started again after the broker was lost.
    pub reconnects: Counter,
    /// `fleet_publish_confirm_seconds`: from a publish to the broker's confirm.
    pub confirm_seconds: Histogram,
    /// `fleet_publish_confirm_timeouts_total`: publishes whose confirm did not come within
    /// `amqp.confirm_timeout_secs` (each drops its connection).
    pub confirm_timeouts: Counter,
}

/// What `/readyz` checks. A service that publishes only (the producer API) does not consume, and
/// its readiness ignores `consuming`.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    topology: AtomicBool,
    consuming: AtomicBool,
    /// Set when deliveries in hand stop settling (the consumer's watchdog).
    stalled: AtomicBool,
    /// Set when the broker refused this user a publish (the producer API).
    refused: AtomicBool,
    publishes_only: bool,
}

impl Health {
    /// Readiness of a service that publishes and does not consume.
    pub fn publisher() -> Self {
        Self {
            publishes_only: true,
            ..Self::default()
        }
    }

    /// The broker connection is up.
    pub fn connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        if !up {
            self.consuming.store(false, Ordering::Relaxed);
        }
    }

    /// The topology is declared (or found in place).
    pub fn topology(&self, declared: bool) {
        self.topology.store(declared, Ordering::Relaxed);
    }

    /// Our consumer is registered with the broker.
    pub fn consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    /// Whether deliveries in hand still settle (a consumer's own reading).
    pub fn progressing(&self, progressing: bool) {
        self.stalled.store(!progressing, Ordering::Relaxed);
    }

    /// Whether the broker refused this user its last publish (ACCESS_REFUSED); a later
    /// confirmed one clears it.
    pub fn refused(&self, refused: bool) {
        self.refused.store(refused, Ordering::Relaxed);
    }

    /// A subscription is up: connected, topology in place, consuming.
    pub fn subscribed(&self) {
        self.connected(true);
        self.topology(true);
        self.consuming(true);
    }

    /// The broker is gone: nothing holds until the next session says so again.
    pub fn lost(&self) {
        self.connected(false);
    }

    /// Ready to do work: connected, topology in place, consuming (unless publishing only) and
    /// not stuck.
    pub fn is_ready(&self) -> bool {
        let connected = self.connected.load(Ordering::Relaxed);
        let topology = self.topology.load(Ordering::Relaxed);
        let consuming = self.publishes_only || self.consuming.load(Ordering::Relaxed);
        let stalled = self.stalled.load(Ordering::Relaxed);
        let refused = self.refused.load(Ordering::Relaxed);
        connected && topology && consuming && !stalled && !refused
    }

    fn report(&self) -> serde_json::Value {
        let mut report = serde_json::json!({
            "ready": self.is_ready(),
            "connected": self.connected.load(Ordering::Relaxed),
            "topology": self.topology.load(Ordering::Relaxed),
        });
        if self.publishes_only {
            report["permitted"] = (!self.refused.load(Ordering::Relaxed)).into();
        } else {
            report["consuming"] = self.consuming.load(Ordering::Relaxed).into();
            report["progressing"] = (!self.stalled.load(Ordering::Relaxed)).into();
        }
        report
    }
}

/// A service's metrics registry and health.
pub struct Observer {
    registry: Registry,
    /// Metrics every service has, registered already.
    pub common: Common,
    /// What `/readyz` reports.
    pub health: Arc<Health>,
}

impl Observer {
    /// A registry holding [`Common`], and `health`.
    pub fn new(health: Health) -> Self {
        let mut registry = Registry::default();
        let common = Common {
            reconnects: register(
                &mut registry,
                "fleet_reconnects",
                "Sessions started again after the broker connection was lost",
                Counter::default(),
            ),
            confirm_seconds: register(
                &mut registry,
                "fleet_publish_confirm_seconds",
                "Time from a publish to the broker's confirm",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            confirm_timeouts: register(
                &mut registry,
                "fleet_publish_confirm_timeouts",
                "Publishes whose confirm did not come within amqp.confirm_timeout_secs",
                Counter::default(),
            ),
        };
        Self {
            registry,
            common,
            health: Arc::new(health),
        }
    }

    /// The registry, for the service to add its own metrics before [`Observer::router`].
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// `/metrics`, `/healthz` and `/readyz`.
    pub fn router(self) -> Router {
        let state = Arc::new(Served {
            registry: self.registry,
            health: self.health,
        });
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(state)
    }
}

struct Served {
    registry: Registry,
    health: Arc<Health>,
}

async fn metrics(State(served): State<Arc<Served>>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &served.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {error}\n"),
        ),
    }
}

async fn readyz(State(served): State<Arc<Served>>) -> impl IntoResponse {
    let status = if served.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(served.health.report()))
}
