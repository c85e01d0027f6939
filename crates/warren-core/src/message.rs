//! The protocol-neutral message: immutable, shared by `Arc` between every queue it was
//! routed to, body as `Bytes` (never copied per queue).

use crate::RoutingKey;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{CoreError, CoreResult};

/// AMQP basic properties, the model every front-end maps into (MQTT 5 and STOMP headers
/// land in `headers` the RabbitMQ way).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    pub content_type: Option<ShortString>,
    pub content_encoding: Option<ShortString>,
    pub headers: Option<FieldTable>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<ShortString>,
    pub reply_to: Option<ShortString>,
    pub expiration: Option<ShortString>,
    pub message_id: Option<ShortString>,
    pub timestamp: Option<u64>,
    pub kind: Option<ShortString>,
    pub user_id: Option<ShortString>,
    pub app_id: Option<ShortString>,
    pub cluster_id: Option<ShortString>,
}

/// A published message.
#[derive(Debug)]
pub struct Message {
    pub exchange: ShortString,
    pub routing_key: RoutingKey,
    pub properties: Properties,
    pub body: Bytes,
    /// A front-end's encoding of the properties, made on first delivery and reused for
    /// every further delivery of this message (AMQP keeps its content-header bytes here).
    pub encoded_properties: OnceLock<Bytes>,
}

/// The largest per-message TTL RabbitMQ takes (`?MAX_EXPIRY_TIMER`, ms, ~49.7 days).
pub const MAX_EXPIRATION_MS: u64 = 4_294_967_295;

