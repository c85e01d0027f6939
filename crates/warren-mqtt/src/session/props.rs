//! MQTT messages as the core carries them, and back: the headers that hold what AMQP
//! properties cannot (QoS, origin, retain, expiry, MQTT 5 properties), as RabbitMQ's MQTT
//! plugin maps them, so AMQP and STOMP consumers see the same messages.

use bytes::Bytes;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::{PropertyId, PropertyValue};
use warren_core::{AMQPValue, FieldTable, Message, Properties};

use crate::state::now_ms;
use crate::{topic, MAX_SHORT};

/// The header carrying an MQTT publish's QoS through AMQP (RabbitMQ's name).
pub(super) const QOS_HEADER: &str = "x-mqtt-publish-qos";

/// The publishing client id, for no-local subscriptions (MQTT-3.8.3-3).
pub(super) const ORIGIN_HEADER: &str = "x-mqtt-client-id";

/// Set when the message was published with RETAIN (for retain-as-published).
pub(super) const RETAIN_HEADER: &str = "x-mqtt-retain";

/// Unix ms at which a message with an expiry interval expires, so deliveries carry the
/// remaining interval (MQTT-3.3.2-6).
pub(super) const EXPIRY_HEADER: &str = "x-mqtt-expiry-at";

/// MQTT 5 user properties in their original order, with repeated names, when a header
/// table (one value per name, sorted) cannot hold them.
pub(super) const USER_PROPS_HEADER: &str = "x-mqtt-user-properties";

/// MQTT 5 payload format indicator (1 = UTF-8), passed on to 5.0 subscribers.
pub(super) const FORMAT_HEADER: &str = "x-mqtt-payload-format";

/// Correlation data that is no AMQP `correlation_id` (not UTF-8, or over 255 bytes), as
/// RabbitMQ's MQTT plugin keeps it.
pub(super) const CORRELATION_HEADER: &str = "x-correlation-id";

/// A content type or response topic too long for the AMQP property (a short string):
/// kept whole for MQTT 5 subscribers (MQTT-3.3.2-15, -16, -20: forwarded unaltered).
pub(super) const CONTENT_TYPE_HEADER: &str = "x-mqtt-content-type";

pub(super) const RESPONSE_TOPIC_HEADER: &str = "x-mqtt-response-topic";

/// Topic names and filters may have at most this many `/` (Mosquitto's hierarchy limit,
/// with its answers: DISCONNECT 0x81 for such a filter and 0x82 for such a PUBLISH, the
/// connection closed in 3.1.1).
/// It bounds the topic trie's work per message; the spec's limit is the 65,535-byte
/// string (MQTT-1.5.3), which the core carries whole (version 2 of the store's message
/// encoding; an AMQP 0-9-1 consumer sees the routing key cut to 255 bytes).
pub(super) const MAX_TOPIC_DEPTH: usize = 200;

pub(super) fn too_deep(topic: &str) -> bool {
    topic.bytes().filter(|b| *b == b'/').count() > MAX_TOPIC_DEPTH
}

/// A message published over MQTT, as the core carries it; `None` for a topic deeper than
/// [`MAX_TOPIC_DEPTH`].
pub(super) fn mqtt_message(topic_name: &str, payload: Bytes, qos: u8) -> Option<Message> {
    if too_deep(topic_name) {
        return None;
    }
    let mut headers = FieldTable::default();
    headers.insert(QOS_HEADER.into(), AMQPValue::ShortShortUInt(qos));
    Some(Message::new(
        "amq.topic".into(),
        topic::to_amqp(topic_name).into(),
        Properties {
            headers: Some(headers),
            // QoS ≥ 1 messages are persistent, so durable sessions keep them.
            delivery_mode: Some(if qos > 0 { 2 } else { 1 }),
            ..Default::default()
        },
        payload,
    ))
}

/// Marks who published a message and whether with RETAIN (for no-local and
/// retain-as-published at delivery).
pub(super) fn set_origin(msg: &mut Message, client_id: &str, retain: bool) {
    let h = msg
        .properties
        .headers
        .get_or_insert_with(FieldTable::default);
    // A long string: the AMQP field-table codec has no short-string values.
    h.insert(
        ORIGIN_HEADER.into(),
        AMQPValue::LongString(client_id.as_bytes().into()),
    );
    if retain {
        h.insert(RETAIN_HEADER.into(), AMQPValue::Boolean(true));
    }
}

