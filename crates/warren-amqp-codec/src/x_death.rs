//! `x-death` entries in RabbitMQ's field order.
//!
//! AMQP tables are ordered lists on the wire; RabbitMQ writes a dead-letter entry as
//! `count, reason, queue, time, exchange, routing-keys[, original-expiration]`
//! (rabbit_dead_letter), but amq-protocol's `FieldTable` is a sorted map, so its encoding
//! comes out alphabetical. Clients that keep table order show the difference (php-amqp's
//! `amqpqueue_nested_headers` test prints the entry). The rest of the headers table is
//! sorted by both, so only the entries inside `x-death` are reordered here.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::generation::{gen_short_string, gen_value};
use amq_protocol::types::{AMQPValue, FieldTable};

/// RabbitMQ 3.x's order of an `x-death` entry's fields.
const ORDER: [&str; 7] = [
    "count",
    "reason",
    "queue",
    "time",
    "exchange",
    "routing-keys",
    "original-expiration",
];

/// `encoded` (from `gen_properties`) with the `x-death` entries of its headers in
/// RabbitMQ's order; `None` when there are none (or the bytes are not as expected).
pub(crate) fn reorder(props: &BasicProperties, encoded: &[u8]) -> Option<Vec<u8>> {
    let headers = props.headers().as_ref()?;
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return None;
    };
    if !deaths
        .as_slice()
        .iter()
        .any(|d| matches!(d, AMQPValue::FieldTable(_)))
    {
        return None;
    }
    // The headers table follows the flags and the two short strings before it.
    let mut at = 2;
    for s in [props.content_type(), props.content_encoding()]
        .into_iter()
        .flatten()
    {
        at += 1 + s.as_str().len();
    }
    let len_bytes: [u8; 4] = encoded.get(at..at + 4)?.try_into().ok()?;
    let old_len = u32::from_be_bytes(len_bytes) as usize;
    let mut entries = Vec::with_capacity(old_len);
    for (k, v) in headers.inner() {
        put(&mut entries, gen_short_string(k.as_str()))?;
        match v {
            AMQPValue::FieldArray(a) if k.as_str() == "x-death" => {
                let mut items = Vec::new();
                for d in a.as_slice() {
                    match d {
                        AMQPValue::FieldTable(t) => {
                            items.push(b'F');
                            put_table(&mut items, t)?;
                        }
                        other => put(&mut items, gen_value(other))?,
                    }
                }
                entries.push(b'A');
                entries.extend_from_slice(&u32::try_from(items.len()).ok()?.to_be_bytes());
                entries.extend_from_slice(&items);
            }
            _ => put(&mut entries, gen_value(v))?,
        }
    }
    // The same fields in another order: anything else means a mistake here, and the
    // sorted encoding is kept.
    if entries.len() != old_len {
        return None;
    }
    let mut out = Vec::with_capacity(encoded.len());
    out.extend_from_slice(&encoded[..at + 4]);
    out.extend_from_slice(&entries);
    out.extend_from_slice(encoded.get(at + 4 + old_len..)?);
    Some(out)
}

/// A table's length and entries, `ORDER`'s fields first, then the rest sorted.
fn put_table(out: &mut Vec<u8>, t: &FieldTable) -> Option<()> {
    let mut body = Vec::new();
    let known = ORDER.iter().filter_map(|k| t.inner().get_key_value(*k));
    let others = t
        .inner()
        .iter()
        .filter(|(k, _)| !ORDER.contains(&k.as_str()));
    for (k, v) in known.chain(others) {
        put(&mut body, gen_short_string(k.as_str()))?;
        put(&mut body, gen_value(v))?;
    }
    out.extend_from_slice(&u32::try_from(body.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&body);
    Some(())
}

fn put<F>(out: &mut Vec<u8>, f: F) -> Option<()>
where
    F: cookie_factory::SerializeFn<Vec<u8>>,
{
    let bytes = cookie_factory::gen_simple(f, Vec::new()).ok()?;
    out.extend_from_slice(&bytes);
    Some(())
}
