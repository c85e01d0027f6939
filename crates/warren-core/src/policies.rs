//! Policies (RabbitMQ's `rabbitmqctl set_policy`, `/api/policies`): per vhost, a name, a
//! regex on queue or exchange names, what it applies to, a priority and a definition of
//! queue and exchange options. Each queue and exchange follows the one matching policy of
//! the highest priority, re-evaluated whenever a policy or the object changes.
//!
//! RabbitMQ's rules, kept here so the API, definitions and recovery agree:
//! - the pattern is unanchored (`re:run/3`), matched against the object's name;
//! - `apply-to` is `all` (default), `queues`, `exchanges`, `classic_queues`,
//!   `quorum_queues` or `streams`;
//! - a definition key RabbitMQ does not know is refused ("are not recognised policy
//!   settings"); values are checked as its validators do;
//! - queue arguments and policy combine as `rabbit_amqqueue_process:process_args_policy`
//!   does: the smaller of the two for `message-ttl`, `expires`, `max-length`,
//!   `max-length-bytes`; the argument wins for `dead-letter-exchange`,
//!   `dead-letter-routing-key`, `overflow` and an exchange's `alternate-exchange`.

use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ValidationFailed;

/// A stored policy, in the field names of RabbitMQ's definitions file and API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    #[serde(rename = "apply-to", default = "all")]
    pub apply_to: String,
    pub definition: Map<String, Value>,
    #[serde(default)]
    pub priority: i64,
}

fn all() -> String {
    "all".into()
}

/// A user policy (`/api/policies`) or an operator policy (`/api/operator-policies`): the
/// operator's caps limits and TTLs from above whatever users set, and may only name those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    User,
    Operator,
}

/// The keys an operator policy may set (RabbitMQ 3.10's operator policy validators).
const OPERATOR_KEYS: &[&str] = &[
    "expires",
    "message-ttl",
    "max-length",
    "max-length-bytes",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "delivery-limit",
];

/// What kind of object a policy is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    /// A queue; `quorum` / `stream` when declared with that `x-queue-type`.
    Queue {
        quorum: bool,
        stream: bool,
    },
    Exchange,
}

/// A validated policy with its pattern compiled.
#[derive(Debug)]
pub struct Policy {
    pub record: PolicyRecord,
    pattern: Regex,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.record == other.record
    }
}

/// Definition keys Warren acts on, and those RabbitMQ 3.x accepts that have no effect
/// here (mirroring, queue modes and versions, quorum and stream settings): accepted so
/// that policies written for RabbitMQ load, listed in docs/amqp.md.
const INTEGER_KEYS: &[&str] = &[
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "delivery-limit",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "stream-max-segment-size-bytes",
    "initial-cluster-size",
    "ha-sync-batch-size",
];
const STRING_KEYS: &[&str] = &[
    "alternate-exchange",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "dead-letter-strategy",
    "queue-master-locator",
    "queue-leader-locator",
    "max-age",
    "ha-mode",
    "ha-sync-mode",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
];
const APPLY_TO: &[&str] = &[
    "all",
    "queues",
    "exchanges",
    "classic_queues",
    "quorum_queues",
    "streams",
];

fn check_value(key: &str, v: &Value) -> Result<(), String> {
    let int = v.as_i64();
    match key {
        "expires" => match int {
            Some(n) if n >= 1 => Ok(()),
            _ => Err(format!("<<\"{key}\">> must be an integer greater than 0")),
        },
        k if INTEGER_KEYS.contains(&k) => match int {
            Some(n) if n >= 0 => Ok(()),
            _ => Err(format!("<<\"{key}\">> must be a non-negative integer")),
        },
        "overflow" => match v.as_str() {
            Some("drop-head" | "reject-publish" | "reject-publish-dlx") => Ok(()),
            _ => Err(format!(
                "<<\"{key}\">> must be one of drop-head, reject-publish, reject-publish-dlx"
            )),
        },
        "queue-mode" => match v.as_str() {
            Some("default" | "lazy") => Ok(()),
            _ => Err(format!("<<\"{key}\">> must be one of default, lazy")),
        },
        "queue-version" => match int {
            Some(1 | 2) => Ok(()),
            _ => Err(format!("<<\"{key}\">> must be 1 or 2")),
        },
        "ha-params" => Ok(()),
        k if STRING_KEYS.contains(&k) => match v {
            Value::String(_) => Ok(()),
            _ => Err(format!("<<\"{key}\">> must be a string")),
        },
        _ => Err(String::new()),
    }
}

