//! Layered settings: built-in defaults, then a file (`--config PATH` or `FLEET_CONFIG`), then the
//! environment (`FLEET_<SECTION>__<KEY>`, e.g. `FLEET_AMQP__URL`, `FLEET_CONSUMER__WORKERS`).
//!
//! [`Settings::load`] validates everything before any I/O and names the offending key on error.
//! Secrets never come from the command line: the broker password comes from the URL, from
//! `amqp.password_file` (`FLEET_AMQP__PASSWORD_FILE`), or from systemd's
//! `$CREDENTIALS_DIRECTORY/amqp-password`.

use crate::error::SettingsError;
use config::{Config, Environment, File};
use lapin::uri::AMQPUri;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The systemd credential name that holds the broker password (`LoadCredential=amqp-password:...`).
pub const CREDENTIAL_NAME: &str = "amqp-password";

/// A secret read from a file: compared and used, never printed (`Debug` shows `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// All fleet settings. Every service reads the same structure and uses its own sections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Broker connection.
    pub amqp: AmqpSettings,
    /// Queue types, delivery limit, retry delays.
    pub topology: TopologySettings,
    /// The worker process.
    pub consumer: ConsumerSettings,
    /// The submit CLI and HTTP API.
    pub producer: ProducerSettings,
    /// The result store and its read API.
    pub collector: CollectorSettings,
    /// Logging.
    pub log: LogSettings,
}

/// `[amqp]`: how to reach the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL. Default `amqp://guest:guest@127.0.0.1:5672/%2f`. Env `FLEET_AMQP__URL`.
    pub url: String,
    /// Broker user; overrides a user in `url`, so one URL can serve every role (systemd units
    /// set it per service). Default none. Env `FLEET_AMQP__USER`.
    pub user: Option<String>,
    /// File whose first line is the broker password; overrides a password in `url`.
    /// Default none (then `$CREDENTIALS_DIRECTORY/amqp-password` if present).
    /// Env `FLEET_AMQP__PASSWORD_FILE`.
    pub password_file: Option<PathBuf>,
    /// Publishes awaiting a broker confirm at once, per publisher. Default 1024.
    /// Env `FLEET_AMQP__PUBLISH_WINDOW`.
    pub publish_window: usize,
    /// Seconds to wait for the broker to accept a connection. Default 10.
    /// Env `FLEET_AMQP__CONNECT_TIMEOUT_SECS`.
    pub connect_timeout_secs: u64,
    /// AMQP heartbeat in seconds: a silent peer is declared lost after about twice this.
    /// Default 15. Env `FLEET_AMQP__HEARTBEAT_SECS`.
    pub heartbeat_secs: u16,
    /// Seconds a service keeps trying to (re)connect before it exits 1. Default 300.
    /// Env `FLEET_AMQP__RECONNECT_TIMEOUT_SECS`.
    pub reconnect_timeout_secs: u64,
    /// Seconds a publish may wait for its confirm; past it the publish counts as lost, the
    /// connection is dropped and the work done again. Default 30.
    /// Env `FLEET_AMQP__CONFIRM_TIMEOUT_SECS`.
    pub confirm_timeout_secs: u64,
    /// PEM file of the CA certificates that sign the broker's certificate, for `amqps://` URLs.
    /// The broker's name in the URL must match its certificate. Default none.
    /// Env `FLEET_AMQP__TLS_CA_FILE`.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS (with `?auth_mechanism=external` in the URL, the
    /// broker takes the user from it). Needs `tls_key_file`. Env `FLEET_AMQP__TLS_CERT_FILE`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `tls_cert_file`. Env `FLEET_AMQP__TLS_KEY_FILE`.
    pub tls_key_file: Option<PathBuf>,
    /// Where the password is read from (`password_file` or the systemd credential), with the
    /// setting that named it; read again on every connection, so a rotated password is picked
    /// up by the next reconnect.
    #[serde(skip)]
    password_source: Option<(&'static str, PathBuf)>,
}

/// Queue type of the work, dead-letter and result queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, with a delivery limit (the default).
    Quorum,
    /// Single-node classic queue.
    Classic,
}

/// Most work queues `topology.work_queues` may ask for.
pub const MAX_WORK_QUEUES: usize = 64;

