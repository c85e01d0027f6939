//! Hand-written decoders for the client methods sent once per message: basic.publish and
//! basic.ack (AMQP 0-9-1 §1.8.3.7, §1.8.3.13).
//!
//! amq-protocol's generated parsers read a method's bit fields into an `AMQPFlags`, a
//! `Vec` with a `String` per flag name, then look each flag up by name: three allocations
//! and a string compare per flag on every publish and ack. These read the same bytes into
//! the same values. Anything they do not accept whole (a short frame, bad UTF-8, trailing
//! bytes) is left to amq-protocol's parser, so errors stay exactly as they were; the tests
//! compare both parsers on valid and invalid input.

use amq_protocol::protocol::{basic, AMQPClass};

/// basic.publish or basic.ack from a method frame's payload (class and method ids
/// first); None for any other method, or input amq-protocol should judge.
pub(crate) fn decode(payload: &[u8]) -> Option<AMQPClass> {
    match payload.get(..4)? {
        [0, 60, 0, 40] => publish(&payload[4..]),
        [0, 60, 0, 80] => ack(&payload[4..]),
        _ => None,
    }
}

/// reserved-1 (short), exchange (shortstr), routing-key (shortstr), mandatory and
/// immediate (bits 0 and 1 of one octet).
fn publish(b: &[u8]) -> Option<AMQPClass> {
    let b = b.get(2..)?;
    let (exchange, b) = short_string(b)?;
    let (routing_key, b) = short_string(b)?;
    let [bits] = b else {
        return None;
    };
    Some(AMQPClass::Basic(basic::AMQPMethod::Publish(
        basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        },
    )))
}

/// delivery-tag (longlong), multiple (bit 0 of one octet).
fn ack(b: &[u8]) -> Option<AMQPClass> {
    let [t0, t1, t2, t3, t4, t5, t6, t7, bits] = *b else {
        return None;
    };
    Some(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag: u64::from_be_bytes([t0, t1, t2, t3, t4, t5, t6, t7]),
        multiple: bits & 1 != 0,
    })))
}

/// A length-prefixed UTF-8 string and the bytes after it.
fn short_string(b: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = b.split_first()?;
    let len = len as usize;
    let s = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((s, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::parse_class;
    use proptest::prelude::*;

    /// What amq-protocol makes of the same payload, when it takes all of it.
    fn theirs(payload: &[u8]) -> Option<AMQPClass> {
        match parse_class(payload) {
            Ok((&[], m)) => Some(m),
            _ => None,
        }
    }

    fn publish_bytes(exchange: &[u8], key: &[u8], bits: u8) -> Vec<u8> {
        let mut v = vec![0, 60, 0, 40, 0, 0, exchange.len() as u8];
        v.extend_from_slice(exchange);
        v.push(key.len() as u8);
        v.extend_from_slice(key);
        v.push(bits);
        v
    }

    #[test]
    fn spec_bytes() {
        let m = decode(&publish_bytes(b"amq.topic", b"a.b", 0b11)).unwrap();
        assert_eq!(
            m,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "amq.topic".into(),
                routing_key: "a.b".into(),
                mandatory: true,
                immediate: true,
            }))
        );
        let ack = [0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 1, 2, 1];
        assert_eq!(
            decode(&ack),
            Some(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 258,
                multiple: true,
            })))
        );
        // Not ours: basic.nack, and a publish cut short or with a byte too many.
        assert_eq!(decode(&[0, 60, 0, 120, 0, 0, 0, 0, 0, 0, 0, 1, 0]), None);
        let full = publish_bytes(b"x", b"k", 0);
        assert_eq!(decode(&full[..full.len() - 1]), None);
        assert_eq!(decode(&[full.as_slice(), &[0]].concat()), None);
        // Invalid UTF-8 is left to amq-protocol, which refuses it too.
        let bad = publish_bytes(&[0xff], b"k", 0);
        assert_eq!(decode(&bad), None);
        assert_eq!(theirs(&bad), None);
    }

    proptest! {
        /// Whatever this decoder accepts, amq-protocol decodes to the same method.
        #[test]
        fn agrees_with_amq_protocol(
            id in prop_oneof![Just(40u8), Just(80u8)],
            tail in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut payload = vec![0, 60, 0, id];
            payload.extend_from_slice(&tail);
            if let Some(ours) = decode(&payload) {
                prop_assert_eq!(Some(ours), theirs(&payload));
            }
        }

        /// Every well-formed publish is taken by the fast path, with amq-protocol's result.
        #[test]
        fn takes_every_publish(
            exchange in "[a-z.é]{0,60}",
            key in "\\PC{0,40}",
            bits in any::<u8>(),
        ) {
            let payload = publish_bytes(exchange.as_bytes(), key.as_bytes(), bits);
            prop_assume!(exchange.len() < 256 && key.len() < 256);
            let ours = decode(&payload);
            prop_assert!(ours.is_some());
            prop_assert_eq!(ours, theirs(&payload));
        }

        #[test]
        fn takes_every_ack(tag in any::<u64>(), bits in any::<u8>()) {
            let mut payload = vec![0, 60, 0, 80];
            payload.extend_from_slice(&tag.to_be_bytes());
            payload.push(bits);
            let ours = decode(&payload);
            prop_assert!(ours.is_some());
            prop_assert_eq!(ours, theirs(&payload));
        }
    }
}
