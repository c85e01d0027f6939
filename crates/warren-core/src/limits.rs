//! RabbitMQ's limits: per vhost `max-connections` and `max-queues`, per user
//! `max-connections` and `max-channels` (`rabbitmqctl set_vhost_limits`,
//! `set_user_limits`, `/api/vhost-limits`, `/api/user-limits`). A negative value means no
//! limit, as in RabbitMQ; 0 allows none.
//!
//! Counting is done on demand from the connection registry and the vhost's queue map, and
//! only when a limit is set, so brokers without limits pay one map lookup per connection.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{CoreError, ErrorKind, ValidationFailed};

/// A limit's name → value.
pub type LimitMap = BTreeMap<String, i64>;

/// Whose limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitOwner {
    VHost,
    User,
}

impl LimitOwner {
    /// The names RabbitMQ accepts for this owner.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            LimitOwner::VHost => &["max-connections", "max-queues"],
            LimitOwner::User => &["max-connections", "max-channels"],
        }
    }

    pub(crate) fn key(self) -> &'static str {
        match self {
            LimitOwner::VHost => "vhost",
            LimitOwner::User => "user",
        }
    }
}

/// Checks one limit as RabbitMQ's `rabbit_vhost_limit` / user-limit validators do: a known
/// name and an integer value.
pub fn validate(owner: LimitOwner, name: &str, value: &Value) -> Result<i64, ValidationFailed> {
    if !owner.names().contains(&name) {
        return Err(ValidationFailed(format!(
            "Unrecognised terms [{{<<\"{name}\">>,{value}}}] in limits"
        )));
    }
    value
        .as_i64()
        .ok_or_else(|| ValidationFailed(format!("<<\"{name}\">> must be an integer, got {value}")))
}

/// The value in force for `name`: `None` when unset or negative (no limit).
pub fn effective(map: Option<&LimitMap>, name: &str) -> Option<u64> {
    map?.get(name).and_then(|v| u64::try_from(*v).ok())
}

/// RabbitMQ's refusals, as 530 NOT_ALLOWED (MQTT and STOMP map it to their own answers).
pub(crate) fn vhost_connections_reached(vhost: &str, user: &str, limit: u64) -> CoreError {
    CoreError::new(
        ErrorKind::NotAllowed,
        format!("access to vhost '{vhost}' refused for user '{user}': connection limit ({limit}) is reached"),
    )
}

pub(crate) fn user_connections_reached(user: &str, limit: u64) -> CoreError {
    CoreError::new(
        ErrorKind::NotAllowed,
        format!("Connection refused for user '{user}'. User connection limit ({limit}) is reached"),
    )
}

pub(crate) fn user_channels_reached(user: &str, limit: u64) -> CoreError {
    CoreError::new(
        ErrorKind::NotAllowed,
        format!("number of channels opened for user '{user}' has reached the maximum allowed user limit of ({limit})"),
    )
}

pub(crate) fn vhost_queues_reached(queue: &str, vhost: &str, limit: u64) -> CoreError {
    CoreError::precondition(format!(
        "cannot declare queue '{queue}': queue limit in vhost '{vhost}' ({limit}) is reached"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_values_are_checked() {
        assert_eq!(
            validate(LimitOwner::VHost, "max-queues", &json!(3)).unwrap(),
            3
        );
        assert_eq!(
            validate(LimitOwner::User, "max-channels", &json!(-1)).unwrap(),
            -1
        );
        assert!(validate(LimitOwner::User, "max-queues", &json!(1)).is_err());
        assert!(validate(LimitOwner::VHost, "max-connections", &json!("x")).is_err());
        let mut m = LimitMap::new();
        m.insert("max-queues".into(), -1);
        m.insert("max-connections".into(), 0);
        assert_eq!(
            effective(Some(&m), "max-queues"),
            None,
            "negative: no limit"
        );
        assert_eq!(effective(Some(&m), "max-connections"), Some(0));
        assert_eq!(effective(None, "max-connections"), None);
    }
}