/// The AMQP frame size fleet asks for unless `amqp.url` sets `?frame_max=`.
pub const FRAME_MAX: u32 = 32 * 1024;

/// Most results one message may hold (`consumer.results_per_message`). Groups are also cut at
/// 1 MiB of JSON, so large outputs never make a message the broker would refuse.
pub const MAX_RESULTS_PER_MESSAGE: usize = 256;

/// `[topology]`: arguments of the queues every service declares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySettings {
    /// `quorum` or `classic`. Default `quorum`. Env `FLEET_TOPOLOGY__QUEUE_TYPE`.
    pub queue_type: QueueType,
    /// Deliveries of one message before a quorum queue dead-letters it (poison-message backstop).
    /// Default 5. Env `FLEET_TOPOLOGY__DELIVERY_LIMIT`.
    pub delivery_limit: u32,
    /// Retry delay queues, in milliseconds; retry N waits the Nth (the last repeats).
    /// Default `[1000, 5000, 30000, 120000, 600000]`. Env `FLEET_TOPOLOGY__RETRY_DELAYS_MS=1000,5000`.
    #[serde(deserialize_with = "delays")]
    pub retry_delays_ms: Vec<u64>,
    /// Work queues the tasks are spread over, to use more than one broker core (a queue is one
    /// Erlang process). Default 1: `fleet.tasks.default` alone. Every service of a fleet needs
    /// the same value. Env `FLEET_TOPOLOGY__WORK_QUEUES`.
    pub work_queues: usize,
}

/// `[consumer]`: the worker process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Compute slots, and threads in the blocking pool. Default: the number of CPU cores.
    /// Env `FLEET_CONSUMER__WORKERS`.
    pub workers: usize,
    /// I/O-bound handlers running at once. Default 256. The prefetch covers them too, so a
    /// consumer full of waiting I/O tasks still has room for compute ones.
    /// Env `FLEET_CONSUMER__IO_CONCURRENCY`.
    pub io_concurrency: usize,
    /// Unacked deliveries per worker slot (prefetch = workers x this + io_concurrency). Default 4.
    /// Env `FLEET_CONSUMER__PREFETCH_PER_WORKER`.
    pub prefetch_per_worker: u16,
    /// Largest task body accepted, in bytes; larger ones are dead-lettered. Default 1048576.
    /// Env `FLEET_CONSUMER__MAX_MESSAGE_BYTES`.
    pub max_message_bytes: usize,
    /// Most results sent in one message to `fleet.results`. Default 256: results ready at the
    /// same moment go as one `{"v":1,"type":"results","results":[...]}` message, which roughly
    /// halves the broker's work per task under load; nothing waits for a group to fill, so a
    /// lone result still goes at once, and each task is still acked only after the message
    /// holding its result is confirmed. 1 sends every result as a message of its own. 1 to 256.
    /// Env `FLEET_CONSUMER__RESULTS_PER_MESSAGE`.
    pub results_per_message: usize,
    /// Attempts per task, the first included, before a retryable failure is final. Default 5.
    /// Env `FLEET_CONSUMER__MAX_ATTEMPTS`.
    pub max_attempts: u32,
    /// Seconds in-flight tasks get to finish after SIGTERM. Default 30.
    /// Env `FLEET_CONSUMER__GRACE_PERIOD_SECS`.
    pub grace_period_secs: u64,
    /// Milliseconds a task may run before it counts as a retryable `timeout` failure.
    /// Default 600000 (10 minutes). Env `FLEET_CONSUMER__TIME_LIMIT_MS`.
    pub time_limit_ms: u64,
    /// Per-kind overrides of `max_attempts`, `time_limit_ms` and the retry delays.
    /// Env `FLEET_CONSUMER__KINDS__<KIND>__MAX_ATTEMPTS=3`.
    pub kinds: BTreeMap<String, KindSettings>,
    /// The `exec` handler.
    pub exec: ExecSettings,
    /// Address of `/metrics`, `/healthz` and `/readyz`. Default `127.0.0.1:8082`; port 0 picks a
    /// free one (logged at start). Env `FLEET_CONSUMER__LISTEN`.
    pub listen: String,
}

