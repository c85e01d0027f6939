//! Hand-written encoder for basic.deliver, the one method written per delivered message.
//!
//! amq-protocol's generic path would build a `Deliver` with three owned strings per
//! delivery; this writes the same bytes straight from borrowed ones. A test checks the
//! output against amq-protocol's.

use bytes::{BufMut, BytesMut};

/// Appends a basic.deliver method frame (class 60, method 60; AMQP 0-9-1 §1.8.3.9).
pub fn encode_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    let short = |s: &str| fit_short(s).len();
    let size = 4 + 1 + short(consumer_tag) + 8 + 1 + 1 + short(exchange) + 1 + short(routing_key);
    out.reserve(size + 8);
    out.put_u8(1);
    out.put_u16(channel);
    out.put_u32(size as u32);
    out.put_u16(60);
    out.put_u16(60);
    put_short(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short(out, exchange);
    put_short(out, routing_key);
    out.put_u8(0xCE);
}

fn put_short(out: &mut BytesMut, s: &str) {
    let b = fit_short(s).as_bytes();
    out.put_u8(b.len() as u8);
    out.put_slice(b);
}

/// The longest prefix of `s` that is a short string (≤ 255 bytes, whole characters).
/// Only a routing key can be longer: an MQTT topic (up to 65,535 bytes) reaching an AMQP
/// consumer. RabbitMQ closes that consumer's connection (541); Warren delivers the message
/// with the key cut, which is all 0-9-1 can carry.
pub(crate) fn fit_short(s: &str) -> &str {
    let mut end = s.len().min(u8::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_cut_at_a_character() {
        assert_eq!(fit_short("a.b"), "a.b");
        let key = "é".repeat(200);
        let cut = fit_short(&key);
        assert_eq!(cut.len(), 254);
        assert!(key.starts_with(cut));
        let mut ours = BytesMut::new();
        encode_deliver(&mut ours, 1, "c", 1, false, "amq.topic", &key);
        // The frame's size field matches what was written, and it ends with 0xCE.
        let size = u32::from_be_bytes([ours[3], ours[4], ours[5], ours[6]]) as usize;
        assert_eq!(ours.len(), 7 + size + 1);
        assert_eq!(ours[ours.len() - 1], 0xCE);
    }
    use amq_protocol::protocol::{basic, AMQPClass};

    #[test]
    fn matches_amq_protocol() {
        let mut ours = BytesMut::new();
        encode_deliver(&mut ours, 7, "ctag-1", 42, true, "amq.topic", "a.b.c");
        let mut theirs = BytesMut::new();
        warren_amqp_codec::encode_method(
            &mut theirs,
            7,
            &AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag-1".into(),
                delivery_tag: 42,
                redelivered: true,
                exchange: "amq.topic".into(),
                routing_key: "a.b.c".into(),
            })),
        );
        assert_eq!(ours, theirs);
    }
}
