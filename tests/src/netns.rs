//! Hosts of a test's own on this machine, for what crosses a network: one network namespace per
//! host, each joined by a veth pair to a bridge in a switch namespace, all made here and removed
//! on drop. Tests talk only to these namespaces' addresses; the machine's own network is not
//! touched. Needs root and iproute2's `ip`.

use anyhow::Context as _;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The hosts' subnet, a /24 inside the test's namespaces only.
const SUBNET: [u8; 3] = [10, 77, 0];

/// Runs `ip args...`; fails with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (package iproute2)")?;
    anyhow::ensure!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// True when this process runs as root (its real uid, from /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|uids| uids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// One host: a network namespace with `lo` and `eth0` at `addr`.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its name, also the hostname its processes see.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the test network.
    pub addr: Ipv4Addr,
    /// Its cable's port on the switch.
    port: String,
}

impl Host {
    /// A command that runs `program` on this host: in its network namespace, and in a UTS
    /// namespace of its own whose hostname is the host's name (so a worker id says which host
    /// ran a task). `ip netns exec`, `unshare` and `sh` all exec, so the child's pid is
    /// `program`'s and signals reach it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "unshare", "--uts", "--"])
            .args(["sh", "-c", r#"hostname "$1" && shift && exec "$@""#, "sh"])
            .arg(&self.name)
            .arg(program);
        command
    }

    /// Runs `program args...` on this host and returns its stdout.
    ///
    /// Fails when it cannot start or exits non-zero (the error holds its stderr).
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} on {}", self.name))?;
        anyhow::ensure!(
            output.status.success(),
            "{program} {args:?} on {} failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Hosts on one switch; every namespace, and every process left in one, goes on drop.
pub struct Network {
    switch: String,
    hosts: Vec<Host>,
}

impl Network {
    /// Makes a host per name, at 10.77.0.1, .2, ... in the order given, all on one switch.
    ///
    /// # Panics
    /// When not run as root, or `ip` fails (the message says which command).
    pub fn new(names: &[&str]) -> Self {
        assert!(
            is_root(),
            "multi-host tests make network namespaces and need root"
        );
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let mut network = Self {
            switch: format!("fleet-{id}-switch"),
            hosts: Vec::new(),
        };
        network.build(id, names).expect("building the test network");
        network
    }

    fn build(&mut self, id: &str, names: &[&str]) -> anyhow::Result<()> {
        let switch = self.switch.clone();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let netns = format!("fleet-{id}-{name}");
            let port = format!("port{i}");
            let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], u8::try_from(i + 1)?);
            ip(&["netns", "add", &netns])?;
            self.hosts.push(Host {
                name: (*name).to_owned(),
                netns: netns.clone(),
                addr,
                port: port.clone(),
            });
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The host called `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Pulls `name`'s cable: its switch port goes down, and nothing reaches it or leaves it,
    /// with no reset sent either way.
    ///
    /// # Panics
    /// When `ip` fails.
    pub fn unplug(&self, name: &str) {
        let port = &self.host(name).port;
        ip(&["-n", &self.switch, "link", "set", port, "down"]).expect("unplugging");
    }

    /// Plugs `name`'s cable back in.
    ///
    /// # Panics
    /// When `ip` fails.
    pub fn plug(&self, name: &str) {
        let port = &self.host(name).port;
        ip(&["-n", &self.switch, "link", "set", port, "up"]).expect("plugging in");
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let namespaces = self
            .hosts
            .iter()
            .map(|h| h.netns.clone())
            .chain([self.switch.clone()]);
        for netns in namespaces {
            // Whatever still runs there (epmd, a process a failed test left) goes first.
            if let Ok(output) = Command::new("ip").args(["netns", "pids", &netns]).output() {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", &netns]);
        }
    }
}