pub(super) fn header<'a>(m: &'a Message, k: &str) -> Option<&'a AMQPValue> {
    m.properties.headers.as_ref().and_then(|h| h.inner().get(k))
}

/// Seconds left of a message's expiry interval: `None` without one, `Some(0)` when expired.
pub(super) fn remaining_expiry(m: &Message) -> Option<u32> {
    let at = warren_core::queue::int_value(header(m, EXPIRY_HEADER)?)? as u64;
    let now = now_ms();
    if at <= now {
        return Some(0);
    }
    Some(((at - now).div_ceil(1000)).min(u32::MAX as u64) as u32)
}

/// MQTT 5 PUBLISH properties into the core's AMQP-style properties, as RabbitMQ maps them:
/// content type, response topic (→ reply_to, as a routing key), correlation data (→
/// correlation_id when it is short UTF-8, else a header), user properties (→ headers);
/// message expiry (→ per-message TTL `expiration`, plus the deadline for the remaining
/// interval at delivery), payload format indicator (→ a header for 5.0 subscribers).
pub(super) fn map_v5_properties(p: &mqtt5_protocol::Properties, props: &mut Properties) {
    let expiry = p.get_message_expiry_interval();
    if let Some(secs) = expiry {
        // Capped at the longest TTL the core takes (~49.7 days, RabbitMQ's limit): a
        // longer expiry would make the publish a 406 instead.
        let ms = (secs as u64 * 1000).min(warren_core::message::MAX_EXPIRATION_MS);
        props.expiration = Some(ms.to_string().as_str().into());
    }
    let headers = props.headers.get_or_insert_with(FieldTable::default);
    // What no AMQP property can hold travels whole in a header (see v5_properties_of).
    let mut keep = |name: &str, bytes: &[u8]| {
        headers.insert(name.into(), AMQPValue::LongString(bytes.into()));
    };
    if let Some(PropertyValue::Utf8String(ct)) = p.get(PropertyId::ContentType) {
        if ct.len() <= MAX_SHORT {
            props.content_type = Some(ct.as_str().into());
        } else {
            keep(CONTENT_TYPE_HEADER, ct.as_bytes());
        }
    }
    if let Some(PropertyValue::Utf8String(rt)) = p.get(PropertyId::ResponseTopic) {
        let amqp = topic::to_amqp(rt);
        if amqp.len() <= MAX_SHORT {
            props.reply_to = Some(amqp.as_str().into());
        } else {
            keep(RESPONSE_TOPIC_HEADER, rt.as_bytes());
        }
    }
    if let Some(PropertyValue::BinaryData(cd)) = p.get(PropertyId::CorrelationData) {
        match std::str::from_utf8(cd) {
            Ok(s) if s.len() <= MAX_SHORT => props.correlation_id = Some(s.into()),
            _ => keep(CORRELATION_HEADER, cd),
        }
    }
    if let Some(secs) = expiry {
        headers.insert(
            EXPIRY_HEADER.into(),
            AMQPValue::LongLongInt((now_ms() + secs as u64 * 1000) as i64),
        );
    }
    // MQTT-3.3.2-4: forwarded unaltered, 0 (unspecified bytes) as well as 1 (UTF-8).
    if let Some(PropertyValue::Byte(b)) = p.get(PropertyId::PayloadFormatIndicator) {
        headers.insert(FORMAT_HEADER.into(), AMQPValue::ShortShortUInt(*b));
    }
    // User properties become headers; a table keeps one value per name in name order, so
    // when the list has repeated names or another order the list itself travels too
    // (MQTT-3.3.2-17/18: forwarded unaltered, in order).
    let mut last: Option<&str> = None;
    let mut in_table_order = true;
    for (id, v) in p.iter() {
        if let (PropertyId::UserProperty, PropertyValue::Utf8StringPair(k, v)) = (id, v) {
            // A name too long for a header key travels in the list only.
            if k.len() <= MAX_SHORT {
                headers.insert(
                    k.as_str().into(),
                    AMQPValue::LongString(v.as_bytes().into()),
                );
            } else {
                in_table_order = false;
            }
            in_table_order &= last.is_none_or(|l| l < k.as_str());
            last = Some(k.as_str());
        }
    }
    // The list is built only in that case: no extra allocation per publish otherwise.
    if !in_table_order {
        let pairs: Vec<AMQPValue> = p
            .iter()
            .filter_map(|(id, v)| match (id, v) {
                (PropertyId::UserProperty, PropertyValue::Utf8StringPair(k, v)) => {
                    Some(AMQPValue::FieldArray(
                        vec![
                            AMQPValue::LongString(k.as_bytes().into()),
                            AMQPValue::LongString(v.as_bytes().into()),
                        ]
                        .into(),
                    ))
                }
                _ => None,
            })
            .collect();
        headers.insert(
            USER_PROPS_HEADER.into(),
            AMQPValue::FieldArray(pairs.into()),
        );
    }
}

