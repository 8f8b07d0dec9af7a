//! Error types that decide how a process ends, and the exit codes of DESIGN.md.

use std::process::ExitCode;

/// Settings are invalid; the process exits 2 before any I/O.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{key}`: {message}")]
pub struct SettingsError {
    /// The dotted settings key, e.g. `consumer.workers`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl SettingsError {
    /// A settings error for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The broker refused our credentials or permissions; the process exits 3.
#[derive(Debug, thiserror::Error)]
#[error("broker {broker} refused user `{user}`: {reason}")]
pub struct AuthError {
    /// The broker address with the password redacted.
    pub broker: String,
    /// The user name we presented.
    pub user: String,
    /// What the broker said.
    pub reason: String,
}

/// The broker refused an operation on a resource (ACCESS_REFUSED): this user's permissions do not
/// cover what the service must do. Waiting does not help; the process exits 3.
#[derive(Debug, thiserror::Error)]
#[error("the broker refused to {operation} `{resource}`: {reason}")]
pub struct PermissionError {
    /// What was refused, e.g. `consume from`.
    pub operation: String,
    /// The queue or exchange.
    pub resource: String,
    /// What the broker said.
    pub reason: String,
}

/// Bad command-line usage (a missing file, a malformed argument); the process exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `submit --wait` saw at least one failed task; the process exits 4.
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} tasks failed")]
pub struct TasksFailed {
    /// Failed results.
    pub failed: u64,
    /// Tasks in the batch.
    pub total: u64,
}

/// Exit code 0: done.
pub const EXIT_OK: u8 = 0;
/// Exit code 1: runtime failure (broker lost for good, store unwritable).
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code 2: bad usage or settings.
pub const EXIT_USAGE: u8 = 2;
/// Exit code 3: authentication or permission refused by the broker.
pub const EXIT_AUTH: u8 = 3;
/// Exit code 4: `submit --wait` and a task failed.
pub const EXIT_TASKS_FAILED: u8 = 4;

/// The exit code for an error that ended a process, found anywhere in its cause chain.
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    for cause in error.chain() {
        if cause.is::<SettingsError>() || cause.is::<UsageError>() {
            return ExitCode::from(EXIT_USAGE);
        }
        if cause.is::<AuthError>() || cause.is::<PermissionError>() {
            return ExitCode::from(EXIT_AUTH);
        }
        if cause.is::<TasksFailed>() {
            return ExitCode::from(EXIT_TASKS_FAILED);
        }
    }
    ExitCode::from(EXIT_RUNTIME)
}
