//! Definitions in RabbitMQ's JSON format (users with their salted SHA-256 hashes, vhosts,
//! permissions, topic permissions, durable queues, exchanges and bindings), so a file
//! exported from RabbitMQ loads into Warren and the reverse. One implementation for the
//! management API (`/api/definitions`) and for loading a file at boot (RabbitMQ's
//! `load_definitions`).
//!
//! Import is additive and idempotent like RabbitMQ's: existing objects are kept (an
//! inequivalent queue or exchange is an error), missing ones are created in dependency
//! order: users, vhosts, permissions, topic permissions, policies, exchanges, queues,
//! bindings. Parameters are accepted and ignored (logged).

use serde_json::{json, Value};

use crate::error::CoreError;
use crate::json::{json_to_table, table_to_json};
use crate::limits::{LimitMap, LimitOwner};
use crate::meta::UserRecord;
use crate::permissions::PermissionRecord;
use crate::policies::{PolicyKind, PolicyRecord};
use crate::topic_permissions::TopicPermissionRecord;
use crate::{Broker, ExchangeDecl, QueueDecl, ShortString, Target};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionsError {
    /// The file is not what RabbitMQ would accept (a missing field, an unknown vhost).
    #[error("{0}")]
    Invalid(String),
    /// The broker refused an object (an inequivalent queue, a bad regex) or the store failed.
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// `tags` as RabbitMQ takes it: a comma-separated string, or (3.9+) a list.
pub fn parse_tags(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// A topic permission in RabbitMQ's JSON field names.
pub fn topic_permission_json(p: &TopicPermissionRecord) -> Value {
    json!({
        "user": p.user,
        "vhost": p.vhost,
        "exchange": p.exchange,
        "write": p.write,
        "read": p.read,
    })
}

/// The broker's definitions in RabbitMQ's format; with `only`, one vhost's objects
/// without their `vhost` fields (RabbitMQ's per-vhost export). `rabbit_version` is the
/// RabbitMQ version the file claims to come from.
pub fn export(b: &Broker, only: Option<&str>, rabbit_version: &str) -> Value {
    let mut vhosts = b.vhosts();
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    let vhosts: Vec<_> = vhosts
        .into_iter()
        .filter(|v| only.is_none_or(|o| o == v.name))
        .collect();
    let (mut queues, mut exchanges, mut bindings) = (Vec::new(), Vec::new(), Vec::new());
    for vh in &vhosts {
        let mut qs = vh.queues();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        // Every queue but exclusive ones, durable or not, as RabbitMQ 3.10 exports them.
        for q in qs.iter().filter(|q| q.exclusive_owner.is_none()) {
            let mut e = json!({
                "name": q.name.as_str(),
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": table_to_json(&q.arguments),
            });
            if only.is_none() {
                e["vhost"] = json!(vh.name);
            }
            queues.push(e);
        }
        let mut xs = vh.exchanges();
        xs.sort_by(|a, b| a.name.cmp(&b.name));
        for x in xs
            .iter()
            .filter(|x| !x.name.as_str().is_empty() && !x.name.as_str().starts_with("amq."))
        {
            let mut e = json!({
                "name": x.name.as_str(),
                "type": x.kind.as_str(),
                "durable": x.durable,
                "auto_delete": x.auto_delete,
                "internal": x.internal,
                "arguments": table_to_json(&x.arguments),
            });
            if only.is_none() {
                e["vhost"] = json!(vh.name);
            }
            exchanges.push(e);
        }
        let mut bs = vh.bindings();
        bs.sort_by(|a, b| {
            (a.0.as_str(), a.1.target.name(), a.1.routing_key.as_str()).cmp(&(
                b.0.as_str(),
                b.1.target.name(),
                b.1.routing_key.as_str(),
            ))
        });
        for (src, bd) in bs {
            let mut e = json!({
                "source": src.as_str(),
                "destination": bd.target.name(),
                "destination_type": if bd.target.is_queue() { "queue" } else { "exchange" },
                "routing_key": bd.routing_key.as_str(),
                "arguments": table_to_json(&bd.arguments),
            });
            if only.is_none() {
                e["vhost"] = json!(vh.name);
            }
            bindings.push(e);
        }
    }
    let mut out = json!({
        "rabbit_version": rabbit_version,
        "policies": vhosts
            .iter()
            .flat_map(|vh| {
                vh.policies(PolicyKind::User)
                    .records()
                    .map(|p| policy_json(p, only.is_none()))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>(),
        "parameters": parameters_json(b, &vhosts, only.is_none()),
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    });
    if only.is_none() {
        // The whole broker's export names the product too; a vhost's has only
        // rabbit_version (RabbitMQ 3.10).
        out["rabbitmq_version"] = json!(rabbit_version);
        out["product_name"] = json!("Warren");
        out["product_version"] = json!(env!("CARGO_PKG_VERSION"));
        let user_limits = b.limits(LimitOwner::User);
        out["users"] = json!(b
            .users()
            .iter()
            .map(|u| json!({
                "name": u.name,
                "password_hash": u.password_hash,
                "hashing_algorithm": u.hashing_algorithm,
                "tags": u.tags,
                "limits": limits_of(&user_limits, &u.name, json!({})),
            }))
            .collect::<Vec<_>>());
        out["vhosts"] = json!(vhosts
            .iter()
            .map(|v| {
                let m = v.metadata();
                let mut meta = json!({"description": m.description, "tags": m.tags});
                if let Some(t) = &m.default_queue_type {
                    meta["default_queue_type"] = json!(t);
                }
                json!({"name": v.name, "description": m.description, "tags": m.tags,
                       "metadata": meta})
            })
            .collect::<Vec<_>>());
        out["permissions"] = json!(b
            .permissions()
            .iter()
            .map(|p| json!({"user": p.user, "vhost": p.vhost, "configure": p.configure, "write": p.write, "read": p.read}))
            .collect::<Vec<_>>());
        out["topic_permissions"] = json!(b
            .topic_permissions()
            .iter()
            .map(topic_permission_json)
            .collect::<Vec<_>>());
        out["global_parameters"] = json!(b
            .global_parameters()
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect::<Vec<_>>());
    }
    out
}

/// Vhost limits and operator policies as RabbitMQ 3.10 exports them: runtime parameters
/// of components `vhost-limits` (named `limits`) and `operator_policy`.
fn parameters_json(
    b: &Broker,
    vhosts: &[std::sync::Arc<crate::VHost>],
    with_vhost: bool,
) -> Vec<Value> {
    let wanted = |v: &str| vhosts.iter().any(|vh| vh.name == v);
    let mut out = Vec::new();
    let mut add = |vhost: &str, component: &str, name: &str, value: Value| {
        let mut e = json!({"component": component, "name": name, "value": value});
        if with_vhost {
            e["vhost"] = json!(vhost);
        }
        out.push(e);
    };
    for (vhost, limits) in b.limits(LimitOwner::VHost) {
        if wanted(&vhost) {
            add(&vhost, "vhost-limits", "limits", json!(limits));
        }
    }
    for p in b.policies(PolicyKind::Operator) {
        if wanted(&p.vhost) {
            let mut e = policy_parameter_json(&p, "operator_policy");
            if !with_vhost {
                if let Value::Object(m) = &mut e {
                    m.remove("vhost");
                }
            }
            out.push(e);
        }
    }
    out
}

/// A policy as the runtime parameter RabbitMQ keeps it as (component `policy` or
/// `operator_policy`): `{component, name, value: {pattern, apply-to, definition,
/// priority}, vhost}`.
pub fn policy_parameter_json(p: &PolicyRecord, component: &str) -> Value {
    let mut value = policy_json(p, false);
    if let Value::Object(m) = &mut value {
        m.remove("name");
    }
    json!({"component": component, "name": p.name, "value": value, "vhost": p.vhost})
}

/// An owner's limits as an object, or `none` (RabbitMQ writes `{}` for users and `[]` for
/// vhosts without limits).
fn limits_of(all: &[(String, LimitMap)], who: &str, none: Value) -> Value {
    all.iter()
        .find(|(w, _)| w == who)
        .map_or(none, |(_, m)| json!(m))
}

/// A policy in RabbitMQ's JSON (the API's and the definitions file's), with its vhost
/// unless the export is per vhost.
pub fn policy_json(p: &PolicyRecord, with_vhost: bool) -> Value {
    let mut e = json!({
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to,
        "definition": p.definition,
        "priority": p.priority,
    });
    if with_vhost {
        e["vhost"] = json!(p.vhost);
    }
    e
}

/// A policy from its JSON (`pattern`, `apply-to`, `definition`, `priority`).
fn policy_record(p: &Value, vhost: String, name: &str) -> Result<PolicyRecord, DefinitionsError> {
    Ok(PolicyRecord {
        vhost,
        name: name.to_owned(),
        pattern: text(p, "pattern")?.to_owned(),
        apply_to: p
            .get("apply-to")
            .and_then(Value::as_str)
            .unwrap_or("all")
            .to_owned(),
        definition: p
            .get("definition")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        priority: p.get("priority").and_then(Value::as_i64).unwrap_or(0),
    })
}

fn arr<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn text<'a>(v: &'a Value, k: &str) -> Result<&'a str, DefinitionsError> {
    v.get(k).and_then(Value::as_str).ok_or_else(|| {
        DefinitionsError::Invalid(format!("definitions: missing or non-string '{k}' in {v}"))
    })
}

fn flag(v: &Value, k: &str, default: bool) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(default)
}

fn short(s: &str) -> Result<ShortString, DefinitionsError> {
    ShortString::try_new(s).map_err(|_| DefinitionsError::Invalid(format!("name too long: {s}")))
}

/// Imports `defs`; with `only`, every object goes to that vhost (the per-vhost endpoint).
pub async fn import(b: &Broker, defs: &Value, only: Option<&str>) -> Result<(), DefinitionsError> {
    let vhost_of = |e: &Value| -> Result<String, DefinitionsError> {
        match only {
            Some(v) => Ok(v.to_owned()),
            None => Ok(text(e, "vhost")?.to_owned()),
        }
    };
    if only.is_none() {
        for u in arr(defs, "users") {
            let algo = u
                .get("hashing_algorithm")
                .and_then(Value::as_str)
                .unwrap_or(crate::auth::SHA256_ALGORITHM);
            if algo != crate::auth::SHA256_ALGORITHM {
                return Err(DefinitionsError::Invalid(format!(
                    "user {}: hashing algorithm {algo} is not supported",
                    text(u, "name")?
                )));
            }
            b.put_user_record(UserRecord {
                name: text(u, "name")?.to_owned(),
                password_hash: text(u, "password_hash")?.to_owned(),
                hashing_algorithm: algo.to_owned(),
                tags: parse_tags(u.get("tags")),
            })
            .await?;
        }
        for v in arr(defs, "vhosts") {
            // RabbitMQ 3.11+ writes description and tags both at the top and in `metadata`.
            let meta = v.get("metadata").unwrap_or(v);
            let field = |k: &str| meta.get(k).or_else(|| v.get(k));
            let metadata = crate::vhost::VHostMetadata {
                description: field("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                tags: parse_tags(field("tags")),
                default_queue_type: field("default_queue_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            };
            b.put_vhost(text(v, "name")?, metadata).await?;
        }
        // Limits after their owners exist ({} or, from RabbitMQ 3.x vhosts, [] when none).
        for (owner, section) in [(LimitOwner::User, "users"), (LimitOwner::VHost, "vhosts")] {
            for o in arr(defs, section) {
                if let Some(Value::Object(m)) = o.get("limits") {
                    for (name, value) in m {
                        b.set_limit(owner, text(o, "name")?, name, value).await?;
                    }
                }
            }
        }
        for p in arr(defs, "permissions") {
            b.set_permission(PermissionRecord {
                user: text(p, "user")?.to_owned(),
                vhost: text(p, "vhost")?.to_owned(),
                configure: text(p, "configure")?.to_owned(),
                write: text(p, "write")?.to_owned(),
                read: text(p, "read")?.to_owned(),
            })
            .await?;
        }
    }
    if only.is_none() {
        for p in arr(defs, "topic_permissions") {
            b.set_topic_permission(TopicPermissionRecord {
                user: text(p, "user")?.to_owned(),
                vhost: text(p, "vhost")?.to_owned(),
                exchange: text(p, "exchange")?.to_owned(),
                write: text(p, "write")?.to_owned(),
                read: text(p, "read")?.to_owned(),
            })
            .await?;
        }
    }
    for p in arr(defs, "policies") {
        let record = policy_record(p, vhost_of(p)?, text(p, "name")?)?;
        b.set_policy(PolicyKind::User, record).await?;
    }
    // RabbitMQ keeps vhost limits and operator policies as runtime parameters.
    for p in arr(defs, "parameters") {
        let (vhost, value) = (vhost_of(p)?, p.get("value").unwrap_or(&Value::Null));
        match text(p, "component")? {
            "vhost-limits" => {
                for (name, v) in value.as_object().into_iter().flatten() {
                    b.set_limit(LimitOwner::VHost, &vhost, name, v).await?;
                }
            }
            "operator_policy" => {
                let record = policy_record(value, vhost, text(p, "name")?)?;
                b.set_policy(PolicyKind::Operator, record).await?;
            }
            other => tracing::warn!(
                component = other,
                "definitions: runtime parameter component not supported by Warren; ignored"
            ),
        }
    }
    for p in arr(defs, "global_parameters") {
        let value = p.get("value").cloned().unwrap_or(Value::Null);
        b.set_global_parameter(text(p, "name")?, value).await?;
    }
    for x in arr(defs, "exchanges") {
        let v = vhost_of(x)?;
        let vh = b
            .vhost(&v)
            .ok_or_else(|| DefinitionsError::Invalid(format!("definitions: no vhost '{v}'")))?;
        vh.declare_exchange(ExchangeDecl {
            name: short(text(x, "name")?)?,
            kind: text(x, "type")?.to_owned(),
            passive: false,
            durable: flag(x, "durable", true),
            auto_delete: flag(x, "auto_delete", false),
            internal: flag(x, "internal", false),
            arguments: x.get("arguments").map(json_to_table).unwrap_or_default(),
        })
        .await?;
    }
    for q in arr(defs, "queues") {
        let v = vhost_of(q)?;
        let vh = b
            .vhost(&v)
            .ok_or_else(|| DefinitionsError::Invalid(format!("definitions: no vhost '{v}'")))?;
        vh.declare_queue(
            QueueDecl {
                name: short(text(q, "name")?)?,
                passive: false,
                durable: flag(q, "durable", true),
                exclusive: false,
                auto_delete: flag(q, "auto_delete", false),
                arguments: q.get("arguments").map(json_to_table).unwrap_or_default(),
            },
            crate::ConnectionId(0),
        )
        .await?;
    }
    for bd in arr(defs, "bindings") {
        let v = vhost_of(bd)?;
        let vh = b
            .vhost(&v)
            .ok_or_else(|| DefinitionsError::Invalid(format!("definitions: no vhost '{v}'")))?;
        let dest = text(bd, "destination")?;
        let target = match text(bd, "destination_type")? {
            "queue" => Target::Queue(vh.queue(dest)?),
            "exchange" => Target::Exchange(vh.exchange(dest)?.name.clone()),
            other => {
                return Err(DefinitionsError::Invalid(format!(
                    "definitions: unknown destination_type {other}"
                )))
            }
        };
        vh.bind(
            text(bd, "source")?,
            target,
            // A binding key may be a long MQTT filter (RoutingKey).
            text(bd, "routing_key")?.into(),
            bd.get("arguments").map(json_to_table).unwrap_or_default(),
        )
        .await?;
    }
    Ok(())
}
