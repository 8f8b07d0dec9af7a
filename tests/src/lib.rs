//! fleet-tests: support for end-to-end tests against the real broker, and the `fleet-bench`
//! benchmark.
//!
//! Every test gets a fresh vhost ([`Vhost`]) on the local broker, so tests never see each
//! other's queues and leave nothing behind. Services run in-process through the same `run`
//! functions the binaries call.

pub mod netns;
pub mod node;
pub mod process;
pub mod proxy;
pub mod soak;

use anyhow::Context as _;
use fleet_consumer::registry::Registry;
use fleet_shared::settings::Settings;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The broker tests use: `FLEET_TEST_AMQP_HOST` (default `127.0.0.1:5672`), guest/guest.
pub fn broker_host() -> String {
    std::env::var("FLEET_TEST_AMQP_HOST").unwrap_or_else(|_| "127.0.0.1:5672".to_owned())
}

/// Panics with a one-line hint when no broker answers: a test never silently skips.
pub fn require_broker() {
    let host = broker_host();
    if std::net::TcpStream::connect(&host).is_err() {
        panic!(
            "no RabbitMQ at {host}: start one (`rabbitmq-server -detached`) or run `scripts/test`, which does"
        );
    }
}

/// Runs `rabbitmqctl args...` on the shared broker and returns what it printed.
fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("running rabbitmqctl (is rabbitmq-server installed?)")?;
    anyhow::ensure!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A broker user of its own with a random password, deleted on drop. The password reaches
/// rabbitmqctl on its standard input, never its command line.
pub struct User {
    /// Its name.
    pub name: String,
    /// Its password.
    pub password: String,
}

impl User {
    /// Creates the user with no tags and no permissions.
    ///
    /// # Panics
    /// When rabbitmqctl fails.
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("fleet-user-{}", &id[..12]);
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        with_password_on_stdin(&["add_user", &name], &password);
        Self { name, password }
    }

    /// Gives the user a new random password (the broker's, not any file's).
    ///
    /// # Panics
    /// When rabbitmqctl fails.
    pub fn change_password(&mut self) {
        self.password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        with_password_on_stdin(&["change_password", &self.name], &self.password);
    }

    /// Grants the user configure, write and read patterns on `vhost`.
    ///
    /// # Panics
    /// When rabbitmqctl fails.
    pub fn permit(&self, vhost: &str, configure: &str, write: &str, read: &str) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            vhost,
            &self.name,
            configure,
            write,
            read,
        ])
        .expect("rabbitmqctl set_permissions");
    }
}

fn with_password_on_stdin(args: &[&str], password: &str) {
    use std::io::Write as _;
    let mut child = Command::new("rabbitmqctl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running rabbitmqctl");
    child
        .stdin
        .take()
        .expect("a stdin pipe")
        .write_all(format!("{password}\n").as_bytes())
        .expect("writing the password to rabbitmqctl");
    let output = child.wait_with_output().expect("rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `rabbitmqctl args...` on the shared broker.
///
/// # Panics
/// When it fails.
pub fn ctl(args: &[&str]) {
    rabbitmqctl(args).expect("rabbitmqctl");
}

impl Default for User {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_user", &self.name]);
    }
}

/// A vhost of its own on the local broker, removed on drop.
pub struct Vhost {
    /// Its name.
    pub name: String,
    /// A scratch directory for this test (databases, files), removed on drop.
    pub dir: PathBuf,
}

impl Vhost {
    /// Creates a uniquely named vhost with full permissions for guest.
    ///
    /// # Panics
    /// When no broker answers or rabbitmqctl fails: tests cannot run without one.
    pub fn new() -> Self {
        require_broker();
        // Service logs (warnings by default, RUST_LOG for more) go to stderr beside the test's.
        fleet_shared::telemetry::init(fleet_shared::settings::LogFormat::Pretty, "warn");
        let name = format!("fleet-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]).expect("creating a test vhost");
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])
            .expect("granting guest the test vhost");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Self { name, dir }
    }

    /// The AMQP URL of this vhost.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/{}", broker_host(), self.name)
    }

    /// Settings pointing at this vhost, a collector database in the scratch directory, free
    /// ports for both HTTP APIs, and `extra` `FLEET_*` variables on top.
    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        settings_of(&self.env(extra))
    }

    /// Where [`Vhost::env_as`] keeps `user`'s password.
    pub fn password_file(&self, user: &User) -> PathBuf {
        self.dir.join(format!("{}.password", user.name))
    }

    /// Writes `user`'s password to [`Vhost::password_file`] and returns the environment of
    /// [`Vhost::env`] that logs in as `user` through that file, with `extra` on top.
    pub fn env_as(&self, user: &User, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let password_file = self.password_file(user);
        write_secret(&password_file, &format!("{}\n", user.password));
        let url = format!("amqp://{}@{}/{}", user.name, broker_host(), self.name);
        let file = password_file.display().to_string();
        let mut vars = vec![
            ("FLEET_AMQP__URL", url.as_str()),
            ("FLEET_AMQP__PASSWORD_FILE", file.as_str()),
        ];
        vars.extend_from_slice(extra);
        self.env(&vars)
    }

    /// The environment of [`Vhost::settings`], for services run as processes.
    pub fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        fleet_env(&self.url(), &self.dir, extra)
    }
}

