//! `exec`: run a program from the consumer's allow-list, the seed's subprocess chapter.
//! `{"program": "name", "args": [...], "stdin": "..."}` -> `{"exit_code": 0, "stdout": "...", "stderr": "..."}`.
//!
//! The program is looked up by name in `consumer.exec.programs`; a name not on the list is a
//! permanent failure and nothing runs. argv comes from the payload and never passes through a
//! shell; the environment is cleared; the run is killed at the timeout; output is capped.

use crate::registry::{HandlerError, TaskContext};
use fleet_shared::settings::ExecSettings;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// A name on the allow-list.
    pub program: String,
    /// Arguments, passed as argv (no shell).
    #[serde(default)]
    pub args: Vec<String>,
    /// Written to the program's stdin, which is then closed.
    #[serde(default)]
    pub stdin: String,
}

/// Output.
#[derive(Debug, Serialize)]
pub struct Output {
    /// Exit status; `null` when a signal ended the program.
    pub exit_code: Option<i32>,
    /// Standard output (lossy UTF-8), at most `max_output_bytes`.
    pub stdout: String,
    /// Standard error (lossy UTF-8), at most `max_output_bytes`.
    pub stderr: String,
    /// True when either stream was cut at the cap.
    pub truncated: bool,
}

/// The `exec` handler with its allow-list.
#[derive(Debug, Clone)]
pub struct Exec {
    programs: Arc<BTreeMap<String, PathBuf>>,
    timeout: Duration,
    max_output: usize,
    /// The user and group programs run as (`consumer.exec.uid`, `consumer.exec.gid`).
    run_as: Option<(u32, u32)>,
}

impl Exec {
    /// An `exec` handler for `settings`.
    pub fn new(settings: &ExecSettings) -> Self {
        Self {
            programs: Arc::new(settings.programs.clone()),
            timeout: Duration::from_millis(settings.timeout_ms),
            max_output: settings.max_output_bytes,
            run_as: settings.uid.zip(settings.gid),
        }
    }

    /// Runs the allow-listed program. Fails permanently for a name not on the list or a program
    /// that cannot start, and retryably when it outlives the timeout (it is killed).
    pub async fn run(self, payload: Payload, _ctx: TaskContext) -> Result<Output, HandlerError> {
        let path = self.programs.get(&payload.program).ok_or_else(|| {
            HandlerError::permanent(
                "not_allowed",
                format!(
                    "program `{}` is not on this consumer's exec allow-list",
                    payload.program
                ),
            )
        })?;
        let mut command = Command::new(path);
        if let Some((uid, gid)) = self.run_as {
            // The child drops to this user before exec; as root, std also drops the
            // supplementary groups.
            command.uid(uid).gid(gid);
        }
        let mut child = command
            .args(&payload.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                HandlerError::permanent("spawn_failed", format!("{}: {e}", path.display()))
            })?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(HandlerError::permanent(
                "spawn_failed",
                "no pipes to the child",
            ));
        };
        let input = payload.stdin.into_bytes();
        let run = async {
            // A program that exits without reading stdin closes the pipe: not an error of ours.
            let feed = async move {
                let _ = stdin.write_all(&input).await;
                drop(stdin);
            };
            let (_, out, err, status) = tokio::join!(
                feed,
                read_capped(stdout, self.max_output),
                read_capped(stderr, self.max_output),
                child.wait()
            );
            (out, err, status)
        };
        let (out, err, status) = tokio::time::timeout(self.timeout, run).await.map_err(|_| {
            HandlerError::retryable(
                "timeout",
                format!(
                    "{} ran longer than {:?} and was killed",
                    payload.program, self.timeout
                ),
            )
        })?;
        let status = status.map_err(|e| HandlerError::retryable("wait_failed", e.to_string()))?;
        let (stdout, out_cut) = out.map_err(|e| HandlerError::retryable("io", e.to_string()))?;
        let (stderr, err_cut) = err.map_err(|e| HandlerError::retryable("io", e.to_string()))?;
        Ok(Output {
            exit_code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            truncated: out_cut || err_cut,
        })
    }
}

/// Reads at most `cap` bytes and discards the rest, so a chatty program never blocks on a full
/// pipe nor fills our memory.
async fn read_capped(
    mut reader: impl AsyncRead + Unpin,
    cap: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut chunk = [0u8; 8192];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok((kept, truncated));
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
        truncated |= n > room;
    }
}
