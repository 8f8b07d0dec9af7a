//! `fleet-bench`: the real fleet (producer, one consumer process with default workers, collector)
//! against the local broker, and in the same run a plain lapin pipeline as the baseline.
//!
//! Both sides use persistent messages on quorum queues, up to 1,024 confirms outstanding when
//! publishing tasks, one confirmed result publish per task and one ack per message. The last
//! line printed is:
//! `fleet-bench tasks=N fleet_tps=X baseline_tps=Y ratio=R p50_ms=A p99_ms=B client_cpu_us_per_task=C`
//! Latency is submit to stored, measured from each task id's UUIDv7 timestamp (millisecond
//! precision) to the collector's commit time. Build the binaries in release mode first
//! (`make bench` does).

use anyhow::{Context as _, bail};
use clap::Parser;
use fleet_producer::client::CollectorClient;
use fleet_producer::collector::store::Store;
use fleet_shared::settings::Settings;
use fleet_tests::Vhost;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Benchmark the fleet against a plain lapin pipeline.
#[derive(Parser)]
struct Args {
    /// `square` tasks per side.
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Prefetch of the baseline's consumer [default: the fleet consumer's, workers x 4].
    #[arg(long)]
    baseline_prefetch: Option<u16>,
    /// Instead of the comparison, soak: steady load for this long (e.g. `5m`), then count
    /// lost and duplicated results and report each process's RSS at start and end.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// With --soak: kill -9 a consumer (and start it again) or cut every broker connection,
    /// at random every 3 to 10 seconds.
    #[arg(long, requires = "soak")]
    chaos: bool,
    /// With --soak: tasks per second offered.
    #[arg(long, default_value_t = 500, requires = "soak")]
    rate: u64,
    /// With --soak: consumer processes.
    #[arg(long, default_value_t = 2, requires = "soak")]
    consumers: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.soak {
        Some(duration) => runtime.block_on(soak(fleet_tests::soak::Plan {
            duration,
            rate: args.rate,
            consumers: args.consumers,
            chaos: args.chaos,
        })),
        None => runtime.block_on(bench(args)),
    }
}

async fn soak(plan: fleet_tests::soak::Plan) -> anyhow::Result<()> {
    let r = fleet_tests::soak::run(plan).await?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "fleet-soak duration_s={} chaos={} rate={} tasks={} lost={} duplicates={} failed={} kills={} cuts={} settle_s={:.1} rss_mib consumer={:.1}->{:.1} collector={:.1}->{:.1} producer={:.1}->{:.1}",
        plan.duration.as_secs(),
        plan.chaos,
        plan.rate,
        r.tasks,
        r.lost,
        r.duplicates,
        r.failed,
        r.kills,
        r.cuts,
        r.settle.as_secs_f64(),
        mib(r.rss_kib[0].0),
        mib(r.rss_kib[0].1),
        mib(r.rss_kib[1].0),
        mib(r.rss_kib[1].1),
        mib(r.rss_kib[2].0),
        mib(r.rss_kib[2].1),
    );
    if r.lost > 0 {
        bail!("{} tasks lost", r.lost);
    }
    Ok(())
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let prefetch = args
        .baseline_prefetch
        .unwrap_or_else(|| settings.prefetch());
    let baseline = baseline(&settings, args.tasks, prefetch)
        .await
        .context("baseline")?;
    println!(
        "baseline: {} tasks in {:.2}s = {:.0} tasks/s",
        args.tasks,
        baseline.as_secs_f64(),
        rate(args.tasks, baseline)
    );
    let fleet = fleet(&vhost, &settings, args.tasks)
        .await
        .context("fleet")?;
    println!(
        "fleet: {} tasks in {:.2}s = {:.0} tasks/s; CPU us/task producer {:.1} consumer {:.1} collector {:.1}",
        args.tasks,
        fleet.elapsed.as_secs_f64(),
        rate(args.tasks, fleet.elapsed),
        fleet.cpu_us[0] / args.tasks as f64,
        fleet.cpu_us[1] / args.tasks as f64,
        fleet.cpu_us[2] / args.tasks as f64,
    );
    let (fleet_tps, baseline_tps) = (rate(args.tasks, fleet.elapsed), rate(args.tasks, baseline));
    println!(
        "fleet-bench tasks={} fleet_tps={:.0} baseline_tps={:.0} ratio={:.2} p50_ms={:.1} p99_ms={:.1} client_cpu_us_per_task={:.1}",
        args.tasks,
        fleet_tps,
        baseline_tps,
        fleet_tps / baseline_tps,
        fleet.p50_ms,
        fleet.p99_ms,
        fleet.cpu_us.iter().sum::<f64>() / args.tasks as f64,
    );
    Ok(())
}

