//! Framing over mqtt5-protocol: that crate decodes a complete packet but has no "need more
//! bytes" answer, so the remaining-length varint is peeked here first (MQTT-2.2.3), then the
//! whole packet is split off the buffer without copying.

use bytes::{Buf, Bytes, BytesMut};
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::{FixedHeader, Packet};

/// Why input cannot be decoded; every case closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// MQTT-1.5.5: a remaining length longer than four bytes.
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// MQTT-3.1.2-2: a CONNECT with a protocol level other than 3 (as "MQIsdp"), 4 or 5;
    /// answered with CONNACK 0x01 before closing.
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
}

/// Decodes one packet; `Ok(None)` until it is complete. `version` is 0 before CONNECT
/// (whose body carries its own level), then 3 (MQTT 3.1), 4 or 5.
pub fn decode(buf: &mut BytesMut, version: u8, max: usize) -> Result<Option<Packet>, CodecError> {
    let mut version = version;
    if version == 3 {
        // MQTT 3.1 clients set DUP on re-sent PUBREL, SUBSCRIBE and UNSUBSCRIBE, whose
        // flags 3.1.1 fixes (MQTT-3.6.1-1, 3.8.1-1, 3.10.1-1): the bit is cleared and the
        // packet decoded as 3.1.1, as Mosquitto accepts it.
        if let Some(b) = buf.first_mut() {
            if matches!(*b, 0x6A | 0x8A | 0xAA) {
                *b &= !0x08;
            }
        }
        version = 4;
    }
    let mut len: usize = 0;
    let mut header = 0;
    for i in 1..=4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        if b & 0x80 == 0 {
            header = i + 1;
            break;
        }
    }
    if header == 0 {
        return Err(CodecError::BadLength);
    }
    let total = header + len;
    if total > max {
        return Err(CodecError::TooLarge { size: total, max });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    let mut mqisdp = false;
    if version == 0 && frame[0] >> 4 == 1 {
        if let Some(rewritten) = check_connect_header(&frame[header..])? {
            frame = rewritten;
            mqisdp = true;
        }
    }
    let fh = FixedHeader::decode(&mut frame).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let packet = if version == 0 {
        Packet::decode_from_body(fh.packet_type, &fh, &mut frame)
    } else {
        Packet::decode_from_body_with_version(fh.packet_type, &fh, &mut frame, version)
    }
    .map_err(|e| CodecError::Malformed(e.to_string()))?;
    // MQTT-3.1.4-1: a CONNECT must be exactly what its flags say; bytes after its payload
    // (a user name without its flag, say) make it malformed, as Mosquitto closes it.
    if matches!(packet, Packet::Connect(_)) && frame.has_remaining() {
        return Err(CodecError::Malformed(
            "bytes after the CONNECT payload".into(),
        ));
    }
    Ok(Some(match packet {
        Packet::Connect(mut c) if mqisdp => {
            c.protocol_version = 3;
            Packet::Connect(c)
        }
        other => other,
    }))
}

/// Peeks the protocol name and level of a CONNECT body (MQTT-3.1.2-1/2). MQTT 3.1
/// (`MQIsdp`, level 3) differs from 3.1.1 only in its header, so it is rewritten as a
/// level-4 CONNECT (returned) and decoded as such; RabbitMQ accepts 3.1 too.
fn check_connect_header(body: &[u8]) -> Result<Option<Bytes>, CodecError> {
    let short = || CodecError::Malformed("short CONNECT".into());
    let n = u16::from_be_bytes([
        *body.first().ok_or_else(short)?,
        *body.get(1).ok_or_else(short)?,
    ]) as usize;
    let name = body.get(2..2 + n).ok_or_else(short)?;
    let level = *body.get(2 + n).ok_or_else(short)?;
    match (name, level) {
        (b"MQTT", 4 | 5) => Ok(None),
        (b"MQTT", l) => Err(CodecError::UnsupportedLevel(l)),
        (b"MQIsdp", 3) => {
            let rest = &body[3 + n..];
            let len = 7 + rest.len();
            let mut out = BytesMut::with_capacity(len + 5);
            out.extend_from_slice(&[0x10]);
            put_varint(&mut out, len);
            out.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
            out.extend_from_slice(rest);
            Ok(Some(out.freeze()))
        }
        (b"MQIsdp", l) => Err(CodecError::UnsupportedLevel(l)),
        // MQTT-3.1.2-1: another protocol name; the server may close without CONNACK.
        _ => Err(CodecError::Malformed("unknown protocol name".into())),
    }
}