/// `{<<"key">>,Value}` as RabbitMQ prints a definition entry in its validation errors.
fn erlang_pair(k: &str, v: &Value) -> String {
    let v = match v {
        Value::String(t) => format!("<<\"{t}\">>"),
        other => other.to_string(),
    };
    format!("{{<<\"{k}\">>,{v}}}")
}

impl Policy {
    /// Validates `record` as RabbitMQ's `rabbit_policy:validate` does and compiles it.
    pub fn new(kind: PolicyKind, record: PolicyRecord) -> Result<Policy, ValidationFailed> {
        let apply_to_ok = match kind {
            PolicyKind::User => APPLY_TO.contains(&record.apply_to.as_str()),
            // Operator policies only ever apply to queues.
            PolicyKind::Operator => matches!(
                record.apply_to.as_str(),
                "all" | "queues" | "classic_queues" | "quorum_queues"
            ),
        };
        if !apply_to_ok {
            // RabbitMQ 3.10's text (which knows only these three).
            return Err(ValidationFailed(format!(
                "apply-to '{}' unrecognised; should be 'queues', 'exchanges' or 'all'",
                record.apply_to
            )));
        }
        let pattern = Regex::new(&record.pattern).map_err(|e| {
            ValidationFailed(format!(
                "<<\"{}\">> is not a valid regex: {e}",
                record.pattern
            ))
        })?;
        if record.definition.is_empty() {
            return Err(ValidationFailed("no policy provided".into()));
        }
        let mut unknown = Vec::new();
        for (k, v) in &record.definition {
            if kind == PolicyKind::Operator && !OPERATOR_KEYS.contains(&k.as_str()) {
                unknown.push(erlang_pair(k, v));
                continue;
            }
            match check_value(k, v) {
                Ok(()) => {}
                Err(why) if why.is_empty() => unknown.push(erlang_pair(k, v)),
                Err(why) => return Err(ValidationFailed(why)),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ValidationFailed(format!(
                "[{}] are not recognised policy settings",
                unknown.join(",")
            )));
        }
        Ok(Policy { record, pattern })
    }

    fn applies(&self, object: Object, name: &str) -> bool {
        let kind = match (self.record.apply_to.as_str(), object) {
            ("all", _) => true,
            ("queues", Object::Queue { .. }) => true,
            ("classic_queues", Object::Queue { quorum, stream }) => !quorum && !stream,
            ("quorum_queues", Object::Queue { quorum, .. }) => quorum,
            ("streams", Object::Queue { stream, .. }) => stream,
            ("exchanges", Object::Exchange) => true,
            _ => false,
        };
        kind && self.fits(object) && self.pattern.is_match(name)
    }

    /// Whether every key of the definition means something to the queue's type: RabbitMQ
    /// passes over a policy with one that does not (`is_policy_applicable` of each queue
    /// type; the lists were read off RabbitMQ 3.10 key by key).
    fn fits(&self, object: Object) -> bool {
        let refused: &[&str] = match object {
            Object::Exchange => return true,
            Object::Queue { stream: true, .. } => &[
                "max-length",
                "queue-mode",
                "message-ttl",
                "expires",
                "overflow",
                "dead-letter-exchange",
                "dead-letter-routing-key",
                "dead-letter-strategy",
                "delivery-limit",
                "queue-master-locator",
                "max-in-memory-length",
                "max-in-memory-bytes",
            ],
            Object::Queue { quorum: true, .. } => &[
                "queue-mode",
                "queue-master-locator",
                "max-age",
                "stream-max-segment-size-bytes",
                "initial-cluster-size",
            ],
            Object::Queue { .. } => &[
                "delivery-limit",
                "max-age",
                "queue-leader-locator",
                "stream-max-segment-size-bytes",
                "dead-letter-strategy",
                "initial-cluster-size",
            ],
        };
        // Mirroring (`ha-*`) is for classic queues only.
        let classic = matches!(
            object,
            Object::Queue {
                quorum: false,
                stream: false
            }
        );
        self.record
            .definition
            .keys()
            .all(|k| !refused.contains(&k.as_str()) && (classic || !k.starts_with("ha-")))
    }

