//! Topic permissions (RabbitMQ's "topic authorisation"): per user, vhost and exchange a
//! `write` and a `read` regex matched against routing keys, enforced only on topic
//! exchanges.
//!
//! RabbitMQ's rules (`rabbit_auth_backend_internal:check_topic_access/4`), kept here so
//! every front-end asks the same question:
//! - no topic permission for the user and exchange means allowed;
//! - an empty regex is `^$` (only the empty routing key);
//! - `{username}`, `{vhost}` and (MQTT only) `{client_id}` in a regex are replaced by the
//!   raw values before matching (not regex-escaped, as in RabbitMQ);
//! - the regexes are unanchored, as `re:run/3`.
//!
//! `{username}` and `{vhost}` are fixed per record, so they are expanded when the record is
//! set; only a `{client_id}` regex needs compiling per MQTT connection
//! ([`TopicPermissions::for_client`]). Checks on the message path are a hash lookup and a
//! `Regex::is_match`, with no allocation.

use std::collections::HashMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, ErrorKind};
use crate::permissions::{Access, BadPermission};

const CLIENT_ID: &str = "{client_id}";

/// A stored topic permission, in the field names of RabbitMQ's definitions file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPermissionRecord {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

/// One record with both regexes compiled.
#[derive(Debug, Clone)]
struct Compiled {
    record: TopicPermissionRecord,
    /// `None`: the regex does not compile once `{client_id}` is expanded; grants nothing.
    write: Option<Regex>,
    read: Option<Regex>,
    /// Whether a regex names `{client_id}` (then MQTT sessions recompile it).
    per_client: bool,
}

/// `pattern` with RabbitMQ's variables replaced; `client_id: None` leaves `{client_id}` as
/// literal text (PCRE reads an unknown `{…}` literally; Rust's regex wants it escaped).
fn expand(pattern: &str, user: &str, vhost: &str, client_id: Option<&str>) -> String {
    // RabbitMQ: an empty topic regex means `^$`.
    let p = if pattern.is_empty() { "^$" } else { pattern };
    let p = p.replace("{username}", user).replace("{vhost}", vhost);
    match client_id {
        Some(c) => p.replace(CLIENT_ID, c),
        None => p.replace(CLIENT_ID, r"\{client_id\}"),
    }
}

impl Compiled {
    fn new(record: TopicPermissionRecord, client_id: Option<&str>) -> Result<Self, BadPermission> {
        let build = |which: &'static str, pattern: &str| {
            let expanded = expand(pattern, &record.user, &record.vhost, client_id);
            Regex::new(&expanded).map_err(|e| BadPermission {
                which,
                pattern: pattern.to_owned(),
                reason: e.to_string(),
            })
        };
        Ok(Self {
            write: Some(build("write", &record.write)?),
            read: Some(build("read", &record.read)?),
            per_client: record.write.contains(CLIENT_ID) || record.read.contains(CLIENT_ID),
            record,
        })
    }

    fn allows(&self, access: Access, routing_key: &str) -> bool {
        let re = match access {
            Access::Write => &self.write,
            // Configure has no topic form; RabbitMQ only asks read and write.
            Access::Read | Access::Configure => &self.read,
        };
        re.as_ref().is_some_and(|r| r.is_match(routing_key))
    }
}

/// Validates `record`'s regexes as they will be used.
pub fn validate(record: &TopicPermissionRecord) -> Result<(), BadPermission> {
    Compiled::new(record.clone(), None)?;
    Compiled::new(record.clone(), Some("client")).map(|_| ())
}

/// The topic permissions of one user in one vhost, by exchange name.
#[derive(Debug, Clone, Default)]
pub struct TopicPermissions {
    by_exchange: HashMap<String, Compiled>,
}

impl TopicPermissions {
    /// Adds or replaces the record for its exchange.
    pub(crate) fn insert(&mut self, record: TopicPermissionRecord) -> Result<(), BadPermission> {
        let c = Compiled::new(record, None)?;
        self.by_exchange.insert(c.record.exchange.clone(), c);
        Ok(())
    }

    pub(crate) fn remove(&mut self, exchange: &str) -> bool {
        self.by_exchange.remove(exchange).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.by_exchange.is_empty()
    }

    /// Whether a rule exists for `exchange`: front-ends look up the exchange's type only
    /// then, so publishing where no rule applies costs one hash lookup.
    pub fn covers(&self, exchange: &str) -> bool {
        self.by_exchange.contains_key(exchange)
    }

