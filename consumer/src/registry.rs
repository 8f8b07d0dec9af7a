//! The handler registry: kind -> handler, built in one function and passed into `run`.
//!
//! A handler is a plain `async fn(Payload, TaskContext) -> Result<Output, HandlerError>`.
//! Compute-bound handlers run on the consumer's blocking pool (one thread per worker slot);
//! I/O-bound ones run as async tasks on the runtime; those done in microseconds run inline.

use chrono::{DateTime, Utc};
use fleet_shared::envelope;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What a handler knows about the task it runs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// Task id.
    pub id: Arc<str>,
    /// Attempts before this one (0 the first time).
    pub attempt: u32,
    /// After this instant the result is no longer wanted.
    pub deadline: Option<DateTime<Utc>>,
    /// Cancelled when the task passes its time limit. I/O handlers are dropped at that moment
    /// anyway; a compute handler cannot be stopped from outside, so a long one should check
    /// [`CancellationToken::is_cancelled`] now and then and return (its slot stays taken until it
    /// does).
    pub cancel: CancellationToken,
}

/// A handler failure: retryable (the task is tried again after a delay) or permanent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct HandlerError {
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// Short category for the result's `error.kind`, e.g. `overflow`.
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

impl HandlerError {
    /// A failure another attempt will not fix.
    pub fn permanent(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// A failure another attempt may fix (a timeout, a busy dependency).
    pub fn retryable(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            kind: kind.into(),
            message: message.into(),
        }
    }
}

/// Where a handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// CPU-bound: on the blocking pool, at most `workers` at once.
    Compute,
    /// I/O-bound: an async task, at most `io_concurrency` at once.
    Io,
    /// Done in microseconds (arithmetic, a lookup, reshaping JSON): run at once where the
    /// delivery is handled, without a slot and without handing it to another thread, which
    /// would cost more than the work. It must neither block nor await I/O: anything that can
    /// take longer than about 100 µs belongs in [`Work::Compute`].
    Inline,
}

/// A type-erased handler: JSON payload in, JSON output out.
pub type ErasedHandler = Arc<
    dyn Fn(Value, TaskContext) -> BoxFuture<'static, Result<Value, HandlerError>> + Send + Sync,
>;

/// A registered handler and where it runs.
#[derive(Clone)]
pub struct Handler {
    /// Compute, I/O or inline.
    pub work: Work,
    /// The function.
    pub call: ErasedHandler,
}

/// Two handlers claimed one kind.
#[derive(Debug, thiserror::Error)]
#[error("handler kind `{0}` is registered twice")]
pub struct DuplicateKind(pub String);

/// Task kind -> handler.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `kind`. Its payload is decoded from the task's JSON (a payload that
    /// does not fit is a permanent `invalid_payload` failure) and its output encoded back.
    ///
    /// Fails if `kind` is already registered.
    pub fn register<P, O, F, Fut>(
        &mut self,
        kind: &str,
        work: Work,
        handler: F,
    ) -> Result<&mut Self, DuplicateKind>
    where
        P: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(P, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        if self.handlers.contains_key(kind) {
            return Err(DuplicateKind(kind.to_owned()));
        }
        let handler = Arc::new(handler);
        let call: ErasedHandler = Arc::new(move |payload: Value, ctx: TaskContext| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let payload: P = envelope::from_value(payload)
                    .map_err(|e| HandlerError::permanent("invalid_payload", e.to_string()))?;
                let output = handler(payload, ctx).await?;
                envelope::to_value(&output)
                    .map_err(|e| HandlerError::permanent("invalid_output", e.to_string()))
            })
        });
        self.handlers
            .insert(kind.to_owned(), Handler { work, call });
        Ok(self)
    }

    /// The handler for `kind`, if any.
    pub fn get(&self, kind: &str) -> Option<&Handler> {
        self.handlers.get(kind)
    }

    /// Registered kinds, sorted (for the startup banner).
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo(p: Value, _: TaskContext) -> Result<Value, HandlerError> {
        Ok(p)
    }

    #[test]
    fn a_duplicate_kind_fails_at_registration() {
        let mut registry = Registry::new();
        registry.register("echo", Work::Io, echo).expect("first");
        let err = registry
            .register("echo", Work::Compute, echo)
            .err()
            .expect("duplicate");
        assert_eq!(err.0, "echo");
    }
}