    /// A definition value as an integer (validated on creation).
    pub fn int(&self, key: &str) -> Option<u64> {
        self.record.definition.get(key)?.as_u64()
    }

    /// A definition value as text (validated on creation).
    pub fn text(&self, key: &str) -> Option<&str> {
        self.record.definition.get(key)?.as_str()
    }
}

/// The policies of one vhost, highest priority first (ties by name, so the choice is
/// stable).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    ordered: Vec<Arc<Policy>>,
}

impl Policies {
    /// Adds or replaces the policy of that name; true if one was replaced.
    pub fn set(&mut self, p: Arc<Policy>) -> bool {
        let replaced = self.remove(&p.record.name).is_some();
        let at = self
            .ordered
            .iter()
            .position(|o| (o.record.priority, &p.record.name) < (p.record.priority, &o.record.name))
            .unwrap_or(self.ordered.len());
        self.ordered.insert(at, p);
        replaced
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Policy>> {
        let i = self.ordered.iter().position(|o| o.record.name == name)?;
        Some(self.ordered.remove(i))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.ordered.iter().find(|o| o.record.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// The policy in force for an object: the matching one of the highest priority.
    pub fn for_object(&self, object: Object, name: &str) -> Option<&Arc<Policy>> {
        self.ordered.iter().find(|p| p.applies(object, name))
    }

    pub fn records(&self) -> impl Iterator<Item = &PolicyRecord> {
        self.ordered.iter().map(|p| &p.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(name: &str, pattern: &str, priority: i64, def: Value) -> PolicyRecord {
        PolicyRecord {
            vhost: "/".into(),
            name: name.into(),
            pattern: pattern.into(),
            apply_to: "all".into(),
            definition: def.as_object().cloned().unwrap_or_default(),
            priority,
        }
    }

    /// Which queue types take a policy, by its keys, as RabbitMQ 3.10 answered key by key
    /// (`rabbitmqctl list_queues name policy` after each).
    #[test]
    fn a_policy_passes_over_queue_types_its_keys_mean_nothing_to() {
        let (c, q, s) = (
            Object::Queue {
                quorum: false,
                stream: false,
            },
            Object::Queue {
                quorum: true,
                stream: false,
            },
            Object::Queue {
                quorum: false,
                stream: true,
            },
        );
        for (def, classic, quorum, stream) in [
            (json!({"ha-mode": "all"}), true, false, false),
            (json!({"max-length": 1}), true, true, false),
            (json!({"max-length-bytes": 1000}), true, true, true),
            (json!({"queue-mode": "lazy"}), true, false, false),
            (json!({"message-ttl": 1000}), true, true, false),
            (json!({"delivery-limit": 3}), false, true, false),
            (json!({"max-age": "1D"}), false, false, true),
            (
                json!({"queue-leader-locator": "client-local"}),
                false,
                true,
                true,
            ),
            (
                json!({"queue-master-locator": "min-masters"}),
                true,
                false,
                false,
            ),
            (
                json!({"dead-letter-strategy": "at-least-once"}),
                false,
                true,
                false,
            ),
            (
                json!({"max-length-bytes": 1000, "max-age": "1D"}),
                false,
                false,
                true,
            ),
            (json!({"alternate-exchange": "ae"}), true, true, true),
        ] {
            let p = Policy::new(PolicyKind::User, rec("p", ".*", 0, def.clone())).unwrap();
            assert_eq!(
                (p.applies(c, "x"), p.applies(q, "x"), p.applies(s, "x")),
                (classic, quorum, stream),
                "{def}"
            );
        }
    }

    #[test]
    fn highest_priority_matching_policy_wins() {
        let mut ps = Policies::default();
        for (n, pat, prio) in [("low", "^q", 0), ("high", "^q\\.", 5), ("other", "x", 9)] {
            let p = Policy::new(
                PolicyKind::User,
                rec(n, pat, prio, json!({"max-length": 1})),
            )
            .unwrap();
            ps.set(Arc::new(p));
        }
        let q = Object::Queue {
            quorum: false,
            stream: false,
        };
        assert_eq!(ps.for_object(q, "q.a").unwrap().record.name, "high");
        assert_eq!(ps.for_object(q, "qa").unwrap().record.name, "low");
        assert!(ps.for_object(q, "z").is_none());
        // Unanchored, as re:run.
        assert_eq!(ps.for_object(q, "my-x").unwrap().record.name, "other");
        assert!(ps.set(Arc::new(
            Policy::new(
                PolicyKind::User,
                rec("high", "^nothing$", 5, json!({"max-length": 1}))
            )
            .unwrap()
        )));
        assert_eq!(ps.for_object(q, "q.a").unwrap().record.name, "low");
    }

    #[test]
    fn apply_to_selects_the_kind() {
        let mut r = rec("p", ".*", 0, json!({"alternate-exchange": "ae"}));
        r.apply_to = "exchanges".into();
        let p = Policy::new(PolicyKind::User, r).unwrap();
        assert!(p.applies(Object::Exchange, "x"));
        assert!(!p.applies(
            Object::Queue {
                quorum: false,
                stream: false
            },
            "x"
        ));
        let mut r = rec("p", ".*", 0, json!({"max-length": 1}));
        r.apply_to = "quorum_queues".into();
        let p = Policy::new(PolicyKind::User, r).unwrap();
        assert!(p.applies(
            Object::Queue {
                quorum: true,
                stream: false
            },
            "q"
        ));
        assert!(!p.applies(
            Object::Queue {
                quorum: false,
                stream: false
            },
            "q"
        ));
        let mut r = rec("p", ".*", 0, json!({"max-age": "1h"}));
        r.apply_to = "streams".into();
        let p = Policy::new(PolicyKind::User, r).unwrap();
        assert!(p.applies(
            Object::Queue {
                quorum: false,
                stream: true
            },
            "s"
        ));
        assert!(!p.applies(
            Object::Queue {
                quorum: false,
                stream: false
            },
            "q"
        ));
    }

    #[test]
    fn operator_policies_take_limits_and_ttls_only() {
        let op = |def: Value| Policy::new(PolicyKind::Operator, rec("o", ".*", 0, def));
        assert!(op(json!({"max-length": 10, "message-ttl": 1000})).is_ok());
        assert!(op(json!({"dead-letter-exchange": "x"}))
            .unwrap_err()
            .0
            .contains("not recognised"));
        let mut r = rec("o", ".*", 0, json!({"max-length": 1}));
        r.apply_to = "exchanges".into();
        assert!(Policy::new(PolicyKind::Operator, r).is_err());
    }

    #[test]
    fn validation_follows_rabbitmq() {
        let bad = |def: Value| {
            Policy::new(PolicyKind::User, rec("p", ".*", 0, def))
                .unwrap_err()
                .0
        };
        assert_eq!(
            bad(json!({"foo": 1, "bar": 2})),
            "[{<<\"bar\">>,2},{<<\"foo\">>,1}] are not recognised policy settings"
        );
        assert!(bad(json!({"max-length": -1})).contains("non-negative"));
        assert!(bad(json!({"expires": 0})).contains("greater than 0"));
        assert!(bad(json!({"overflow": "nope"})).contains("drop-head"));
        assert!(bad(json!({"dead-letter-exchange": 3})).contains("string"));
        assert_eq!(bad(json!({})), "no policy provided");
        assert!(Policy::new(PolicyKind::User, rec("p", "(", 0, json!({"max-length": 1}))).is_err());
        let mut r = rec("p", ".*", 0, json!({"max-length": 1}));
        r.apply_to = "everything".into();
        assert!(Policy::new(PolicyKind::User, r).is_err());
        let ok = json!({"ha-mode": "all", "queue-mode": "lazy", "message-ttl": 0,
                        "overflow": "reject-publish", "dead-letter-exchange": "dlx"});
        assert!(Policy::new(PolicyKind::User, rec("p", ".*", 0, ok)).is_ok());
    }
}
