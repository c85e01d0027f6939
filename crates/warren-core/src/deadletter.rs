//! Dead-lettering the RabbitMQ way: the message is republished to the queue's
//! `x-dead-letter-exchange` with an `x-death` history in its headers.

use crate::RoutingKey;
use std::time::{SystemTime, UNIX_EPOCH};

use amq_protocol_types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use crate::message::{Message, Properties};

/// Why a message left its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Rejected,
    Expired,
    Maxlen,
    /// A quorum queue's `x-delivery-limit` was exceeded.
    DeliveryLimit,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => "rejected",
            DeadReason::Expired => "expired",
            DeadReason::Maxlen => "maxlen",
            DeadReason::DeliveryLimit => "delivery_limit",
        }
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

fn as_str(v: Option<&AMQPValue>) -> Option<String> {
    match v? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The routing keys a message was published with: its key plus the `CC` header's (what
/// `x-death` records; the `BCC` keys are not shown, as in RabbitMQ).
pub fn routing_keys(msg: &Message) -> Vec<String> {
    let mut keys = vec![msg.routing_key.as_str().to_owned()];
    keys.extend(header_keys(msg, "CC"));
    keys
}

/// The sender-selected keys a message also routes on: its `CC` and `BCC` headers'.
pub fn sender_selected_keys(msg: &Message) -> impl Iterator<Item = String> + '_ {
    header_keys(msg, "CC").chain(header_keys(msg, "BCC"))
}

/// The keys of a sender-selected distribution header (an array of strings; RabbitMQ ignores
/// any other type).
fn header_keys<'m>(msg: &'m Message, name: &str) -> impl Iterator<Item = String> + 'm {
    let keys = match msg
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.inner().get(name))
    {
        Some(AMQPValue::FieldArray(a)) => a.as_slice(),
        _ => &[],
    };
    keys.iter().filter_map(|v| as_str(Some(v)))
}

/// `msg` without its `BCC` header, or `None` if it has none: RabbitMQ removes it before
/// delivery, so no consumer sees the blind copies' keys.
pub fn without_bcc(msg: &Message) -> Option<Message> {
    if !msg.properties.headers.as_ref()?.contains_key("BCC") {
        return None;
    }
    Some(msg.with_headers(|h| {
        h.remove("BCC");
    }))
}

/// The copy of `msg` that goes to the dead-letter exchange, with `x-death` updated:
/// the entry for (queue, reason) has its count raised and moves to the front, or a new
/// entry is prepended. `expiration` is removed (kept as `original-expiration`).
pub fn dead_lettered(
    msg: &Message,
    queue: &str,
    reason: DeadReason,
    dl_routing_key: Option<&ShortString>,
) -> Message {
    let mut props: Properties = msg.properties.clone();
    // The sender-selected CC/BCC keys are spent: RabbitMQ drops them from the copy (the
    // original keys are kept in the x-death entry's routing-keys).
    let mut headers: FieldTable = {
        let mut m = props.headers.take().unwrap_or_default().inner().clone();
        m.remove("CC");
        m.remove("BCC");
        m.into()
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let keys = routing_keys(msg);
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let existing = deaths.iter().position(|d| match d {
        AMQPValue::FieldTable(t) => {
            as_str(t.inner().get("queue")).as_deref() == Some(queue)
                && as_str(t.inner().get("reason")).as_deref() == Some(reason.as_str())
        }
        _ => false,
    });
    let entry = match existing {
        Some(i) => {
            let mut t = match deaths.remove(i) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            let count = match t.inner().get("count") {
                Some(AMQPValue::LongLongInt(c)) => *c + 1,
                Some(v) => crate::queue::int_value(v).unwrap_or(0) + 1,
                None => 1,
            };
            t.insert("count".into(), AMQPValue::LongLongInt(count));
            t.insert("time".into(), AMQPValue::Timestamp(now));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), text(reason.as_str()));
            t.insert("queue".into(), text(queue));
            t.insert("time".into(), AMQPValue::Timestamp(now));
            t.insert("exchange".into(), text(msg.exchange.as_str()));
            let mut rk = FieldArray::default();
            for k in &keys {
                rk.push(text(k));
            }
            t.insert("routing-keys".into(), AMQPValue::FieldArray(rk));
            if let Some(exp) = &props.expiration {
                t.insert("original-expiration".into(), text(exp.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !headers.contains_key("x-first-death-reason") {
        headers.insert("x-first-death-reason".into(), text(reason.as_str()));
        headers.insert("x-first-death-queue".into(), text(queue));
        headers.insert("x-first-death-exchange".into(), text(msg.exchange.as_str()));
    }
    // RabbitMQ 3.10 (and 3.12, the version Warren reports) writes no x-last-death-*
    // headers; 3.13 added them.
    props.expiration = None;
    props.headers = Some(headers);
    let routing_key = dl_routing_key
        .map(RoutingKey::from)
        .unwrap_or_else(|| msg.routing_key.clone());
    Message::new(msg.exchange.clone(), routing_key, props, msg.body.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn x_death_counts_per_queue_and_reason() {
        let m = Message::new(
            "ex".into(),
            "rk".into(),
            Properties {
                expiration: Some("100".into()),
                ..Default::default()
            },
            Bytes::from_static(b"x"),
        );
        let once = dead_lettered(&m, "q1", DeadReason::Expired, None);
        assert!(once.properties.expiration.is_none());
        let twice = dead_lettered(&once, "q1", DeadReason::Expired, Some(&"dl".into()));
        assert_eq!(twice.routing_key.as_str(), "dl");
        let h = twice.properties.headers.unwrap();
        let AMQPValue::FieldArray(deaths) = h.inner().get("x-death").unwrap() else {
            panic!("x-death is not an array")
        };
        assert_eq!(deaths.as_slice().len(), 1);
        let AMQPValue::FieldTable(d) = &deaths.as_slice()[0] else {
            panic!()
        };
        assert_eq!(d.inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(
            as_str(d.inner().get("original-expiration")).as_deref(),
            Some("100")
        );
        assert_eq!(
            as_str(h.inner().get("x-first-death-reason")).as_deref(),
            Some("expired")
        );
    }
}
