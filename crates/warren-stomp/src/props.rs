//! STOMP headers ↔ the core's message properties, as RabbitMQ's STOMP plugin maps them,
//! so a message keeps its properties across AMQP, STOMP and MQTT.

use warren_core::{AMQPValue, FieldTable, LongString, Properties, ShortString};

use crate::codec::Frame;

/// Headers of a SEND that are about the frame or a property, never copied into the
/// message's header table. `receipt` is not among them: RabbitMQ's plugin keeps it, so the
/// MESSAGE frames of a SEND with a receipt carry it too.
const RESERVED: &[&str] = &[
    "destination",
    "content-length",
    "transaction",
    "content-type",
    "content-encoding",
    "persistent",
    "priority",
    "correlation-id",
    "reply-to",
    "expiration",
    "amqp-message-id",
    "message-id",
    "timestamp",
    "type",
    "user-id",
    "app-id",
    "subscription",
    "redelivered",
    "ack",
    "id",
    "prefetch-count",
    "durable",
    "auto-delete",
    "exclusive",
    "persistent",
];

/// Queue arguments a SUBSCRIBE or SEND may carry (RabbitMQ's list); they declare the queue
/// and are not message headers.
pub const QUEUE_ARGS: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-type",
    "x-single-active-consumer",
    "x-queue-mode",
    "x-queue-master-locator",
    "x-queue-name",
];

/// A boolean header as RabbitMQ's `boolean_header` reads it: `true`/`false`, and the
/// `True`/`False` some Python clients send; anything else is absent.
pub fn flag(f: &Frame, name: &str) -> Option<bool> {
    f.get(name).and_then(parse_bool)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" | "True" => Some(true),
        "false" | "False" => Some(false),
        _ => None,
    }
}

/// Errors in property headers, reported in an ERROR frame.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("'{0}' is not allowed on 'SEND'.")]
    NotAllowed(&'static str),
    #[error("invalid value for header '{0}'")]
    Invalid(&'static str),
}

fn short(v: &str) -> Result<ShortString, HeaderError> {
    // ShortString::from panics beyond 255 bytes: values come from the peer.
    if v.len() > 255 {
        return Err(HeaderError::Invalid("property"));
    }
    Ok(ShortString::from(v))
}

/// The properties of a SEND frame, read in one pass over its headers (this runs for
/// every SEND). For a repeated header the first one counts (STOMP 1.2).
pub fn from_send(f: &Frame) -> Result<Properties, HeaderError> {
    if f.get("message-id").is_some() {
        return Err(HeaderError::NotAllowed("message-id"));
    }
    let mut p = Properties::default();
    let (mut persistent, mut priority, mut timestamp) = (None, None, None);
    let mut table = FieldTable::default();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in f.headers() {
        let slot = match k {
            "content-type" => &mut p.content_type,
            "content-encoding" => &mut p.content_encoding,
            "correlation-id" => &mut p.correlation_id,
            "reply-to" => &mut p.reply_to,
            "expiration" => &mut p.expiration,
            "amqp-message-id" => &mut p.message_id,
            "type" => &mut p.kind,
            "user-id" => &mut p.user_id,
            "app-id" => &mut p.app_id,
            "persistent" => {
                persistent.get_or_insert(v);
                continue;
            }
            "priority" => {
                priority.get_or_insert(v);
                continue;
            }
            "timestamp" => {
                timestamp.get_or_insert(v);
                continue;
            }
            _ if RESERVED.contains(&k) || QUEUE_ARGS.contains(&k) => continue,
            // Names must fit an AMQP short string.
            _ if k.len() > 255 || !seen.insert(k) => continue,
            _ => {
                table.insert(
                    ShortString::from(k),
                    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
                );
                continue;
            }
        };
        if slot.is_none() {
            *slot = Some(short(v)?);
        }
    }
    // RabbitMQ refuses a `persistent` header that is not a boolean (an ERROR, the frame
    // dropped), rather than sending the message transient.
    let persistent = match persistent {
        Some(v) => parse_bool(v).ok_or(HeaderError::Invalid("persistent"))?,
        None => false,
    };
    p.delivery_mode = Some(if persistent { 2 } else { 1 });
    if let Some(v) = priority {
        p.priority = Some(
            v.trim()
                .parse()
                .map_err(|_| HeaderError::Invalid("priority"))?,
        );
    }
    if let Some(v) = timestamp {
        p.timestamp = Some(
            v.trim()
                .parse()
                .map_err(|_| HeaderError::Invalid("timestamp"))?,
        );
    }
    if !table.inner().is_empty() {
        p.headers = Some(table);
    }
    Ok(p)
}

/// Adds a delivered message's property headers to a MESSAGE frame.
/// A message's properties as MESSAGE headers, handed to `put` one by one (the session
/// writes them straight into its output). Table entries never repeat a header set here
/// or by the session: those names are [`RESERVED`].
pub fn to_message(p: &Properties, put: &mut impl FnMut(&str, &str)) {
    if let Some(h) = &p.headers {
        for (k, v) in h.inner() {
            let k = k.as_str();
            if RESERVED.contains(&k) {
                continue;
            }
            if let Some(text) = header_text(v) {
                put(k, &text);
            }
        }
    }
    let mut short = |name: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            put(name, v.as_str());
        }
    };
    short("app-id", &p.app_id);
    short("user-id", &p.user_id);
    short("type", &p.kind);
    short("amqp-message-id", &p.message_id);
    short("expiration", &p.expiration);
    short("correlation-id", &p.correlation_id);
    short("content-encoding", &p.content_encoding);
    short("content-type", &p.content_type);
    if let Some(ts) = p.timestamp {
        put("timestamp", &ts.to_string());
    }
    if let Some(r) = &p.reply_to {
        // An AMQP reply-to is a bare queue name: STOMP clients reply through /reply-queue/.
        let r = r.as_str();
        if r.starts_with('/') {
            put("reply-to", r);
        } else {
            put("reply-to", &format!("/reply-queue/{r}"));
        }
    }
    if let Some(pr) = p.priority {
        put("priority", &pr.to_string());
    }
    if p.delivery_mode == Some(2) {
        put("persistent", "true");
    }
}

