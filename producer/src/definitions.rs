//! `fleet-producer definitions --out DIR`: RabbitMQ definitions for a production fleet: the
//! vhost `fleet`, one user per role with the permissions of [`fleet_shared::roles`], and fresh
//! random passwords, stored in the definitions only as salted SHA-256 hashes (RabbitMQ's
//! `rabbit_password_hashing_sha256`). Each password is written to its own file
//! (`fleet-<role>.password`, mode 0600, in one folder or in a folder per role: [`Layout`]),
//! ready for `FLEET_AMQP__PASSWORD_FILE` or systemd's `LoadCredential=`. Load the definitions with `rabbitmqctl import_definitions` or the
//! `load_definitions` setting.

use anyhow::Context as _;
use base64::Engine as _;
use fleet_shared::roles::{self, Role};
use rand::RngCore as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};

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

/// Where [`write`] puts each file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `DIR/definitions.json` and `DIR/fleet-<role>.password`: one machine holds them all and
    /// hands each role its own file (systemd's `LoadCredential=`, a copy per machine).
    Flat,
    /// `DIR/broker/definitions.json` and `DIR/<role>/fleet-<role>.password`: one folder per
    /// reader, so each can be a volume of its own and a container mounts only its role's
    /// (docker compose).
    Split,
}

impl Layout {
    /// The definitions file under `dir`.
    pub fn definitions(self, dir: &Path) -> PathBuf {
        match self {
            Self::Flat => dir.join("definitions.json"),
            Self::Split => dir.join("broker").join("definitions.json"),
        }
    }

    /// The password file of `role` under `dir`.
    pub fn password(self, dir: &Path, role: &Role) -> PathBuf {
        let file = format!("{}.password", user_name(role));
        match self {
            Self::Flat => dir.join(file),
            Self::Split => dir.join(role.name).join(file),
        }
    }
}

/// A new file at `path` with `mode`. Whatever was there goes first (a file left by an interrupted
/// run, or a symlink): opening it would keep its mode, or follow the link.
fn fresh_file(path: &Path, mode: u32) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()));
        }
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the definitions and one password file per role (mode 0600) under `dir` as `layout`
/// says, creating the folders that are missing. The definitions are written last, so they exist
/// only once every password does. An existing definitions file is never overwritten: with
/// `if_missing` that is success (a compose start after the first), otherwise an error.
///
/// Fails when a file cannot be written.
pub fn write(dir: &Path, layout: Layout, if_missing: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::DirBuilderExt as _;
    let target = layout.definitions(dir);
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
    let create_parent = |path: &Path, mode: u32| -> anyhow::Result<()> {
        let parent = path.parent().expect("a file under dir has a parent");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))
    };
    for (role, password) in &passwords {
        let path = layout.password(dir, role);
        create_parent(&path, 0o700)?;
        let mut file = fresh_file(&path, 0o600)?;
        writeln!(file, "{password}").with_context(|| format!("writing {}", path.display()))?;
    }
    let text = serde_json::to_string_pretty(&definitions(&passwords))?;
    // The definitions hold only salted hashes; the broker reads them as a user of its own.
    create_parent(&target, 0o755)?;
    fresh_file(&target, 0o644)?
        .write_all((text + "\n").as_bytes())
        .with_context(|| format!("writing {}", target.display()))?;
    println!(
        "wrote {} and a password file per user ({}) under {}",
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
    fn the_split_layout_gives_each_reader_a_folder_of_its_own() {
        let dir = std::env::temp_dir().join(format!("fleet-definitions-{}", std::process::id()));
        write(&dir, Layout::Split, false).expect("write");
        let mut found: Vec<String> = Vec::new();
        for folder in std::fs::read_dir(&dir).expect("dir") {
            let folder = folder.expect("entry").path();
            for file in std::fs::read_dir(&folder).expect("folder") {
                let file = file.expect("entry").path();
                let name = |p: &Path| p.file_name().expect("name").to_string_lossy().into_owned();
                found.push(format!("{}/{}", name(&folder), name(&file)));
            }
        }
        found.sort();
        assert_eq!(
            found,
            [
                "admin/fleet-admin.password",
                "broker/definitions.json",
                "collector/fleet-collector.password",
                "consumer/fleet-consumer.password",
                "producer/fleet-producer.password",
            ]
        );
        write(&dir, Layout::Split, true).expect("a second start keeps them");
        // An interrupted run's leftovers: a readable password file and a symlink.
        let flat = dir.join("flat");
        std::fs::create_dir_all(&flat).expect("dir");
        let elsewhere = dir.join("elsewhere");
        std::fs::write(flat.join("fleet-admin.password"), "old\n").expect("old");
        std::os::unix::fs::symlink(&elsewhere, flat.join("fleet-producer.password")).expect("link");
        write(&flat, Layout::Flat, false).expect("write over leftovers");
        use std::os::unix::fs::PermissionsExt as _;
        for role in ["admin", "producer"] {
            let path = flat.join(format!("fleet-{role}.password"));
            let meta = std::fs::symlink_metadata(&path).expect("written");
            assert!(meta.is_file(), "a file, not a link");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        assert!(!elsewhere.exists(), "the link was not followed");
        assert!(
            write(&dir, Layout::Split, false).is_err(),
            "never overwritten"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

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
