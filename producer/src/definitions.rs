//! `fleet-producer definitions --out DIR`: RabbitMQ definitions for a production fleet: the
//! vhost `fleet`, one user per role with the permissions of [`fleet_shared::roles`], and fresh
//! random passwords, stored in the definitions only as salted SHA-256 hashes (RabbitMQ's
//! `rabbit_password_hashing_sha256`). Each password is written to its own file
//! (`DIR/fleet-<role>.password`, mode 0600), ready for `FLEET_AMQP__PASSWORD_FILE` or systemd's
//! `LoadCredential=`. Load the definitions with `rabbitmqctl import_definitions` or the
//! `load_definitions` setting.

use anyhow::Context as _;
use base64::Engine as _;
use fleet_shared::roles::{self, Role};
use rand::RngCore as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::path::Path;

/// The vhost the definitions create.
pub const VHOST: &str = "fleet";

/// The user name of `role`.
pub fn user_name(role: &Role) -> String {
    format!("fleet-{}", role.name)
}

/// RabbitMQ's salted SHA-256 password hash: base64(salt ++ sha256(salt ++ password)).
pub fn password_hash(password: &str, salt: [u8; 4]) -> String {
    let digest = Sha256::new()
        .chain_update(salt)
        .chain_update(password.as_bytes())
        .finalize();
    let mut salted = salt.to_vec();
    salted.extend_from_slice(&digest);
    base64::engine::general_purpose::STANDARD.encode(salted)
}

/// The definitions for `passwords` (one per role, in [`roles::ALL`] order).
pub fn definitions(passwords: &[(Role, String)]) -> Value {
    let mut rng = rand::rng();
    let users: Vec<Value> = passwords
        .iter()
        .map(|(role, password)| {
            let mut salt = [0u8; 4];
            rng.fill_bytes(&mut salt);
            json!({
                "name": user_name(role),
                "password_hash": password_hash(password, salt),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": if role.name == roles::ADMIN.name { "management" } else { "" },
                "limits": {}
            })
        })
        .collect();
    let permissions: Vec<Value> = passwords
        .iter()
        .map(|(role, _)| {
            json!({
                "user": user_name(role),
                "vhost": VHOST,
                "configure": role.configure,
                "write": role.write,
                "read": role.read
            })
        })
        .collect();
    json!({
        "rabbit_version": "3.10.8",
        "users": users,
        "vhosts": [{ "name": VHOST }],
        "permissions": permissions
    })
}

/// Writes `definitions.json` and one password file per role into `dir` (created if needed).
/// An existing `definitions.json` is never overwritten: with `if_missing` that is success (a
/// compose start after the first), otherwise an error.
///
/// Fails when `dir` cannot be written.
pub fn write(dir: &Path, if_missing: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join("definitions.json");
    if if_missing && target.exists() {
        println!("{} exists; kept", target.display());
        return Ok(());
    }
    anyhow::ensure!(
        !target.exists(),
        "{} exists; remove it first (its users would get new passwords)",
        target.display()
    );
    let mut rng = rand::rng();
    let passwords: Vec<(Role, String)> = roles::ALL
        .iter()
        .map(|role| {
            let mut secret = [0u8; 24];
            rng.fill_bytes(&mut secret);
            (
                *role,
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
            )
        })
        .collect();
    for (role, password) in &passwords {
        let path = dir.join(format!("{}.password", user_name(role)));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(file, "{password}").with_context(|| format!("writing {}", path.display()))?;
    }
    let text = serde_json::to_string_pretty(&definitions(&passwords))?;
    std::fs::write(&target, text + "\n")
        .with_context(|| format!("writing {}", target.display()))?;
    println!(
        "wrote {} and a password file per user ({}) in {}",
        target.display(),
        roles::ALL
            .iter()
            .map(user_name)
            .collect::<Vec<_>>()
            .join(", "),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_rabbitmqs_salted_sha256() {
        // RabbitMQ's own example (rabbitmq.com/docs/passwords): salt 908D C60A, password "test12".
        let salt = [0x90, 0x8D, 0xC6, 0x0A];
        assert_eq!(
            password_hash("test12", salt),
            "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
        );
    }
}