/// `[consumer.kinds.<kind>]`: how one kind of task is retried and limited. Unset keys fall back to
/// `[consumer]` and `[topology]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSettings {
    /// Attempts in all, the first included.
    pub max_attempts: Option<u32>,
    /// Milliseconds one attempt may run.
    pub time_limit_ms: Option<u64>,
    /// Delay before retry N (the last repeats); each delay gets its own delay queue.
    #[serde(default, deserialize_with = "some_delays")]
    pub retry_delays_ms: Option<Vec<u64>>,
}

/// The retry policy of one kind, with the defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy<'a> {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// How long one attempt may run.
    pub time_limit: Duration,
    /// Delay before retry N (the last repeats).
    pub retry_delays_ms: &'a [u64],
}

/// `[consumer.exec]`: external programs a consumer may run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSettings {
    /// Allow-list: name -> absolute path. Default empty (nothing runs).
    /// Env `FLEET_CONSUMER__EXEC__PROGRAMS__<NAME>=/abs/path`.
    pub programs: BTreeMap<String, PathBuf>,
    /// Milliseconds a program may run before it is killed. Default 10000.
    /// Env `FLEET_CONSUMER__EXEC__TIMEOUT_MS`.
    pub timeout_ms: u64,
    /// Bytes kept of each of stdout and stderr. Default 65536.
    /// Env `FLEET_CONSUMER__EXEC__MAX_OUTPUT_BYTES`.
    pub max_output_bytes: usize,
    /// The user id programs run as, so that they cannot read the consumer's own files (its
    /// password, `/proc/<consumer>/environ`). Default none: the consumer's own user. Needs a
    /// consumer that may change user (root, or `CAP_SETUID` and `CAP_SETGID`).
    /// Env `FLEET_CONSUMER__EXEC__UID`.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The group id programs run as, with no supplementary groups; set with `uid`.
    /// Env `FLEET_CONSUMER__EXEC__GID`.
    #[serde(default)]
    pub gid: Option<u32>,
}

/// `[producer]`: the submit CLI and the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerSettings {
    /// HTTP API listen address. Default `127.0.0.1:8080`. Env `FLEET_PRODUCER__LISTEN`.
    pub listen: String,
    /// The collector's read API, for `submit --wait` and `demo`. Default `http://127.0.0.1:8081`.
    /// Env `FLEET_PRODUCER__COLLECTOR_URL`.
    pub collector_url: String,
    /// Broker connections in the HTTP API's pool. Default 4. Env `FLEET_PRODUCER__POOL_SIZE`.
    pub pool_size: usize,
    /// Largest batch the HTTP API accepts, in tasks. Default 10000.
    /// Env `FLEET_PRODUCER__MAX_BATCH`.
    pub max_batch: usize,
    /// Largest HTTP request body, in bytes. Default 16777216. Env `FLEET_PRODUCER__MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// File whose first line is the bearer token the HTTP API requires
    /// (`Authorization: Bearer <token>`). Default none: no token is asked for.
    /// Env `FLEET_PRODUCER__TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file`; never printed.
    #[serde(skip)]
    pub token: Option<Secret>,
}

/// `[collector]`: the result store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSettings {
    /// SQLite database file. Default `./fleet-results.db`. Env `FLEET_COLLECTOR__DB`.
    pub db: PathBuf,
    /// HTTP read API listen address. Default `127.0.0.1:8081`. Env `FLEET_COLLECTOR__LISTEN`.
    pub listen: String,
    /// Results per transaction at most. Default 1000. Env `FLEET_COLLECTOR__BATCH_SIZE`.
    pub batch_size: usize,
    /// Milliseconds a partial transaction waits for more results. Default 0: it stores what
    /// has arrived (under load, results gather while the previous transaction commits).
    /// Env `FLEET_COLLECTOR__FLUSH_INTERVAL_MS`.
    pub flush_interval_ms: u64,
    /// Seconds to finish storing in-flight results after SIGTERM. Default 10.
    /// Env `FLEET_COLLECTOR__GRACE_PERIOD_SECS`.
    pub grace_period_secs: u64,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable (the default).
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `pretty` or `json`. Default `pretty`. Env `FLEET_LOG__FORMAT`. Levels come from `RUST_LOG`.
    pub format: LogFormat,
    /// Where to send spans with OTLP over HTTP (JSON), e.g.
    /// `http://otel-collector:4318/v1/traces`. Default none: no export.
    /// Env `FLEET_LOG__OTLP_ENDPOINT`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

