//! The durable record of a persistent MQTT session (meta key `m\0<vhost>\0<client id>`):
//! what the session queue and its bindings cannot hold. Pure bytes in, bytes out.
//!
//! Layout (big-endian). Version 1:
//! `1 ‖ expiry u32 ‖ disconnected_at u64 (unix ms, 0 = connected) ‖ n u16 ‖ n × u16
//! inbound QoS 2 ids awaiting PUBREL ‖ m u16 ‖ m × u16 outbound ids awaiting PUBCOMP`.
//! Version 2 (written now) is version 1 with `2` first, followed by
//! `k u16 ‖ k × (queue seq u64 ‖ packet id u16)` (unacknowledged outbound PUBLISHes) and
//! `w u8` (0 = no will; 1 = `due u64 (unix ms) ‖ retain u8 ‖ len u32 ‖ len bytes`, a
//! delayed will and its message in the store's encoding).
//! Version 3 (written now) is version 2 with `3` first, followed by
//! `s u16 ‖ s × (len u16 ‖ len bytes of $share/<group>/<filter> ‖ qos u8 ‖ has id u8 ‖
//! [id u32])`: the shared subscriptions, whose bindings are the group's, not the session's.
//!
//! # Invariants
//! * Written (and synced) before the PUBREC / PUBCOMP / PUBREL that depends on it, so a
//!   restart never forgets an id a client was told about.
//! * The id lists are bounded by the receive maxima (server's for inbound, client's for
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
    /// Outbound QoS ≥ 1 PUBLISHes not yet acknowledged, as (session queue seq, packet id):
    /// redelivered with their original packet id (MQTT-4.4.0-1).
    pub outgoing_unacked: Vec<(u64, u16)>,
    /// A will waiting for its delay, so it is sent even across a restart.
    pub will: Option<StoredWill>,
    /// Shared subscriptions, restored when the session resumes.
    pub shared_subs: Vec<StoredShared>,
}

/// A shared subscription as the record keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredShared {
    /// `$share/<group>/<filter>`, as subscribed.
    pub filter: String,
    pub qos: u8,
    pub id: Option<u32>,
}

/// A delayed will (MQTT 5 will delay interval) as the record keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredWill {
    /// When it is due (unix ms).
    pub due: u64,
    pub retain: bool,
    /// The will message, encoded as the store encodes messages.
    pub message: Vec<u8>,
}

impl SessionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let will_len = self.will.as_ref().map_or(0, |w| 13 + w.message.len());
        let mut v = Vec::with_capacity(
            20 + 2 * (self.incoming_qos2.len() + self.outgoing_pubrel.len())
                + 10 * self.outgoing_unacked.len()
                + will_len,
        );
        v.push(3);
        v.extend_from_slice(&self.expiry.to_be_bytes());
        v.extend_from_slice(&self.disconnected_at.to_be_bytes());
        for ids in [&self.incoming_qos2, &self.outgoing_pubrel] {
            let n = ids.len().min(u16::MAX as usize);
            v.extend_from_slice(&(n as u16).to_be_bytes());
            for id in &ids[..n] {
                v.extend_from_slice(&id.to_be_bytes());
            }
        }
        let n = self.outgoing_unacked.len().min(u16::MAX as usize);
        v.extend_from_slice(&(n as u16).to_be_bytes());
        for (seq, id) in &self.outgoing_unacked[..n] {
            v.extend_from_slice(&seq.to_be_bytes());
            v.extend_from_slice(&id.to_be_bytes());
        }
        match &self.will {
            None => v.push(0),
            Some(w) => {
                v.push(1);
                v.extend_from_slice(&w.due.to_be_bytes());
                v.push(u8::from(w.retain));
                v.extend_from_slice(&(w.message.len() as u32).to_be_bytes());
                v.extend_from_slice(&w.message);
            }
        }
        // Filters are at most a packet's size; a record never holds more than u16::MAX.
        let shared: Vec<&StoredShared> = self
            .shared_subs
            .iter()
            .filter(|s| s.filter.len() <= u16::MAX as usize)
            .take(u16::MAX as usize)
            .collect();
        v.extend_from_slice(&(shared.len() as u16).to_be_bytes());
        for s in shared {
            v.extend_from_slice(&(s.filter.len() as u16).to_be_bytes());
            v.extend_from_slice(s.filter.as_bytes());
            v.push(s.qos);
            match s.id {
                None => v.push(0),
                Some(id) => {
                    v.push(1);
                    v.extend_from_slice(&id.to_be_bytes());
                }
            }
        }
        v
    }

    /// `None` for bytes that are not a version 1, 2 or 3 record.
    pub fn decode(b: &[u8]) -> Option<SessionRecord> {
        let mut r = Reader(b);
        let version = r.u8()?;
        if !(1..=3).contains(&version) {
            return None;
        }
        let mut rec = SessionRecord {
            expiry: r.u32()?,
            disconnected_at: r.u64()?,
            ..Default::default()
        };
        for list in [&mut rec.incoming_qos2, &mut rec.outgoing_pubrel] {
            let n = r.u16()?;
            for _ in 0..n {
                list.push(r.u16()?);
            }
        }
        if version == 1 {
            return r.0.is_empty().then_some(rec);
        }
        let n = r.u16()?;
        for _ in 0..n {
            rec.outgoing_unacked.push((r.u64()?, r.u16()?));
        }
        if r.u8()? == 1 {
            let due = r.u64()?;
            let retain = r.u8()? != 0;
            let len = r.u32()? as usize;
            let message = r.take(len)?.to_vec();
            rec.will = Some(StoredWill {
                due,
                retain,
                message,
            });
        }
        if version == 3 {
            let n = r.u16()?;
            for _ in 0..n {
                let len = r.u16()? as usize;
                let filter = std::str::from_utf8(r.take(len)?).ok()?.to_owned();
                let qos = r.u8()?;
                let id = match r.u8()? {
                    0 => None,
                    _ => Some(r.u32()?),
                };
                rec.shared_subs.push(StoredShared { filter, qos, id });
            }
        }
        r.0.is_empty().then_some(rec)
    }
}

