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
