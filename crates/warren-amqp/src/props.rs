//! AMQP basic properties ↔ the core's protocol-neutral [`Properties`].

use warren_amqp_codec::BasicProperties;
use warren_core::Properties;

/// Takes a client's properties into the core model.
pub fn from_amqp(p: &BasicProperties) -> Properties {
    Properties {
        content_type: p.content_type().clone(),
        content_encoding: p.content_encoding().clone(),
        headers: p.headers().clone(),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: p.correlation_id().clone(),
        reply_to: p.reply_to().clone(),
        expiration: p.expiration().clone(),
        message_id: p.message_id().clone(),
        timestamp: *p.timestamp(),
        kind: p.kind().clone(),
        user_id: p.user_id().clone(),
        app_id: p.app_id().clone(),
        cluster_id: p.cluster_id().clone(),
    }
}

/// Builds AMQP properties for a delivery of a core message.
pub fn to_amqp(p: &Properties) -> BasicProperties {
    let mut b = BasicProperties::default();
    if let Some(v) = &p.content_type {
        b = b.with_content_type(v.clone());
    }
    if let Some(v) = &p.content_encoding {
        b = b.with_content_encoding(v.clone());
    }
    if let Some(v) = &p.headers {
        b = b.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode {
        b = b.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        b = b.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        b = b.with_correlation_id(v.clone());
    }
    if let Some(v) = &p.reply_to {
        b = b.with_reply_to(v.clone());
    }
    if let Some(v) = &p.expiration {
        b = b.with_expiration(v.clone());
    }
    if let Some(v) = &p.message_id {
        b = b.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp {
        b = b.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        b = b.with_type(v.clone());
    }
    if let Some(v) = &p.user_id {
        b = b.with_user_id(v.clone());
    }
    if let Some(v) = &p.app_id {
        b = b.with_app_id(v.clone());
    }
    if let Some(v) = &p.cluster_id {
        b = b.with_cluster_id(v.clone());
    }
    b
}
