use amq_protocol::protocol::{basic, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use proptest::prelude::*;

use super::*;

fn decode_all(mut buf: BytesMut, frame_max: u32) -> Result<Vec<Frame>, FrameError> {
    let mut out = Vec::new();
    while let Some(f) = decode_frame(&mut buf, frame_max)? {
        out.push(f);
    }
    assert!(
        buf.is_empty() || buf.len() < 7 || decode_frame(&mut buf.clone(), frame_max)?.is_none()
    );
    Ok(out)
}

fn publish(exchange: &str, key: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: exchange.into(),
        routing_key: key.into(),
        mandatory: true,
        immediate: false,
    }))
}

#[test]
fn protocol_header() {
    // AMQP 0-9's header is taken as 0-9-1, as RabbitMQ does.
    let mut b = BytesMut::from(&b"AMQP\x01\x01\x00\x09"[..]);
    assert_eq!(decode_protocol_header(&mut b), Some(HeaderCheck::Ok));
    let mut b = BytesMut::from(&b"AMQP\x01\x01\x08\x00"[..]);
    assert_eq!(
        decode_protocol_header(&mut b),
        Some(HeaderCheck::Wrong),
        "0-8"
    );
    let mut b = BytesMut::from(&b"AMQP\x00\x00\x09\x01rest"[..]);
    assert_eq!(decode_protocol_header(&mut b), Some(HeaderCheck::Ok));
    assert_eq!(&b[..], b"rest");
    let mut b = BytesMut::from(&b"AMQ"[..]);
    assert_eq!(decode_protocol_header(&mut b), None);
    let mut b = BytesMut::from(&b"AMQP\x00\x00\x08\x00"[..]);
    assert_eq!(decode_protocol_header(&mut b), Some(HeaderCheck::Wrong));
    let mut b = BytesMut::from(&b"GET /"[..]);
    assert_eq!(decode_protocol_header(&mut b), Some(HeaderCheck::Wrong));
}

#[test]
fn heartbeat_spec_bytes() {
    let mut out = BytesMut::new();
    encode_heartbeat(&mut out);
    assert_eq!(&out[..], &[8, 0, 0, 0, 0, 0, 0, 0xCE]);
    assert_eq!(decode_all(out, 4096).unwrap(), vec![Frame::Heartbeat(0)]);
}

#[test]
fn channel_open_spec_bytes() {
    // channel.open on channel 1: class 20, method 10, reserved shortstr "".
    let raw = [1u8, 0, 1, 0, 0, 0, 5, 0, 20, 0, 10, 0, 0xCE];
    let frames = decode_all(BytesMut::from(&raw[..]), 4096).unwrap();
    assert_eq!(
        frames,
        vec![Frame::Method(
            1,
            Box::new(AMQPClass::Channel(channel::AMQPMethod::Open(
                channel::Open {}
            )))
        )]
    );
}