/// The user properties list kept by [`map_v5_properties`], as (name, value) pairs.
pub(super) fn user_props_list(h: &FieldTable) -> Option<Vec<(String, String)>> {
    let AMQPValue::FieldArray(a) = h.inner().get(USER_PROPS_HEADER)? else {
        return None;
    };
    a.as_slice()
        .iter()
        .map(|pair| match pair {
            AMQPValue::FieldArray(kv) => match kv.as_slice() {
                [AMQPValue::LongString(k), AMQPValue::LongString(v)] => Some((
                    String::from_utf8_lossy(k.as_bytes()).into_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The reverse of [`map_v5_properties`] for a delivery to an MQTT 5 client.
pub(super) fn v5_properties_of(m: &Message, p: &mut PublishPacket) {
    let props = &m.properties;
    if let Some(ct) = &props.content_type {
        p.properties.set_content_type(ct.as_str().to_owned());
    }
    if let Some(rt) = &props.reply_to {
        p.properties.set_response_topic(topic::to_mqtt(rt.as_str()));
    }
    if let Some(c) = &props.correlation_id {
        p.properties
            .set_correlation_data(Bytes::copy_from_slice(c.as_str().as_bytes()));
    }
    if let Some(h) = &props.headers {
        // MQTT-3.3.2-4: the byte as published, whatever its value (Mosquitto 2.0 forwards
        // values other than 0 and 1 too).
        if let Some(AMQPValue::ShortShortUInt(b)) = h.inner().get(FORMAT_HEADER) {
            let _ = p
                .properties
                .add(PropertyId::PayloadFormatIndicator, PropertyValue::Byte(*b));
        }
        let listed = user_props_list(h);
        if let Some(list) = &listed {
            for (k, v) in list {
                p.properties.add_user_property(k.clone(), v.clone());
            }
        }
        for (k, v) in h.inner() {
            // The properties `map_v5_properties` kept in headers, read in this one pass.
            if let AMQPValue::LongString(s) = v {
                let text = || String::from_utf8_lossy(s.as_bytes()).into_owned();
                match k.as_str() {
                    CONTENT_TYPE_HEADER if props.content_type.is_none() => {
                        p.properties.set_content_type(text())
                    }
                    RESPONSE_TOPIC_HEADER if props.reply_to.is_none() => {
                        p.properties.set_response_topic(text())
                    }
                    CORRELATION_HEADER if props.correlation_id.is_none() => p
                        .properties
                        .set_correlation_data(Bytes::copy_from_slice(s.as_bytes())),
                    _ => {}
                }
            }
            if k.as_str().starts_with("x-")
                || listed
                    .as_ref()
                    .is_some_and(|l| l.iter().any(|(n, _)| n == k.as_str()))
            {
                continue;
            }
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::Boolean(b) => b.to_string(),
                other => match warren_core::queue::int_value(other) {
                    Some(i) => i.to_string(),
                    None => continue,
                },
            };
            p.properties.add_user_property(k.as_str().to_owned(), text);
        }
    }
}

/// The MQTT QoS a message was published with (AMQP messages: 1 if persistent, else 0).
pub(super) fn msg_qos(m: &Message) -> u8 {
    match m
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.inner().get(QOS_HEADER))
    {
        Some(v) => warren_core::queue::int_value(v).unwrap_or(0).clamp(0, 2) as u8,
        None => u8::from(m.is_persistent()),
    }
}
