//! The v1 wire contract (DESIGN.md "Wire contract"): the one place where bytes become typed
//! messages and back. JSON Schemas of these messages live in `schemas/` at the repository root.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The envelope version this build reads and writes.
pub const VERSION: u32 = 1;
/// Header: on a task, attempts made before this delivery (0 on first publish); on a dead
/// letter, attempts made in all.
pub const HEADER_ATTEMPT: &str = "x-fleet-attempt";
/// Header on tasks a consumer republishes (retries, dead letters): the broker user that
/// published the task first, as the consumer established it from the AMQP `user_id`.
pub const HEADER_PUBLISHED_BY: &str = "x-fleet-published-by";
/// Header on messages fleet dead-letters: when (AMQP timestamp, seconds).
pub const HEADER_DEAD_AT: &str = "x-fleet-dead-at";
/// Header on dead-lettered messages: why it was dead-lettered.
pub const HEADER_ERROR: &str = "x-fleet-error";
/// Header on dead-lettered messages: the routing key the task was published with.
pub const HEADER_ROUTING_KEY: &str = "x-fleet-routing-key";
/// Header on retried messages: which delay queue holds them. Not `x-` prefixed on purpose: a
/// headers exchange ignores binding arguments that start with `x-`, so such a binding would
/// match every retry and copy it into every delay queue.
pub const HEADER_DELAY: &str = "fleet-delay-ms";
/// Header: W3C trace context, when the caller had one.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// `content_type` of every fleet message.
pub const CONTENT_TYPE: &str = "application/json";
/// AMQP `type` property of a batch manifest on the result path.
pub const BATCH_TYPE: &str = "batch";
/// AMQP `type` property of a result group on the result path (`consumer.results_per_message`).
pub const RESULTS_TYPE: &str = "results";

