//! AMQP field values ↔ JSON as RabbitMQ renders them (arguments and headers in the
//! management API and in definitions files).

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::{AMQPValue, FieldTable, LongString, ShortString};

pub fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => {
            json!(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_to_json(t: &FieldTable) -> Value {
    let mut m = Map::new();
    for (k, v) in t.inner() {
        m.insert(k.as_str().to_owned(), value_to_json(v));
    }
    Value::Object(m)
}

/// JSON → AMQP the way RabbitMQ's management plugin converts arguments: integers become
/// signed 64-bit (`l`), other numbers doubles, strings long strings.
pub fn json_to_value(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(a) => {
            AMQPValue::FieldArray(a.iter().map(json_to_value).collect::<Vec<_>>().into())
        }
        Value::Object(_) => AMQPValue::FieldTable(json_to_table(v)),
    }
}

pub fn json_to_table(v: &Value) -> FieldTable {
    let mut t = FieldTable::default();
    if let Value::Object(m) = v {
        for (k, v) in m {
            if let Ok(key) = ShortString::try_new(k.as_str()) {
                t.insert(key, json_to_value(v));
            }
        }
    }
    t
}
