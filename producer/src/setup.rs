//! `fleet-producer setup`: the admin step that declares the whole topology, so that the
//! services' own broker users need no configure permission.

use anyhow::Context as _;
use fleet_shared::settings::Settings;
use fleet_shared::{amqp, topology};

/// Declares every exchange, queue and binding (with the retry delays of every kind in
/// `settings`), and prints what it had to change in a topology an earlier fleet declared. Safe
/// to run again.
///
/// Fails when the broker cannot be reached, refuses us, or refuses a declaration (this user may
/// not configure, or a queue exists with other arguments).
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let connection = amqp::connect(&settings, "fleet-producer-setup").await?;
    let upgrades = topology::declare(&connection, &settings, topology::Migrate::WhenEmpty)
        .await
        .context("declaring the topology (this needs a user that may configure fleet's names)")?;
    let _ = connection.close(200, "set up".into()).await;
    for upgrade in &upgrades {
        println!("{upgrade}");
    }
    let topology = topology::Topology::of(&settings);
    let names = |names: Vec<&str>| names.join(", ");
    println!(
        "topology declared: exchanges {}; queues {}",
        names(topology.exchanges.iter().map(|e| e.name.as_str()).collect()),
        names(topology.queues.iter().map(|q| q.name.as_str()).collect()),
    );
    Ok(())
}
