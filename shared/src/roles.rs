//! The broker permissions of each fleet role on its vhost, checked operation by operation
//! against a real broker in `tests/tests/roles.rs`. RabbitMQ matches each pattern against exchange and
//! queue names: configure = declare or delete, write = publish to an exchange (or bind a queue),
//! read = consume from a queue (or bind from an exchange).
//!
//! Only the admin may configure; nobody else may write `amq.default`, which reaches every queue.

/// One role's permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// Role name, also the default user name (`fleet-<name>`).
    pub name: &'static str,
    /// Configure pattern.
    pub configure: &'static str,
    /// Write pattern.
    pub write: &'static str,
    /// Read pattern.
    pub read: &'static str,
}

/// No resource at all.
pub const NOTHING: &str = "^$";

/// Declares the topology (`fleet-producer setup`) and works the dead letters (`dlq`).
pub const ADMIN: Role = Role {
    name: "admin",
    configure: r"^fleet\..*",
    write: r"^(fleet\..*|amq\.default)$",
    read: r"^fleet\..*",
};

/// Publishes tasks and batch manifests.
pub const PRODUCER: Role = Role {
    name: "producer",
    configure: NOTHING,
    write: r"^fleet\.(tasks(\.[0-9]+)?|batches)$",
    read: NOTHING,
};

/// Takes tasks; publishes results, retries, dead letters and status beats.
pub const CONSUMER: Role = Role {
    name: "consumer",
    configure: NOTHING,
    write: r"^fleet\.(results|retry|dead|status)$",
    read: r"^fleet\.tasks\.default(\.[0-9]+)?$",
};

/// Takes results and manifests; dead-letters undecodable ones; publishes status beats.
pub const COLLECTOR: Role = Role {
    name: "collector",
    configure: NOTHING,
    write: r"^fleet\.(dead|status)$",
    read: r"^fleet\.results$",
};

/// Every role.
pub const ALL: [Role; 4] = [ADMIN, PRODUCER, CONSUMER, COLLECTOR];
