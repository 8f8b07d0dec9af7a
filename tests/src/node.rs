//! A RabbitMQ node of the test's own, for tests that stop, restart or break a broker: its own
//! node name, ports and data directory, started with the installed `rabbitmq-server`. The shared
//! broker is never touched.

use crate::netns::Host;
use anyhow::Context as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private broker node, stopped and deleted on drop.
pub struct Node {
    /// Erlang node name, e.g. `fleet-1a2b3c4d@localhost`.
    pub name: String,
    /// Its AMQP port on 127.0.0.1 (or on its host's address).
    pub port: u16,
    /// The test host it runs on, if not this machine's loopback.
    on: Option<Host>,
    dir: PathBuf,
    dist_port: u16,
    /// Extra Erlang VM flags (`RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS`).
    erl_args: String,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn chown_rabbitmq(path: &std::path::Path) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(path)
        .status()
        .context("running chown")?;
    anyhow::ensure!(status.success(), "chown rabbitmq {} failed", path.display());
    Ok(())
}

impl Node {
    /// Creates the node's directory and starts it; returns when its AMQP port answers and its
    /// boot, every listener included, is done.
    ///
    /// # Panics
    /// When the node does not answer within 60 seconds (its log directory is kept then).
    pub fn start() -> Self {
        Self::start_with(&[], |_, _| String::new())
    }

    /// As [`Node::start`], with `plugins` enabled and the lines `configure(dir, port)` returns
    /// added to rabbitmq.conf; `configure` may also write files (certificates) into `dir`, which
    /// is given to the rabbitmq user before the node starts.
    ///
    /// # Panics
    /// As [`Node::start`].
    pub fn start_with(
        plugins: &[&str],
        configure: impl FnOnce(&std::path::Path, u16) -> String,
    ) -> Self {
        Self::start_at(None, plugins, "", configure)
    }

    /// As [`Node::start`], with these Erlang VM flags added (e.g. `+sbwt none`).
    ///
    /// # Panics
    /// As [`Node::start`].
    pub fn start_with_erl_args(erl_args: &str) -> Self {
        Self::start_at(None, &[], erl_args, |_, _| String::new())
    }

    /// As [`Node::start_with`], on `host`: listening on the host's address, port 5672, and
    /// driven with `rabbitmqctl` run on that host.
    ///
    /// # Panics
    /// As [`Node::start`].
    pub fn start_on(host: &Host, configure: impl FnOnce(&std::path::Path, u16) -> String) -> Self {
        Self::start_at(Some(host.clone()), &[], "", configure)
    }

    fn start_at(
        on: Option<Host>,
        plugins: &[&str],
        erl_args: &str,
        configure: impl FnOnce(&std::path::Path, u16) -> String,
    ) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("fleet-{}@localhost", &id[..8]);
        let dir = std::env::temp_dir().join(format!("fleet-node-{}", &id[..8]));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("creating the node directory");
        }
        // A host of its own has every port free.
        let (port, dist_port) = match on {
            Some(_) => (5672, 25672),
            None => (free_port(), free_port()),
        };
        let extra = configure(&dir, free_port());
        let address = on
            .as_ref()
            .map_or("127.0.0.1".to_owned(), |h| h.addr.to_string());
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = {address}:{port}\nloopback_users = none\n{extra}"),
        )
        .expect("writing rabbitmq.conf");
        std::fs::write(
            dir.join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )
        .expect("writing enabled_plugins");
        chown_rabbitmq(&dir).expect("giving the node directory to the rabbitmq user");
        let mut node = Self {
            name,
            port,
            on,
            dir,
            dist_port,
            erl_args: erl_args.to_owned(),
            child: None,
        };
        node.boot();
        node
    }

    fn boot(&mut self) {
        let mut command = self.command("rabbitmq-server");
        if !self.erl_args.is_empty() {
            command.env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", &self.erl_args);
        }
        let child = command
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("node.pid"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env(
                "RABBITMQ_FEATURE_FLAGS_FILE",
                self.dir.join("feature_flags"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting rabbitmq-server");
        self.child = Some(child);
        let started = Instant::now();
        while !self.answers() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "node {} did not answer on port {} within 60 s; see {}",
                self.name,
                self.port,
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The AMQP port opens before the rest of the boot (a TLS listener, plugins) is done.
        if let Err(e) = self.ctl(&["await_startup", "--timeout", "60"]) {
            panic!("node {} did not finish starting: {e:#}", self.name);
        }
    }

    /// `program` on the node's host.
    fn command(&self, program: &str) -> Command {
        match &self.on {
            Some(host) => host.command(program),
            None => Command::new(program),
        }
    }

    /// True when its AMQP port takes a connection.
    fn answers(&self) -> bool {
        match &self.on {
            Some(host) => host
                .run(
                    "bash",
                    &[
                        "-c",
                        &format!("exec 3<>/dev/tcp/{}/{}", host.addr, self.port),
                    ],
                )
                .is_ok(),
            None => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
        }
    }

    /// The node's directory (its config, data, logs, and files `start_with` wrote).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The AMQP URL of the node's default vhost, as guest.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.host())
    }

    /// `address:port` of its AMQP listener.
    pub fn host(&self) -> String {
        match &self.on {
            Some(host) => format!("{}:{}", host.addr, self.port),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// Runs `rabbitmqctl -n <node> args...`.
    ///
    /// Fails when rabbitmqctl does.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .command("rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .context("running rabbitmqctl")?;
        anyhow::ensure!(
            output.status.success(),
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Stops the node (its data stays), as a broker restart or crash would.
    pub fn stop(&mut self) {
        let _ = self.ctl(&["stop"]);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Stops and starts the node again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("node {} logs kept in {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
