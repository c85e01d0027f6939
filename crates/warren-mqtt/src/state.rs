//! The durable record of a persistent MQTT session (meta key `m\0<vhost>\0<client id>`):
//! what the session queue and its bindings cannot hold. Pure bytes in, bytes out.
//!
//! Layout (version 1, big-endian):
//! `1 ‖ expiry u32 ‖ disconnected_at u64 (unix ms, 0 = connected) ‖ n u16 ‖ n × u16
//! inbound QoS 2 ids awaiting PUBREL ‖ m u16 ‖ m × u16 outbound ids awaiting PUBCOMP`.
//!
//! # Invariants
//! * Written (and synced) before the PUBREC / PUBCOMP / PUBREL that depends on it, so a
//!   restart never forgets an id a client was told about.
//! * Both id lists are bounded by the receive maximum (server's for inbound, client's for
//!   outbound), so a record stays small.

/// Session expiry that means "never" (MQTT-3.1.2-11: 0xFFFFFFFF; 3.1.1 persistent sessions).
pub const NEVER: u32 = u32::MAX;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionRecord {
    /// Session expiry interval in seconds.
    pub expiry: u32,
    /// When the last connection of the session ended (unix ms); 0 while connected (after a
    /// crash the broker's start counts as the disconnect).
    pub disconnected_at: u64,
    /// Inbound QoS 2 packet ids between PUBREC and PUBREL: a re-sent PUBLISH with one of
    /// these ids is a duplicate, not a new message.
    pub incoming_qos2: Vec<u16>,
    /// Outbound QoS 2 packet ids between PUBREC and PUBCOMP: PUBREL is re-sent for them on
    /// reconnect (the message itself is already the client's).
    pub outgoing_pubrel: Vec<u16>,
}

impl SessionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v =
            Vec::with_capacity(17 + 2 * (self.incoming_qos2.len() + self.outgoing_pubrel.len()));
        v.push(1);
        v.extend_from_slice(&self.expiry.to_be_bytes());
        v.extend_from_slice(&self.disconnected_at.to_be_bytes());
        for ids in [&self.incoming_qos2, &self.outgoing_pubrel] {
            let n = ids.len().min(u16::MAX as usize);
            v.extend_from_slice(&(n as u16).to_be_bytes());
            for id in &ids[..n] {
                v.extend_from_slice(&id.to_be_bytes());
            }
        }
        v
    }

    /// `None` for bytes that are not a version-1 record.
    pub fn decode(b: &[u8]) -> Option<SessionRecord> {
        let (&version, rest) = b.split_first()?;
        if version != 1 {
            return None;
        }
        let expiry = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
        let disconnected_at = u64::from_be_bytes(rest.get(4..12)?.try_into().ok()?);
        let mut at = 12;
        let mut lists = [Vec::new(), Vec::new()];
        for list in lists.iter_mut() {
            let n = u16::from_be_bytes(rest.get(at..at + 2)?.try_into().ok()?) as usize;
            at += 2;
            let raw = rest.get(at..at + 2 * n)?;
            at += 2 * n;
            *list = raw
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
        }
        let [incoming_qos2, outgoing_pubrel] = lists;
        Some(SessionRecord {
            expiry,
            disconnected_at,
            incoming_qos2,
            outgoing_pubrel,
        })
    }
}

/// Milliseconds since the Unix epoch (session records survive restarts, so an `Instant`
/// will not do).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_input() {
        let r = SessionRecord {
            expiry: 3600,
            disconnected_at: 1_700_000_000_000,
            incoming_qos2: vec![1, 65535],
            outgoing_pubrel: vec![7],
        };
        assert_eq!(SessionRecord::decode(&r.encode()), Some(r.clone()));
        let e = r.encode();
        for cut in 0..e.len() {
            assert_eq!(SessionRecord::decode(&e[..cut]), None);
        }
        assert_eq!(SessionRecord::decode(&[2]), None);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = SessionRecord::decode(&b);
        }
    }
}
