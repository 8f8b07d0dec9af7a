//! The soak run of `fleet-bench --soak DURATION [--chaos]`: steady load through the real
//! binaries for a while, optionally killing consumers and cutting connections at random, then a
//! count of what was lost (must be 0) and duplicated, and each process's memory at start and end.
//!
//! Every service and the producer reach the broker through a [`Proxy`], so a cut hits them all.

use crate::process::Process;
use crate::proxy::Proxy;
use crate::{Vhost, broker_host, settings_of};
use anyhow::Context as _;
use fleet_producer::client::CollectorClient;
use fleet_producer::submit::{self, Receipt};
use rand::Rng as _;
use serde_json::json;
use std::time::{Duration, Instant};

/// What the soak run is asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How long the load runs.
    pub duration: Duration,
    /// Tasks per second offered.
    pub rate: u64,
    /// Consumer processes.
    pub consumers: usize,
    /// Kill consumers and cut connections at random.
    pub chaos: bool,
    /// More `FLEET_*` settings for every service.
    pub settings: Vec<(String, String)>,
}

/// What came of it.
#[derive(Debug, Default)]
pub struct Report {
    /// Tasks published (and confirmed).
    pub tasks: u64,
    /// Tasks without a stored result at the end.
    pub lost: u64,
    /// Results stored for a task that already had one (ignored by the collector).
    pub duplicates: u64,
    /// Failed results (there should be none: `square` of a small n cannot fail).
    pub failed: u64,
    /// Consumers killed with SIGKILL (and started again).
    pub kills: u64,
    /// Times every broker connection was cut.
    pub cuts: u64,
    /// RSS in KiB at start (after warm-up) and end: consumers (largest), collector, producer.
    pub rss_kib: [(u64, u64); 3],
    /// From the end of the load until every result was stored.
    pub settle: Duration,
}

fn own_rss_kib() -> u64 {
    crate::process::status_kib("self", "VmRSS")
}

/// Runs the plan on a fresh vhost of the local broker.
///
/// Fails when a service cannot start, a publish fails for good, or results stop arriving for
/// five minutes after the load ends.
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    let vhost = Vhost::new();
    let proxy = Proxy::start(broker_host()).await;
    let url = format!("amqp://guest:guest@{}/{}", proxy.addr, vhost.name);
    let mut extra = vec![
        ("FLEET_AMQP__URL", url.as_str()),
        ("FLEET_AMQP__HEARTBEAT_SECS", "5"),
    ];
    extra.extend(plan.settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let env = vhost.env(&extra);
    let settings = settings_of(&env);
    let collector = Process::spawn("fleet-collector", &[], &env);
    let mut consumers: Vec<Process> = (0..plan.consumers)
        .map(|_| Process::spawn("fleet-consumer", &[], &env))
        .collect();
    let client = CollectorClient::new(&settings.producer.collector_url);
    let mut report = Report::default();
    let mut receipts: Vec<Receipt> = Vec::new();

    let started = Instant::now();
    let mut next_batch = started;
    let mut next_chaos = started + Duration::from_secs(5);
    let mut rss_taken = false;
    let mut n: i64 = 0;
    while started.elapsed() < plan.duration {
        if !rss_taken && started.elapsed() >= Duration::from_secs(10).min(plan.duration / 2) {
            let consumer = consumers.iter().map(Process::rss_kib).max().unwrap_or(0);
            report.rss_kib = [(consumer, 0), (collector.rss_kib(), 0), (own_rss_kib(), 0)];
            rss_taken = true;
        }
        if Instant::now() >= next_batch {
            // One batch a second, published through every cut (unconfirmed ones are resent).
            let payloads = (0..plan.rate)
                .map(|_| {
                    n += 1;
                    json!({ "n": n % 1_000_000 })
                })
                .collect();
            let submit::Batch { receipt, messages } = submit::batch("square", payloads);
            submit::publish_reliably(&settings, "fleet-soak-producer", messages)
                .await
                .context("publishing a soak batch")?;
            report.tasks += plan.rate;
            receipts.push(receipt);
            next_batch += Duration::from_secs(1);
        }
        if plan.chaos && Instant::now() >= next_chaos {
            let mut rng = rand::rng();
            if rng.random_bool(0.5) {
                let victim = rng.random_range(0..consumers.len());
                let killed = consumers.swap_remove(victim);
                tracing::warn!(pid = killed.pid(), "soak: kill -9 of a consumer");
                killed.kill9();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
                consumers.push(Process::spawn("fleet-consumer", &[], &env));
                report.kills += 1;
            } else {
                tracing::warn!("soak: cutting every broker connection");
                proxy.cut();
                report.cuts += 1;
            }
            next_chaos = Instant::now() + Duration::from_millis(rng.random_range(3_000..10_000));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let load_ended = Instant::now();
    let mut open: Vec<&Receipt> = receipts.iter().collect();
    let mut last_progress = Instant::now();
    let mut done_before = 0;
    while !open.is_empty() {
        let mut still = Vec::new();
        let mut done_now = 0;
        for receipt in open {
            match client.batch(&receipt.batch).await.ok().flatten() {
                Some(status) if status.complete => {}
                Some(status) => {
                    done_now += status.done;
                    still.push(receipt);
                }
                None => still.push(receipt),
            }
        }
        open = still;
        if done_now != done_before {
            (done_before, last_progress) = (done_now, Instant::now());
        }
        anyhow::ensure!(
            last_progress.elapsed() < Duration::from_secs(300),
            "no progress for 5 minutes with {} batches open",
            open.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.settle = load_ended.elapsed();

    for receipt in &receipts {
        let status = client
            .batch(&receipt.batch)
            .await?
            .context("a published batch the collector never saw")?;
        let total = receipt.task_ids.len() as u64;
        report.lost += total.saturating_sub(status.done);
        report.duplicates += status.duplicates;
        report.failed += status.failed;
    }
    let consumer = consumers.iter().map(Process::rss_kib).max().unwrap_or(0);
    report.rss_kib[0].1 = consumer;
    report.rss_kib[1].1 = collector.rss_kib();
    report.rss_kib[2].1 = own_rss_kib();
    for consumer in consumers {
        consumer.terminate(Duration::from_secs(60));
    }
    collector.terminate(Duration::from_secs(60));
    Ok(report)
}