#[test]
fn start_ok_plain_from_a_client() {
    let mut args = vec![0u8, 0, 0, 0]; // empty client properties
    args.extend_from_slice(b"\x05PLAIN");
    args.extend_from_slice(&[0, 0, 0, 12]);
    args.extend_from_slice(b"\0guest\0guest");
    args.extend_from_slice(b"\x05en_US");
    let mut payload = vec![0, 10, 0, 11];
    payload.extend(args);
    let mut raw = vec![1u8, 0, 0];
    raw.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    raw.extend(payload);
    raw.push(0xCE);
    match &decode_all(BytesMut::from(&raw[..]), 0).unwrap()[..] {
        [Frame::Method(0, m)] => match m.as_ref() {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(s)) => {
                assert_eq!(s.mechanism.as_str(), "PLAIN");
                assert_eq!(s.response.as_bytes(), b"\0guest\0guest");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn publish_header_body_and_bodies_split_by_frame_max() {
    let mut out = BytesMut::new();
    encode_method(&mut out, 3, &publish("amq.topic", "a.b"));
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_delivery_mode(2);
    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    encode_content(&mut out, 3, &props, &body, 4096);
    let frames = decode_all(out, 4096).unwrap();
    assert_eq!(frames.len(), 2 + 3, "10000 bytes in 4088-byte chunks");
    assert_eq!(
        frames[0],
        Frame::Method(3, Box::new(publish("amq.topic", "a.b")))
    );
    match &frames[1] {
        Frame::Header(3, h) => {
            assert_eq!(h.class_id, 60);
            assert_eq!(h.body_size, 10_000);
            assert_eq!(h.properties, props);
            assert_eq!(h.raw_properties, encode_properties(&props));
        }
        other => panic!("{other:?}"),
    }
    let joined: Vec<u8> = frames[2..]
        .iter()
        .flat_map(|f| match f {
            Frame::Body(3, b) => b.to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(joined, body);
}

/// A header table in the order a client wrote it (not the decoder's key order): the
/// property bytes are kept as sent, so a delivery can pass them through as RabbitMQ does.
#[test]
fn content_header_keeps_the_property_bytes_as_sent() {
    // Flags: content-type (bit 15) and headers (bit 13); "text/plain"; table {z: 1, a: 2}.
    let mut props = vec![0xA0, 0x00, 10];
    props.extend_from_slice(b"text/plain");
    let table: &[u8] = &[1, b'z', b'b', 1, 1, b'a', b'b', 2];
    props.extend_from_slice(&(table.len() as u32).to_be_bytes());
    props.extend_from_slice(table);
    let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    payload.extend_from_slice(&props);
    let mut buf = BytesMut::new();
    put_frame(&mut buf, FRAME_HEADER, 1, &payload);
    let Some(Frame::Header(1, h)) = decode_frame(&mut buf, 0).unwrap() else {
        panic!("a header frame");
    };
    assert_eq!(h.body_size, 5);
    assert_eq!(&h.raw_properties[..], &props[..]);
    let keys: Vec<String> = h
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys, ["a", "z"], "decoded in key order");
    assert_ne!(
        encode_properties(&h.properties),
        h.raw_properties,
        "re-encoding sorts"
    );
}

#[test]
fn empty_body_has_no_body_frame() {
    let mut out = BytesMut::new();
    encode_content(&mut out, 1, &BasicProperties::default(), b"", 4096);
    assert_eq!(decode_all(out, 4096).unwrap().len(), 1);
}

#[test]
fn bad_frame_end_and_oversize_and_unknown_type() {
    let raw = [1u8, 0, 1, 0, 0, 0, 5, 0, 20, 0, 10, 0, 0x00];
    assert_eq!(
        decode_frame(&mut BytesMut::from(&raw[..]), 4096),
        Err(FrameError::BadFrameEnd(0))
    );
    // Only the 7-byte header of a 1 MiB body frame: refused before the payload arrives.
    let head = [3u8, 0, 1, 0, 0x10, 0, 0];
    let e = decode_frame(&mut BytesMut::from(&head[..]), 131_072).unwrap_err();
    assert_eq!(e.reply_code(), 501);
    assert!(matches!(e, FrameError::FrameTooLarge { .. }));
    // RabbitMQ's 8-byte allowance: a payload of frame_max is taken, one more byte is not,
    // with RabbitMQ's text.
    let body = |n: u32| {
        let mut f = vec![3u8, 0, 1];
        f.extend_from_slice(&n.to_be_bytes());
        f.resize(7 + n as usize, b'x');
        f.push(0xCE);
        BytesMut::from(&f[..])
    };
    assert!(matches!(
        decode_frame(&mut body(4096), 4096),
        Ok(Some(Frame::Body(1, b))) if b.len() == 4096
    ));
    let e = decode_frame(&mut body(4097), 4096).unwrap_err();
    assert_eq!(
        e.reply_text(),
        "type 3, all octets = <<>>: {frame_too_large,4097,4088}"
    );
    let e = decode_frame(
        &mut BytesMut::from(&b"\x09\x00\x00\x00\x00\x00\x00\xce"[..]),
        4096,
    )
    .unwrap_err();
    assert_eq!(e, FrameError::UnknownFrameType(9));
}

#[test]
fn unknown_method_is_540_and_bad_arguments_502() {
    let raw = [1u8, 0, 1, 0, 0, 0, 4, 0, 60, 3, 0xE7, 0xCE];
    let e = decode_frame(&mut BytesMut::from(&raw[..]), 4096).unwrap_err();
    assert_eq!(
        e,
        FrameError::UnknownMethod {
            class: 60,
            method: 999
        }
    );
    assert_eq!(e.reply_code(), 540);
    // queue.declare with its arguments cut short.
    let raw = [1u8, 0, 1, 0, 0, 0, 6, 0, 50, 0, 10, 0, 0, 0xCE];
    let e = decode_frame(&mut BytesMut::from(&raw[..]), 4096).unwrap_err();
    assert_eq!(e.reply_code(), 502);
}

/// basic.qos (60, 10): prefetch-size long, prefetch-count short, global bit.
#[test]
fn qos_with_a_prefetch_size_is_540() {
    let qos = |size: u32| {
        let mut f = vec![1u8, 0, 1, 0, 0, 0, 11, 0, 60, 0, 10];
        f.extend_from_slice(&size.to_be_bytes());
        f.extend_from_slice(&[0, 5, 0, 0xCE]);
        BytesMut::from(&f[..])
    };
    let e = decode_frame(&mut qos(4096), 4096).unwrap_err();
    assert_eq!(e, FrameError::PrefetchSize(4096));
    assert!(e.frame_consumed(), "the rest of the input stays in step");
    assert_eq!(
        (e.reply_code(), e.reply_text(), e.method()),
        (540, "prefetch_size!=0 (4096)".into(), (60, 10))
    );
    assert!(matches!(
        decode_frame(&mut qos(0), 4096),
        Ok(Some(Frame::Method(1, _)))
    ));
}

#[test]
fn truncated_frames_need_more_at_every_split() {
    let mut out = BytesMut::new();
    encode_method(&mut out, 1, &publish("", "q"));
    encode_content(&mut out, 1, &BasicProperties::default(), b"hello", 4096);
    let all = out.freeze();
    for cut in 0..all.len() {
        let mut b = BytesMut::from(&all[..cut]);
        let mut n = 0;
        while decode_frame(&mut b, 4096).unwrap().is_some() {
            n += 1;
        }
        assert!(n < 3, "cut {cut}");
    }
}

fn field_table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::btree_map(
        "[a-z]{1,8}",
        prop_oneof![
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<bool>().prop_map(AMQPValue::Boolean),
            ".{0,16}".prop_map(|s| AMQPValue::LongString(LongString::from(s.as_bytes()))),
        ],
        0..4,
    )
    .prop_map(|m| {
        let mut t = FieldTable::default();
        for (k, v) in m {
            t.insert(k.into(), v);
        }
        t
    })
}

proptest! {
    #[test]
    fn methods_and_content_round_trip_in_random_chunks(
        ch in 1u16..100, tag in any::<u64>(), multiple in any::<bool>(),
        key in "[a-z.]{0,30}", headers in field_table(),
        body in proptest::collection::vec(any::<u8>(), 0..20_000),
        frame_max in 4096u32..20_000, chunks in proptest::collection::vec(1usize..500, 1..50),
    ) {
        let ack = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: tag, multiple }));
        let props = BasicProperties::default().with_headers(headers).with_priority(3);
        let mut out = BytesMut::new();
        encode_method(&mut out, ch, &ack);
        encode_method(&mut out, ch, &publish("ex", &key));
        encode_content(&mut out, ch, &props, &body, frame_max);
        let bytes = out.freeze();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < bytes.len() {
            let n = chunks[i % chunks.len()].min(bytes.len() - pos);
            buf.extend_from_slice(&bytes[pos..pos + n]);
            pos += n;
            i += 1;
            while let Some(f) = decode_frame(&mut buf, frame_max).unwrap() {
                frames.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&frames[0], &Frame::Method(ch, Box::new(ack)));
        prop_assert_eq!(&frames[1], &Frame::Method(ch, Box::new(publish("ex", &key))));
        match &frames[2] {
            Frame::Header(c, h) => {
                prop_assert_eq!(*c, ch);
                prop_assert_eq!(&h.properties, &props);
                prop_assert_eq!(h.body_size, body.len() as u64);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        let joined: Vec<u8> = frames[3..].iter().flat_map(|f| match f { Frame::Body(_, b) => b.to_vec(), _ => Vec::new() }).collect();
        prop_assert_eq!(joined, body);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000), frame_max in 0u32..10_000) {
        let mut buf = BytesMut::from(&data[..]);
        let _ = decode_protocol_header(&mut buf.clone());
        for _ in 0..100 {
            match decode_frame(&mut buf, frame_max) {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
    }
}

/// RabbitMQ writes an `x-death` entry's fields in its own order (count, reason, queue,
/// time, exchange, routing-keys, original-expiration), not sorted: php-amqp prints them.
#[test]
fn x_death_entries_keep_rabbitmqs_field_order() {
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("exchange".into(), AMQPValue::LongString("ex".into()));
    death.insert(
        "original-expiration".into(),
        AMQPValue::LongString("100".into()),
    );
    death.insert("queue".into(), AMQPValue::LongString("q".into()));
    death.insert("reason".into(), AMQPValue::LongString("expired".into()));
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongString("k".into())].into()),
    );
    death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
    let mut headers = FieldTable::default();
    headers.insert("a".into(), AMQPValue::LongInt(7));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    headers.insert("z".into(), AMQPValue::Boolean(true));
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_headers(headers)
        .with_delivery_mode(2);
    let encoded = encode_properties(&props);
    let at = |name: &str| {
        encoded
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .unwrap_or_else(|| panic!("{name} encoded"))
    };
    let order = [
        "count",
        "reason",
        "queue",
        "time",
        "exchange",
        "routing-keys",
        "original-expiration",
    ];
    for pair in order.windows(2) {
        assert!(at(pair[0]) < at(pair[1]), "{} before {}", pair[0], pair[1]);
    }
    assert!(at("a") < at("x-death") && at("x-death") < at("\u{1}z"));
    // The same properties decode back.
    let mut buf = BytesMut::new();
    encode_content(&mut buf, 1, &props, b"", 4096);
    let frames = decode_all(buf, 4096).unwrap();
    let Frame::Header(1, h) = &frames[0] else {
        panic!("a header frame");
    };
    assert_eq!(h.properties, props);
}
