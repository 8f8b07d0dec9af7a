//! The shipped binaries as child processes: started with an explicit environment, stopped with
//! SIGTERM or SIGKILL, their exit codes read. Nothing here puts a secret on a command line.

use anyhow::Context as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary next to the running executable (built by `cargo build --workspace`).
///
/// # Panics
/// When it has not been built: the message says how to build it.
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("the running executable's path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Stdout and stderr both appended to `log`.
fn log_to(log: &std::path::Path) -> (Stdio, Stdio) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("opening the log file");
    let copy = file.try_clone().expect("a second handle on the log file");
    (Stdio::from(file), Stdio::from(copy))
}

/// A running binary, killed with SIGKILL if still running when dropped.
pub struct Process {
    /// The binary's name, for messages.
    pub name: String,
    child: Child,
}

impl Process {
    /// Starts `name` with `args` and exactly `env` (plus `PATH`, and the test's `RUST_LOG` unless
    /// `env` has one); its stderr goes to the test's, its stdout nowhere.
    ///
    /// # Panics
    /// When the binary is missing or cannot start.
    pub fn spawn(name: &str, args: &[&str], env: &[(String, String)]) -> Self {
        let mut command = Command::new(binary(name));
        command.args(args);
        Self::start(name, command, env, Stdio::null(), Stdio::inherit())
    }

    /// As [`Process::spawn`], through `command`, which is to exec `name` in the end (as
    /// [`crate::netns::Host::command`] does), so signals reach it; stdout and stderr both go to
    /// `log`.
    ///
    /// # Panics
    /// When it cannot start, or `log` cannot be opened.
    pub fn spawn_command(
        name: &str,
        command: Command,
        env: &[(String, String)],
        log: &std::path::Path,
    ) -> Self {
        let (stdout, stderr) = log_to(log);
        Self::start(name, command, env, stdout, stderr)
    }

    /// As [`Process::spawn`], with stdout and stderr both appended to `log`.
    ///
    /// # Panics
    /// When the binary is missing or cannot start, or `log` cannot be opened.
    pub fn spawn_logged(
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        log: &std::path::Path,
    ) -> Self {
        let (stdout, stderr) = log_to(log);
        let mut command = Command::new(binary(name));
        command.args(args);
        Self::start(name, command, env, stdout, stderr)
    }

    fn start(
        name: &str,
        mut command: Command,
        env: &[(String, String)],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Self {
        command
            .env_clear()
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for inherited in ["PATH", "RUST_LOG"] {
            if let Some(value) = std::env::var_os(inherited) {
                command.env(inherited, value);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))
            .expect("the binary starts");
        Self {
            name: name.to_owned(),
            child,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its command line as the kernel shows it (`/proc/PID/cmdline`, NULs as spaces).
    pub fn cmdline(&self) -> String {
        std::fs::read(format!("/proc/{}/cmdline", self.pid()))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default()
    }

    /// Sends `signal` (`TERM`, `KILL`, `INT`).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status();
    }

    /// SIGKILL and reap: the process gets no chance to clean up.
    pub fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// True while it has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for it to exit by itself.
    ///
    /// # Panics
    /// When it is still running after `limit`.
    pub fn wait(mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} did not exit within {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits up to `limit` for the drain to end; returns the exit status.
    pub fn terminate(self, limit: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait(limit)
    }

    /// Resident set size in KiB, from /proc (0 if it has exited).
    pub fn rss_kib(&self) -> u64 {
        status_kib(&self.pid().to_string(), "VmRSS")
    }
}

/// A KiB field (`VmRSS`, `VmHWM`, ...) of `/proc/<pid>/status`, `pid` a number or `self`; 0 when
/// the process is gone.
pub fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
