//! fleet across hosts, deployed as the systemd units deploy it: a broker host running a RabbitMQ
//! node of its own with the definitions `fleet-producer definitions` wrote, two worker hosts
//! running consumers, and a master host running the collector and the producer. Each host is a
//! network namespace of the test's own (`fleet_tests::netns`), each service gets the
//! environment its unit in `deploy/systemd` gives it: the same `/etc/fleet/fleet.env`, the
//! unit's own `Environment=` lines, and its password as the systemd credential `amqp-password`.

use fleet_producer::client::PAGE;
use fleet_producer::collector::store::BatchStatus;
use fleet_shared::envelope::{self, ResultMessage, Status, TaskResult};
use fleet_tests::netns::{Host, Network};
use fleet_tests::node::Node;
use fleet_tests::process::{Process, binary};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Short, so a host whose cable is pulled is given up on quickly: the broker closes its
/// connection after missing heartbeats, and its unacked tasks are delivered again.
const HEARTBEAT_SECS: u64 = 2;

/// The test's `/etc/fleet`: `fleet.env` and the password files, as an operator lays them out.
struct Etc {
    dir: PathBuf,
    credentials: PathBuf,
}

impl Etc {
    /// The environment systemd gives `unit` (a file in `deploy/systemd`, started as `instance`
    /// if it is a template) on `host`: the unit's `Environment=` lines, then its
    /// `EnvironmentFile=` over them (systemd's order), and `CREDENTIALS_DIRECTORY` holding what
    /// its `LoadCredential=` lines name.
    fn unit_environment(&self, unit: &str, instance: &str, host: &Host) -> Vec<(String, String)> {
        let unit_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/systemd")
            .join(unit);
        let text = std::fs::read_to_string(&unit_path)
            .expect("reading the unit")
            .replace("%i", instance);
        let credentials = self.credentials.join(format!("{}-{unit}", host.name));
        std::fs::create_dir_all(&credentials).expect("a credentials directory");
        let mut env = BTreeMap::new();
        let mut files = Vec::new();
        for line in text.lines() {
            if let Some(assignment) = line.strip_prefix("Environment=") {
                let (key, value) = assignment.split_once('=').expect("Environment=KEY=VALUE");
                env.insert(key.to_owned(), value.to_owned());
            } else if let Some(file) = line.strip_prefix("EnvironmentFile=") {
                files.push(self.path(file));
            } else if let Some(credential) = line.strip_prefix("LoadCredential=") {
                let (name, source) = credential
                    .split_once(':')
                    .expect("LoadCredential=NAME:PATH");
                std::fs::copy(self.path(source), credentials.join(name))
                    .expect("copying the credential");
            }
        }
        for file in files {
            for item in dotenvy::from_path_iter(&file).expect("reading the environment file") {
                let (key, value) = item.expect("a KEY=VALUE line");
                env.insert(key, value);
            }
        }
        env.insert(
            "CREDENTIALS_DIRECTORY".to_owned(),
            credentials.display().to_string(),
        );
        env.into_iter().collect()
    }

    /// `/etc/fleet/...` in a unit, in the test's own `/etc/fleet`.
    fn path(&self, path: &str) -> PathBuf {
        let name = path
            .strip_prefix("/etc/fleet/")
            .unwrap_or_else(|| panic!("{path} is not under /etc/fleet"));
        self.dir.join(name)
    }
}

/// Polls `check` every 250 ms until it returns `Some`, or panics after `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The collector's read API, asked from the master host with curl.
struct Collector<'a> {
    master: &'a Host,
    base: String,
}

impl Collector<'_> {
    fn get(&self, path: &str) -> Option<String> {
        self.master
            .run("curl", &["-sf", &format!("{}{path}", self.base)])
            .ok()
    }

    fn status(&self, batch: &str) -> Option<BatchStatus> {
        self.get(&format!("/v1/batches/{batch}"))
            .map(|body| serde_json::from_str(&body).expect("a batch status"))
    }

    /// All stored results of `batch`, page by page (JSON lines).
    fn results(&self, batch: &str) -> Vec<TaskResult> {
        let mut all = Vec::new();
        loop {
            let path = format!(
                "/v1/batches/{batch}/results?offset={}&limit={PAGE}",
                all.len()
            );
            let page = self.get(&path).expect("a page of results");
            let before = all.len();
            for line in page.lines().filter(|l| !l.is_empty()) {
                match envelope::decode_result(line.as_bytes()) {
                    Ok(ResultMessage::Result(result)) => all.push(result),
                    other => panic!("not a result: {other:?}"),
                }
            }
            if all.len() - before < PAGE {
                return all;
            }
        }
    }

    fn complete(&self, batch: &str, limit: Duration) -> BatchStatus {
        wait_for(&format!("batch {batch} to complete"), limit, || {
            self.status(batch).filter(|s| s.complete)
        })
    }
}