/// Appends an encoded packet.
pub fn encode<P: MqttPacket>(packet: &P, out: &mut BytesMut) {
    thread_local! {
        /// The body of the packet being encoded (the acknowledgements of every QoS 1/2
        /// message come this way; PUBLISH takes [`encode_publish`]). mqtt5-protocol's
        /// `MqttPacket::encode` builds every body in a new `Vec`; one buffer per thread,
        /// reused, allocates none, and holds no memory per connection.
        static BODY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BODY.with_borrow_mut(|body| {
        body.clear();
        let before = out.len();
        let encoded = packet.encode_body(body).and_then(|()| {
            let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
            FixedHeader::new(packet.packet_type(), packet.flags(), len).encode(out)
        });
        match encoded {
            Ok(()) => out.extend_from_slice(body),
            Err(e) => {
                out.truncate(before);
                tracing::warn!(error = %e, "mqtt packet could not be encoded");
            }
        }
        // A large message's body is not kept for the thread's life.
        if body.capacity() > 64 * 1024 {
            *body = Vec::new();
        }
    });
}

/// The largest Remaining Length a Variable Byte Integer holds (MQTT-1.5.5).
const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Appends a PUBLISH, written straight into `out`: the one packet of every delivery.
/// mqtt5-protocol's encoder takes the topic through two new allocations (an
/// `MqttString`, then its bytes) and the packet through a body buffer; this writes each
/// part once (docs/PERFORMANCE.md, "Instructions per message, counted by callgrind"). Nothing is written
/// for a packet the protocol cannot carry (false).
pub fn encode_publish(p: &PublishPacket, out: &mut BytesMut) -> bool {
    let topic = p.topic_name.as_bytes();
    // MQTT-1.5.4-2: no U+0000 in a UTF-8 string; MQTT-1.5.4: at most 65,535 bytes. An
    // AMQP routing key can hold either.
    let Ok(topic_len) = u16::try_from(topic.len()) else {
        tracing::warn!(len = topic.len(), "mqtt publish not sent: topic too long");
        return false;
    };
    if topic.contains(&0) {
        tracing::warn!("mqtt publish not sent: topic holds U+0000");
        return false;
    }
    // MQTT-2.2.1-2: a QoS 0 PUBLISH has no packet identifier; QoS 1 and 2 must.
    let packet_id = match (p.qos as u8, p.packet_id) {
        (0, _) => None,
        (_, Some(id)) => Some(id),
        (_, None) => {
            tracing::warn!("mqtt publish not sent: QoS > 0 without a packet id");
            return false;
        }
    };
    let props_len = if p.protocol_version == 5 {
        p.properties.encoded_len()
    } else {
        0
    };
    let remaining =
        2 + topic.len() + if packet_id.is_some() { 2 } else { 0 } + props_len + p.payload.len();
    if remaining > MAX_REMAINING_LENGTH {
        tracing::warn!(
            remaining,
            "mqtt publish not sent: larger than a packet can be"
        );
        return false;
    }
    let before = out.len();
    out.reserve(5 + remaining);
    // MQTT-3.3.1-2: DUP is 0 on a QoS 0 PUBLISH.
    let flags = if packet_id.is_some() {
        p.flags()
    } else {
        p.flags() & !0x08
    };
    out.extend_from_slice(&[0x30 | flags]);
    put_varint(out, remaining);
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(topic);
    if let Some(id) = packet_id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    if p.protocol_version == 5 {
        if let Err(e) = p.properties.encode_direct(out) {
            out.truncate(before);
            tracing::warn!(error = %e, "mqtt publish not sent: properties");
            return false;
        }
    }
    out.extend_from_slice(&p.payload);
    true
}

/// Appends a Variable Byte Integer (MQTT-1.5.5).
fn put_varint(out: &mut BytesMut, mut x: usize) {
    loop {
        let mut b = (x & 0x7f) as u8;
        x >>= 7;
        if x > 0 {
            b |= 0x80;
        }
        out.extend_from_slice(&[b]);
        if x == 0 {
            break;
        }
    }
}

/// What a successful MQTT 5 CONNACK says besides the protocol's defaults.
pub struct ConnAckV5<'a> {
    pub session_present: bool,
    /// 0 = none (the default), so left out.
    pub topic_alias_maximum: u16,
    pub assigned_client_id: Option<&'a str>,
    /// 65,535 = the default, so left out.
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
}

