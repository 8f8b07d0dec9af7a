//! The producer's HTTP API (`fleet-producer serve`):
//! `POST /v1/tasks` `{kind, payload, id?}` -> 202 `{id}`;
//! `POST /v1/batches` `{kind, payloads: [...]}` -> 202 `{batch, total}`;
//! bad input -> 400 with a JSON error; a publish the broker did not confirm -> 503.
//! `/metrics`, `/healthz` and `/readyz` beside them, without the bearer token.

use crate::problem::ApiError;
use crate::submit;
use anyhow::Context as _;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use deadpool::managed::{Manager, RecycleError, RecycleResult};
use fleet_shared::envelope::{self, HEADER_TRACEPARENT, Task};
use fleet_shared::observe::{Health, Observer, register};
use fleet_shared::publisher::{Outgoing, PublishError, Publisher};
use fleet_shared::settings::{Secret, Settings};
use fleet_shared::telemetry::redact;
use fleet_shared::trace::TraceParent;
use fleet_shared::{amqp, topology};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Broker connections for the HTTP API: deadpool's managed pool around [`amqp::connect`], so
/// they get what every other fleet connection gets (TLS settings, the password file read at
/// connect time, refusals mapped to exit code 3). deadpool-lapin's manager can only connect by
/// URL, without a TLS configuration.
struct Connections {
    settings: Settings,
    health: Arc<Health>,
    /// Connections made so far; every one after the first counts as a reconnect.
    made: AtomicU64,
    reconnects: Counter,
}

impl Manager for Connections {
    type Type = lapin::Connection;
    type Error = anyhow::Error;

    async fn create(&self) -> anyhow::Result<lapin::Connection> {
        let connected = amqp::connect(&self.settings, "fleet-producer-api").await;
        self.health.connected(connected.is_ok());
        if connected.is_ok() && self.made.fetch_add(1, Ordering::Relaxed) > 0 {
            self.reconnects.inc();
        }
        connected
    }

    async fn recycle(
        &self,
        connection: &mut lapin::Connection,
        _: &deadpool::managed::Metrics,
    ) -> RecycleResult<anyhow::Error> {
        if connection.status().connected() {
            Ok(())
        } else {
            self.health.connected(false);
            Err(RecycleError::message("the broker connection is closed"))
        }
    }
}

type Pool = deadpool::managed::Pool<Connections>;

struct App {
    pool: Pool,
    window: usize,
    /// `topology.work_queues`: tasks are spread over this many queues.
    shards: usize,
    max_batch: usize,
    token: Option<Secret>,
    user: Option<String>,
    metrics: Metrics,
    confirm_seconds: Histogram,
    confirm_timeouts: Counter,
    confirm_timeout: Duration,
    health: Arc<Health>,
}

/// `{kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// `{method,route,status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

/// The most kinds `fleet_tasks_published_total` gives a series of their own; tasks of any kind
/// after those count as kind `other`, so callers cannot grow `/metrics` without end.
pub const MAX_KIND_SERIES: usize = 100;

/// The API's metrics, beside [`fleet_shared::observe::Common`].
#[derive(Clone)]
struct Metrics {
    /// `fleet_tasks_published_total{kind}`: tasks the broker confirmed.
    published: Family<KindLabel, Counter>,
    /// The kinds with a series of their own (at most [`MAX_KIND_SERIES`]).
    kinds: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// `fleet_http_requests_total{method,route,status}`: API requests answered.
    requests: Family<RequestLabels, Counter>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            published: register(
                registry,
                "fleet_tasks_published",
                "Tasks published and confirmed by the broker",
                Family::default(),
            ),
            kinds: Arc::default(),
            requests: register(
                registry,
                "fleet_http_requests",
                "HTTP API requests answered",
                Family::default(),
            ),
        }
    }

    fn published(&self, kind: &str, n: u64) {
        let own_series = {
            let mut kinds = self
                .kinds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            kinds.contains(kind) || (kinds.len() < MAX_KIND_SERIES && kinds.insert(kind.to_owned()))
        };
        let kind = if own_series { kind } else { "other" };
        self.published
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc_by(n);
    }
}