/// The most bytes a task id, batch id or kind holds. Each travels as an AMQP short string
/// (`message_id`, `correlation_id`, `type`, the routing key), and those stop at 255 bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// A field past its documented bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {problem}")]
pub struct FieldError {
    /// The field, as the wire contract names it (`id`, `batch`, `kind`, `task_id`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// Checks a name: a task id, batch id or kind is 1 to [`MAX_NAME_BYTES`] bytes of text without
/// control characters (so it fits an AMQP short string and prints as one line).
///
/// Fails with the field and what is wrong.
pub fn check_name(field: &'static str, value: &str) -> Result<(), FieldError> {
    let problem = if value.is_empty() {
        "must not be empty".to_owned()
    } else if value.len() > MAX_NAME_BYTES {
        format!("is {} bytes; the most is {MAX_NAME_BYTES}", value.len())
    } else if value.chars().any(char::is_control) {
        "holds a control character".to_owned()
    } else {
        return Ok(());
    };
    Err(FieldError { field, problem })
}

/// Why a message is in `fleet.dead`. The text form ([`std::fmt::Display`]) is stable: it is the
/// `x-fleet-error` header fleet writes ([`DeadReason::header`]) and what `dlq list` shows, and
/// operators match on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadReason {
    /// The body is not a valid v1 message: the [`DecodeError`]'s text.
    Invalid(String),
    /// The body is over `consumer.max_message_bytes`.
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// No handler takes this kind.
    UnknownKind(String),
    /// The handler failed for good (a permanent error, or a retryable one on the last attempt).
    Failed {
        /// The error's kind, e.g. `timeout`.
        kind: String,
        /// Its message.
        message: String,
    },
    /// Handling it panicked outside the handler.
    Panicked(String),
    /// On the result path: a message that came through an exchange not meant for it.
    Misrouted {
        /// What it is: a result, a result group or a batch manifest.
        what: &'static str,
        /// The exchange it came through.
        exchange: String,
        /// The only exchange that may carry it.
        allowed: &'static str,
    },
    /// Dead-lettered by the broker (its `x-death`): e.g. `delivery_limit`.
    Broker {
        /// The broker's reason.
        reason: String,
        /// The queue it was dead-lettered from.
        queue: String,
    },
    /// Routed to `fleet.dead` as the alternate exchange of an exchange that could not route it.
    Unroutable {
        /// The exchange it was published to.
        exchange: String,
        /// Its routing key.
        routing_key: String,
    },
    /// An `x-fleet-error` as it was found (written by an earlier release or another publisher).
    Recorded(String),
    /// Nothing recorded why.
    Unknown,
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(error) | Self::Recorded(error) => f.write_str(error),
            Self::TooLarge { bytes, limit } => {
                write!(f, "too large: {bytes} bytes, the limit is {limit}")
            }
            Self::UnknownKind(kind) => write!(f, "unknown kind `{kind}`"),
            Self::Failed { kind, message } => write!(f, "{kind}: {message}"),
            Self::Panicked(message) => write!(f, "panicked while handling: {message}"),
            Self::Misrouted {
                what,
                exchange,
                allowed,
            } => write!(
                f,
                "a {what} arrived through exchange `{exchange}`; only `{allowed}` may carry one"
            ),
            Self::Broker { reason, queue } => write!(f, "{reason} (broker, queue {queue})"),
            Self::Unroutable {
                exchange,
                routing_key,
            } => write!(
                f,
                "unroutable: published to `{exchange}` with routing key `{routing_key}`"
            ),
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

impl DeadReason {
    /// The `x-fleet-error` header's text ([`reason_header`]).
    pub fn header(&self) -> String {
        reason_header(&self.to_string()).into_owned()
    }
}

/// The most bytes of a reason in `x-fleet-error`: a dead letter's headers travel in one frame
/// (32 KiB by default, `amqp.url`'s `frame_max`), and a reason is a line for a person.
pub const MAX_REASON_BYTES: usize = 1024;

/// `reason` as the `x-fleet-error` header carries it: cut at [`MAX_REASON_BYTES`] on a character
/// boundary, with `…` where it was cut. A handler's or a panic's message can be any length.
pub fn reason_header(reason: &str) -> std::borrow::Cow<'_, str> {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.into();
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end]).into()
}

/// Checks `batch` when there is one.
fn check_batch(batch: Option<&str>) -> Result<(), FieldError> {
    batch.map_or(Ok(()), |b| check_name("batch", b))
}

/// The `x-fleet-attempt` header of `headers`: attempts before this delivery. Any integer type is
/// read; absent, negative or of another type it is 0; past `u32::MAX` it is `u32::MAX`, so a
/// forged count never starts the attempts afresh.
pub fn attempt(headers: Option<&lapin::types::FieldTable>) -> u32 {
    use lapin::types::AMQPValue;
    let n: i64 = match headers.and_then(|h| h.inner().get(HEADER_ATTEMPT)) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).into(),
        Some(AMQPValue::ShortInt(n)) => (*n).into(),
        Some(AMQPValue::ShortShortInt(n)) => (*n).into(),
        Some(AMQPValue::LongUInt(n)) => (*n).into(),
        Some(AMQPValue::ShortUInt(n)) => (*n).into(),
        Some(AMQPValue::ShortShortUInt(n)) => (*n).into(),
        _ => 0,
    };
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// A task as published to `fleet.tasks` with routing key = `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Envelope version; always [`VERSION`].
    pub v: u32,
    /// Task id: a UUID or the caller's idempotency key.
    pub id: String,
    /// Handler name, also the routing key.
    pub kind: String,
    /// The batch this task belongs to, if any.
    pub batch: Option<String>,
    /// Handler input.
    pub payload: Value,
    /// When the task was made.
    pub created_at: DateTime<Utc>,
    /// After this instant the task is not run.
    pub deadline: Option<DateTime<Utc>>,
}