/// The host part of a result's `<host>/<pid>/<slot>` worker id.
fn host_of(result: &TaskResult) -> &str {
    result.worker.split('/').next().unwrap_or_default()
}

/// Results per worker host.
fn by_host(results: &[TaskResult]) -> BTreeMap<String, usize> {
    let mut hosts = BTreeMap::new();
    for result in results {
        *hosts.entry(host_of(result).to_owned()).or_insert(0) += 1;
    }
    hosts
}

/// Every task of `tasks` has one ok result, and the results are exactly those tasks.
fn assert_all_done_once(status: &BatchStatus, results: &[TaskResult], tasks: u64) {
    assert_eq!(
        (status.total, status.done, status.ok, status.failed),
        (Some(tasks), tasks, tasks, 0),
        "every task done, none failed"
    );
    assert_eq!(results.len() as u64, tasks, "one stored result per task");
    let ids: HashSet<&str> = results.iter().map(|r| r.task_id.as_str()).collect();
    assert_eq!(ids.len() as u64, tasks, "no task twice");
    assert!(results.iter().all(|r| r.status == Status::Ok));
}

/// Unacked deliveries on the channels of connections from `addr`, and how many channels.
fn unacked_from(node: &Node, addr: &str) -> (usize, u64) {
    let listing = node
        .ctl(&[
            "list_channels",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .expect("listing channels");
    let prefix = format!("{addr}:");
    let mut channels = 0;
    let mut unacked = 0;
    for line in listing.lines().filter(|l| l.starts_with(&prefix)) {
        channels += 1;
        unacked += line
            .rsplit('\t')
            .next()
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("a count");
    }
    (channels, unacked)
}

#[test]
fn across_hosts_nothing_is_lost_and_an_unplugged_worker_host_hands_its_tasks_over() {
    let net = Network::new(&["broker", "worker-1", "worker-2", "master"]);
    let (broker, master) = (net.host("broker"), net.host("master"));
    let workers = [net.host("worker-1"), net.host("worker-2")];
    let scratch =
        std::env::temp_dir().join(format!("fleet-multihost-{}", uuid::Uuid::new_v4().simple()));
    let etc = Etc {
        dir: scratch.join("etc/fleet"),
        credentials: scratch.join("credentials"),
    };
    let logs = scratch.join("logs");
    std::fs::create_dir_all(&logs).expect("a log directory");
    eprintln!(
        "service logs in {} (kept if the test fails)",
        logs.display()
    );

    // The operator's steps (docs/DEPLOY.md): users and passwords, then the broker loads them.
    let made = std::process::Command::new(binary("fleet-producer"))
        .args(["definitions", "--out"])
        .arg(&etc.dir)
        .env_clear()
        .status()
        .expect("running fleet-producer definitions");
    assert!(made.success());
    let definitions = etc.dir.join("definitions.json");
    let node = Node::start_on(broker, |dir, _| {
        std::fs::copy(&definitions, dir.join("definitions.json")).expect("copying definitions");
        format!(
            "load_definitions = {}\n",
            dir.join("definitions.json").display()
        )
    });
    let collector_listen = format!("{}:8081", master.addr);
    std::fs::write(
        etc.dir.join("fleet.env"),
        format!(
            "# /etc/fleet/fleet.env on every host of this test\n\
             FLEET_AMQP__URL=amqp://{broker}/fleet\n\
             FLEET_AMQP__HEARTBEAT_SECS={HEARTBEAT_SECS}\n\
             FLEET_AMQP__CONNECT_TIMEOUT_SECS=2\n\
             FLEET_CONSUMER__WORKERS=2\n\
             FLEET_CONSUMER__IO_CONCURRENCY=8\n\
             FLEET_COLLECTOR__DB={db}\n\
             FLEET_COLLECTOR__LISTEN={collector_listen}\n\
             FLEET_PRODUCER__COLLECTOR_URL=http://{collector_listen}\n",
            broker = node.host(),
            db = scratch.join("results.db").display(),
        ),
    )
    .expect("writing fleet.env");

    // `fleet-producer setup` as fleet-admin declares the topology, from the master host.
    let admin = master
        .command(binary("fleet-producer"))
        .arg("setup")
        .env_clear()
        .env("FLEET_AMQP__URL", format!("amqp://{}/fleet", node.host()))
        .env("FLEET_AMQP__USER", "fleet-admin")
        .env(
            "FLEET_AMQP__PASSWORD_FILE",
            etc.dir.join("fleet-admin.password"),
        )
        .status()
        .expect("running fleet-producer setup");
    assert!(admin.success(), "setup as fleet-admin");

    let collector = Process::spawn_command(
        "fleet-collector",
        master.command(binary("fleet-collector")),
        &etc.unit_environment("fleet-collector.service", "", master),
        &logs.join("master-collector.log"),
    );
    let mut consumers: Vec<Process> = workers
        .iter()
        .map(|host| {
            Process::spawn_command(
                "fleet-consumer",
                host.command(binary("fleet-consumer")),
                &etc.unit_environment("fleet-consumer@.service", "8082", host),
                &logs.join(format!("{}-consumer.log", host.name)),
            )
        })
        .collect();
    let collector_api = Collector {
        master,
        base: format!("http://{collector_listen}"),
    };
    let submit = |tasks: usize| -> String {
        let input = scratch.join(format!("tasks-{tasks}.jsonl"));
        std::fs::write(&input, "{\"ms\":10}\n".repeat(tasks)).expect("writing tasks");
        let output = master
            .command(binary("fleet-producer"))
            .args(["submit", "sleep", "--input"])
            .arg(&input)
            .env_clear()
            .envs(etc.unit_environment("fleet-producer.service", "", master))
            .output()
            .expect("running fleet-producer submit");
        assert!(
            output.status.success(),
            "submit: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("UTF-8")
            .trim()
            .to_owned()
    };

    // 20,000 tasks; both worker hosts take part.
    let batch = submit(20_000);
    let both = wait_for(
        "results from both worker hosts",
        Duration::from_secs(120),
        || {
            let results = collector_api.results(&batch);
            let hosts = by_host(&results);
            (results.len() >= 2_000 && hosts.len() == 2).then_some(hosts)
        },
    );
    eprintln!("before the cut: {both:?}");

    // Pull worker-1's cable while it holds unacked tasks.
    let cut_host = &workers[0].addr.to_string();
    let (channels, unacked) = unacked_from(&node, cut_host);
    assert!(
        channels > 0 && unacked > 0,
        "worker-1 holds unacked tasks before the cut ({channels} channels, {unacked} unacked)"
    );
    let unplugged = Instant::now();
    net.unplug("worker-1");
    // Taken once `ip` has returned: from here on nothing leaves worker-1. (A result finished
    // while `ip` ran may still have got out.)
    let unplugged_at = chrono::Utc::now();
    wait_for(
        "the broker to drop worker-1's connection",
        Duration::from_secs(HEARTBEAT_SECS * 10),
        || (unacked_from(&node, cut_host).0 == 0).then_some(()),
    );
    eprintln!(
        "the broker dropped worker-1 after {:?} (heartbeat {HEARTBEAT_SECS} s); it held {unacked} unacked",
        unplugged.elapsed()
    );

    // The batch completes with worker-1 still unplugged, so worker-2 ran what worker-1 held.
    let status = collector_api.complete(&batch, Duration::from_secs(240));
    let results = collector_api.results(&batch);
    assert_all_done_once(&status, &results, 20_000);
    let hosts = by_host(&results);
    assert_eq!(
        hosts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["worker-1", "worker-2"]
    );
    let late: Vec<&TaskResult> = results
        .iter()
        .filter(|r| host_of(r) == "worker-1" && r.finished_at >= unplugged_at)
        .collect();
    assert!(
        late.is_empty(),
        "no result worker-1 finished after its cable was out can have arrived: {late:?}"
    );
    eprintln!("20,000 tasks: {hosts:?}, duplicates {}", status.duplicates);

    // Cable back in: worker-1 connects again by itself and takes work again.
    net.plug("worker-1");
    let back = Instant::now();
    wait_for("worker-1 to connect again", Duration::from_secs(60), || {
        (unacked_from(&node, cut_host).0 > 0).then_some(())
    });
    eprintln!(
        "worker-1 consuming again {:?} after the cable returned",
        back.elapsed()
    );
    let batch = submit(4_000);
    let status = collector_api.complete(&batch, Duration::from_secs(120));
    let results = collector_api.results(&batch);
    assert_all_done_once(&status, &results, 4_000);
    let hosts = by_host(&results);
    assert!(
        hosts.get("worker-1").copied().unwrap_or(0) > 0,
        "worker-1 works again: {hosts:?}"
    );
    eprintln!("after the cable returned: {hosts:?}");

    for consumer in consumers.drain(..) {
        assert!(consumer.terminate(Duration::from_secs(40)).success());
    }
    assert!(collector.terminate(Duration::from_secs(20)).success());
    drop(node);
    drop(net);
    let _ = std::fs::remove_dir_all(&scratch);
}
