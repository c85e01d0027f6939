//! Durable metadata records (vhosts, exchanges, queues, bindings, users): their keys in the
//! store's `meta` column family and their JSON values.

use amq_protocol_types::FieldTable;
use serde::{Deserialize, Serialize};
use warren_store::Op;

use crate::exchange::{Binding, Exchange, ExchangeKind, Target};
use crate::queue::Queue;

pub(crate) const VHOST: &[u8] = b"v\0";
pub(crate) const EXCHANGE: &[u8] = b"e\0";
pub(crate) const QUEUE: &[u8] = b"q\0";
pub(crate) const BINDING: &[u8] = b"b\0";
pub(crate) const USER: &[u8] = b"u\0";
/// MQTT retained messages: `r\0<vhost>\0<topic>` → the encoded message.
pub(crate) const RETAINED: &[u8] = b"r\0";
/// Permissions: `p\0<vhost>\0<user>` → [`PermissionRecord`](crate::permissions::PermissionRecord).
pub(crate) const PERMISSION: &[u8] = b"p\0";
/// Topic permissions: `t\0<vhost>\0<user>\0<exchange>` →
/// [`TopicPermissionRecord`](crate::topic_permissions::TopicPermissionRecord).
pub(crate) const TOPIC_PERMISSION: &[u8] = b"t\0";
/// Broker settings live under `s\0` (`m\0` is MQTT sessions). Set once the default
/// user's permission was granted, so that data dirs from before permissions existed get
/// it exactly once (and a later revoke sticks).
pub(crate) const PERMISSIONS_INITIALISED: &[u8] = b"s\0permissions-initialised";
/// Policies: `y\0<vhost>\0<name>` → [`PolicyRecord`](crate::policies::PolicyRecord).
pub(crate) const POLICY: &[u8] = b"y\0";
/// Operator policies: `O\0<vhost>\0<name>` → the same record.
pub(crate) const OPERATOR_POLICY: &[u8] = b"O\0";
/// Limits: `l\0vhost\0<vhost>` or `l\0user\0<user>` → the
/// [`LimitMap`](crate::limits::LimitMap) as JSON.
pub(crate) const LIMIT: &[u8] = b"l\0";
/// Global runtime parameters: `g\0<name>` → the value as JSON
/// ([`global_parameters`](crate::global_parameters)).
pub(crate) const GLOBAL_PARAMETER: &[u8] = b"g\0";
/// MQTT session state (expiry, QoS 2 packet ids): `m\0<vhost>\0<client id>` → bytes the
/// MQTT front-end encodes; the core only stores them.
pub(crate) const MQTT_SESSION: &[u8] = b"m\0";