impl Task {
    /// Checks every field's bound ([`check_name`]).
    ///
    /// Fails with the first field past its bound.
    pub fn check(&self) -> Result<(), FieldError> {
        check_name("id", &self.id)?;
        check_name("kind", &self.kind)?;
        check_batch(self.batch.as_deref())
    }

    /// A new v1 task created now.
    pub fn new(id: String, kind: String, batch: Option<String>, payload: Value) -> Self {
        Self {
            v: VERSION,
            id,
            kind,
            batch,
            payload,
            created_at: Utc::now(),
            deadline: None,
        }
    }
}

/// `ok` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The handler returned an output.
    Ok,
    /// The handler failed for good.
    Failed,
}

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// A short machine-readable category, e.g. `overflow`, `not_allowed`, `invalid_payload`.
    pub kind: String,
    /// A human-readable explanation.
    pub message: String,
}

/// A result as published to `fleet.results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Envelope version; always [`VERSION`].
    pub v: u32,
    /// The task's id.
    pub task_id: String,
    /// The task's batch.
    pub batch: Option<String>,
    /// The task's kind.
    pub kind: String,
    /// Outcome.
    pub status: Status,
    /// Handler output when `status` is ok.
    pub output: Option<Value>,
    /// Why it failed when `status` is failed.
    pub error: Option<ErrorInfo>,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// `<host>/<pid>/<slot>` of the worker that ran it.
    pub worker: String,
    /// When the handler started.
    pub started_at: DateTime<Utc>,
    /// When the handler finished.
    pub finished_at: DateTime<Utc>,
    /// The broker user that published the task (its AMQP `user_id`, which the broker checks),
    /// when it set one.
    #[serde(default)]
    pub published_by: Option<String>,
    /// The W3C `traceparent` the consumer sent the result with: the task's trace, the consumer's
    /// span. Absent when the task came without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl TaskResult {
    /// Checks every name's bound ([`check_name`]).
    ///
    /// Fails with the first field past its bound.
    pub fn check(&self) -> Result<(), FieldError> {
        check_name("task_id", &self.task_id)?;
        check_name("kind", &self.kind)?;
        check_batch(self.batch.as_deref())
    }
}

/// Published to the result path with a batch, so the collector knows its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchManifest {
    /// Envelope version; always [`VERSION`].
    pub v: u32,
    /// Always `"batch"`.
    #[serde(rename = "type")]
    pub kind_of_message: String,
    /// The batch id.
    pub batch: String,
    /// Tasks in the batch.
    pub total: u64,
    /// Kind of its tasks.
    pub kind: String,
}

impl BatchManifest {
    /// Checks every name's bound ([`check_name`]).
    ///
    /// Fails with the first field past its bound.
    pub fn check(&self) -> Result<(), FieldError> {
        check_name("batch", &self.batch)?;
        check_name("kind", &self.kind)
    }

    /// The manifest of `batch`, `total` tasks of `kind`.
    pub fn new(batch: String, total: u64, kind: String) -> Self {
        Self {
            v: VERSION,
            kind_of_message: BATCH_TYPE.to_owned(),
            batch,
            total,
            kind,
        }
    }
}

/// Several results in one message, each as it would be published alone: what a consumer with
/// `consumer.results_per_message` above 1 sends when more than one result is ready at once.
/// Read as `ResultGroup` (of [`TaskResult`]s); sent with each result already encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultGroup<R = TaskResult> {
    /// Envelope version; always [`VERSION`].
    pub v: u32,
    /// Always `"results"`.
    #[serde(rename = "type")]
    pub kind_of_message: String,
    /// The results, at least one.
    pub results: Vec<R>,
}

impl<R> ResultGroup<R> {
    /// A group of `results`.
    pub fn new(results: Vec<R>) -> Self {
        Self {
            v: VERSION,
            kind_of_message: RESULTS_TYPE.to_owned(),
            results,
        }
    }
}

/// A result encoded once, to be sized and put into a group ([`encode_group`]) as it is.
pub type EncodedResult = Box<RawValue>;