/// Big-endian reads that fail (`None`) at the end of the input instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.array()?))
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

    fn sample() -> SessionRecord {
        SessionRecord {
            expiry: 3600,
            disconnected_at: 1_700_000_000_000,
            incoming_qos2: vec![1, 65535],
            outgoing_pubrel: vec![7],
            outgoing_unacked: vec![(42, 9), (u64::MAX, 10)],
            will: Some(StoredWill {
                due: 1_700_000_005_000,
                retain: true,
                message: b"encoded will".to_vec(),
            }),
            shared_subs: vec![
                StoredShared {
                    filter: "$share/g/a/+".into(),
                    qos: 1,
                    id: Some(7),
                },
                StoredShared {
                    filter: "$share/h/#".into(),
                    qos: 2,
                    id: None,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_bad_input() {
        let r = sample();
        assert_eq!(SessionRecord::decode(&r.encode()), Some(r.clone()));
        let e = r.encode();
        for cut in 0..e.len() {
            assert_eq!(SessionRecord::decode(&e[..cut]), None, "cut at {cut}");
        }
        let mut long = e.clone();
        long.push(0);
        assert_eq!(SessionRecord::decode(&long), None);
        assert_eq!(SessionRecord::decode(&[3]), None);
        let bare = SessionRecord::default();
        assert_eq!(SessionRecord::decode(&bare.encode()), Some(bare));
    }

    #[test]
    fn version_1_records_still_load() {
        // 1 ‖ expiry 60 ‖ disconnected_at 5 ‖ [3] ‖ [] (a record of an earlier release).
        let v1 = [1, 0, 0, 0, 60, 0, 0, 0, 0, 0, 0, 0, 5, 0, 1, 0, 3, 0, 0];
        let r = SessionRecord::decode(&v1).expect("v1 decodes");
        assert_eq!(r.expiry, 60);
        assert_eq!(r.disconnected_at, 5);
        assert_eq!(r.incoming_qos2, vec![3]);
        assert!(r.outgoing_pubrel.is_empty() && r.outgoing_unacked.is_empty());
        assert_eq!(r.will, None);
    }

    #[test]
    fn version_2_records_still_load() {
        // A version 2 record is a version 3 one without the shared-subscription list.
        let mut r = sample();
        r.shared_subs.clear();
        let mut v2 = r.encode();
        v2[0] = 2;
        v2.truncate(v2.len() - 2);
        assert_eq!(SessionRecord::decode(&v2), Some(r));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = SessionRecord::decode(&b);
        }

        #[test]
        fn decode_inverts_encode(
            expiry: u32, at: u64,
            inc in proptest::collection::vec(proptest::prelude::any::<u16>(), 0..8),
            unacked in proptest::collection::vec(proptest::prelude::any::<(u64, u16)>(), 0..8),
            will in proptest::option::of((proptest::prelude::any::<u64>(), proptest::prelude::any::<bool>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32))),
            shared in proptest::collection::vec(("\\PC{0,12}", 0u8..3, proptest::option::of(proptest::prelude::any::<u32>())), 0..4),
        ) {
            let r = SessionRecord {
                expiry,
                disconnected_at: at,
                incoming_qos2: inc.clone(),
                outgoing_pubrel: inc,
                outgoing_unacked: unacked,
                will: will.map(|(due, retain, message)| StoredWill { due, retain, message }),
                shared_subs: shared.into_iter().map(|(filter, qos, id)| StoredShared { filter, qos, id }).collect(),
            };
            proptest::prop_assert_eq!(SessionRecord::decode(&r.encode()), Some(r));
        }
    }
}