const DEFAULTS: &str = r#"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
publish_window = 1024
connect_timeout_secs = 10
heartbeat_secs = 15
reconnect_timeout_secs = 300
confirm_timeout_secs = 30

[topology]
queue_type = "quorum"
delivery_limit = 5
work_queues = 1
retry_delays_ms = [1000, 5000, 30000, 120000, 600000]

[consumer]
io_concurrency = 256
prefetch_per_worker = 4
max_message_bytes = 1048576
results_per_message = 256
max_attempts = 5
grace_period_secs = 30
time_limit_ms = 600000
kinds = {}
listen = "127.0.0.1:8082"

[consumer.exec]
programs = {}
timeout_ms = 10000
max_output_bytes = 65536

[producer]
listen = "127.0.0.1:8080"
collector_url = "http://127.0.0.1:8081"
pool_size = 4
max_batch = 10000
max_body_bytes = 16777216

[collector]
db = "./fleet-results.db"
listen = "127.0.0.1:8081"
batch_size = 1000
flush_interval_ms = 0
grace_period_secs = 10

[log]
format = "pretty"
"#;

/// Programs that run another program named in their arguments (or a script): on `exec`'s
/// allow-list they would let any payload run anything, so settings refuse them.
pub const LAUNCHERS: &[&str] = &[
    "env", "sh", "bash", "dash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox", "xargs",
    "find", "nohup", "nice", "ionice", "timeout", "setsid", "stdbuf", "chroot", "taskset", "sudo",
    "su", "doas", "runuser", "setpriv", "unshare", "nsenter", "strace", "ltrace", "gdb", "script",
    "watch", "flock", "parallel", "python", "python3", "perl", "ruby", "node", "php", "lua", "awk",
    "gawk", "mawk", "sed", "vim", "vi", "ssh",
];