fn rate(tasks: u64, elapsed: Duration) -> f64 {
    tasks as f64 / elapsed.as_secs_f64()
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Plain lapin: publish N persistent tasks with <= 1024 confirms outstanding; a consumer
/// publishes one confirmed result per task, then acks; a result reader acks each result.
async fn baseline(settings: &Settings, tasks: u64, prefetch: u16) -> anyhow::Result<Duration> {
    let url = settings.amqp_uri()?.to_string();
    let connect = || Connection::connect(&url, ConnectionProperties::default());
    let (producer, worker, reader) = (connect().await?, connect().await?, connect().await?);
    let setup = producer.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for queue in ["bench.tasks", "bench.results"] {
        setup.queue_declare(queue.into(), durable, quorum()).await?;
    }
    let persistent = || BasicProperties::default().with_delivery_mode(2);

    let work_in = worker.create_channel().await?;
    work_in
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let work_out = worker.create_channel().await?;
    work_out
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut deliveries = work_in
        .basic_consume(
            "bench.tasks".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let work = tokio::spawn(async move {
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery?;
            let out = work_out.clone();
            tokio::spawn(async move {
                let n: u64 = std::str::from_utf8(&delivery.data)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body = format!("{n} {}", n.wrapping_mul(n));
                let confirm = out
                    .basic_publish(
                        "".into(),
                        "bench.results".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await;
                if let Ok(confirm) = confirm
                    && confirm.await.is_ok_and(|c| c.is_ack())
                {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            });
        }
        anyhow::Ok(())
    });

    let read = reader.create_channel().await?;
    read.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut results = read
        .basic_consume(
            "bench.results".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let started = Instant::now();
    let publish = producer.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let publishing = tokio::spawn(async move {
        let mut pending = futures_util::stream::FuturesUnordered::new();
        for n in 0..tasks {
            if pending.len() >= 1024 {
                pending.next().await;
            }
            let confirm = publish
                .basic_publish(
                    "".into(),
                    "bench.tasks".into(),
                    BasicPublishOptions::default(),
                    n.to_string().as_bytes(),
                    persistent(),
                )
                .await?;
            pending.push(confirm);
        }
        while pending.next().await.is_some() {}
        anyhow::Ok(())
    });
    let mut seen = 0;
    while seen < tasks {
        let Some(delivery) = tokio::time::timeout(Duration::from_secs(60), results.next()).await?
        else {
            bail!("result stream ended");
        };
        delivery?.ack(BasicAckOptions::default()).await?;
        seen += 1;
    }
    let elapsed = started.elapsed();
    publishing.await??;
    work.abort();
    for queue in ["bench.tasks", "bench.results"] {
        setup
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await?;
    }
    for connection in [producer, worker, reader] {
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(elapsed)
}

struct FleetRun {
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU (user + sys) in microseconds: producer, consumer, collector.
    cpu_us: [f64; 3],
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the workspace binaries first",
        path.display()
    );
    Ok(path)
}

fn spawn(name: &str, args: &[&str], env: &[(String, String)]) -> anyhow::Result<Child> {
    Command::new(sibling(name)?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime (fields 14, 15) or cutime + cstime (16, 17) of /proc/<pid>/stat, in µs.
fn cpu_us(stat: &Path, children: bool) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(stat)?;
    let after_name = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<f64> = after_name
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // after_name starts at field 3 (state), so field k is at index k - 3.
    let (a, b) = if children { (13, 14) } else { (11, 12) };
    Ok(
        (fields.get(a).copied().unwrap_or(0.0) + fields.get(b).copied().unwrap_or(0.0))
            / clock_ticks()
            * 1e6,
    )
}

fn stop(mut child: Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(())
}

async fn fleet(vhost: &Vhost, settings: &Settings, tasks: u64) -> anyhow::Result<FleetRun> {
    let env = vec![
        ("FLEET_AMQP__URL".to_owned(), vhost.url()),
        (
            "FLEET_COLLECTOR__DB".to_owned(),
            settings.collector.db.display().to_string(),
        ),
        (
            "FLEET_COLLECTOR__LISTEN".to_owned(),
            settings.collector.listen.clone(),
        ),
    ];
    let collector = spawn("fleet-collector", &[], &env)?;
    let consumer = spawn("fleet-consumer", &[], &env)?;
    let client = CollectorClient::new(&settings.producer.collector_url);
    let up = Instant::now();
    while client.batch("none").await.is_err() {
        anyhow::ensure!(
            up.elapsed() < Duration::from_secs(20),
            "the collector did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let input = vhost.dir.join("input.jsonl");
    let lines: String = (0..tasks)
        .map(|n| format!("{{\"n\":{}}}\n", n % 3_000_000))
        .collect();
    std::fs::write(&input, lines)?;

    let producer_cpu_before = cpu_us(Path::new("/proc/self/stat"), true)?;
    let started = Instant::now();
    let submitted = Command::new(sibling("fleet-producer")?)
        .args(["submit", "square", "--input"])
        .arg(&input)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .context("running fleet-producer submit")?;
    anyhow::ensure!(
        submitted.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let producer_cpu = cpu_us(Path::new("/proc/self/stat"), true)? - producer_cpu_before;
    let batch = String::from_utf8(submitted.stdout)?.trim().to_owned();
    loop {
        if let Some(status) = client.batch(&batch).await?
            && status.complete
        {
            anyhow::ensure!(
                status.ok == tasks && status.duplicates == 0,
                "unexpected outcome: {status:?}"
            );
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the batch did not complete in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let consumer_cpu = cpu_us(
        &PathBuf::from(format!("/proc/{}/stat", consumer.id())),
        false,
    )?;
    let collector_cpu = cpu_us(
        &PathBuf::from(format!("/proc/{}/stat", collector.id())),
        false,
    )?;
    stop(consumer)?;
    stop(collector)?;

    let store = Store::open(&settings.collector.db)?;
    let mut latencies_ms: Vec<f64> = store
        .stored_times(&batch)?
        .into_iter()
        .filter_map(|(id, stored_us)| {
            let (secs, nanos) = uuid::Uuid::parse_str(&id).ok()?.get_timestamp()?.to_unix();
            let created_us = i64::try_from(secs).ok()? * 1_000_000 + i64::from(nanos / 1000);
            Some((stored_us - created_us) as f64 / 1000.0)
        })
        .collect();
    anyhow::ensure!(latencies_ms.len() as u64 == tasks, "latency for every task");
    latencies_ms.sort_by(f64::total_cmp);
    let at = |q: f64| latencies_ms[((latencies_ms.len() - 1) as f64 * q).round() as usize];
    Ok(FleetRun {
        elapsed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        cpu_us: [producer_cpu, consumer_cpu, collector_cpu],
    })
}
