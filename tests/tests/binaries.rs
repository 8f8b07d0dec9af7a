//! The shipped binaries: exit codes of DESIGN.md and passwords kept out of argv and output.

use fleet_tests::process::binary;
use fleet_tests::{Vhost, require_broker};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary(name))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("running the binary")
}

#[test]
fn a_bad_setting_exits_2_with_a_line_naming_the_key() {
    for (name, args) in [
        ("fleet-consumer", &[][..]),
        ("fleet-collector", &[][..]),
        ("fleet-producer", &["serve"][..]),
    ] {
        let output = run(name, args, &[("FLEET_CONSUMER__WORKERS", "lots")]);
        assert_eq!(output.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{name}: one line: {stderr}");
        assert!(stderr.contains("consumer.workers"), "{name}: {stderr}");
    }
    let output = run(
        "fleet-consumer",
        &[],
        &[("FLEET_AMQP__PASSWORD_FILE", "/nonexistent/pw")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("amqp.password_file"));
    for (key, value, named) in [
        (
            "FLEET_LOG__OTLP_ENDPOINT",
            "collector:4318",
            "log.otlp_endpoint",
        ),
        ("FLEET_CONSUMER__LISTEN", "everywhere", "consumer.listen"),
        ("FLEET_TOPOLOGY__WORK_QUEUES", "0", "topology.work_queues"),
        ("FLEET_TOPOLOGY__WORK_QUEUES", "65", "topology.work_queues"),
        (
            "FLEET_CONSUMER__RESULTS_PER_MESSAGE",
            "0",
            "consumer.results_per_message",
        ),
        (
            "FLEET_CONSUMER__RESULTS_PER_MESSAGE",
            "257",
            "consumer.results_per_message",
        ),
    ] {
        let output = run("fleet-consumer", &[], &[(key, value)]);
        assert_eq!(output.status.code(), Some(2), "{key}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(named),
            "{key}"
        );
    }
}

#[test]
fn submit_with_unreadable_input_exits_2() {
    let output = run(
        "fleet-producer",
        &["submit", "square", "--input", "/nonexistent/input.jsonl"],
        &[],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/input.jsonl"));
}

/// Runs each service as `user` with `password` (from a file) and checks the broker's refusal:
/// exit 3 within 5 seconds, one line naming broker and user, and never the password.
fn assert_refused(vhost: &Vhost, user: &str, password: &str, why: &str) {
    let password_file = vhost.dir.join(format!("password-{user}"));
    fleet_tests::write_secret(&password_file, &format!("{password}\n"));
    let url = format!(
        "amqp://{user}@{}/{}",
        fleet_tests::broker_host(),
        vhost.name
    );
    for (name, args) in [
        ("fleet-consumer", &[][..]),
        ("fleet-collector", &[][..]),
        ("fleet-producer", &["demo"][..]),
        ("fleet-producer", &["dlq", "list"][..]),
    ] {
        let started = Instant::now();
        let output = run(
            name,
            args,
            &[
                ("FLEET_AMQP__URL", url.as_str()),
                (
                    "FLEET_AMQP__PASSWORD_FILE",
                    password_file.to_str().expect("utf-8 path"),
                ),
                (
                    "FLEET_COLLECTOR__DB",
                    vhost.dir.join("r.db").to_str().expect("utf-8 path"),
                ),
                ("FLEET_COLLECTOR__LISTEN", &fleet_tests::free_address()),
            ],
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} {why}: took {:?}",
            started.elapsed()
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(3), "{name} {why}: {all}");
        assert_eq!(
            all.lines().count(),
            1,
            "{name} {why}: one line, no retry storm: {all}"
        );
        assert!(
            all.contains(&format!("refused user `{user}`")),
            "{name} {why}: {all}"
        );
        assert!(
            all.contains(&fleet_tests::broker_host()),
            "{name} {why}: {all}"
        );
        assert!(
            !all.contains(password),
            "{name} {why}: printed the password"
        );
    }
}

#[test]
fn a_refused_login_exits_3_quickly_naming_broker_and_user_but_not_the_password() {
    require_broker();
    let vhost = Vhost::new();
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    assert_refused(&vhost, "guest", &wrong, "with a wrong password");
    let nobody = format!("nobody-{}", uuid::Uuid::new_v4().simple());
    assert_refused(&vhost, &nobody, &wrong, "as an unknown user");
    // A real user with the right password but no permission on the vhost.
    let user = fleet_tests::User::new();
    assert_refused(
        &vhost,
        &user.name,
        &user.password,
        "without vhost permission",
    );
}

fn fleet_env(settings: &fleet_shared::settings::Settings, vhost: &Vhost) -> Vec<(String, String)> {
    vec![
        ("FLEET_AMQP__URL".to_owned(), vhost.url()),
        (
            "FLEET_PRODUCER__COLLECTOR_URL".to_owned(),
            settings.producer.collector_url.clone(),
        ),
    ]
}

async fn run_async(name: &'static str, args: Vec<String>, env: Vec<(String, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(binary(name))
            .args(&args)
            .env_clear()
            .envs(env)
            .output()
            .expect("running the binary")
    })
    .await
    .expect("the blocking task ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_wait_exits_0_when_all_ok_and_4_when_any_failed_and_writes_the_results() {
    let vhost = Vhost::new();
    let settings = vhost.settings(&[]);
    let collector = fleet_tests::Service::collector(&settings);
    let consumer = fleet_tests::Service::builtin_consumer(&settings);
    let input = vhost.dir.join("in.jsonl");
    let output = vhost.dir.join("out.jsonl");
    std::fs::write(&input, "{\"n\": 3}\n\n{\"n\": 4}\n{\"n\": 5}\n").expect("input");
    let args = |file: &std::path::Path, out: &std::path::Path| {
        vec![
            "submit".to_owned(),
            "square".to_owned(),
            "--input".to_owned(),
            file.display().to_string(),
            "--wait".to_owned(),
            "--output".to_owned(),
            out.display().to_string(),
        ]
    };
    let ok = run_async(
        "fleet-producer",
        args(&input, &output),
        fleet_env(&settings, &vhost),
    )
    .await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let batch = String::from_utf8_lossy(&ok.stdout).trim().to_owned();
    assert_eq!(batch.len(), 36, "prints the batch id: {batch}");
    let summary = |output: &Output| {
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .find(|l| l.starts_with("batch "))
            .unwrap_or_default()
            .to_owned()
    };
    let done = summary(&ok);
    assert!(
        done.starts_with(&format!("batch {batch}: 3 ok, 0 failed, 0 duplicates in "))
            && done.ends_with(" tasks/s)"),
        "a final summary with the wall time and rate: {done}"
    );
    let lines = std::fs::read_to_string(&output).expect("results written");
    let mut squares: Vec<i64> = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            assert_eq!(v["batch"], batch.as_str());
            v["output"]["square"].as_i64().expect("square")
        })
        .collect();
    squares.sort_unstable();
    assert_eq!(squares, vec![9, 16, 25]);

    std::fs::write(&input, "{\"n\": 2}\n{\"n\": 4000000000}\n").expect("input");
    let failed = run_async(
        "fleet-producer",
        args(&input, &output),
        fleet_env(&settings, &vhost),
    )
    .await;
    assert_eq!(
        failed.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&output)
            .expect("results")
            .lines()
            .count(),
        2
    );
    let failed_batch = String::from_utf8_lossy(&failed.stdout).trim().to_owned();

    // `fleet-collector watch`: a finished batch at once (exit 4 when a task failed), and a
    // running one until its end.
    let watch = |batch: &str| {
        vec![
            "watch".to_owned(),
            batch.to_owned(),
            "--collector".to_owned(),
            settings.producer.collector_url.clone(),
        ]
    };
    let watched = run_async(
        "fleet-collector",
        watch(&batch),
        fleet_env(&settings, &vhost),
    )
    .await;
    assert_eq!(watched.status.code(), Some(0));
    assert!(summary(&watched).starts_with(&format!("batch {batch}: 3 ok, 0 failed, 0 duplicates")));
    let watched = run_async(
        "fleet-collector",
        watch(&failed_batch),
        fleet_env(&settings, &vhost),
    )
    .await;
    assert_eq!(watched.status.code(), Some(4));
    assert!(summary(&watched).starts_with(&format!("batch {failed_batch}: 1 ok, 1 failed")));
    std::fs::write(&input, "{\"ms\": 1500}\n".repeat(6)).expect("input");
    let submitted = run_async(
        "fleet-producer",
        vec![
            "submit".to_owned(),
            "sleep".to_owned(),
            "--input".to_owned(),
            input.display().to_string(),
        ],
        fleet_env(&settings, &vhost),
    )
    .await;
    assert!(submitted.status.success());
    let running = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    let watched = run_async(
        "fleet-collector",
        watch(&running),
        fleet_env(&settings, &vhost),
    )
    .await;
    assert_eq!(watched.status.code(), Some(0));
    let line = summary(&watched);
    assert!(line.starts_with(&format!("batch {running}: 6 ok, 0 failed")));
    let waited: f64 = line
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|secs| secs.parse().ok())
        .expect("the wall time");
    assert!(waited >= 0.5, "it followed the batch while it ran: {line}");

    let demo = run_async(
        "fleet-producer",
        vec!["demo".to_owned()],
        fleet_env(&settings, &vhost),
    )
    .await;
    assert_eq!(
        demo.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("Put task "))
            .count(),
        10
    );
    let results: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("Result: "))
        .collect();
    assert_eq!(results.len(), 10, "{stdout}");
    for line in results {
        // "Result: 3411 * 3411 = 11634921"
        let numbers: Vec<i64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("number"))
            .collect();
        assert_eq!(numbers.len(), 3, "{line}");
        assert_eq!(numbers[0], numbers[1]);
        assert_eq!(numbers[0] * numbers[0], numbers[2], "{line}");
    }
    assert!(stdout.trim_end().ends_with("master exit."));

    consumer.stop().await.expect("consumer drains");
    collector.stop().await.expect("collector drains");
}