/// `FLEET_*` variables for a fleet on broker `url`: a collector database in `dir`, free ports for
/// both HTTP APIs (the producer pointed at the collector's), any free port for each consumer's
/// `/metrics`, and `extra` on top.
pub fn fleet_env(
    url: &str,
    dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let collector = free_address();
    let mut env = vec![
        ("FLEET_AMQP__URL".to_owned(), url.to_owned()),
        (
            "FLEET_COLLECTOR__DB".to_owned(),
            dir.join("results.db").display().to_string(),
        ),
        ("FLEET_COLLECTOR__LISTEN".to_owned(), collector.clone()),
        ("FLEET_PRODUCER__LISTEN".to_owned(), free_address()),
        // Tests run many consumers on one machine: each takes a free port for /metrics.
        (
            "FLEET_CONSUMER__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "FLEET_PRODUCER__COLLECTOR_URL".to_owned(),
            format!("http://{collector}"),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

/// Settings from exactly `env`.
///
/// # Panics
/// When they are invalid: test settings must be.
pub fn settings_of(env: &[(String, String)]) -> Settings {
    Settings::load_from(None, env.to_vec()).expect("test settings are valid")
}

impl Default for Vhost {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("FLEET_TEST_KEEP").is_some() {
            eprintln!(
                "keeping vhost {} and {} for inspection",
                self.name,
                self.dir.display()
            );
            return;
        }
        let _ = rabbitmqctl(&["delete_vhost", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `text` to `path` readable by its owner alone, as a password file should be.
///
/// # Panics
/// When the file cannot be written.
pub fn write_secret(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("writing a secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("making a secret file 0600");
}

/// A loopback address with a port that was free a moment ago.
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener.local_addr().expect("a bound address").to_string()
}

/// A service running in-process; cancel and join with [`Service::stop`].
pub struct Service {
    /// Trips the service's drain.
    pub shutdown: CancellationToken,
    /// The service's `run`.
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    /// Starts `run(shutdown)` on the current runtime.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(shutdown.clone()));
        Self { shutdown, handle }
    }

    /// A consumer with `registry`.
    pub fn consumer(settings: &Settings, registry: Registry) -> Self {
        let settings = settings.clone();
        Self::spawn(move |shutdown| fleet_consumer::run(settings, registry, shutdown))
    }

    /// A consumer with the built-in handlers.
    pub fn builtin_consumer(settings: &Settings) -> Self {
        let registry =
            fleet_consumer::handlers::registry(settings).expect("built-in kinds are distinct");
        Self::consumer(settings, registry)
    }

    /// The collector.
    pub fn collector(settings: &Settings) -> Self {
        let settings = settings.clone();
        Self::spawn(move |shutdown| fleet_producer::collector::run(settings, shutdown))
    }

    /// The producer's HTTP API.
    pub fn producer_api(settings: &Settings) -> Self {
        let settings = settings.clone();
        Self::spawn(move |shutdown| fleet_producer::api::serve(settings, shutdown))
    }

    /// True while the service has not returned (an early return means it failed).
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Drains the service and returns what its `run` returned.
    ///
    /// # Panics
    /// When it does not stop within 30 seconds or its task panicked.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("service stops within 30 s")
            .expect("service task did not panic")
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `limit`.
///
/// # Panics
/// When `limit` passes first; the message says what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let waited = tokio::time::timeout(limit, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    match waited {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Waits for the collector to report batch `batch` complete.
///
/// # Panics
/// When it is not complete within `limit`.
pub async fn complete(
    client: &fleet_producer::client::CollectorClient,
    batch: &str,
    limit: Duration,
) -> fleet_producer::collector::store::BatchStatus {
    eventually(&format!("batch {batch} to complete"), limit, || async {
        client
            .batch(batch)
            .await
            .ok()
            .flatten()
            .filter(|s| s.complete)
    })
    .await
}

/// Takes every message now in `fleet.dead` and returns each one's `x-fleet-error` and body.
///
/// # Panics
/// When the broker cannot be reached.
pub async fn drain_dead(settings: &Settings) -> Vec<(String, Vec<u8>)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let connection = fleet_shared::amqp::connect(settings, "test-dead-reader")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut dead = Vec::new();
    while let Some(message) = channel
        .basic_get(
            fleet_shared::topology::DEAD_QUEUE.into(),
            BasicGetOptions::default(),
        )
        .await
        .expect("basic.get")
    {
        let reason = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(fleet_shared::envelope::HEADER_ERROR).cloned())
            .map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        dead.push((reason, message.delivery.data.clone()));
    }
    let _ = connection.close(200, "done".into()).await;
    dead
}

/// The value of `series` (its name and labels exactly as exposed) in a scrape of `{base}/metrics`,
/// or `None` if the service does not answer or has no such series.
pub async fn metric(base: &str, series: &str) -> Option<f64> {
    metric_in(&scrape(base).await?, series)
}

/// The text of `{base}/metrics`, or `None` if the service does not answer; read series from it
/// with [`metric_in`].
pub async fn scrape(base: &str) -> Option<String> {
    reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The value of `series` (its name and labels exactly as exposed) in a `/metrics` text.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Deliveries not acked yet on every channel in `vhost`, as the broker counts them now (a
/// quorum queue's own count in `list_queues` is a statistic, updated every few seconds).
///
/// # Panics
/// When rabbitmqctl fails.
pub fn unacked(vhost: &str) -> u64 {
    let listing = rabbitmqctl(&[
        "list_channels",
        "-q",
        "--no-table-headers",
        "vhost",
        "messages_unacknowledged",
    ])
    .expect("listing channels");
    listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| *name == vhost)
        .map(|(_, count)| count.trim().parse::<u64>().expect("a count"))
        .sum()
}

/// Messages ready in `queue` (a passive declare).
///
/// # Panics
/// When the broker cannot be reached or the queue does not exist.
pub async fn ready(settings: &Settings, queue: &str) -> u32 {
    let connection = fleet_shared::amqp::connect(settings, "test-queue-reader")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = connection.close(200, "done".into()).await;
    declared.message_count()
}
