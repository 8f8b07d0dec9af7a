//! `fleet-producer`: submit tasks (`submit`), serve the HTTP API (`serve`), run the seed's
//! master demo (`demo`), list, replay and purge dead letters (`dlq`), show every queue
//! (`status`), or check a service's health endpoint (`probe`). Settings from `--config PATH` / `FLEET_CONFIG` and `FLEET_*` variables.

use clap::{Parser, Subcommand};
use fleet_producer::dlq;
use fleet_producer::submit::Submission;
use fleet_shared::settings::Settings;
use std::path::PathBuf;
use std::process::ExitCode;

/// The master side of fleet: publish tasks to the broker.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Settings file (TOML); also `FLEET_CONFIG`.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish one batch: one task per JSON line of INPUT; prints the batch id.
    Submit {
        /// Task kind (routing key), e.g. `square`: 1 to 255 bytes, no control characters.
        #[arg(value_parser = name_arg)]
        kind: String,
        /// JSON lines, one payload per line; `-` for stdin.
        #[arg(long)]
        input: PathBuf,
        /// Wait for every result with a progress bar; exit 4 if any task failed.
        #[arg(long)]
        wait: bool,
        /// Write the results as JSON lines to this file (waits).
        #[arg(long)]
        output: Option<PathBuf>,
        /// The collector's read API [default: producer.collector_url].
        #[arg(long)]
        collector: Option<String>,
        /// Publish under this batch id (at most 234 bytes), the tasks taking the ids
        /// `<ID>-1`, `<ID>-2`, ... in input order: running the same submit again after a failure
        /// sends the same tasks, and the batch completes with each stored once. Default: a new
        /// UUIDv7, with a new UUIDv7 per task.
        #[arg(long, value_parser = batch_arg)]
        batch: Option<String>,
    },
    /// Serve the HTTP API on producer.listen.
    Serve,
    /// The seed's task_master.py: ten random `square` tasks, results printed as they arrive.
    Demo,
    /// Declare every exchange and queue (an admin step; services then need no configure right).
    Setup,
    /// Write RabbitMQ definitions (vhost `fleet`, a user per role, fresh hashed passwords) and a
    /// password file per user into DIR.
    Definitions {
        /// Where to write them.
        #[arg(long)]
        out: PathBuf,
        /// Do nothing (and succeed) when DIR already holds definitions.
        #[arg(long)]
        if_missing: bool,
        /// A folder per reader: DIR/broker/definitions.json and DIR/<role>/fleet-<role>.password,
        /// each ready to be a volume of its own (docker compose).
        #[arg(long)]
        split: bool,
    },
    /// Dead letters in fleet.dead: list, replay or purge them.
    Dlq {
        #[command(subcommand)]
        command: Dlq,
    },
    /// Every queue's ready, unacked and consumer counts, over AMQP (no management plugin);
    /// unacked counts need the admin user.
    Status {
        /// Redraw every 2 s until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// One JSON object per reading instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// GET URL and exit 0 if it answers 2xx, 1 otherwise: a container healthcheck (the image has
    /// no curl), e.g. `fleet-producer probe http://127.0.0.1:8082/readyz`.
    Probe {
        /// What to ask, e.g. a service's `/readyz`.
        url: String,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// Show every dead message (id, kind, attempts, when, reason) without removing any.
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead tasks back to fleet.tasks with attempts reset, then remove them.
    Replay {
        /// The task id to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every dead message.
        #[arg(long)]
        all: bool,
    },
    /// Remove dead messages for good.
    Purge {
        /// The task id to remove.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Remove every dead message.
        #[arg(long)]
        all: bool,
    },
}

/// A kind as an argument: within the bound of a name, else clap's usage error (exit 2).
fn name_arg(value: &str) -> Result<String, String> {
    fleet_shared::envelope::check_name("kind", value)
        .map(|()| value.to_owned())
        .map_err(|e| e.to_string())
}

fn batch_arg(value: &str) -> Result<String, String> {
    use fleet_producer::submit::MAX_GIVEN_BATCH_BYTES;
    fleet_shared::envelope::check_name("batch", value).map_err(|e| e.to_string())?;
    if value.len() > MAX_GIVEN_BATCH_BYTES {
        return Err(format!(
            "is {} bytes; the most is {MAX_GIVEN_BATCH_BYTES} (its task ids add a number)",
            value.len()
        ));
    }
    Ok(value.to_owned())
}

fn select(id: Option<String>) -> dlq::Select {
    id.map_or(dlq::Select::All, dlq::Select::Id)
}

async fn run_dlq(settings: Settings, command: Dlq) -> anyhow::Result<()> {
    match command {
        Dlq::List { json } => {
            let letters = dlq::list(&settings).await?;
            if json {
                for letter in &letters {
                    println!("{}", serde_json::to_string(letter)?);
                }
            } else {
                print!("{}", dlq::table(&letters));
            }
        }
        Dlq::Replay { id, .. } => {
            let done = dlq::replay(&settings, &select(id)).await?;
            println!("replayed {}", done.replayed);
            if done.kept > 0 {
                eprintln!(
                    "kept {} dead messages that are not tasks (only tasks are replayed; \
                     `dlq purge` removes them)",
                    done.kept
                );
            }
        }
        Dlq::Purge { id, .. } => {
            let n = dlq::purge(&settings, &select(id)).await?;
            println!("purged {n}");
        }
    }
    Ok(())
}

/// `probe`: one GET with a 3 s limit; needs no settings.
fn probe(url: &str) -> ExitCode {
    let answered = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(3))
                    .build()?;
                client.get(url).send().await?.error_for_status()?;
                Ok(())
            })
        });
    match answered {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{url}: {error:#}");
            ExitCode::from(fleet_shared::error::EXIT_RUNTIME)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Probe { url } = &args.command {
        return probe(url);
    }
    let settings = match fleet_shared::cli::load_settings(args.config.as_deref()) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    match args.command {
        Command::Submit {
            kind,
            input,
            wait,
            output,
            collector,
            batch,
        } => {
            let submission = Submission {
                kind,
                input,
                wait,
                output,
                collector: collector.unwrap_or_else(|| settings.producer.collector_url.clone()),
                batch,
            };
            fleet_shared::cli::run_on_one_thread(settings, |s, shutdown| {
                fleet_producer::submit::run(s, submission, shutdown)
            })
        }
        Command::Serve => fleet_shared::cli::run(settings, fleet_producer::api::serve),
        Command::Demo => fleet_shared::cli::run(settings, fleet_producer::demo::run),
        Command::Definitions {
            out,
            if_missing,
            split,
        } => {
            use fleet_producer::definitions::{self, Layout};
            let layout = if split { Layout::Split } else { Layout::Flat };
            match definitions::write(&out, layout, if_missing) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(fleet_shared::error::EXIT_RUNTIME)
                }
            }
        }
        Command::Setup => fleet_shared::cli::run(settings, |s, _| fleet_producer::setup::run(s)),
        Command::Dlq { command } => fleet_shared::cli::run(settings, |s, _| run_dlq(s, command)),
        Command::Status { watch, json } => {
            let output = if json {
                fleet_producer::status::Output::Json
            } else {
                fleet_producer::status::Output::Table
            };
            fleet_shared::cli::run(settings, move |s, shutdown| {
                fleet_producer::status::run(s, output, watch, shutdown)
            })
        }
        Command::Probe { .. } => unreachable!("answered before the settings are loaded"),
    }
}