    /// RabbitMQ's answer for `access` with `routing_key` on the *topic* exchange
    /// `exchange` (the caller checks the type): no rule for it = allowed.
    pub fn allows(&self, exchange: &str, access: Access, routing_key: &str) -> bool {
        self.by_exchange
            .get(exchange)
            .is_none_or(|c| c.allows(access, routing_key))
    }

    /// These permissions with `{client_id}` expanded for an MQTT connection. A regex that
    /// no longer compiles grants nothing (logged), as RabbitMQ's `re:run` would fail.
    pub fn for_client(&self, client_id: &str) -> TopicPermissions {
        let mut out = self.clone();
        for c in out.by_exchange.values_mut().filter(|c| c.per_client) {
            match Compiled::new(c.record.clone(), Some(client_id)) {
                Ok(n) => *c = n,
                Err(e) => {
                    tracing::warn!(client_id, error = %e, "topic permission regex unusable for this client; refusing");
                    c.write = None;
                    c.read = None;
                }
            }
        }
        out
    }

    /// Whether any regex names `{client_id}`.
    pub fn per_client(&self) -> bool {
        self.by_exchange.values().any(|c| c.per_client)
    }

    pub fn records(&self) -> impl Iterator<Item = &TopicPermissionRecord> {
        self.by_exchange.values().map(|c| &c.record)
    }
}

/// RabbitMQ's 403 for a refused topic: `ACCESS_REFUSED - write access to topic 'a.b' in
/// exchange 'amq.topic' in vhost '/' refused for user 'u'` (`rabbit_access_control`).
pub fn refused(
    access: Access,
    routing_key: &str,
    exchange: &str,
    vhost: &str,
    user: &str,
) -> CoreError {
    CoreError::new(
        ErrorKind::AccessRefused,
        format!(
            "{} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{vhost}' refused for user '{user}'",
            access.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(exchange: &str, write: &str, read: &str) -> TopicPermissionRecord {
        TopicPermissionRecord {
            user: "bob".into(),
            vhost: "/".into(),
            exchange: exchange.into(),
            write: write.into(),
            read: read.into(),
        }
    }

    fn perms(records: &[TopicPermissionRecord]) -> TopicPermissions {
        let mut p = TopicPermissions::default();
        for r in records {
            p.insert(r.clone()).expect("valid");
        }
        p
    }

    #[test]
    fn rabbitmq_semantics() {
        let p = perms(&[rec("amq.topic", "^a\\.", "")]);
        assert!(p.allows("amq.topic", Access::Write, "a.b"));
        assert!(!p.allows("amq.topic", Access::Write, "b.a.c"));
        // Empty is ^$, not "nothing".
        assert!(p.allows("amq.topic", Access::Read, ""));
        assert!(!p.allows("amq.topic", Access::Read, "x"));
        // No rule for the exchange: allowed.
        assert!(p.allows("other", Access::Write, "anything"));
        // Unanchored.
        let p = perms(&[rec("t", "b", "b")]);
        assert!(p.allows("t", Access::Write, "abc"));
    }

    #[test]
    fn variables_expand() {
        let p = perms(&[rec(
            "amq.topic",
            "^{username}\\.{vhost}$",
            "^{client_id}\\.",
        )]);
        assert!(p.allows("amq.topic", Access::Write, "bob./"));
        assert!(!p.allows("amq.topic", Access::Write, "alice./"));
        // Without a client id (AMQP) the placeholder stays literal.
        assert!(p.allows("amq.topic", Access::Read, "{client_id}.x"));
        assert!(!p.allows("amq.topic", Access::Read, "c1.x"));
        assert!(p.per_client());
        let c = p.for_client("c1");
        assert!(c.allows("amq.topic", Access::Read, "c1.x"));
        assert!(!c.allows("amq.topic", Access::Read, "c2.x"));
    }

    #[test]
    fn bad_regex_is_refused() {
        assert!(validate(&rec("x", "(", "")).is_err());
        assert!(validate(&rec("x", ".*", "{client_id}")).is_ok());
        // A client id that breaks the regex refuses rather than allows.
        let p = perms(&[rec("x", "^{client_id}$", ".*")]).for_client("a(");
        assert!(!p.allows("x", Access::Write, "a("));
    }

    #[test]
    fn refusal_text_is_rabbitmqs() {
        let e = refused(Access::Write, "a.b", "amq.topic", "/", "bob");
        assert_eq!(
            e.to_string(),
            "ACCESS_REFUSED - write access to topic 'a.b' in exchange 'amq.topic' in vhost '/' refused for user 'bob'"
        );
    }
}