/// An `expiration` property as rabbit_basic:parse_expiration reads it (Erlang's
/// `string:to_integer`: an optional sign and digits, nothing else), with RabbitMQ's
/// reply text on refusal: `invalid expiration 'abc': no_integer`.
pub fn parse_expiration(s: &str) -> Result<u64, String> {
    let refuse = |why: String| Err(format!("invalid expiration '{s}': {why}"));
    let digits_from = usize::from(s.starts_with(['+', '-']));
    let digits = s[digits_from..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if digits == 0 {
        return refuse("no_integer".into());
    }
    let end = digits_from + digits;
    if end < s.len() {
        return refuse(format!("{{leftover_string,\"{}\"}}", &s[end..]));
    }
    if s.starts_with('-') && s[1..].bytes().any(|b| b != b'0') {
        return refuse(format!("{{value_negative,{s}}}"));
    }
    match s[digits_from..].parse::<u64>() {
        Ok(n) if n <= MAX_EXPIRATION_MS => Ok(n),
        _ => refuse(format!("{{value_too_large,{}}}", s.trim_start_matches('+'))),
    }
}

impl Message {
    pub fn new(
        exchange: ShortString,
        routing_key: RoutingKey,
        properties: Properties,
        body: Bytes,
    ) -> Self {
        Self {
            exchange,
            routing_key,
            properties,
            body,
            encoded_properties: OnceLock::new(),
        }
    }

    /// A copy with its headers changed by `edit`; the body is shared, not copied. The
    /// front-end's cached encoding of the old properties does not carry over.
    pub fn with_headers(
        &self,
        edit: impl FnOnce(&mut BTreeMap<ShortString, AMQPValue>),
    ) -> Message {
        let mut props = self.properties.clone();
        let mut headers = props
            .headers
            .take()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        edit(&mut headers);
        props.headers = Some(headers.into());
        Message::new(
            self.exchange.clone(),
            self.routing_key.clone(),
            props,
            self.body.clone(),
        )
    }

    /// delivery-mode 2.
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode == Some(2)
    }

    /// The per-message TTL from the `expiration` property, in milliseconds.
    ///
    /// RabbitMQ refuses a non-numeric or negative expiration with 406.
    pub fn expiration_ms(&self) -> CoreResult<Option<u64>> {
        match &self.properties.expiration {
            None => Ok(None),
            Some(s) => parse_expiration(s.as_str())
                .map(Some)
                .map_err(CoreError::precondition),
        }
    }

    /// Serialises the message for the store: `version, flags, properties, exchange,
    /// routing key, body`. Strings are length-prefixed (a u8; the routing key's a u16 in
    /// version 2, for MQTT topics past 255 bytes); headers use AMQP field-table encoding.
    /// Version 1 is still written when the routing key fits, so older stores and newer
    /// ones read each other's messages.
    pub fn encode(&self) -> Bytes {
        let p = &self.properties;
        let mut out = BytesMut::with_capacity(64 + self.body.len());
        let long_key = self.routing_key.as_str().len() > u8::MAX as usize;
        out.put_u8(if long_key { FORMAT_V2 } else { FORMAT_V1 });
        let mut flags: u16 = 0;
        let strs = [
            &p.content_type,
            &p.content_encoding,
            &p.correlation_id,
            &p.reply_to,
            &p.expiration,
            &p.message_id,
            &p.kind,
            &p.user_id,
            &p.app_id,
            &p.cluster_id,
        ];
        for (i, s) in strs.iter().enumerate() {
            if s.is_some() {
                flags |= 1 << i;
            }
        }
        if p.headers.is_some() {
            flags |= 1 << 10;
        }
        if p.delivery_mode.is_some() {
            flags |= 1 << 11;
        }
        if p.priority.is_some() {
            flags |= 1 << 12;
        }
        if p.timestamp.is_some() {
            flags |= 1 << 13;
        }
        out.put_u16(flags);
        for s in strs.iter().copied().flatten() {
            put_short(&mut out, s.as_str());
        }
        if let Some(h) = &p.headers {
            let table = encode_table(h);
            out.put_u32(table.len() as u32);
            out.put_slice(&table);
        }
        if let Some(d) = p.delivery_mode {
            out.put_u8(d);
        }
        if let Some(pr) = p.priority {
            out.put_u8(pr);
        }
        if let Some(t) = p.timestamp {
            out.put_u64(t);
        }
        put_short(&mut out, self.exchange.as_str());
        let key = self.routing_key.as_str();
        if long_key {
            // MQTT topic names are at most 65,535 bytes (MQTT-1.5.3).
            let n = key.len().min(u16::MAX as usize);
            out.put_u16(n as u16);
            out.put_slice(&key.as_bytes()[..n]);
        } else {
            put_short(&mut out, key);
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Inverse of [`Message::encode`]; the body is a zero-copy slice of `data`.
    pub fn decode(mut data: Bytes) -> CoreResult<Message> {
        let bad = || CoreError::internal("corrupt stored message");
        if data.remaining() < 3 {
            return Err(bad());
        }
        let version = data.get_u8();
        if version != FORMAT_V1 && version != FORMAT_V2 {
            return Err(bad());
        }
        let flags = data.get_u16();
        let mut strs: [Option<ShortString>; 10] = Default::default();
        for (i, slot) in strs.iter_mut().enumerate() {
            if flags & (1 << i) != 0 {
                *slot = Some(get_short(&mut data).ok_or_else(bad)?);
            }
        }
        let headers = if flags & (1 << 10) != 0 {
            if data.remaining() < 4 {
                return Err(bad());
            }
            let n = data.get_u32() as usize;
            if data.remaining() < n {
                return Err(bad());
            }
            let raw = data.split_to(n);
            Some(decode_table(&raw).ok_or_else(bad)?)
        } else {
            None
        };
        let get_u8 = |bit: u16, data: &mut Bytes| -> CoreResult<Option<u8>> {
            if flags & (1 << bit) == 0 {
                return Ok(None);
            }
            if data.remaining() < 1 {
                return Err(bad());
            }
            Ok(Some(data.get_u8()))
        };
        let delivery_mode = get_u8(11, &mut data)?;
        let priority = get_u8(12, &mut data)?;
        let timestamp = if flags & (1 << 13) != 0 {
            if data.remaining() < 8 {
                return Err(bad());
            }
            Some(data.get_u64())
        } else {
            None
        };
        let exchange = get_short(&mut data).ok_or_else(bad)?;
        let routing_key = if version == FORMAT_V2 {
            get_string(&mut data, |d| d.get_u16() as usize, 2).map(RoutingKey::from)
        } else {
            get_short(&mut data).map(RoutingKey::from)
        }
        .ok_or_else(bad)?;
        let [content_type, content_encoding, correlation_id, reply_to, expiration, message_id, kind, user_id, app_id, cluster_id] =
            strs;
        Ok(Message::new(
            exchange,
            routing_key,
            Properties {
                content_type,
                content_encoding,
                headers,
                delivery_mode,
                priority,
                correlation_id,
                reply_to,
                expiration,
                message_id,
                timestamp,
                kind,
                user_id,
                app_id,
                cluster_id,
            },
            data,
        ))
    }
}

const FORMAT_V1: u8 = 1;
/// Version 1 with the routing key's length as a u16.
const FORMAT_V2: u8 = 2;

fn put_short(out: &mut BytesMut, s: &str) {
    // Short strings are at most 255 bytes by construction (ShortString), but be safe.
    let b = &s.as_bytes()[..s.len().min(255)];
    out.put_u8(b.len() as u8);
    out.put_slice(b);
}

fn get_short(data: &mut Bytes) -> Option<ShortString> {
    // At most 255 bytes: a u8 length.
    get_string(data, |d| d.get_u8() as usize, 1).map(ShortString::from)
}

/// A UTF-8 string after a length of `width` bytes read by `len`.
fn get_string(
    data: &mut Bytes,
    len: impl FnOnce(&mut Bytes) -> usize,
    width: usize,
) -> Option<String> {
    if data.remaining() < width {
        return None;
    }
    let n = len(data);
    if data.remaining() < n {
        return None;
    }
    let s = data.split_to(n);
    String::from_utf8(s.to_vec()).ok()
}

/// AMQP field-table bytes (with the 4-byte length prefix).
pub fn encode_table(t: &FieldTable) -> Vec<u8> {
    cookie_factory::gen_simple(
        amq_protocol_types::generation::gen_field_table(t),
        Vec::new(),
    )
    .unwrap_or_default()
}

/// Parses AMQP field-table bytes as written by [`encode_table`].
pub fn decode_table(raw: &[u8]) -> Option<FieldTable> {
    amq_protocol_types::parsing::parse_field_table(raw)
        .ok()
        .map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{AMQPValue, LongString};
    use proptest::prelude::*;

    /// RabbitMQ 3.10's answers, read off it with pika.
    #[test]
    fn expiration_as_rabbitmq_parses_it() {
        assert_eq!(parse_expiration("60000"), Ok(60000));
        assert_eq!(parse_expiration("+5"), Ok(5));
        assert_eq!(parse_expiration("0"), Ok(0));
        for (input, why) in [
            ("abc", "no_integer"),
            ("", "no_integer"),
            (" 5", "no_integer"),
            ("-1", "{value_negative,-1}"),
            ("1.5", "{leftover_string,\".5\"}"),
            ("4294967296", "{value_too_large,4294967296}"),
            (
                "99999999999999999999",
                "{value_too_large,99999999999999999999}",
            ),
        ] {
            assert_eq!(
                parse_expiration(input),
                Err(format!("invalid expiration '{input}': {why}")),
                "{input:?}"
            );
        }
    }

    fn short() -> impl Strategy<Value = Option<ShortString>> {
        proptest::option::of("[a-z0-9./-]{0,40}".prop_map(ShortString::from))
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            ct in short(), ce in short(), cid in short(), rt in short(), exp in short(),
            mid in short(), ty in short(), uid in short(), app in short(), cl in short(),
            dm in proptest::option::of(1u8..=2), pr in proptest::option::of(0u8..=9),
            ts in proptest::option::of(any::<u64>()),
            hk in proptest::option::of("[a-z]{1,8}"), hv in ".{0,20}",
            ex in "[a-z.]{0,20}", rk in "[a-z.#*é]{0,40}|[a-z/]{250,700}",
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let headers = hk.map(|k| {
                let mut t = FieldTable::default();
                t.insert(k.into(), AMQPValue::LongString(LongString::from(hv.as_bytes())));
                t
            });
            let props = Properties {
                content_type: ct, content_encoding: ce, headers, delivery_mode: dm, priority: pr,
                correlation_id: cid, reply_to: rt, expiration: exp, message_id: mid, timestamp: ts,
                kind: ty, user_id: uid, app_id: app, cluster_id: cl,
            };
            let m = Message::new(ex.into(), rk.into(), props.clone(), Bytes::from(body.clone()));
            let back = Message::decode(m.encode()).unwrap();
            prop_assert_eq!(back.properties, props);
            prop_assert_eq!(back.body.as_ref(), &body[..]);
            prop_assert_eq!(back.exchange, m.exchange);
            prop_assert_eq!(back.routing_key, m.routing_key);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(Bytes::from(data));
        }
    }

    /// A routing key that fits a short string keeps the version-1 layout byte for byte;
    /// a longer one (an MQTT topic) is written as version 2 and read back whole.
    #[test]
    fn long_routing_keys_take_version_2() {
        let short = Message::new(
            "amq.topic".into(),
            "a.b".into(),
            Properties::default(),
            Bytes::from_static(b"x"),
        );
        let bytes = short.encode();
        assert_eq!(&bytes[..], b"\x01\x00\x00\x09amq.topic\x03a.bx");
        let key = "abc.".repeat(199) + "d";
        let long = Message::new(
            "amq.topic".into(),
            key.as_str().into(),
            Properties::default(),
            Bytes::from_static(b"x"),
        );
        let bytes = long.encode();
        assert_eq!(bytes[0], FORMAT_V2);
        assert_eq!(&bytes[bytes.len() - 1..], b"x");
        let back = Message::decode(bytes).unwrap();
        assert_eq!(back.routing_key.as_str(), key);
        assert_eq!(back.body.as_ref(), b"x");
    }
}