impl Settings {
    /// Loads defaults, then `file` (or `$FLEET_CONFIG`), then the process environment.
    ///
    /// Fails with a [`SettingsError`] naming the key when a value is missing, malformed or out of
    /// range, or when the password file cannot be read.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, env)
    }

    /// As [`Settings::load`], with the environment given explicitly (tests, embedding).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut builder = Config::builder()
            .add_source(File::from_str(DEFAULTS, config::FileFormat::Toml))
            .set_default("consumer.workers", cores as u64)
            .map_err(|e| SettingsError::new("consumer.workers", e.to_string()))?;
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get("FLEET_CONFIG").map(PathBuf::from));
        if let Some(path) = &file {
            if !path.is_file() {
                return Err(SettingsError::new(
                    "config",
                    format!("no settings file at {}", path.display()),
                ));
            }
            builder = builder.add_source(File::from(path.as_path()));
        }
        let fleet_env: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("FLEET_") && k.as_str() != "FLEET_CONFIG")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("FLEET")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(fleet_env)),
        );
        let config = builder.build().map_err(from_config_error)?;
        let mut settings: Settings = config.try_deserialize().map_err(from_config_error)?;
        settings.amqp.password_source = password_source(&settings.amqp, &env);
        if let Some(path) = &settings.producer.token_file {
            settings.producer.token = Some(first_line("producer.token_file", path)?);
        }
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let positive = [
            ("consumer.workers", self.consumer.workers),
            ("consumer.io_concurrency", self.consumer.io_concurrency),
            (
                "consumer.max_message_bytes",
                self.consumer.max_message_bytes,
            ),
            ("consumer.max_attempts", self.consumer.max_attempts as usize),
            (
                "consumer.prefetch_per_worker",
                self.consumer.prefetch_per_worker.into(),
            ),
            ("amqp.publish_window", self.amqp.publish_window),
            ("producer.pool_size", self.producer.pool_size),
            ("producer.max_batch", self.producer.max_batch),
            ("collector.batch_size", self.collector.batch_size),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(SettingsError::new(key, "must be at least 1"));
            }
        }
        if u16::try_from(self.wanted_prefetch()).is_err() {
            return Err(SettingsError::new(
                "consumer.prefetch_per_worker",
                "workers x prefetch_per_worker + io_concurrency must fit in 65535",
            ));
        }
        check_delays("topology.retry_delays_ms", &self.topology.retry_delays_ms)?;
        if !(1..=MAX_RESULTS_PER_MESSAGE).contains(&self.consumer.results_per_message) {
            return Err(SettingsError::new(
                "consumer.results_per_message",
                format!("must be from 1 to {MAX_RESULTS_PER_MESSAGE}"),
            ));
        }
        if !(1..=MAX_WORK_QUEUES).contains(&self.topology.work_queues) {
            return Err(SettingsError::new(
                "topology.work_queues",
                format!("must be from 1 to {MAX_WORK_QUEUES}"),
            ));
        }
        if self.consumer.time_limit_ms == 0 {
            return Err(SettingsError::new(
                "consumer.time_limit_ms",
                "must be at least 1",
            ));
        }
        if self.amqp.reconnect_timeout_secs == 0 {
            return Err(SettingsError::new(
                "amqp.reconnect_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.amqp.confirm_timeout_secs == 0 {
            return Err(SettingsError::new(
                "amqp.confirm_timeout_secs",
                "must be at least 1",
            ));
        }
        for (kind, k) in &self.consumer.kinds {
            if k.max_attempts == Some(0) {
                return Err(SettingsError::new(
                    format!("consumer.kinds.{kind}.max_attempts"),
                    "must be at least 1",
                ));
            }
            if k.time_limit_ms == Some(0) {
                return Err(SettingsError::new(
                    format!("consumer.kinds.{kind}.time_limit_ms"),
                    "must be at least 1",
                ));
            }
            if let Some(delays) = &k.retry_delays_ms {
                check_delays(&format!("consumer.kinds.{kind}.retry_delays_ms"), delays)?;
            }
        }
        // The URI parser takes `amqp:/host` (one slash) for a URL with no host, and would log
        // in as guest@localhost; the URL is not echoed back, as it may hold a password.
        if !["amqp://", "amqps://"]
            .iter()
            .any(|scheme| self.amqp.url.starts_with(scheme))
        {
            return Err(SettingsError::new(
                "amqp.url",
                "must start with amqp:// or amqps:// (the value is not shown: it may hold a password)",
            ));
        }
        self.amqp_uri()?;
        match (&self.amqp.tls_cert_file, &self.amqp.tls_key_file) {
            (Some(_), None) => {
                return Err(SettingsError::new(
                    "amqp.tls_key_file",
                    "needed with amqp.tls_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(SettingsError::new(
                    "amqp.tls_cert_file",
                    "needed with amqp.tls_key_file",
                ));
            }
            _ => {}
        }
        for (key, path) in [
            ("amqp.tls_ca_file", &self.amqp.tls_ca_file),
            ("amqp.tls_cert_file", &self.amqp.tls_cert_file),
            ("amqp.tls_key_file", &self.amqp.tls_key_file),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::File::open(path)
            {
                return Err(SettingsError::new(
                    key,
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        }
        match (self.consumer.exec.uid, self.consumer.exec.gid) {
            (Some(_), None) => {
                return Err(SettingsError::new(
                    "consumer.exec.gid",
                    "is needed with consumer.exec.uid",
                ));
            }
            (None, Some(_)) => {
                return Err(SettingsError::new(
                    "consumer.exec.uid",
                    "is needed with consumer.exec.gid",
                ));
            }
            _ => {}
        }
        for (name, path) in &self.consumer.exec.programs {
            let key = || format!("consumer.exec.programs.{name}");
            if !path.is_absolute() {
                return Err(SettingsError::new(
                    key(),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
            let program = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if LAUNCHERS.contains(&program) {
                return Err(SettingsError::new(
                    key(),
                    format!(
                        "{} runs other programs from its arguments; the allow-list is for \
                         programs that take untrusted argv, and a launcher would let a payload \
                         run anything",
                        path.display()
                    ),
                ));
            }
        }
        if let Some(endpoint) = &self.log.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(SettingsError::new(
                "log.otlp_endpoint",
                format!("`{endpoint}` is not an http:// or https:// URL"),
            ));
        }
        for (key, addr) in [
            ("consumer.listen", &self.consumer.listen),
            ("producer.listen", &self.producer.listen),
            ("collector.listen", &self.collector.listen),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(SettingsError::new(
                    key,
                    format!("`{addr}` is not an address:port"),
                ));
            }
        }
        Ok(())
    }

    /// The broker URI with the password from the password file (read now) applied.
    ///
    /// Fails when `amqp.url` is not an AMQP URI or the password file cannot be read.
    pub fn amqp_uri(&self) -> Result<AMQPUri, SettingsError> {
        let mut uri = self.uri_without_password()?;
        if let Some((key, path)) = &self.amqp.password_source {
            uri.authority.userinfo.password = first_line(key, path)?.expose().to_owned();
        }
        Ok(uri)
    }

    /// `amqp.url` parsed, with `amqp.user` and the heartbeat applied; no file is read.
    fn uri_without_password(&self) -> Result<AMQPUri, SettingsError> {
        let mut uri: AMQPUri = self
            .amqp
            .url
            .parse()
            .map_err(|e: String| SettingsError::new("amqp.url", e))?;
        if let Some(user) = &self.amqp.user {
            uri.authority.userinfo.username.clone_from(user);
        }
        // A `?heartbeat=` in the URL wins over the setting.
        uri.query.heartbeat.get_or_insert(self.amqp.heartbeat_secs);
        // lapin keeps 32 frames of frame_max as each connection's read buffer and as its write
        // buffer: at the broker's 128 KiB that is up to 8 MiB a connection, touched under load
        // (a consumer with two work queues peaked at 30 MiB). 32 KiB frames cost nothing
        // measurable; a `?frame_max=` in the URL wins.
        uri.query.frame_max.get_or_insert(FRAME_MAX);
        Ok(uri)
    }

    /// The broker user fleet logs in as, which its publishes carry as AMQP `user_id`; `None`
    /// with EXTERNAL authentication (the broker takes the user from the client certificate).
    pub fn broker_user(&self) -> Option<String> {
        let uri = self.uri_without_password().ok()?;
        let external = uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External);
        (!external && !uri.authority.userinfo.username.is_empty())
            .then_some(uri.authority.userinfo.username)
    }

    /// Prefetch count of a consumer: workers x prefetch_per_worker for the compute slots, plus
    /// io_concurrency, so I/O tasks waiting on the network never take the compute slots' share
    /// of the window (validated to fit in u16).
    pub fn prefetch(&self) -> u16 {
        u16::try_from(self.wanted_prefetch()).unwrap_or(u16::MAX)
    }

    fn wanted_prefetch(&self) -> usize {
        self.consumer
            .workers
            .saturating_mul(usize::from(self.consumer.prefetch_per_worker))
            .saturating_add(self.consumer.io_concurrency)
    }

    /// The retry policy of `kind`: its `[consumer.kinds.<kind>]` entry over the defaults.
    pub fn policy(&self, kind: &str) -> Policy<'_> {
        let own = self.consumer.kinds.get(kind);
        Policy {
            max_attempts: own
                .and_then(|k| k.max_attempts)
                .unwrap_or(self.consumer.max_attempts),
            time_limit: Duration::from_millis(
                own.and_then(|k| k.time_limit_ms)
                    .unwrap_or(self.consumer.time_limit_ms),
            ),
            retry_delays_ms: own
                .and_then(|k| k.retry_delays_ms.as_deref())
                .unwrap_or(&self.topology.retry_delays_ms),
        }
    }

    /// Every retry delay any kind uses, each once: the delay queues to declare.
    pub fn all_retry_delays(&self) -> Vec<u64> {
        let mut delays: Vec<u64> = self
            .consumer
            .kinds
            .values()
            .filter_map(|k| k.retry_delays_ms.as_deref())
            .chain(std::iter::once(self.topology.retry_delays_ms.as_slice()))
            .flatten()
            .copied()
            .collect();
        delays.sort_unstable();
        delays.dedup();
        delays
    }

    /// How long a publish waits for its confirm before it counts as lost.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_secs(self.amqp.confirm_timeout_secs)
    }

    /// How long a service keeps trying to reach the broker before it gives up.
    pub fn reconnect_timeout(&self) -> Duration {
        Duration::from_secs(self.amqp.reconnect_timeout_secs)
    }

    /// The consumer's drain grace period.
    pub fn consumer_grace(&self) -> Duration {
        Duration::from_secs(self.consumer.grace_period_secs)
    }
}

fn check_delays(key: &str, delays: &[u64]) -> Result<(), SettingsError> {
    if delays.is_empty() {
        return Err(SettingsError::new(key, "needs at least one delay"));
    }
    if delays.contains(&0) {
        return Err(SettingsError::new(key, "delays must be at least 1 ms"));
    }
    Ok(())
}

/// A list of delays as a TOML/JSON array, or as `"1000,5000"` (how the environment gives it).
#[derive(Deserialize)]
#[serde(untagged)]
enum DelayList {
    List(Vec<u64>),
    One(u64),
    Text(String),
}

fn delays<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    match DelayList::deserialize(d)? {
        DelayList::List(list) => Ok(list),
        DelayList::One(n) => Ok(vec![n]),
        DelayList::Text(text) => text
            .split(',')
            .map(|part| {
                part.trim().parse::<u64>().map_err(|_| {
                    serde::de::Error::custom(format!("`{part}` is not a number of milliseconds"))
                })
            })
            .collect(),
    }
}

