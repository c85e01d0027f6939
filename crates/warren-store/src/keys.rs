//! Key layout of the message column families: `queue id (u64 BE) ‖ seq (u64 BE)`, so one
//! queue's messages sort together and in sequence order.

use crate::{StoreError, StoreQueueId};

/// The 16-byte key of message `seq` of `queue`.
pub fn message_key(queue: StoreQueueId, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&queue.0.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `[start, end)` covering every message key of `queue`.
pub fn queue_range(queue: StoreQueueId) -> ([u8; 16], [u8; 16]) {
    (
        message_key(queue, 0),
        message_key(StoreQueueId(queue.0.wrapping_add(1)), 0),
    )
}

pub(crate) fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    key.get(8..16)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("message key of {} bytes", key.len())))
}
