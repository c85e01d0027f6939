//! Framing over mqtt5-protocol: that crate decodes a complete packet but has no "need more
//! bytes" answer, so the remaining-length varint is peeked here first (MQTT-2.2.3), then the
//! whole packet is split off the buffer without copying.

use bytes::BytesMut;
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
}

/// Decodes one packet; `Ok(None)` until it is complete. `version` is 0 before CONNECT
/// (whose body carries its own level), then 4 or 5.
pub fn decode(buf: &mut BytesMut, version: u8, max: usize) -> Result<Option<Packet>, CodecError> {
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
    let fh = FixedHeader::decode(&mut frame).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let packet = if version == 0 {
        Packet::decode_from_body(fh.packet_type, &fh, &mut frame)
    } else {
        Packet::decode_from_body_with_version(fh.packet_type, &fh, &mut frame, version)
    }
    .map_err(|e| CodecError::Malformed(e.to_string()))?;
    Ok(Some(packet))
}

/// Appends an encoded packet.
pub fn encode<P: MqttPacket>(packet: &P, out: &mut BytesMut) {
    if let Err(e) = packet.encode(out) {
        tracing::warn!(error = %e, "mqtt packet could not be encoded");
    }
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

    proptest::proptest! {
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