/// A header table value as STOMP header text; tables and arrays are not representable.
fn header_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::Float(x) => x.to_string(),
        AMQPValue::Double(x) => x.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        _ => return None,
    })
}

/// `x-` queue arguments from SUBSCRIBE/SEND headers, typed as RabbitMQ's STOMP plugin
/// types them (numbers for the numeric ones, booleans for the flag).
pub fn queue_arguments(f: &Frame) -> Result<FieldTable, HeaderError> {
    let mut t = FieldTable::default();
    for &name in QUEUE_ARGS {
        if name == "x-queue-name" {
            continue;
        }
        let Some(v) = f.get(name) else { continue };
        let value = match name {
            "x-expires" | "x-max-length" | "x-max-length-bytes" | "x-max-priority"
            | "x-message-ttl" => {
                AMQPValue::LongLongInt(v.trim().parse().map_err(|_| HeaderError::Invalid(name))?)
            }
            "x-single-active-consumer" => AMQPValue::Boolean(parse_bool(v.trim()) == Some(true)),
            _ => AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
        };
        t.insert(ShortString::from(name), value);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_headers_round_trip_through_properties() {
        let f = Frame::new("SEND")
            .with("destination", "/queue/a")
            .with("content-type", "text/plain")
            .with("persistent", "true")
            .with("priority", "3")
            .with("correlation-id", "c1")
            .with("reply-to", "/queue/r")
            .with("expiration", "60000")
            .with("amqp-message-id", "m1")
            .with("timestamp", "1234")
            .with("type", "tt")
            .with("app-id", "aa")
            .with("x-custom", "v")
            .with("x-custom", "ignored")
            .with("x-max-length", "10");
        let p = from_send(&f).unwrap();
        assert_eq!(p.delivery_mode, Some(2));
        assert_eq!(p.priority, Some(3));
        assert_eq!(p.timestamp, Some(1234));
        let mut m = Frame::new("MESSAGE");
        to_message(&p, &mut |k, v| m.push(k, v));
        for (k, v) in [
            ("content-type", "text/plain"),
            ("persistent", "true"),
            ("priority", "3"),
            ("correlation-id", "c1"),
            ("reply-to", "/queue/r"),
            ("expiration", "60000"),
            ("amqp-message-id", "m1"),
            ("timestamp", "1234"),
            ("type", "tt"),
            ("app-id", "aa"),
            ("x-custom", "v"),
        ] {
            assert_eq!(m.get(k), Some(v), "{k}");
        }
        assert_eq!(m.get("x-max-length"), None);
        assert_eq!(m.get("destination"), None);
    }

    #[test]
    fn message_id_on_send_is_refused() {
        let f = Frame::new("SEND").with("message-id", "x");
        assert!(matches!(from_send(&f), Err(HeaderError::NotAllowed(_))));
        let f = Frame::new("SEND").with("priority", "high");
        assert!(matches!(from_send(&f), Err(HeaderError::Invalid(_))));
        // As RabbitMQ: a `persistent` that is not a boolean is refused, not read as false.
        let f = Frame::new("SEND").with("persistent", "maybe");
        assert!(matches!(
            from_send(&f),
            Err(HeaderError::Invalid("persistent"))
        ));
        let f = Frame::new("SEND").with("persistent", "false");
        assert_eq!(from_send(&f).unwrap().delivery_mode, Some(1));
    }

    #[test]
    fn bare_amqp_reply_to_becomes_reply_queue() {
        let p = Properties {
            reply_to: Some("amq.gen-1".into()),
            ..Default::default()
        };
        let mut m = Frame::new("MESSAGE");
        to_message(&p, &mut |k, v| m.push(k, v));
        assert_eq!(m.get("reply-to"), Some("/reply-queue/amq.gen-1"));
    }

    #[test]
    fn queue_arguments_are_typed() {
        let f = Frame::new("SUBSCRIBE")
            .with("x-message-ttl", "1000")
            .with("x-queue-type", "quorum")
            .with("x-single-active-consumer", "true");
        let t = queue_arguments(&f).unwrap();
        assert_eq!(
            t.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(1000))
        );
        assert_eq!(
            t.inner().get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        let bad = Frame::new("SUBSCRIBE").with("x-max-length", "lots");
        assert!(queue_arguments(&bad).is_err());
    }
}
