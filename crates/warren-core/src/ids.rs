//! Identifier newtypes, so a consumer id is never passed where a connection id belongs.

use std::sync::atomic::{AtomicU64, Ordering};

/// A client connection of any protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// A consumer registered on a queue; unique in the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

/// A message's position in one queue: unique per queue, increasing in enqueue order per
/// publisher, the key suffix in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgSeq(pub u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique number for connection and consumer ids.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl ConnectionId {
    pub fn next() -> Self {
        Self(next_id())
    }
}

impl ConsumerId {
    pub fn next() -> Self {
        Self(next_id())
    }
}

/// A routing key, or a binding's key. AMQP 0-9-1 carries them as short strings (≤ 255
/// bytes), but MQTT topic names and filters route through the same exchanges and may be
/// 65,535 bytes long (MQTT-1.5.3), so the core's key is not amq-protocol's `ShortString`
/// (whose constructors panic past 255). AMQP writes one out with
/// `warren_amqp`'s cut to a short string.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct RoutingKey(String);

impl RoutingKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for RoutingKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RoutingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for RoutingKey {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for RoutingKey {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<amq_protocol_types::ShortString> for RoutingKey {
    fn from(s: amq_protocol_types::ShortString) -> Self {
        Self(s.into())
    }
}

impl From<&amq_protocol_types::ShortString> for RoutingKey {
    fn from(s: &amq_protocol_types::ShortString) -> Self {
        Self(s.as_str().to_owned())
    }
}