/// Encodes `result` for a group.
pub fn encode_result(result: &TaskResult) -> EncodedResult {
    // As in `encode`: these types always serialise.
    serde_json::value::to_raw_value(result).expect("envelope types always serialise")
}

/// The body of a result group holding `results` (each from [`encode_result`]), copied as they
/// are.
pub fn encode_group(results: &[&RawValue]) -> Vec<u8> {
    encode(&ResultGroup::new(results.to_vec()))
}

/// What arrives on `fleet.results`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultMessage {
    /// A task's result.
    Result(TaskResult),
    /// A batch manifest.
    Manifest(BatchManifest),
    /// Several tasks' results.
    Results(Vec<TaskResult>),
}

/// Why a body is not a valid v1 message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("undecodable body: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A version this build does not speak.
    #[error("unsupported envelope version {0} (this build reads {VERSION})")]
    Version(u64),
    /// No `v` field.
    #[error("undecodable body: no envelope version `v`")]
    NoVersion,
    /// A field past its bound.
    #[error("invalid field: {0}")]
    Field(#[from] FieldError),
}

/// What is read of a body before it is decoded as a whole: its version and, on the result
/// path, its `type`. Every other field is skipped, so a body is parsed twice but built once
/// (through a `serde_json::Value` it was built twice, and that was a tenth of the collector's CPU).
#[derive(Deserialize)]
struct Head<'a> {
    v: Option<Value>,
    #[serde(rename = "type", borrow)]
    kind_of_message: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> Head<'a> {
    /// The head of `body`, when it is a JSON object of version [`VERSION`].
    fn read(body: &'a [u8]) -> Result<Self, DecodeError> {
        // serde would try to fill a struct from an array too, and fail in its own words.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(DecodeError::Malformed(serde::de::Error::custom(
                "expected a JSON object",
            )));
        }
        let head: Self = serde_json::from_slice(body)?;
        match head.v.as_ref().map(Value::as_u64) {
            Some(Some(v)) if v == u64::from(VERSION) => Ok(head),
            Some(Some(v)) => Err(DecodeError::Version(v)),
            _ => Err(DecodeError::NoVersion),
        }
    }
}

/// Decodes a task body. Fails on bad JSON, a wrong shape or another envelope version.
pub fn decode_task(body: &[u8]) -> Result<Task, DecodeError> {
    Head::read(body)?;
    let task: Task = serde_json::from_slice(body)?;
    task.check()?;
    Ok(task)
}

/// Decodes what arrives on the result path: a result, a batch manifest or a result group.
/// A group must hold at least one result, each of version [`VERSION`]; every name is within its
/// bound ([`check_name`]).
pub fn decode_result(body: &[u8]) -> Result<ResultMessage, DecodeError> {
    match Head::read(body)?.kind_of_message.as_deref() {
        Some(BATCH_TYPE) => {
            let manifest: BatchManifest = serde_json::from_slice(body)?;
            manifest.check()?;
            Ok(ResultMessage::Manifest(manifest))
        }
        Some(RESULTS_TYPE) => {
            let group: ResultGroup<TaskResult> = serde_json::from_slice(body)?;
            if group.results.is_empty() {
                return Err(DecodeError::Malformed(serde::de::Error::custom(
                    "a result group holds no results",
                )));
            }
            if let Some(other) = group.results.iter().find(|r| r.v != VERSION) {
                return Err(DecodeError::Version(other.v.into()));
            }
            for result in &group.results {
                result.check()?;
            }
            Ok(ResultMessage::Results(group.results))
        }
        _ => {
            let result: TaskResult = serde_json::from_slice(body)?;
            result.check()?;
            Ok(ResultMessage::Result(result))
        }
    }
}

/// Encodes any envelope message.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Envelope types hold only strings, numbers, timestamps and JSON values: serialising
    // them cannot fail.
    serde_json::to_vec(message).expect("envelope types always serialise")
}