/// A successful MQTT 5 CONNACK with its properties in Mosquitto's order (Topic Alias
/// Maximum, Assigned Client Identifier, Receive Maximum; then Maximum Packet Size, which
/// Mosquitto leaves out unless configured). mqtt5-protocol writes properties in hash-map
/// order, different from one packet to the next, and clients' tests compare a CONNACK's
/// bytes (Mosquitto's 12-prop-assigned-client-identifier compares the first 12).
pub fn encode_connack_v5(c: &ConnAckV5<'_>, out: &mut BytesMut) {
    let mut props = BytesMut::with_capacity(64);
    if c.topic_alias_maximum > 0 {
        props.extend_from_slice(&[0x22]);
        props.extend_from_slice(&c.topic_alias_maximum.to_be_bytes());
    }
    if let Some(id) = c.assigned_client_id {
        // A client id is at most a 65,535-byte UTF-8 string (MQTT-1.5.4).
        let id = &id.as_bytes()[..id.len().min(u16::MAX as usize)];
        props.extend_from_slice(&[0x12]);
        props.extend_from_slice(&(id.len() as u16).to_be_bytes());
        props.extend_from_slice(id);
    }
    if c.receive_maximum != u16::MAX {
        props.extend_from_slice(&[0x21]);
        props.extend_from_slice(&c.receive_maximum.to_be_bytes());
    }
    props.extend_from_slice(&[0x27]);
    props.extend_from_slice(&c.maximum_packet_size.to_be_bytes());
    let mut head = BytesMut::with_capacity(8);
    head.extend_from_slice(&[u8::from(c.session_present), 0x00]);
    put_varint(&mut head, props.len());
    out.extend_from_slice(&[0x20]);
    put_varint(out, head.len() + props.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&props);
}