fn some_delays<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u64>>, D::Error> {
    delays(d).map(Some)
}

/// Where the broker password comes from: `amqp.password_file`, else the systemd credential.
/// (`validate` reads it once, so a missing or empty file fails at start, naming the key.)
fn password_source(
    amqp: &AmqpSettings,
    env: &std::collections::HashMap<String, String>,
) -> Option<(&'static str, PathBuf)> {
    match (&amqp.password_file, env.get("CREDENTIALS_DIRECTORY")) {
        (Some(path), _) => Some(("amqp.password_file", path.clone())),
        (None, Some(dir)) if Path::new(dir).join(CREDENTIAL_NAME).is_file() => Some((
            "CREDENTIALS_DIRECTORY",
            Path::new(dir).join(CREDENTIAL_NAME),
        )),
        _ => None,
    }
}

/// The first line of the secret file at `path`; an unreadable or empty file is an error naming
/// `key`.
fn first_line(key: &str, path: &Path) -> Result<Secret, SettingsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::new(key, format!("cannot read {}: {e}", path.display())))?;
    // Before logging is set up, so on stderr; once a file, though it is read at every connect.
    static WARNED: std::sync::Mutex<BTreeSet<PathBuf>> = std::sync::Mutex::new(BTreeSet::new());
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
        && WARNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.to_owned())
    {
        eprintln!(
            "warning: {key} {} can be read by other users (mode {:o}); `chmod 600` it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let secret = text.lines().next().unwrap_or_default().to_owned();
    if secret.is_empty() {
        return Err(SettingsError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret(secret))
}

fn from_config_error(error: config::ConfigError) -> SettingsError {
    match &error {
        config::ConfigError::Type { key: Some(key), .. } => {
            SettingsError::new(key.clone(), error.to_string())
        }
        config::ConfigError::NotFound(key) => SettingsError::new(key.clone(), "missing"),
        _ => {
            // serde messages name the field ("unknown field `wrokers`") but not its section.
            let message = error.to_string();
            let key = message
                .split('`')
                .nth(1)
                .map_or_else(|| "settings".to_owned(), str::to_owned);
            SettingsError::new(key, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_load_without_any_source() {
        let s = Settings::load_from(None, env(&[])).expect("defaults are valid");
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.topology.queue_type, QueueType::Quorum);
        assert!(s.consumer.workers >= 1);
        assert_eq!(s.collector.db, PathBuf::from("./fleet-results.db"));
        assert_eq!(
            s.confirm_timeout(),
            crate::publisher::DEFAULT_CONFIRM_TIMEOUT
        );
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("fleet.toml");
        std::fs::write(&file, "[consumer]\nworkers = 7\nio_concurrency = 9\n").expect("write");
        let s = Settings::load_from(
            Some(&file),
            env(&[
                ("FLEET_CONSUMER__WORKERS", "3"),
                ("FLEET_TOPOLOGY__RETRY_DELAYS_MS", "10,20"),
                ("FLEET_CONSUMER__EXEC__PROGRAMS__ECHO", "/bin/echo"),
            ]),
        )
        .expect("valid");
        assert_eq!(s.consumer.workers, 3);
        assert_eq!(s.consumer.io_concurrency, 9);
        assert_eq!(s.topology.retry_delays_ms, vec![10, 20]);
        assert_eq!(s.consumer.exec.programs["echo"], PathBuf::from("/bin/echo"));
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::load_from(None, env(&[("FLEET_CONSUMER__WORKERS", "many")]))
            .expect_err("not a number");
        assert_eq!(err.key, "consumer.workers");
        let err = Settings::load_from(None, env(&[("FLEET_CONSUMER__WORKERS", "0")]))
            .expect_err("zero workers");
        assert_eq!(err.key, "consumer.workers");
        let err = Settings::load_from(None, env(&[("FLEET_AMQP__CONFIRM_TIMEOUT_SECS", "0")]))
            .expect_err("no time for a confirm");
        assert_eq!(err.key, "amqp.confirm_timeout_secs");
        let err = Settings::load_from(None, env(&[("FLEET_AMQP__URL", "http://nope")]))
            .expect_err("not amqp");
        assert_eq!(err.key, "amqp.url");
        let err = Settings::load_from(None, env(&[("FLEET_CONSUMER__EXEC__PROGRAMS__LS", "ls")]))
            .expect_err("relative path");
        assert_eq!(err.key, "consumer.exec.programs.ls");
        for launcher in ["/usr/bin/env", "/bin/sh", "/usr/bin/xargs", "/usr/bin/find"] {
            let err = Settings::load_from(
                None,
                env(&[("FLEET_CONSUMER__EXEC__PROGRAMS__RUN", launcher)]),
            )
            .expect_err("a launcher");
            assert_eq!(err.key, "consumer.exec.programs.run");
            assert!(err.message.contains("runs other programs"), "{err}");
        }
        let err = Settings::load_from(None, env(&[("FLEET_CONSUMER__EXEC__UID", "65534")]))
            .expect_err("a uid without a gid");
        assert_eq!(err.key, "consumer.exec.gid");
        let err = Settings::load_from(None, env(&[("FLEET_CONSUMER__EXEC__GID", "65534")]))
            .expect_err("a gid without a uid");
        assert_eq!(err.key, "consumer.exec.uid");
        let err = Settings::load_from(
            None,
            env(&[("FLEET_AMQP__URL", "amqp:/fleet:s3cret@broker/fleet")]),
        )
        .expect_err("one slash");
        assert_eq!(err.key, "amqp.url");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn frames_are_32_kib_unless_the_url_says_otherwise() {
        let s = Settings::load_from(None, env(&[])).expect("defaults are valid");
        assert_eq!(
            s.amqp_uri().expect("a URI").query.frame_max,
            Some(FRAME_MAX)
        );
        let s = Settings::load_from(
            None,
            env(&[("FLEET_AMQP__URL", "amqp://u:p@h:5672/%2f?frame_max=131072")]),
        )
        .expect("valid");
        assert_eq!(s.amqp_uri().expect("a URI").query.frame_max, Some(131_072));
    }

    #[test]
    fn password_file_replaces_the_url_password() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "hunter2\n").expect("write");
        let s = Settings::load_from(
            None,
            env(&[("FLEET_AMQP__PASSWORD_FILE", file.to_str().expect("utf-8"))]),
        )
        .expect("valid");
        assert_eq!(
            s.amqp_uri().expect("uri").authority.userinfo.password,
            "hunter2"
        );
        let s = Settings::load_from(
            None,
            env(&[
                ("FLEET_AMQP__URL", "amqp://broker.example:5672/fleet"),
                ("FLEET_AMQP__USER", "fleet-consumer"),
            ]),
        )
        .expect("valid");
        let uri = s.amqp_uri().expect("uri");
        assert_eq!(uri.authority.userinfo.username, "fleet-consumer");
        assert_eq!(s.broker_user().as_deref(), Some("fleet-consumer"));
        let err = Settings::load_from(
            None,
            env(&[("FLEET_AMQP__PASSWORD_FILE", "/nonexistent/pw")]),
        )
        .expect_err("missing file");
        assert_eq!(err.key, "amqp.password_file");
    }
}