/// Decodes a handler payload or other caller JSON into `T`, for the HTTP API and handlers.
pub fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Converts a JSON value into a typed payload or back (handler inputs and outputs).
pub fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, serde_json::Error> {
    serde_json::from_value(value)
}

/// Converts a handler output into a JSON value.
pub fn to_value<T: Serialize>(value: &T) -> Result<Value, serde_json::Error> {
    serde_json::to_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An ok result of task `id` (timestamps to the second, so two calls make equal results).
    fn result(id: &str) -> TaskResult {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time");
        TaskResult {
            v: VERSION,
            task_id: id.into(),
            batch: Some("b1".into()),
            kind: "square".into(),
            status: Status::Ok,
            output: Some(json!({"n": 3, "square": 9})),
            error: None,
            attempts: 1,
            worker: "h/1/0".into(),
            started_at: now,
            finished_at: now,
            published_by: None,
            traceparent: None,
        }
    }

    #[test]
    fn task_round_trips() {
        let task = Task::new(
            "t1".into(),
            "square".into(),
            Some("b1".into()),
            json!({"n": 3}),
        );
        assert_eq!(decode_task(&encode(&task)).expect("decodes"), task);
    }

    #[test]
    fn result_and_manifest_are_told_apart() {
        let manifest = BatchManifest::new("b1".into(), 10, "square".into());
        assert_eq!(
            decode_result(&encode(&manifest)).expect("decodes"),
            ResultMessage::Manifest(manifest)
        );
        let result = result("t1");
        assert_eq!(
            decode_result(&encode(&result)).expect("decodes"),
            ResultMessage::Result(result)
        );
    }

    #[test]
    fn a_result_group_decodes_and_an_empty_one_does_not() {
        let group = ResultGroup::new(vec![result("t1"), result("t2")]);
        assert_eq!(
            decode_result(&encode(&group)).expect("decodes"),
            ResultMessage::Results(vec![result("t1"), result("t2")])
        );
        let encoded = [encode_result(&result("t1")), encode_result(&result("t2"))];
        let parts: Vec<&RawValue> = encoded.iter().map(|r| &**r).collect();
        assert_eq!(
            encode_group(&parts),
            encode(&group),
            "the same bytes either way"
        );
        assert!(matches!(
            decode_result(br#"{"v":1,"type":"results","results":[]}"#),
            Err(DecodeError::Malformed(_))
        ));
        let mut old = result("t3");
        old.v = 2;
        assert!(matches!(
            decode_result(&encode(&ResultGroup::new(vec![old]))),
            Err(DecodeError::Version(2))
        ));
    }

    #[test]
    fn the_documented_example_decodes() {
        let body = br#"{"v":1,"id":"x","kind":"square","batch":null,"payload":{"n":3411},
            "created_at":"2026-01-01T00:00:00Z","deadline":null}"#;
        let task = decode_task(body).expect("decodes");
        assert_eq!(task.payload["n"], 3411);
    }

    #[test]
    fn names_past_their_bounds_are_refused_naming_the_field() {
        let body = |id: &str, batch: &str| {
            encode(&json!({"v": 1, "id": id, "kind": "square", "batch": batch,
                "payload": {}, "created_at": "2026-01-01T00:00:00Z"}))
        };
        let refused = |body: Vec<u8>| decode_task(&body).expect_err("refused").to_string();
        assert!(decode_task(&body(&"i".repeat(255), &"b".repeat(255))).is_ok());
        assert_eq!(
            refused(body(&"i".repeat(256), "b")),
            "invalid field: `id` is 256 bytes; the most is 255"
        );
        assert_eq!(
            refused(body("i", &"é".repeat(128))),
            "invalid field: `batch` is 256 bytes; the most is 255"
        );
        assert_eq!(
            refused(body("", "b")),
            "invalid field: `id` must not be empty"
        );
        assert_eq!(
            refused(body("a\u{1b}[2J", "b")),
            "invalid field: `id` holds a control character"
        );
        let mut long = result("t1");
        long.task_id = "t".repeat(300);
        assert!(matches!(
            decode_result(&encode(&long)),
            Err(DecodeError::Field(FieldError {
                field: "task_id",
                ..
            }))
        ));
        assert!(matches!(
            decode_result(&encode(&ResultGroup::new(vec![result("t2"), long]))),
            Err(DecodeError::Field(FieldError {
                field: "task_id",
                ..
            }))
        ));
        let manifest = BatchManifest::new("b".repeat(256), 1, "square".into());
        assert!(matches!(
            decode_result(&encode(&manifest)),
            Err(DecodeError::Field(FieldError { field: "batch", .. }))
        ));
    }

    #[test]
    fn a_long_reason_is_cut_to_its_bound_on_a_character_boundary() {
        assert_eq!(reason_header("short"), "short");
        let exact = "r".repeat(MAX_REASON_BYTES);
        assert_eq!(reason_header(&exact), exact.as_str());
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = reason_header(&long);
        assert!(
            cut.len() <= MAX_REASON_BYTES && cut.ends_with('…'),
            "{}",
            cut.len()
        );
    }

    #[test]
    fn each_dead_reason_has_its_stable_text() {
        let reasons = [
            (
                DeadReason::TooLarge {
                    bytes: 2048,
                    limit: 1024,
                },
                "too large: 2048 bytes, the limit is 1024",
            ),
            (
                DeadReason::UnknownKind("later".to_owned()),
                "unknown kind `later`",
            ),
            (
                DeadReason::Failed {
                    kind: "timeout".to_owned(),
                    message: "ran past its time limit of 100 ms".to_owned(),
                },
                "timeout: ran past its time limit of 100 ms",
            ),
            (
                DeadReason::Panicked("boom".to_owned()),
                "panicked while handling: boom",
            ),
            (
                DeadReason::Misrouted {
                    what: "result",
                    exchange: "fleet.batches".to_owned(),
                    allowed: "fleet.results",
                },
                "a result arrived through exchange `fleet.batches`; only `fleet.results` may carry one",
            ),
            (
                DeadReason::Broker {
                    reason: "delivery_limit".to_owned(),
                    queue: "fleet.tasks.default".to_owned(),
                },
                "delivery_limit (broker, queue fleet.tasks.default)",
            ),
            (
                DeadReason::Unroutable {
                    exchange: "fleet.retry".to_owned(),
                    routing_key: "sleep".to_owned(),
                },
                "unroutable: published to `fleet.retry` with routing key `sleep`",
            ),
            (DeadReason::Unknown, "unknown"),
        ];
        for (reason, text) in reasons {
            assert_eq!(reason.to_string(), text);
            assert_eq!(reason.header(), text);
        }
        let undecodable = decode_task(b"{").expect_err("not JSON");
        assert!(
            DeadReason::Invalid(undecodable.to_string())
                .to_string()
                .starts_with("undecodable body: ")
        );
        let long = DeadReason::Panicked("x".repeat(2 * MAX_REASON_BYTES));
        assert!(long.header().len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn bad_bodies_say_why() {
        assert!(matches!(
            decode_task(b"not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_task(br#"{"id":"x"}"#),
            Err(DecodeError::NoVersion)
        ));
        assert!(matches!(
            decode_task(br#"{"v":2,"id":"x","kind":"k"}"#),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(
            decode_task(br#"{"v":1,"id":"x"}"#),
            Err(DecodeError::Malformed(_))
        ));
        let not_an_object = decode_result(b" [1]").expect_err("an array is no envelope");
        assert!(
            not_an_object.to_string().contains("expected a JSON object"),
            "{not_an_object}"
        );
        assert!(matches!(
            decode_result(br#"{"v":"1","task_id":"x"}"#),
            Err(DecodeError::NoVersion)
        ));
    }
}
