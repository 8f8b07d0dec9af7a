//! The shipped binaries: exit codes of DESIGN.md and passwords kept out of argv and output.

use fleet_tests::{Vhost, require_broker};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A workspace binary next to this test's executable (built by `cargo build --workspace`).
fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` first (scripts/test does)",
        path.display()
    );
    path
}

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

#[test]
fn a_refused_password_exits_3_quickly_naming_broker_and_user_but_not_the_password() {
    require_broker();
    let vhost = Vhost::new();
    let secret = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    let password_file = vhost.dir.join("password");
    std::fs::write(&password_file, format!("{secret}\n")).expect("writing the password file");
    let url = format!("amqp://guest@{}/{}", fleet_tests::broker_host(), vhost.name);
    for (name, args) in [
        ("fleet-consumer", &[][..]),
        ("fleet-collector", &[][..]),
        ("fleet-producer", &["demo"][..]),
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
            "{name} took {:?}",
            started.elapsed()
        );
        assert_eq!(
            output.status.code(),
            Some(3),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(all.contains("refused user `guest`"), "{name}: {all}");
        assert!(all.contains(&fleet_tests::broker_host()), "{name}: {all}");
        assert!(!all.contains(&secret), "{name} printed the password");
    }
}
