//! AMQP values ↔ JSON as RabbitMQ's management API renders them (arguments, headers,
//! message properties, payloads).

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use warren_core::{Properties, ShortString};

use crate::error::ApiError;

pub use warren_core::json::{json_to_table, table_to_json};

/// Message properties with only the fields that are set, as RabbitMQ shows them.
pub fn properties_to_json(p: &Properties) -> Value {
    let mut m = Map::new();
    let mut s = |k: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            m.insert(k.into(), json!(v.as_str()));
        }
    };
    s("content_type", &p.content_type);
    s("content_encoding", &p.content_encoding);
    s("correlation_id", &p.correlation_id);
    s("reply_to", &p.reply_to);
    s("expiration", &p.expiration);
    s("message_id", &p.message_id);
    s("type", &p.kind);
    s("user_id", &p.user_id);
    s("app_id", &p.app_id);
    s("cluster_id", &p.cluster_id);
    if let Some(h) = &p.headers {
        m.insert("headers".into(), table_to_json(h));
    }
    if let Some(d) = p.delivery_mode {
        m.insert("delivery_mode".into(), json!(d));
    }
    if let Some(pr) = p.priority {
        m.insert("priority".into(), json!(pr));
    }
    if let Some(t) = p.timestamp {
        m.insert("timestamp".into(), json!(t));
    }
    Value::Object(m)
}

fn short(m: &Map<String, Value>, k: &str) -> Result<Option<ShortString>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => ShortString::try_new(s.as_str())
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("property {k} is too long"))),
        Some(Value::Number(n)) => Ok(ShortString::try_new(n.to_string()).ok()),
        Some(_) => Err(ApiError::BadRequest(format!(
            "property {k} must be a string"
        ))),
    }
}

fn small_int(m: &Map<String, Value>, k: &str) -> Result<Option<u8>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest(format!("property {k} must be an integer 0..255"))),
    }
}

/// The `properties` object of a publish request.
pub fn json_to_properties(v: Option<&Value>) -> Result<Properties, ApiError> {
    let empty = Map::new();
    let m = match v {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::BadRequest("properties must be an object".into())),
    };
    Ok(Properties {
        content_type: short(m, "content_type")?,
        content_encoding: short(m, "content_encoding")?,
        headers: m
            .get("headers")
            .filter(|h| h.is_object())
            .map(json_to_table),
        delivery_mode: small_int(m, "delivery_mode")?,
        priority: small_int(m, "priority")?,
        correlation_id: short(m, "correlation_id")?,
        reply_to: short(m, "reply_to")?,
        expiration: short(m, "expiration")?,
        message_id: short(m, "message_id")?,
        timestamp: m.get("timestamp").and_then(Value::as_u64),
        kind: short(m, "type")?,
        user_id: short(m, "user_id")?,
        app_id: short(m, "app_id")?,
        cluster_id: short(m, "cluster_id")?,
    })
}

/// Decodes a publish payload (`payload_encoding` "string" or "base64").
pub fn decode_payload(payload: &str, encoding: &str) -> Result<Bytes, ApiError> {
    match encoding {
        "string" | "" => Ok(Bytes::copy_from_slice(payload.as_bytes())),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map(Bytes::from)
            .map_err(|e| ApiError::BadRequest(format!("payload is not base64: {e}"))),
        other => Err(ApiError::BadRequest(format!(
            "payload_encoding must be string or base64, not {other}"
        ))),
    }
}

/// Encodes a fetched payload: `auto` gives a string when the bytes are UTF-8, else base64.
pub fn encode_payload(body: &[u8], encoding: &str) -> (String, &'static str) {
    if encoding != "base64" {
        if let Ok(s) = std::str::from_utf8(body) {
            return (s.to_owned(), "string");
        }
    }
    (
        base64::engine::general_purpose::STANDARD.encode(body),
        "base64",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let v = json!({"x-message-ttl": 1000, "x-dead-letter-exchange": "dlx", "f": 1.5, "b": true, "a": [1, "x"]});
        let t = json_to_table(&v);
        assert_eq!(table_to_json(&t), v);
    }

    #[test]
    fn payloads() {
        assert_eq!(
            decode_payload("aGk=", "base64").ok(),
            Some(Bytes::from_static(b"hi"))
        );
        assert!(decode_payload("!", "base64").is_err());
        assert_eq!(encode_payload(b"hi", "auto"), ("hi".into(), "string"));
        assert_eq!(encode_payload(&[0xff], "auto"), ("/w==".into(), "base64"));
    }

    #[test]
    fn properties() {
        let p = json_to_properties(Some(
            &json!({"delivery_mode": 2, "headers": {"a": 1}, "content_type": "text/plain"}),
        ))
        .ok();
        let p = p.expect("valid");
        assert_eq!(p.delivery_mode, Some(2));
        assert_eq!(
            properties_to_json(&p),
            json!({"delivery_mode": 2, "headers": {"a": 1}, "content_type": "text/plain"})
        );
        assert!(json_to_properties(Some(&json!({"delivery_mode": 300}))).is_err());
    }
}