/// `POST /v1/tasks` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// Handler kind.
    pub kind: String,
    /// Handler input.
    pub payload: Value,
    /// Idempotency key; a UUID is made when absent.
    pub id: Option<String>,
}

/// `POST /v1/batches` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBatch {
    /// Handler kind of every task.
    pub kind: String,
    /// One payload per task.
    pub payloads: Vec<Value>,
}

/// Serves the API until `shutdown` is cancelled.
///
/// Fails when the address cannot be bound, the broker cannot be reached or refuses us, or
/// topology cannot be declared.
pub async fn serve(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut observer = Observer::new(Health::publisher());
    let metrics = Metrics::register(observer.registry());
    let (common, health) = (observer.common.clone(), Arc::clone(&observer.health));
    // Declare topology once, on a connection of our own, before taking requests.
    let (connection, _publisher) =
        submit::connect_publisher(&settings, "fleet-producer-setup").await?;
    let _ = connection.close(200, "topology declared".into()).await;
    health.topology(true);

    let pool = Pool::builder(Connections {
        settings: settings.clone(),
        health: Arc::clone(&health),
        made: AtomicU64::new(0),
        reconnects: common.reconnects.clone(),
    })
    .max_size(settings.producer.pool_size)
    .runtime(deadpool::Runtime::Tokio1)
    .build()
    .context("creating the broker connection pool")?;
    let listener = tokio::net::TcpListener::bind(&settings.producer.listen)
        .await
        .with_context(|| format!("listening on {}", settings.producer.listen))?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        broker = %redact(&settings.amqp.url),
        exchange = topology::TASKS_EXCHANGE,
        listen = %settings.producer.listen,
        pool = settings.producer.pool_size,
        token_required = settings.producer.token.is_some(),
        "fleet-producer serving"
    );
    let app = App {
        pool,
        window: settings.amqp.publish_window,
        shards: settings.topology.work_queues,
        max_batch: settings.producer.max_batch,
        token: settings.producer.token.clone(),
        user: settings.broker_user(),
        metrics,
        confirm_seconds: common.confirm_seconds.clone(),
        confirm_timeouts: common.confirm_timeouts.clone(),
        confirm_timeout: settings.confirm_timeout(),
        health: Arc::clone(&health),
    };
    // Readiness follows the broker even when no request comes: a pooled connection is checked
    // (and made again if it went) every two seconds.
    let pool = app.pool.clone();
    let watch = tokio::spawn(async move {
        loop {
            let _ = tokio::time::timeout(Duration::from_secs(5), pool.get()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let hosts = crate::hosts::HostCheck::for_listener(listener.local_addr()?);
    let routes = router(app, settings.producer.max_body_bytes)
        .merge(observer.router())
        .layer(axum::middleware::from_fn_with_state(
            hosts,
            crate::hosts::check_host,
        ));
    fleet_shared::http::serve(listener, routes, shutdown.cancelled_owned()).await;
    watch.abort();
    Ok(())
}

fn router(app: App, max_body: usize) -> Router {
    let app = Arc::new(app);
    Router::new()
        .route("/v1/tasks", post(create_task))
        .route("/v1/batches", post(create_batch))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            count_request,
        ))
        .with_state(app)
}

/// Counts every answered request in `fleet_http_requests_total`, by its route (not its path, so
/// ids do not make new series).
async fn count_request(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// With `producer.token_file` set, every request needs `Authorization: Bearer <token>`; anything
/// else is a 401 (compared in constant time, and never logged).
async fn require_token(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq as _;
    let Some(token) = &app.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
        next.run(request).await
    } else {
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
                .into_response();
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        response
    }
}

fn bad_request(rejection: JsonRejection) -> ApiError {
    ApiError::new(rejection.status(), rejection.body_text())
}

impl App {
    /// Runs `publish` with a confirmed publisher on a pooled connection and closes its channel.
    /// No connection, no channel, or an unconfirmed publish is a 503: the caller may try again.
    async fn publish<T, F, Fut>(&self, what: &str, publish: F) -> Result<T, ApiError>
    where
        F: FnOnce(Publisher) -> Fut,
        Fut: Future<Output = Result<T, PublishError>>,
    {
        let unavailable =
            || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the broker is unavailable");
        let connection = self.pool.get().await.map_err(|e| {
            tracing::warn!(error = %e, "no broker connection");
            unavailable()
        })?;
        let publisher = Publisher::new(&connection, self.window)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot open a channel");
                unavailable()
            })?
            .identified_as(self.user.clone())
            .sharded(self.shards)
            .confirm_timeout(self.confirm_timeout)
            .timed(self.confirm_seconds.clone(), self.confirm_timeouts.clone());
        let channel = publisher.channel().clone();
        let stalled = publisher.clone();
        let outcome = publish(publisher).await;
        if stalled.stalled() {
            // A connection whose broker stopped confirming goes, so the pool makes a new one.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "no confirm in time".into()),
            )
            .await;
        } else {
            let _ = channel.close(200, "done".into()).await;
        }
        // A refusal is this user's permissions, not a passing fault: not ready until a publish
        // goes through again (permissions can change while it runs).
        self.health
            .refused(outcome.as_ref().is_err_and(PublishError::is_refused));
        outcome.map_err(|e| {
            if e.is_refused() {
                tracing::error!(error = %anyhow::Error::from(e), "the broker refused to publish the {what}: this user lacks the write permission");
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the broker refused to publish the {what}"),
                );
            }
            tracing::warn!(error = %anyhow::Error::from(e), "{what} not confirmed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the broker did not confirm the {what}"),
            )
        })
    }
}

