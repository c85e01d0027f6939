//! Per-vhost user permissions with RabbitMQ's semantics: three regular expressions
//! (configure, write, read) matched against resource names.
//!
//! RabbitMQ's rules, kept here so every front-end asks the same question:
//! - the regexes are *unanchored* (`re:run/3`): `"^foo"` must be written to anchor;
//! - an empty regex grants nothing (RabbitMQ special-cases `<<"">>`);
//! - the default exchange `""` is checked under the name `amq.default`;
//! - a user without a permission record on a vhost cannot open a connection to it.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, ErrorKind};

/// Which of the three permissions an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Declare and delete (queue.declare, exchange.declare, *.delete).
    Configure,
    /// Publish to an exchange, bind a queue (write on the queue side).
    Write,
    /// Consume, get, purge; the source exchange of a binding.
    Read,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// The kind of resource a check is about (RabbitMQ's `#resource.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Queue,
    Exchange,
    /// An MQTT/STOMP topic: checked against the exchange's permissions by front-ends
    /// until topic permissions exist.
    Topic,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Queue => "queue",
            ResourceKind::Exchange => "exchange",
            ResourceKind::Topic => "topic",
        }
    }
}

/// A stored permission, in the field names of RabbitMQ's definitions file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionRecord {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// A permission with its regexes compiled once (checks run on every publish).
#[derive(Debug, Clone)]
pub struct CompiledPermission {
    pub record: PermissionRecord,
    configure: Option<Regex>,
    write: Option<Regex>,
    read: Option<Regex>,
}

/// A permission regex that does not compile.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid {which} regex '{pattern}': {reason}")]
pub struct BadPermission {
    pub which: &'static str,
    pub pattern: String,
    pub reason: String,
}

impl From<BadPermission> for CoreError {
    fn from(e: BadPermission) -> Self {
        CoreError::precondition(e.to_string())
    }
}

fn compile(which: &'static str, pattern: &str) -> Result<Option<Regex>, BadPermission> {
    if pattern.is_empty() {
        return Ok(None);
    }
    Regex::new(pattern).map(Some).map_err(|e| BadPermission {
        which,
        pattern: pattern.into(),
        reason: e.to_string(),
    })
}

impl CompiledPermission {
    pub fn new(record: PermissionRecord) -> Result<Self, BadPermission> {
        Ok(Self {
            configure: compile("configure", &record.configure)?,
            write: compile("write", &record.write)?,
            read: compile("read", &record.read)?,
            record,
        })
    }

    /// Whether `access` to a resource called `name` is granted.
    pub fn allows(&self, access: Access, name: &str) -> bool {
        let re = match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        };
        re.as_ref().is_some_and(|r| r.is_match(name))
    }
}

/// The name RabbitMQ checks permissions under (the default exchange is `amq.default`).
pub fn resource_name(kind: ResourceKind, name: &str) -> &str {
    if kind == ResourceKind::Exchange && name.is_empty() {
        "amq.default"
    } else {
        name
    }
}

/// RabbitMQ's 403 for a refused resource: `ACCESS_REFUSED - access to exchange
/// 'amq.default' in vhost '/' refused for user 'u'` (checked against RabbitMQ 3.10: the text
/// does not say which of the three permissions was missing).
pub fn refused(
    _access: Access,
    kind: ResourceKind,
    name: &str,
    vhost: &str,
    user: &str,
) -> CoreError {
    CoreError::new(
        ErrorKind::AccessRefused,
        format!(
            "access to {} '{}' in vhost '{}' refused for user '{}'",
            kind.as_str(),
            resource_name(kind, name),
            vhost,
            user
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(c: &str, w: &str, r: &str) -> CompiledPermission {
        CompiledPermission::new(PermissionRecord {
            user: "u".into(),
            vhost: "/".into(),
            configure: c.into(),
            write: w.into(),
            read: r.into(),
        })
        .expect("valid")
    }

    #[test]
    fn rabbitmq_semantics() {
        let p = perm(".*", "^app\\.", "");
        assert!(p.allows(Access::Configure, "anything"));
        assert!(p.allows(Access::Write, "app.x"));
        assert!(!p.allows(Access::Write, "x.app.y"));
        // Empty grants nothing, not even the empty name.
        assert!(!p.allows(Access::Read, ""));
        // Unanchored, as re:run.
        let p = perm("foo", "foo", "foo");
        assert!(p.allows(Access::Read, "xfooy"));
    }

    #[test]
    fn default_exchange_is_amq_default() {
        let e = refused(Access::Write, ResourceKind::Exchange, "", "/", "bob");
        assert_eq!(
            e.to_string(),
            "ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' refused for user 'bob'"
        );
    }

    #[test]
    fn bad_regex_is_refused() {
        assert!(CompiledPermission::new(PermissionRecord {
            user: "u".into(),
            vhost: "/".into(),
            configure: "(".into(),
            write: String::new(),
            read: String::new(),
        })
        .is_err());
    }
}
