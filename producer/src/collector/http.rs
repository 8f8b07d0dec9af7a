//! The collector's read API: `GET /v1/tasks/{id}`, `GET /v1/batches/{id}`,
//! `GET /v1/batches/{id}/results?offset=&limit=` (JSON lines).

use super::store::Store;
use crate::problem::ApiError;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::{Arc, Mutex};

/// Results per page unless `limit` says otherwise, and the most one page holds.
const DEFAULT_LIMIT: u64 = 1000;
const MAX_LIMIT: u64 = 10_000;
/// The most bytes of results one page holds (at least one result, whatever its size). A page the
/// bound cut is answered with [`TRUNCATED`]; the next page starts after the results received.
pub const MAX_PAGE_BYTES: usize = 4 << 20;
/// Header on a page of results that [`MAX_PAGE_BYTES`] cut short of `limit`.
pub const TRUNCATED: &str = "x-fleet-truncated";

type Shared = Arc<Mutex<Store>>;

/// The read API over a store connection of its own.
pub fn router(store: Store) -> Router {
    Router::new()
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/batches/{id}", get(batch))
        .route("/v1/batches/{id}/results", get(results))
        .with_state(Arc::new(Mutex::new(store)))
}

async fn read<T: Send + 'static>(
    store: Shared,
    f: impl FnOnce(&Store) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        let store = store
            .lock()
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store lock poisoned"))?;
        f(&store).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the store: {e}"),
            )
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?
}

async fn task(State(store): State<Shared>, Path(id): Path<String>) -> Response {
    let lookup = id.clone();
    match read(store, move |s| s.task(&lookup)).await {
        Ok(Some(body)) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Ok(None) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("no result for task {id}")).into_response()
        }
        Err(error) => error.into_response(),
    }
}

async fn batch(State(store): State<Shared>, Path(id): Path<String>) -> Response {
    let lookup = id.clone();
    match read(store, move |s| s.batch(&lookup)).await {
        Ok(Some(status)) => Json(status).into_response(),
        Ok(None) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("nothing known of batch {id}"),
        )
        .into_response(),
        Err(error) => error.into_response(),
    }
}

#[derive(Deserialize)]
struct Page {
    offset: Option<u64>,
    limit: Option<u64>,
}

async fn results(
    State(store): State<Shared>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let offset = page.offset.unwrap_or(0);
    // SQLite's integers are i64.
    if i64::try_from(offset).is_err() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`offset` must be at most {}", i64::MAX),
        )
        .into_response();
    }
    let limit = page.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    match read(store, move |s| {
        s.results_within(&id, offset, limit, MAX_PAGE_BYTES)
    })
    .await
    {
        Ok((rows, truncated)) => {
            let mut body = rows.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            let mut response =
                ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
            if truncated {
                response
                    .headers_mut()
                    .insert(TRUNCATED, header::HeaderValue::from_static("true"));
            }
            response
        }
        Err(error) => error.into_response(),
    }
}