/// PINGRESP (MQTT-3.13): `D0 00`.
pub fn encode_pingresp(out: &mut BytesMut) {
    out.extend_from_slice(&[0xD0, 0x00]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_more_then_decodes_pingreq_and_rejects_bad_lengths() {
        let mut b = BytesMut::from(&[0xC0u8][..]);
        assert!(decode(&mut b, 4, 1024).unwrap().is_none());
        b.extend_from_slice(&[0x00]);
        assert!(matches!(
            decode(&mut b, 4, 1024).unwrap(),
            Some(Packet::PingReq)
        ));
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            decode(&mut b, 4, 1024),
            Err(CodecError::BadLength)
        ));
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0x7f][..]);
        assert!(matches!(
            decode(&mut b, 4, 1024),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn connect_from_spec_bytes() {
        // MQTT 3.1.1 CONNECT, clean session, keep-alive 60, client id "a".
        let raw = [
            0x10u8, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a',
        ];
        let mut b = BytesMut::from(&raw[..]);
        match decode(&mut b, 0, 1024).unwrap() {
            Some(Packet::Connect(c)) => {
                assert_eq!(c.protocol_version, 4);
                assert!(c.clean_start);
                assert_eq!(c.keep_alive, 60);
                assert_eq!(c.client_id, "a");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Mosquitto's 01-connect-uname-no-flag: a user name without the user-name flag.
    #[test]
    fn connect_with_bytes_after_its_payload_is_malformed() {
        let raw = [
            0x10u8, 18, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a', 0, 3, b'u', b's',
            b'r',
        ];
        let mut b = BytesMut::from(&raw[..]);
        assert!(matches!(
            decode(&mut b, 0, 1024),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn mqtt31_connect_is_accepted_as_level_3() {
        // MQTT 3.1 CONNECT: "MQIsdp", level 3, clean session, keep-alive 10, client id
        // longer than 23 characters (3.1 limited it; RabbitMQ does not enforce it).
        let id = b"a-client-id-longer-than-23-chars";
        let mut raw = vec![0x10u8, (12 + 2 + id.len()) as u8];
        raw.extend_from_slice(&[0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 10]);
        raw.extend_from_slice(&[0, id.len() as u8]);
        raw.extend_from_slice(id);
        let mut b = BytesMut::from(&raw[..]);
        match decode(&mut b, 0, 1024).unwrap() {
            Some(Packet::Connect(c)) => {
                assert_eq!(c.protocol_version, 3);
                assert_eq!(c.keep_alive, 10);
                assert_eq!(c.client_id.as_bytes(), id);
            }
            other => panic!("{other:?}"),
        }
        assert!(b.is_empty());
    }

    #[test]
    fn unsupported_level_is_reported() {
        let raw = [
            0x10u8, 13, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 1, b'a',
        ];
        let mut b = BytesMut::from(&raw[..]);
        assert!(matches!(
            decode(&mut b, 0, 1024),
            Err(CodecError::UnsupportedLevel(6))
        ));
    }

    #[test]
    fn v5_publish_from_spec_bytes() {
        // PUBLISH QoS 1, topic "a/b", packet id 10, properties: message expiry 60,
        // topic alias 1; payload "hi".
        let raw = [
            0x32u8, 18, 0, 3, b'a', b'/', b'b', 0, 10, 8, 0x02, 0, 0, 0, 60, 0x23, 0, 1, b'h', b'i',
        ];
        let mut b = BytesMut::from(&raw[..]);
        match decode(&mut b, 5, 1024).unwrap() {
            Some(Packet::Publish(p)) => {
                assert_eq!(p.topic_name, "a/b");
                assert_eq!(p.packet_id, Some(10));
                assert_eq!(p.properties.get_message_expiry_interval(), Some(60));
                assert_eq!(p.properties.get_topic_alias(), Some(1));
                assert_eq!(&p.payload[..], b"hi");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encode_writes_spec_bytes_and_reuses_its_buffer() {
        use mqtt5_protocol::QoS;
        // A v5 PUBLISH with one property (the order of several is mqtt5-protocol's hash
        // map's), then a 3.1.1 QoS 0 one (no packet id, no properties) and a 200 KB one:
        // each packet's bytes are its own.
        let mut p = PublishPacket::new("a/b", Bytes::from_static(b"hi"), QoS::AtLeastOnce)
            .with_packet_id(10);
        p.properties.set_message_expiry_interval(60);
        let mut out = BytesMut::new();
        encode(&p, &mut out);
        let spec = [
            0x32u8, 15, 0, 3, b'a', b'/', b'b', 0, 10, 5, 0x02, 0, 0, 0, 60, b'h', b'i',
        ];
        assert_eq!(&out[..], spec);
        out.clear();
        assert!(encode_publish(&p, &mut out));
        assert_eq!(&out[..], spec);
        out.clear();
        let q = PublishPacket::new_v311("t", Bytes::from_static(b"x"), QoS::AtMostOnce);
        encode(&q, &mut out);
        assert_eq!(&out[..], [0x30u8, 4, 0, 1, b't', b'x']);
        out.clear();
        let big = PublishPacket::new_v311("t", Bytes::from(vec![7u8; 200_000]), QoS::AtMostOnce);
        encode(&big, &mut out);
        let mut reference = BytesMut::new();
        MqttPacket::encode(&big, &mut reference).unwrap();
        assert_eq!(out, reference);
    }

    #[test]
    fn qos3_publish_is_malformed() {
        // MQTT-3.3.1-4: both QoS bits set.
        let raw = [0x36u8, 5, 0, 1, b'a', 0, 1];
        let mut b = BytesMut::from(&raw[..]);
        assert!(decode(&mut b, 4, 1024).is_err());
    }

    #[test]
    fn v5_subscribe_options_from_spec_bytes() {
        // SUBSCRIBE id 1, properties: subscription identifier 7; filter "t" with QoS 1,
        // no-local, retain-as-published, retain handling 2.
        let raw = [0x82u8, 9, 0, 1, 2, 0x0B, 7, 0, 1, b't', 0b0010_1101];
        let mut b = BytesMut::from(&raw[..]);
        match decode(&mut b, 5, 1024).unwrap() {
            Some(Packet::Subscribe(s)) => {
                assert_eq!(s.properties.get_subscription_identifier(), Some(7));
                let o = &s.filters[0].options;
                assert_eq!(o.qos as u8, 1);
                assert!(o.no_local);
                assert!(o.retain_as_published);
                assert_eq!(o.retain_handling as u8, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connack_v5_in_mosquittos_order() {
        let mut out = BytesMut::new();
        encode_connack_v5(
            &ConnAckV5 {
                session_present: false,
                topic_alias_maximum: 10,
                assigned_client_id: Some("auto-6D67543A-9806-9C5D-4764-53C5BE74DD3F"),
                receive_maximum: 20,
                maximum_packet_size: 0x0100_0000,
            },
            &mut out,
        );
        // Mosquitto 2.0's CONNACK for an empty client id, then our Maximum Packet Size.
        let mut want = vec![0x20, 0x3A, 0, 0, 0x37, 0x22, 0, 10, 0x12, 0, 41];
        want.extend_from_slice(b"auto-6D67543A-9806-9C5D-4764-53C5BE74DD3F");
        want.extend_from_slice(&[0x21, 0, 20, 0x27, 1, 0, 0, 0]);
        assert_eq!(&out[..], &want[..]);
        let mut out = BytesMut::new();
        encode_connack_v5(
            &ConnAckV5 {
                session_present: true,
                topic_alias_maximum: 0,
                assigned_client_id: None,
                receive_maximum: u16::MAX,
                maximum_packet_size: 300,
            },
            &mut out,
        );
        assert_eq!(&out[..], &[0x20, 8, 1, 0, 5, 0x27, 0, 0, 1, 44]);
    }

    #[test]
    fn publish_encoder_refuses_what_the_protocol_cannot_carry() {
        use mqtt5_protocol::QoS;
        let mut out = BytesMut::from(&b"kept"[..]);
        // MQTT-1.5.4-2: U+0000 in the topic (an AMQP routing key may hold one).
        let nul = PublishPacket::new_v311("a\0b", Bytes::from_static(b"x"), QoS::AtMostOnce);
        assert!(!encode_publish(&nul, &mut out));
        // MQTT-1.5.4: a topic over 65,535 bytes.
        let long = PublishPacket::new("t".repeat(70_000), Bytes::new(), QoS::AtMostOnce);
        assert!(!encode_publish(&long, &mut out));
        // MQTT-2.2.1-2: QoS 1 needs a packet id.
        let no_id = PublishPacket::new_v311("t", Bytes::new(), QoS::AtLeastOnce);
        assert!(!encode_publish(&no_id, &mut out));
        assert_eq!(&out[..], b"kept");
    }

    proptest::proptest! {
        /// `encode_publish` writes what mqtt5-protocol's own encoder writes, at both
        /// levels, with any flags and properties, and decodes back to the packet.
        #[test]
        fn publish_encoder_matches_mqtt5_protocol(
            topic in "[a-z/é+.*]{1,40}",
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            qos in 0u8..3,
            id in 1u16..,
            dup: bool,
            retain: bool,
            v5: bool,
            expiry in proptest::option::of(0u32..),
            alias in proptest::option::of(1u16..),
            sub_ids in proptest::collection::vec(1u32..268_435_455, 0..3),
            user in proptest::collection::vec(("[a-z]{0,8}", "[a-zé ]{0,8}"), 0..3),
            content_type in proptest::option::of("[a-z/]{0,12}"),
        ) {
            use mqtt5_protocol::QoS;
            let q = match qos { 0 => QoS::AtMostOnce, 1 => QoS::AtLeastOnce, _ => QoS::ExactlyOnce };
            let payload = Bytes::from(payload);
            let mut p = if v5 {
                let mut p = PublishPacket::new(topic, payload, q);
                if let Some(e) = expiry { p.properties.set_message_expiry_interval(e); }
                if let Some(a) = alias { p.properties.set_topic_alias(a); }
                for s in &sub_ids { p.properties.set_subscription_identifier(*s); }
                for (k, v) in &user { p.properties.add_user_property(k.clone(), v.clone()); }
                if let Some(c) = &content_type { p.properties.set_content_type(c.clone()); }
                p
            } else {
                PublishPacket::new_v311(topic, payload, q)
            };
            p = p.with_retain(retain).with_dup(dup && qos > 0);
            if qos > 0 {
                p = p.with_packet_id(id);
            }
            let mut ours = BytesMut::new();
            proptest::prop_assert!(encode_publish(&p, &mut ours));
            let mut reference = BytesMut::new();
            MqttPacket::encode(&p, &mut reference).unwrap();
            proptest::prop_assert_eq!(&ours, &reference);
            let mut read = ours.clone();
            match decode(&mut read, if v5 { 5 } else { 4 }, 1 << 20) {
                Ok(Some(Packet::Publish(back))) => {
                    proptest::prop_assert_eq!(back.topic_name, p.topic_name);
                    proptest::prop_assert_eq!(back.payload, p.payload);
                    proptest::prop_assert_eq!(back.packet_id, p.packet_id);
                    proptest::prop_assert_eq!((back.dup, back.retain), (p.dup, p.retain));
                }
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }

        /// Bad input never panics the decoder, whole or fed in pieces, at either level.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), split in 0usize..600) {
            for version in [0u8, 4, 5] {
                let mut b = BytesMut::from(&data[..split.min(data.len())]);
                let _ = decode(&mut b, version, 256);
                b.extend_from_slice(&data[split.min(data.len())..]);
                for _ in 0..50 {
                    match decode(&mut b, version, 256) {
                        Ok(Some(_)) => continue,
                        _ => break,
                    }
                }
            }
        }
    }
}