/// A 400 naming the field when `value` is past the bound of a name ([`envelope::check_name`]).
fn check_name(field: &'static str, value: &str) -> Result<(), ApiError> {
    envelope::check_name(field, value).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))
}

/// The caller's `traceparent`, if it sent a valid one.
fn incoming(headers: &HeaderMap) -> Option<TraceParent> {
    headers
        .get(HEADER_TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
}

/// 202 with `body`, and the `traceparent` the tasks were published with.
fn accepted(body: Value, trace: &TraceParent) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(value) = axum::http::HeaderValue::from_str(&trace.to_string()) {
        response.headers_mut().insert(HEADER_TRACEPARENT, value);
    }
    response
}

async fn create_task(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<NewTask>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body.map_err(bad_request)?;
    check_name("kind", &new.kind)?;
    if let Some(id) = &new.id {
        check_name("id", id)?;
    }
    let id = new.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let span = tracing::info_span!("publish", kind = %new.kind, task_id = %id);
    // The task's parent is this request's span: in the caller's trace, or a new one.
    let trace = TraceParent::continue_in(&span, incoming(&headers));
    let task_kind = new.kind.clone();
    let task = Task::new(id.clone(), new.kind, None, new.payload);
    app.publish("task", |publisher| async move {
        publisher
            .publish(Outgoing::task(&task).traced(&trace))
            .await
    })
    .instrument(span)
    .await?;
    app.metrics.published(&task_kind, 1);
    tracing::debug!(task_id = %id, trace_id = %trace.trace_id(), kind = %task_kind, "task published");
    Ok(accepted(json!({ "id": id }), &trace))
}

async fn create_batch(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<NewBatch>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body.map_err(bad_request)?;
    check_name("kind", &new.kind)?;
    if new.payloads.is_empty() || new.payloads.len() > app.max_batch {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`payloads` must hold 1 to {} payloads", app.max_batch),
        ));
    }
    let span = tracing::info_span!("publish", kind = %new.kind, tasks = new.payloads.len());
    let trace = TraceParent::continue_in(&span, incoming(&headers));
    let submit::Batch { receipt, messages } = submit::batch_in(&new.kind, new.payloads, &trace);
    app.publish("batch", |publisher| async move {
        publisher
            .publish_all(messages)
            .await
            .map_err(|unconfirmed| unconfirmed.error)
    })
    .instrument(span)
    .await?;
    app.metrics
        .published(&new.kind, receipt.task_ids.len() as u64);
    tracing::debug!(batch = %receipt.batch, trace_id = %trace.trace_id(), kind = %new.kind, "batch published");
    Ok(accepted(
        json!({ "batch": receipt.batch, "total": receipt.task_ids.len() }),
        &trace,
    ))
}