fn key(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn put<T: Serialize>(key: Vec<u8>, value: &T) -> Op {
    Op::PutMeta {
        key,
        value: serde_json::to_vec(value).unwrap_or_default(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VHostRecord {
    pub name: String,
    /// Absent in records written before vhosts had metadata.
    #[serde(default)]
    pub metadata: crate::vhost::VHostMetadata,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExchangeRecord {
    pub vhost: String,
    pub name: String,
    pub kind: ExchangeKind,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct QueueRecord {
    pub vhost: String,
    pub name: String,
    pub store_id: u64,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct BindingRecord {
    pub vhost: String,
    pub source: String,
    /// `"queue"` or `"exchange"`.
    pub destination_type: String,
    pub destination: String,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// A user as RabbitMQ stores it: the salted SHA-256 hash in base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub password_hash: String,
    pub hashing_algorithm: String,
    pub tags: Vec<String>,
}

pub(crate) fn vhost_put(name: &str, metadata: &crate::vhost::VHostMetadata) -> Op {
    put(
        key(VHOST, &[name]),
        &VHostRecord {
            name: name.into(),
            metadata: metadata.clone(),
        },
    )
}

pub(crate) fn exchange_put(vhost: &str, x: &Exchange) -> Op {
    put(
        key(EXCHANGE, &[vhost, x.name.as_str()]),
        &ExchangeRecord {
            vhost: vhost.into(),
            name: x.name.as_str().into(),
            kind: x.kind,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: x.arguments.clone(),
        },
    )
}

pub(crate) fn exchange_delete(vhost: &str, name: &str) -> Op {
    Op::DeleteMeta {
        key: key(EXCHANGE, &[vhost, name]),
    }
}

pub(crate) fn queue_put(vhost: &str, q: &Queue) -> Op {
    put(
        key(QUEUE, &[vhost, q.name.as_str()]),
        &QueueRecord {
            vhost: vhost.into(),
            name: q.name.as_str().into(),
            store_id: q.store_id.0,
            auto_delete: q.auto_delete,
            arguments: q.arguments.clone(),
        },
    )
}

pub(crate) fn queue_delete(vhost: &str, name: &str) -> Op {
    Op::DeleteMeta {
        key: key(QUEUE, &[vhost, name]),
    }
}

fn binding_key(vhost: &str, source: &str, b: &Binding) -> Vec<u8> {
    let kind = if b.target.is_queue() { "q" } else { "e" };
    // Arguments are part of a binding's identity; a digest keeps the key short.
    let args = serde_json::to_vec(&b.arguments).unwrap_or_default();
    let digest = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&args);
        d.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    key(
        BINDING,
        &[
            vhost,
            source,
            kind,
            b.target.name(),
            b.routing_key.as_str(),
            &digest,
        ],
    )
}

pub(crate) fn binding_put(vhost: &str, x: &Exchange, b: &Binding) -> Op {
    put(
        binding_key(vhost, x.name.as_str(), b),
        &BindingRecord {
            vhost: vhost.into(),
            source: x.name.as_str().into(),
            destination_type: match b.target {
                Target::Queue(_) => "queue".into(),
                Target::Exchange(_) => "exchange".into(),
            },
            destination: b.target.name().into(),
            routing_key: b.routing_key.as_str().into(),
            arguments: b.arguments.clone(),
        },
    )
}

/// The delete of a binding's record, if the source is durable (only then was it written).
pub(crate) fn binding_delete(vhost: &str, x: &Exchange, b: &Binding) -> Option<Op> {
    x.durable.then(|| Op::DeleteMeta {
        key: binding_key(vhost, x.name.as_str(), b),
    })
}

pub(crate) fn retained_key(vhost: &str, topic: &str) -> Vec<u8> {
    key(RETAINED, &[vhost, topic])
}

pub(crate) fn mqtt_session_key(vhost: &str, client_id: &str) -> Vec<u8> {
    key(MQTT_SESSION, &[vhost, client_id])
}

pub(crate) fn user_put(u: &UserRecord) -> Op {
    put(key(USER, &[&u.name]), u)
}

pub(crate) fn user_delete(name: &str) -> Op {
    Op::DeleteMeta {
        key: key(USER, &[name]),
    }
}

pub(crate) fn vhost_delete(name: &str) -> Op {
    Op::DeleteMeta {
        key: key(VHOST, &[name]),
    }
}

pub(crate) fn permission_put(p: &crate::permissions::PermissionRecord) -> Op {
    put(key(PERMISSION, &[&p.vhost, &p.user]), p)
}

pub(crate) fn permission_delete(vhost: &str, user: &str) -> Op {
    Op::DeleteMeta {
        key: key(PERMISSION, &[vhost, user]),
    }
}

pub(crate) fn topic_permission_put(p: &crate::topic_permissions::TopicPermissionRecord) -> Op {
    put(key(TOPIC_PERMISSION, &[&p.vhost, &p.user, &p.exchange]), p)
}

pub(crate) fn topic_permission_delete(vhost: &str, user: &str, exchange: &str) -> Op {
    Op::DeleteMeta {
        key: key(TOPIC_PERMISSION, &[vhost, user, exchange]),
    }
}

pub(crate) fn permissions_initialised() -> Op {
    Op::PutMeta {
        key: PERMISSIONS_INITIALISED.to_vec(),
        value: b"1".to_vec(),
    }
}

/// The key prefix of a kind of policy.
pub(crate) fn policy_prefix(kind: crate::policies::PolicyKind) -> &'static [u8] {
    match kind {
        crate::policies::PolicyKind::User => POLICY,
        crate::policies::PolicyKind::Operator => OPERATOR_POLICY,
    }
}

pub(crate) fn policy_put(
    kind: crate::policies::PolicyKind,
    p: &crate::policies::PolicyRecord,
) -> Op {
    put(key(policy_prefix(kind), &[&p.vhost, &p.name]), p)
}

pub(crate) fn policy_delete(kind: crate::policies::PolicyKind, vhost: &str, name: &str) -> Op {
    Op::DeleteMeta {
        key: key(policy_prefix(kind), &[vhost, name]),
    }
}

pub(crate) fn limits_put(
    owner: crate::limits::LimitOwner,
    who: &str,
    limits: &crate::limits::LimitMap,
) -> Op {
    if limits.is_empty() {
        return Op::DeleteMeta {
            key: key(LIMIT, &[owner.key(), who]),
        };
    }
    put(key(LIMIT, &[owner.key(), who]), limits)
}

pub(crate) fn global_parameter_put(name: &str, value: &serde_json::Value) -> Op {
    put(key(GLOBAL_PARAMETER, &[name]), value)
}

pub(crate) fn global_parameter_delete(name: &str) -> Op {
    Op::DeleteMeta {
        key: key(GLOBAL_PARAMETER, &[name]),
    }
}

/// The parameter name of a global parameter key.
pub(crate) fn global_parameter_name(k: &[u8]) -> Option<String> {
    let rest = k.strip_prefix(GLOBAL_PARAMETER)?;
    std::str::from_utf8(rest).ok().map(str::to_owned)
}

/// Splits a limits key into (owner, name).
pub(crate) fn limits_key_parts(k: &[u8]) -> Option<(crate::limits::LimitOwner, String)> {
    let rest = k.strip_prefix(LIMIT)?;
    let text = std::str::from_utf8(rest).ok()?;
    let (owner, who) = text.split_once('\0')?;
    let owner = match owner {
        "vhost" => crate::limits::LimitOwner::VHost,
        "user" => crate::limits::LimitOwner::User,
        _ => return None,
    };
    Some((owner, who.to_owned()))
}
