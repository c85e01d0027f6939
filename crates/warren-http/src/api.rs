//! The `/api` handlers, path by path as RabbitMQ's management plugin has them.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use warren_core::definitions::parse_tags;
use warren_core::{
    Access, Binding, ChannelStat, ConnectionEntry, ConsumerActivity, CoreError, Exchange,
    ExchangeDecl, FieldTable, Message, MsgSeq, Queue, QueueDecl, ResourceKind, ShortString, Target,
    UserRecord, VHost,
};

use crate::auth::Caller;
use crate::convert::{
    decode_payload, encode_payload, json_to_properties, json_to_table, properties_to_json,
    table_to_json,
};
use crate::error::{ApiError, ApiResult};
use crate::history::Windows;
use crate::listing::ListParams;
use crate::stats::{
    Rates, Totals, CHURN, COUNTERS, KEEP_GLOBAL, KEEP_QUEUE, MESSAGE_COUNTERS, QUEUE_COUNTERS,
};

/// Where `recv_oct` is in [`COUNTERS`] (`send_oct` follows).
const RECV_OCT: usize = MESSAGE_COUNTERS;
use crate::{definitions, AppState, RABBITMQ_COMPAT_VERSION};

pub(crate) type Q = Query<HashMap<String, String>>;
type St = State<AppState>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/auth", get(auth_settings))
        .route(
            "/api/extensions",
            get(|_: Caller| async { Json(json!([])) }),
        )
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{node}", get(node))
        .route("/api/vhosts", get(vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(vhost_get).put(vhost_put).delete(vhost_delete),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route("/api/vhosts/{vhost}/connections", get(vhost_connections))
        .route("/api/vhosts/{vhost}/channels", get(vhost_channels))
        .route("/api/users", get(users))
        .route(
            "/api/users/without-permissions",
            get(users_without_permissions),
        )
        .route("/api/users/bulk-delete", post(users_bulk_delete))
        .route(
            "/api/users/{user}",
            get(user_get).put(user_put).delete(user_delete),
        )
        .route("/api/users/{user}/permissions", get(user_permissions))
        .route("/api/permissions", get(permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(permission_get)
                .put(permission_put)
                .delete(permission_delete),
        )
        .merge(crate::topic_permissions::routes())
        .merge(crate::policies::routes())
        .merge(crate::limits::routes())
        .merge(crate::global_parameters::routes())
        .merge(crate::feature_flags::routes())
        .route("/api/connections", get(connections))
        .route(
            "/api/connections/{name}",
            get(connection_get).delete(connection_delete),
        )
        .route("/api/connections/{name}/channels", get(connection_channels))
        .route("/api/channels", get(channels))
        .route("/api/channels/{name}", get(channel_get))
        .route("/api/consumers", get(consumers))
        .route("/api/consumers/{vhost}", get(consumers_in))
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges_in))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchange_get).put(exchange_put).delete(exchange_delete),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            post(exchange_publish),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(exchange_bindings_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(exchange_bindings_destination),
        )
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(queues_in))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue_get).put(queue_put).delete(queue_delete),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            axum::routing::delete(queue_purge),
        )
        .route("/api/queues/{vhost}/{name}/get", post(queue_get_messages))
        .route("/api/queues/{vhost}/{name}/actions", post(queue_action))
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings_in))
        .route(
            "/api/bindings/{vhost}/e/{source}/{dtype}/{dest}",
            get(bindings_between).post(binding_create),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{dtype}/{dest}/{props}",
            get(binding_get).delete(binding_delete),
        )
        .route(
            "/api/definitions",
            get(definitions::export_all).post(definitions::import_all),
        )
        .route(
            "/api/definitions/{vhost}",
            get(definitions::export_vhost).post(definitions::import_vhost),
        )
        .route("/api/health/checks/alarms", get(health_alarms))
        .route("/api/health/checks/local-alarms", get(health_alarms))
        .route("/api/health/checks/virtual-hosts", get(health_ok))
        .route("/api/health/checks/port-listener/{port}", get(health_port))
        .route(
            "/api/health/checks/protocol-listener/{protocol}",
            get(health_protocol),
        )
        .route("/api/health/checks/node-is-quorum-critical", get(health_ok))
        .route(
            "/api/health/checks/node-is-mirror-sync-critical",
            get(health_ok),
        )
        .route("/api/aliveness-test/{vhost}", get(aliveness))
        // Pre-3.8 health check, still used by liveness probes.
        .route("/api/healthchecks/node", get(health_ok))
        .route("/api/healthchecks/node/{node}", get(health_ok))
        .merge(crate::parameters::routes())
        .fallback(|| async { ApiError::ObjectNotFound })
}

// ---------------------------------------------------------------- helpers

/// A request body as JSON; an empty body is `{}` (RabbitMQ accepts a bodiless PUT).
pub(crate) fn body_json(b: &Bytes) -> ApiResult<Value> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value =
        serde_json::from_slice(b).map_err(|e| ApiError::BadRequest(format!("bad JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    Ok(v)
}

fn bool_field(v: &Value, k: &str, default: bool) -> ApiResult<bool> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(_) => Err(ApiError::BadRequest(format!("{k} must be a boolean"))),
    }
}

/// A string field the request must have; RabbitMQ's 400 text when it is missing.
pub(crate) fn required_str(v: &Value, k: &str) -> ApiResult<String> {
    str_field(v, k)
        .map(str::to_owned)
        .ok_or_else(|| ApiError::BadRequest(format!("[{{key_missing,{k}}}]")))
}

pub(crate) fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

fn details(rate: f64) -> Value {
    json!({ "rate": (rate * 10.0).round() / 10.0 })
}

pub(crate) fn created(was_new: bool) -> Response {
    if was_new {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

pub(crate) fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// The default exchange appears in paths as `amq.default`.
fn exchange_path_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

pub(crate) fn list(params: &Q, items: Vec<Value>) -> ApiResult<Json<Value>> {
    Ok(Json(ListParams::parse(&params.0)?.apply(items)?))
}

fn q_flag(params: &Q, k: &str) -> bool {
    params.0.get(k).is_some_and(|v| v == "true")
}

// ---------------------------------------------------------------- rendering

/// A queue as the API shows it, with the samples `windows` ask for.
pub(crate) fn queue_json(s: &AppState, vhost: &str, q: &Queue, windows: &Windows) -> Value {
    let c = q.counts();
    let r: Rates = s.sampler.queue_rates(q.store_id.0);
    let mut queue_totals = Totals::default();
    queue_totals.add(&c);
    let stream = q.is_stream();
    // A stream's unacked deliveries are still in the log (counted in `ready`).
    let messages = c.ready as u64 + if stream { 0 } else { c.unacked as u64 };
    let fp = q.footprint();
    let unacked_bytes = fp.unacked_bytes;
    let (policy, operator) = (q.policy(), q.operator_policy());
    let consumers = q.consumers_info();
    let exclusive_tag = consumers.iter().find(|c| c.exclusive).map(|c| &*c.tag);
    let single_active_tag = consumers
        .iter()
        .find(|c| c.activity == ConsumerActivity::SingleActive)
        .map(|c| &*c.tag);
    let idle_since = s.sampler.queue_idle_since(q.store_id.0);
    let ram_bytes = c.ready_bytes - fp.paged_out_bytes + unacked_bytes;
    // RabbitMQ's consumer_capacity is the share of time the queue could deliver at once;
    // this is the same share taken now: 1 with nothing waiting, else the share of
    // consumers with prefetch room.
    let capacity = match (c.consumers, c.ready) {
        (0, _) => 0.0,
        (_, 0) => 1.0,
        (n, _) => fp.consumers_with_credit as f64 / n as f64,
    };
    let quorum = q.config().quorum;
    let kind = if stream {
        "stream"
    } else if quorum {
        "quorum"
    } else {
        "classic"
    };
    let mut v = json!({
        "name": q.name.as_str(),
        "vhost": vhost,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "arguments": table_to_json(&q.arguments),
        "node": s.broker.config.node_name,
        "state": "running",
        "type": kind,
        "policy": policy.as_ref().map(|p| p.record.name.clone()),
        "operator_policy": operator.as_ref().map(|p| p.record.name.clone()),
        "effective_policy_definition": effective_definition(policy.as_deref(), operator.as_deref()),
        "exclusive_consumer_tag": exclusive_tag,
        "single_active_consumer_tag": single_active_tag,
        "consumers": c.consumers,
        "messages": messages,
        "messages_details": details(r.messages),
        "messages_ready": c.ready,
        "messages_ready_details": details(r.ready),
        "messages_unacknowledged": c.unacked,
        "messages_unacknowledged_details": details(r.unacked),
        "message_bytes": c.ready_bytes + unacked_bytes,
        "message_bytes_ready": c.ready_bytes,
        "message_bytes_unacknowledged": unacked_bytes,
        // A long backlog of a durable queue stays in the store (docs/storage.md, paging).
        "messages_paged_out": c.paged_out,
        "messages_ram": messages.saturating_sub(c.paged_out as u64),
        "messages_ready_ram": c.ready.saturating_sub(c.paged_out),
        "messages_unacknowledged_ram": if stream { 0 } else { c.unacked },

    });
    // (Apart from the literal above: serde_json's macro has a recursion limit.)
    let more = json!({
        "messages_persistent": fp.persistent,
        "message_bytes_persistent": fp.persistent_bytes,
        "message_bytes_ram": ram_bytes,
        "message_bytes_paged_out": fp.paged_out_bytes,
        "head_message_timestamp": fp.head_timestamp,
        "consumer_capacity": capacity,
        "consumer_utilisation": capacity,
        // An estimate: the queue's own record, each in-memory message's record and its
        // body (bodies shared with other queues are counted in each).
        "memory": QUEUE_BASE_BYTES + fp.ram_entries as u64 * MESSAGE_RECORD_BYTES + ram_bytes,
        "recoverable_slaves": null,
    });
    if let (Value::Object(m), Value::Object(extra)) = (&mut v, more) {
        m.extend(extra);
    }
    if let Some(t) = idle_since {
        v["idle_since"] = json!(rabbit_time(t));
    }
    if quorum || stream {
        // One node: it leads and is the only member, as a single-node RabbitMQ shows.
        let node = json!([s.broker.config.node_name]);
        v["leader"] = json!(s.broker.config.node_name);
        v["members"] = node.clone();
        v["online"] = node;
    }
    // RabbitMQ lists a queue's counters once they have moved, and no message_stats at
    // all for a queue nothing has gone through yet.
    let stats = counters_map(&queue_totals, &r, 0..QUEUE_COUNTERS, true);
    if !stats.is_empty() {
        v["message_stats"] = Value::Object(stats);
    }
    if windows.any() {
        windows.apply(&mut v, &s.sampler.queue_history(q.store_id.0, &c));
    }
    v
}

/// What a queue and a message held in memory take besides bodies, for `memory`: the sizes
/// of their records (a queue's lock, lists and config; an entry, a message and its Arc).
const QUEUE_BASE_BYTES: u64 = 1024;
const MESSAGE_RECORD_BYTES: u64 = 256;

/// A time as RabbitMQ 3.10 shows one (`2026-12-03T17:16:51.833+00:00`).
pub(crate) fn rabbit_time(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The policy's definition with the operator policy's limits over it where they are
/// smaller (RabbitMQ's `effective_policy_definition`).
fn effective_definition(
    policy: Option<&warren_core::Policy>,
    operator: Option<&warren_core::Policy>,
) -> Value {
    let mut d = policy
        .map(|p| p.record.definition.clone())
        .unwrap_or_default();
    for (k, v) in operator.map(|p| &p.record.definition).into_iter().flatten() {
        let smaller = match (d.get(k).and_then(Value::as_i64), v.as_i64()) {
            (Some(cur), Some(new)) => new < cur,
            _ => true,
        };
        if smaller {
            d.insert(k.clone(), v.clone());
        }
    }
    Value::Object(d)
}

fn exchange_json(s: &AppState, vhost: &str, x: &Exchange) -> Value {
    let (publish_in, publish_out) = x.publish_counts();
    let (rate_in, rate_out) = s.sampler.exchange_rates(vhost, x.name.as_str());
    let mut e = json!({
        "name": x.name.as_str(),
        "vhost": vhost,
        "type": x.kind.as_str(),
        "durable": x.durable,
        "auto_delete": x.auto_delete,
        "internal": x.internal,
        "arguments": table_to_json(&x.arguments),
        "user_who_performed_action": "rmq-internal",
    });
    // RabbitMQ shows message_stats once something was published to the exchange.
    if publish_in > 0 {
        e["message_stats"] = json!({
            "publish_in": publish_in,
            "publish_in_details": details(rate_in),
            "publish_out": publish_out,
            "publish_out_details": details(rate_out),
        });
    }
    if let Some(p) = x.policy() {
        e["policy"] = json!(p.record.name);
    }
    e
}

/// RabbitMQ's `properties_key`: the quoted routing key, `~` and an arguments digest when
/// there are arguments; `~` alone for an empty key without arguments.
pub(crate) fn props_key(routing_key: &str, args: &FieldTable) -> String {
    // RabbitMQ's quote_plus (space as '+'), then '~' quoted: it separates the parts.
    let quote = |s: &str| {
        percent_encoding::utf8_percent_encode(s, QUOTE_SET)
            .to_string()
            .replace("%20", "+")
    };
    if args.inner().is_empty() {
        if routing_key.is_empty() {
            "~".into()
        } else {
            quote(routing_key)
        }
    } else {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&table_to_json(args))
            .unwrap_or_default()
            .hash(&mut h);
        format!("{}~{:016x}", quote(routing_key), h.finish())
    }
}

/// Characters kept by RabbitMQ's `quote_plus` and by the `Location` of a new binding,
/// except `~`, which separates a properties key's parts.
const QUOTE_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

pub(crate) fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    json!({
        "source": source,
        "vhost": vhost,
        "destination": b.target.name(),
        "destination_type": if b.target.is_queue() { "queue" } else { "exchange" },
        "routing_key": b.routing_key.as_str(),
        "arguments": table_to_json(&b.arguments),
        "properties_key": props_key(b.routing_key.as_str(), &b.arguments),
    })
}

/// The implicit binding of the default exchange to a queue, as RabbitMQ lists it.
fn default_binding_json(vhost: &str, q: &str) -> Value {
    json!({
        "source": "",
        "vhost": vhost,
        "destination": q,
        "destination_type": "queue",
        "routing_key": q,
        "arguments": {},
        "properties_key": props_key(q, &FieldTable::default()),
    })
}

/// Every binding of a vhost, the implicit default-exchange ones first (as RabbitMQ).
fn vhost_bindings(vh: &VHost) -> Vec<Value> {
    let mut queues: Vec<String> = vh
        .queues()
        .iter()
        .map(|q| q.name.as_str().to_owned())
        .collect();
    queues.sort();
    let mut out: Vec<Value> = queues
        .iter()
        .map(|q| default_binding_json(&vh.name, q))
        .collect();
    let mut explicit: Vec<(ShortString, Binding)> = vh.bindings();
    explicit.sort_by(|a, b| {
        (a.0.as_str(), a.1.target.name(), a.1.routing_key.as_str()).cmp(&(
            b.0.as_str(),
            b.1.target.name(),
            b.1.routing_key.as_str(),
        ))
    });
    out.extend(
        explicit
            .iter()
            .map(|(s, b)| binding_json(&vh.name, s.as_str(), b)),
    );
    out
}

fn user_json(u: &UserRecord) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": u.hashing_algorithm,
        "tags": u.tags,
        "limits": {},
    })
}

fn permission_json(p: &warren_core::PermissionRecord) -> Value {
    json!({
        "user": p.user,
        "vhost": p.vhost,
        "configure": p.configure,
        "write": p.write,
        "read": p.read,
    })
}

fn connection_json(s: &AppState, e: &ConnectionEntry) -> Value {
    let i = &e.info;
    let mut client = table_to_json(&i.client_properties.table());
    if client.as_object().is_some_and(|m| m.is_empty()) {
        client = json!({});
    }
    // The name the client gave itself (`connection_name`), as RabbitMQ shows it.
    let user_provided_name = client.get("connection_name").cloned();
    let octets = s.sampler.connection_rates(i.id.0);
    let mut out = json!({
        "name": e.name(),
        "node": s.broker.config.node_name,
        "vhost": i.vhost,
        "user": i.user,
        "user_who_performed_action": i.user,
        "protocol": i.protocol,
        "host": i.local.ip().to_string(),
        "port": i.local.port(),
        "peer_host": i.peer.ip().to_string(),
        "peer_port": i.peer.port(),
        "state": "running",
        "type": "network",
        "ssl": i.tls.is_some(),
        "channels": e.channel_count(),
        "connected_at": e.connected_at,
        "client_properties": client,
        "recv_oct": e.recv_oct.load(std::sync::atomic::Ordering::Relaxed),
        "recv_oct_details": details(octets.recv),
        "send_oct": e.send_oct.load(std::sync::atomic::Ordering::Relaxed),
        "send_oct_details": details(octets.send),
    });
    if let Some(n) = user_provided_name {
        out["user_provided_name"] = n;
    }
    if let Some(m) = i.auth_mechanism {
        out["auth_mechanism"] = json!(m);
    }
    match &i.tuning {
        Some(t) => {
            out["channel_max"] = json!(t.channel_max);
            out["frame_max"] = json!(t.frame_max);
            out["timeout"] = json!(t.heartbeat);
        }
        // RabbitMQ's MQTT and STOMP connections: one channel, no frame limit.
        None => {
            out["channel_max"] = json!(1);
            out["frame_max"] = json!(0);
        }
    }
    if let Some(t) = &i.tls {
        out["ssl_protocol"] = json!(t.protocol);
        out["ssl_cipher"] = json!(t.cipher);
    }
    out
}

/// Consumers of every visible queue: (vhost, queue, consumer).
fn all_consumers(
    s: &AppState,
    caller: &Caller,
    only_vhost: Option<&str>,
) -> Vec<(String, Arc<Queue>, warren_core::ConsumerInfo)> {
    let mut out = Vec::new();
    for vh in caller.visible_vhosts(&s.broker) {
        if only_vhost.is_some_and(|v| v != vh.name) {
            continue;
        }
        for q in vh.queues() {
            for c in q.consumers_info() {
                out.push((vh.name.clone(), q.clone(), c));
            }
        }
    }
    out
}

fn channel_name(conn: &ConnectionEntry, n: u16) -> String {
    format!("{} ({n})", conn.name())
}

fn channels_json(s: &AppState, caller: &Caller, only_vhost: Option<&str>) -> Vec<Value> {
    let consumers = all_consumers(s, caller, only_vhost);
    let mut out = Vec::new();
    let mut conns = visible_connections(s, caller);
    conns.sort_by_cached_key(|c| c.name());
    for e in conns {
        if only_vhost.is_some_and(|v| v != e.info.vhost) {
            continue;
        }
        out.extend(connection_channels_json(s, &e, &consumers));
    }
    out
}

fn connection_channels_json(
    s: &AppState,
    e: &ConnectionEntry,
    consumers: &[(String, Arc<Queue>, warren_core::ConsumerInfo)],
) -> Vec<Value> {
    e.channel_records()
        .into_iter()
        .map(|rec| {
            let n = rec.number;
            let mine = consumers
                .iter()
                .filter(|(_, _, c)| c.owner == e.info.id && c.channel == n as u64);
            let (count, unacked) =
                mine.fold((0u32, 0u32), |(k, u), (_, _, c)| (k + 1, u + c.unacked));
            let settings = rec.settings;
            let gauge =
                |g: &std::sync::atomic::AtomicU64| g.load(std::sync::atomic::Ordering::Relaxed);
            let mut ch = json!({
                "name": channel_name(e, n),
                "number": n,
                "node": s.broker.config.node_name,
                "vhost": e.info.vhost,
                "user": e.info.user,
                "state": "running",
                "consumer_count": count,
                "messages_unacknowledged": unacked,
                "prefetch_count": settings.prefetch_count,
                "global_prefetch_count": settings.global_prefetch_count,
                "confirm": settings.confirm,
                "transactional": settings.transactional,
                "messages_unconfirmed": gauge(&rec.stats.unconfirmed),
                "messages_uncommitted": gauge(&rec.stats.uncommitted),
                "acks_uncommitted": gauge(&rec.stats.acks_uncommitted),
                "user_who_performed_action": e.info.user,
                "connection_details": {
                    "name": e.name(),
                    "peer_host": e.info.peer.ip().to_string(),
                    "peer_port": e.info.peer.port(),
                },
            });
            let counts = rec.stats.counts();
            let rates = s.sampler.channel_rates(e.info.id.0, n);
            if let Some(stats) = channel_message_stats(&counts, &rates) {
                ch["message_stats"] = stats;
            }
            ch
        })
        .collect()
}

/// A channel's `message_stats`: its publishing and its consuming counters, each group
/// shown once one of its counters moved (as RabbitMQ keeps them in two tables), with
/// `deliver_get` summed as RabbitMQ sums it; `None` for an idle channel.
fn channel_message_stats(
    counts: &warren_core::ChannelCounts,
    rates: &[f64; ChannelStat::ALL.len()],
) -> Option<Value> {
    let mut out = serde_json::Map::new();
    for publishing in [true, false] {
        let group = ChannelStat::ALL
            .iter()
            .filter(|k| k.publishing() == publishing);
        if group.clone().all(|&k| counts[k as usize] == 0) {
            continue;
        }
        for &k in group {
            out.insert(k.name().into(), json!(counts[k as usize]));
            out.insert(format!("{}_details", k.name()), details(rates[k as usize]));
        }
        if !publishing {
            let kinds = [
                ChannelStat::Deliver,
                ChannelStat::DeliverNoAck,
                ChannelStat::Get,
                ChannelStat::GetNoAck,
            ];
            let count: u64 = kinds.iter().map(|&k| counts[k as usize]).sum();
            let rate: f64 = kinds.iter().map(|&k| rates[k as usize]).sum();
            out.insert("deliver_get".into(), json!(count));
            out.insert("deliver_get_details".into(), details(rate));
        }
    }
    (!out.is_empty()).then_some(Value::Object(out))
}

fn consumer_json(s: &AppState, vhost: &str, q: &Queue, c: &warren_core::ConsumerInfo) -> Value {
    let conn = s.broker.connections().get(c.owner);
    let channel_details = match &conn {
        Some(e) => json!({
            "name": channel_name(e, c.channel as u16),
            "number": c.channel,
            "connection_name": e.name(),
            "peer_host": e.info.peer.ip().to_string(),
            "peer_port": e.info.peer.port(),
            "user": e.info.user,
            "node": s.broker.config.node_name,
        }),
        None => json!({}),
    };
    json!({
        "consumer_tag": &*c.tag,
        "queue": { "name": q.name.as_str(), "vhost": vhost },
        "channel_details": channel_details,
        "ack_required": !c.no_ack,
        "exclusive": c.exclusive,
        "prefetch_count": c.prefetch,
        "active": c.activity != ConsumerActivity::Waiting,
        "activity_status": c.activity.as_str(),
        "arguments": table_to_json(&c.arguments),
    })
}

fn visible_connections(s: &AppState, caller: &Caller) -> Vec<Arc<ConnectionEntry>> {
    s.broker
        .connections()
        .list()
        .into_iter()
        .filter(|e| caller.is_monitor() || e.info.user == caller.name)
        .collect()
}

// ---------------------------------------------------------------- overview, nodes

async fn overview(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    let windows = Windows::parse(&params.0)?;
    let (totals, rates) = s.sampler.global(&s.broker);
    let vhosts = caller.visible_vhosts(&s.broker);
    let (mut queues, mut exchanges, mut consumers) = (0usize, 0usize, 0u64);
    for vh in &vhosts {
        let qs = vh.queues();
        queues += qs.len();
        consumers += qs.iter().map(|q| q.consumer_count() as u64).sum::<u64>();
        exchanges += vh.exchanges().len();
    }
    let conns = visible_connections(&s, &caller);
    let channels: usize = conns.iter().map(|c| c.channel_count()).sum();
    let listeners: Vec<Value> = s
        .cfg
        .listeners
        .iter()
        .map(|l| {
            json!({
                "node": s.broker.config.node_name,
                "protocol": l.protocol,
                "ip_address": l.addr.ip().to_string(),
                "port": l.addr.port(),
                // What Warren sets: the listen backlog, and TCP_NODELAY on the sockets
                // its protocol front-ends accept (the HTTP server leaves it off).
                "socket_opts": {
                    "backlog": warren_core::shutdown::LISTEN_BACKLOG,
                    "nodelay": !l.protocol.starts_with("http"),
                },
            })
        })
        .collect();
    let http_port = s
        .cfg
        .listeners
        .iter()
        .find(|l| l.protocol == "http")
        .map(|l| l.addr.port().to_string())
        .unwrap_or_default();
    let exchange_types = exchange_types_json();
    let mut v = json!({
        "management_version": RABBITMQ_COMPAT_VERSION,
        "rabbitmq_version": RABBITMQ_COMPAT_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "erlang_version": "none (Rust)",
        "erlang_full_version": "none (Rust)",
        "cluster_name": s.broker.cluster_name(),
        "node": s.broker.config.node_name,
        "rates_mode": "basic",
        "disable_stats": false,
        "enable_queue_totals": true,
        "is_op_policy_updating_enabled": false,
        "exchange_types": exchange_types,
        "message_stats": counters_json(&totals, &rates, 0..MESSAGE_COUNTERS),
        "queue_totals": {
            "messages": totals.ready + totals.unacked,
            "messages_details": details(rates.messages),
            "messages_ready": totals.ready,
            "messages_ready_details": details(rates.ready),
            "messages_unacknowledged": totals.unacked,
            "messages_unacknowledged_details": details(rates.unacked),
        },
        "object_totals": {
            "connections": conns.len(),
            "channels": channels,
            "consumers": consumers,
            "exchanges": exchanges,
            "queues": queues,
        },
        "churn_rates": counters_json(&totals, &rates, CHURN..COUNTERS.len()),
        // Seconds of samples kept (stats.rs): the broker and vhosts an hour, queues ten
        // minutes once asked for, channels and connections none.
        "sample_retention_policies": {
            "global": [KEEP_GLOBAL.as_secs()],
            "basic": [KEEP_QUEUE.as_secs()],
            "detailed": [],
        },
        "statistics_db_event_queue": 0,
        "listeners": listeners,
        "contexts": [{"node": s.broker.config.node_name, "description": "RabbitMQ Management", "path": "/", "port": http_port}],
    });
    if windows.any() {
        windows.apply_overview(&mut v, &s.sampler.global_history(totals));
    }
    Ok(Json(v))
}

/// `GET /api/auth`, which RabbitMQ's UI reads before logging in (no credentials needed):
/// Warren has basic authentication only, no OAuth 2 / UAA.
async fn auth_settings() -> Json<Value> {
    Json(json!({"enable_uaa": false, "uaa_client_id": "", "uaa_location": ""}))
}

async fn whoami(caller: Caller) -> Json<Value> {
    Json(json!({"name": caller.name, "tags": caller.tags}))
}

fn node_json(s: &AppState) -> Value {
    let r = s.resources();
    let alarms = s.broker.alarms.get();
    // RabbitMQ's plugin names for what this node serves, which tools check for.
    let mut plugins = vec!["rabbitmq_management", "rabbitmq_prometheus"];
    for (protocol, plugin) in [
        ("mqtt", "rabbitmq_mqtt"),
        ("stomp", "rabbitmq_stomp"),
        ("http/web-stomp", "rabbitmq_web_stomp"),
        ("http/web-mqtt", "rabbitmq_web_mqtt"),
    ] {
        if s.cfg.listeners.iter().any(|l| l.protocol == protocol) {
            plugins.push(plugin);
        }
    }
    let mechanisms: Vec<Value> = [
        ("PLAIN", "SASL PLAIN authentication mechanism"),
        ("AMQPLAIN", "QPid AMQPLAIN mechanism"),
        (
            "EXTERNAL",
            "SASL EXTERNAL authentication mechanism (client certificate)",
        ),
    ]
    .iter()
    .map(|(n, d)| json!({"name": n, "description": d, "enabled": true}))
    .collect();
    let connections = s.broker.connections().len();
    let figures = [
        r.mem_used,
        r.fd_used,
        connections as u64,
        r.threads,
        r.disk_free,
    ];
    let rates = s.sampler.node_rates(figures);
    let mut v = json!({
        "name": s.broker.config.node_name,
        "type": "disc",
        "running": true,
        "being_drained": false,
        "mem_used": r.mem_used,
        "mem_limit": r.mem_limit,
        "mem_alarm": alarms.memory,
        "disk_free": r.disk_free,
        "disk_free_limit": r.disk_free_limit,
        "disk_free_alarm": alarms.disk,
        "uptime": s.started.elapsed().as_millis() as u64,
        "processors": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "os_pid": std::process::id().to_string(),
        "partitions": [],
        "applications": [{"name": "warren", "description": "Warren message broker", "version": env!("CARGO_PKG_VERSION")}],
        "rates_mode": "basic",
        "fd_used": r.fd_used,
        "fd_total": r.fd_total,
        "sockets_used": connections,
        // RabbitMQ reserves part of the descriptors for files; Warren has no such split.
        "sockets_total": r.fd_total,
        "proc_used": r.threads,
        // Threads against the system's limit (RabbitMQ: Erlang processes against its
        // process limit); check_rabbitmq_server divides by it.
        "proc_total": r.threads_max,
        // Runnable tasks on the machine now (/proc/loadavg), RabbitMQ's scheduler run queue.
        "run_queue": r.run_queue,
        "enabled_plugins": plugins,
        "auth_mechanisms": mechanisms,
        "exchange_types": exchange_types_json(),
        "net_ticktime": 60,
        "cluster_links": [],
    });
    for (name, rate) in [
        "mem_used_details",
        "fd_used_details",
        "sockets_used_details",
        "proc_used_details",
        "disk_free_details",
    ]
    .into_iter()
    .zip(rates)
    {
        v[name] = details(rate);
    }
    // The node's churn counters, as the overview's `churn_rates` (one node).
    let (totals, rates) = s.sampler.global(&s.broker);
    if let (Value::Object(m), Value::Object(churn)) = (
        &mut v,
        counters_json(&totals, &rates, CHURN..COUNTERS.len()),
    ) {
        m.extend(churn);
    }
    v
}

fn exchange_types_json() -> Vec<Value> {
    ["direct", "fanout", "topic", "headers"]
        .iter()
        .map(|t| json!({"name": t, "description": format!("AMQP {t} exchange"), "enabled": true}))
        .collect()
}

async fn nodes(State(s): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_monitor()?;
    Ok(Json(json!([node_json(&s)])))
}

async fn node(State(s): St, caller: Caller, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    caller.require_monitor()?;
    if name != s.broker.config.node_name {
        return Err(ApiError::ObjectNotFound);
    }
    Ok(Json(node_json(&s)))
}

// ---------------------------------------------------------------- vhosts

/// The counters of [`COUNTERS`] in `range` with their rates: a `message_stats` (the
/// first [`QUEUE_COUNTERS`] for a queue, [`MESSAGE_COUNTERS`] for the overview and a
/// vhost), or the overview's `churn_rates` (from [`CHURN`]).
fn counters_json(t: &Totals, r: &Rates, range: std::ops::Range<usize>) -> Value {
    Value::Object(counters_map(t, r, range, false))
}

/// The counters of [`COUNTERS`] in `range`, those still 0 left out with `moved_only`.
fn counters_map(
    t: &Totals,
    r: &Rates,
    range: std::ops::Range<usize>,
    moved_only: bool,
) -> serde_json::Map<String, Value> {
    let counts = t.counters();
    let mut m = serde_json::Map::new();
    for i in range.filter(|&i| !moved_only || counts[i] > 0) {
        let name = COUNTERS[i];
        m.insert(name.into(), json!(counts[i]));
        m.insert(format!("{name}_details"), details(r.counters[i]));
    }
    m
}

fn vhost_json(s: &AppState, vh: &VHost, windows: &Windows) -> Value {
    let (t, r) = s.sampler.vhost(&s.broker, vh);
    let m = vh.metadata();
    // RabbitMQ 3.10 shows Erlang's `undefined` for a vhost made without a default type,
    // and leaves it out of the metadata.
    let queue_type = m.default_queue_type.as_deref().unwrap_or("undefined");
    let mut metadata = json!({"description": m.description, "tags": m.tags});
    if let Some(t) = &m.default_queue_type {
        metadata["default_queue_type"] = json!(t);
    }
    let mut v = json!({
        "name": vh.name,
        "description": m.description,
        "tags": m.tags,
        "metadata": metadata,
        "default_queue_type": queue_type,
        "cluster_state": {&s.broker.config.node_name: "running"},
        // Firehose tracing is not implemented (README).
        "tracing": false,
        "messages": t.ready + t.unacked,
        "messages_details": details(r.messages),
        "messages_ready": t.ready,
        "messages_ready_details": details(r.ready),
        "messages_unacknowledged": t.unacked,
        "messages_unacknowledged_details": details(r.unacked),
        // Summed over the vhost's queues and channels (closed ones included), as the
        // overview's.
        "message_stats": counters_json(&t, &r, 0..MESSAGE_COUNTERS),
        "recv_oct": t.recv_oct,
        "recv_oct_details": details(r.counters[RECV_OCT]),
        "send_oct": t.send_oct,
        "send_oct_details": details(r.counters[RECV_OCT + 1]),
    });
    if windows.any() {
        windows.apply(&mut v, &s.sampler.vhost_history(&vh.name, t));
    }
    v
}

async fn vhosts(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    let windows = Windows::parse(&params.0)?;
    // `monitoring` lists every vhost, even those it may not look into.
    let mut all = s.broker.vhosts();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let items = all
        .iter()
        .filter(|v| caller.is_monitor() || caller.sees_vhost(&s.broker, &v.name))
        .map(|v| vhost_json(&s, v, &windows))
        .collect();
    list(&params, items)
}

async fn vhost_get(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    let windows = Windows::parse(&params.0)?;
    let vh = caller.vhost(&s.broker, &v)?;
    Ok(Json(vhost_json(&s, &vh, &windows)))
}

async fn vhost_put(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let b = body_json(&body)?;
    let existing = s.broker.vhost(&v);
    let existed = existing.is_some();
    // What the body names replaces the vhost's metadata; the rest is kept.
    let mut m = existing.map(|vh| vh.metadata()).unwrap_or_default();
    if let Some(d) = str_field(&b, "description") {
        m.description = d.to_owned();
    }
    if b.get("tags").is_some() {
        m.tags = parse_tags(b.get("tags"));
    }
    if let Some(t) = str_field(&b, "default_queue_type") {
        m.default_queue_type = Some(t.to_owned());
    }
    s.broker.put_vhost(&v, m).await?;
    if !existed {
        // RabbitMQ grants the creating user full permissions on a new vhost.
        s.broker
            .set_permission(warren_core::full_permission(&caller.name, &v))
            .await?;
    }
    Ok(created(!existed))
}

async fn vhost_delete(State(s): St, caller: Caller, Path(v): Path<String>) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.delete_vhost(&v).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}

async fn vhost_permissions(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    caller.vhost(&s.broker, &v)?;
    Ok(Json(Value::Array(
        s.broker
            .permissions()
            .iter()
            .filter(|p| p.vhost == v)
            .map(permission_json)
            .collect(),
    )))
}

async fn vhost_connections(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    caller.vhost(&s.broker, &v)?;
    let items = visible_connections(&s, &caller)
        .iter()
        .filter(|e| e.info.vhost == v)
        .map(|e| connection_json(&s, e))
        .collect();
    list(&params, items)
}

async fn vhost_channels(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    caller.vhost(&s.broker, &v)?;
    list(&params, channels_json(&s, &caller, Some(&v)))
}

// ---------------------------------------------------------------- users, permissions

async fn users(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    list(&params, s.broker.users().iter().map(user_json).collect())
}

/// Users with no permission in any vhost (RabbitMQ 3.8+).
async fn users_without_permissions(State(s): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let perms = s.broker.permissions();
    Ok(Json(Value::Array(
        s.broker
            .users()
            .iter()
            .filter(|u| !perms.iter().any(|p| p.user == u.name))
            .map(user_json)
            .collect(),
    )))
}

/// `{"users": [...]}`: deletes the named users in order. As RabbitMQ, the first name
/// that does not exist stops it with a 400 (the users before it are gone).
async fn users_bulk_delete(State(s): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.require_admin()?;
    let v = body_json(&body)?;
    let Some(names) = v.get("users").and_then(Value::as_array) else {
        return Err(ApiError::BadRequest("[{key_missing,users}]".into()));
    };
    for n in names {
        let Some(n) = n.as_str() else {
            return Err(ApiError::BadRequest(
                "users must be a list of user names".into(),
            ));
        };
        if !s.broker.delete_user(n).await? {
            return Err(ApiError::BadRequest(format!("no_such_user {n}")));
        }
    }
    Ok(no_content())
}

async fn user_get(State(s): St, caller: Caller, Path(u): Path<String>) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker
        .user(&u)
        .map(|u| Json(user_json(&u)))
        .ok_or(ApiError::ObjectNotFound)
}

async fn user_put(
    State(s): St,
    caller: Caller,
    Path(u): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let b = body_json(&body)?;
    // RabbitMQ 3.10 wants `tags` every time (an empty string for none), so a password
    // change cannot silently drop an administrator's tags.
    if b.get("tags").is_none() {
        return Err(ApiError::BadRequest("tags_not_present".into()));
    }
    let tags = parse_tags(b.get("tags"));
    let existing = s.broker.user(&u);
    let rec = if let Some(p) = str_field(&b, "password") {
        UserRecord {
            name: u.clone(),
            password_hash: warren_core::auth::hash_password(p),
            hashing_algorithm: warren_core::auth::SHA256_ALGORITHM.into(),
            tags,
        }
    } else if let Some(h) = str_field(&b, "password_hash") {
        // RabbitMQ refuses a hash that is not base64 (its reason is `[not_base64, H]`).
        use base64::Engine;
        if base64::engine::general_purpose::STANDARD.decode(h).is_err() {
            return Err(ApiError::BadRequestTerm(vec![
                "not_base64".into(),
                h.into(),
            ]));
        }
        let algo =
            str_field(&b, "hashing_algorithm").unwrap_or(warren_core::auth::SHA256_ALGORITHM);
        if algo != warren_core::auth::SHA256_ALGORITHM {
            return Err(ApiError::BadRequest(format!(
                "hashing algorithm {algo} is not supported; use {}",
                warren_core::auth::SHA256_ALGORITHM
            )));
        }
        UserRecord {
            name: u.clone(),
            password_hash: h.to_owned(),
            hashing_algorithm: algo.to_owned(),
            tags,
        }
    } else if let Some(old) = &existing {
        // Updating only the tags keeps the password, as RabbitMQ.
        UserRecord {
            tags,
            ..old.clone()
        }
    } else {
        // RabbitMQ creates a user without a password (it can only use other mechanisms).
        UserRecord {
            name: u.clone(),
            password_hash: String::new(),
            hashing_algorithm: warren_core::auth::SHA256_ALGORITHM.into(),
            tags,
        }
    };
    s.broker.put_user_record(rec).await?;
    Ok(created(existing.is_none()))
}

async fn user_delete(State(s): St, caller: Caller, Path(u): Path<String>) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.delete_user(&u).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}

async fn user_permissions(
    State(s): St,
    caller: Caller,
    Path(u): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    if s.broker.user(&u).is_none() {
        return Err(ApiError::ObjectNotFound);
    }
    Ok(Json(Value::Array(
        s.broker
            .permissions()
            .iter()
            .filter(|p| p.user == u)
            .map(permission_json)
            .collect(),
    )))
}

async fn permissions(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    list(
        &params,
        s.broker.permissions().iter().map(permission_json).collect(),
    )
}

async fn permission_get(
    State(s): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker
        .permission(&v, &u)
        .map(|p| Json(permission_json(&p)))
        .ok_or(ApiError::ObjectNotFound)
}

async fn permission_put(
    State(s): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    // RabbitMQ's reason when either is missing (a 400, not a 404).
    if s.broker.vhost(&v).is_none() || s.broker.user(&u).is_none() {
        return Err(ApiError::BadRequest("vhost_or_user_not_found".into()));
    }
    let b = body_json(&body)?;
    let field = |k: &str| required_str(&b, k);
    let rec = warren_core::PermissionRecord {
        user: u.clone(),
        vhost: v.clone(),
        configure: field("configure")?,
        write: field("write")?,
        read: field("read")?,
    };
    let existed = s.broker.permission(&v, &u).is_some();
    s.broker.set_permission(rec).await?;
    Ok(created(!existed))
}

async fn permission_delete(
    State(s): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.clear_permission(&v, &u).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}

// ---------------------------------------------------------------- connections, channels

async fn connections(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    let items = visible_connections(&s, &caller)
        .iter()
        .map(|e| connection_json(&s, e))
        .collect();
    list(&params, items)
}

fn find_connection(s: &AppState, caller: &Caller, name: &str) -> ApiResult<Arc<ConnectionEntry>> {
    let e = s
        .broker
        .connections()
        .by_name(name)
        .ok_or(ApiError::ObjectNotFound)?;
    if !caller.is_monitor() && e.info.user != caller.name {
        return Err(ApiError::NotAuthorised("Not monitor user".into()));
    }
    Ok(e)
}

async fn connection_get(
    State(s): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let e = find_connection(&s, &caller, &name)?;
    Ok(Json(connection_json(&s, &e)))
}

/// Closes a connection; `X-Reason` becomes the close reason, as in RabbitMQ.
async fn connection_delete(
    State(s): St,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let e = find_connection(&s, &caller, &name)?;
    if !caller.is_admin() && e.info.user != caller.name {
        return Err(ApiError::NotAuthorised("Not administrator user".into()));
    }
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Closed via management plugin");
    tracing::info!(connection = %name, by = %caller.name, %reason, "closing connection from the API");
    e.request_close(reason);
    // RabbitMQ answers once the close is sent and the connection's channels and
    // exclusive queues (and so auto-delete exchanges bound only to them) are gone, not
    // when the close is merely asked for: a client's recovery test lists them right
    // after. Bounded, should a connection be stuck.
    let id = e.info.id;
    drop(e);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while s
        .broker
        .connections()
        .get(id)
        .is_some_and(|e| !e.is_released())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(no_content())
}

async fn connection_channels(
    State(s): St,
    caller: Caller,
    Path(name): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    let e = find_connection(&s, &caller, &name)?;
    let consumers = all_consumers(&s, &caller, Some(&e.info.vhost));
    list(&params, connection_channels_json(&s, &e, &consumers))
}

async fn channels(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    list(&params, channels_json(&s, &caller, None))
}

/// One channel, with its consumers (RabbitMQ's `consumer_details`).
async fn channel_get(
    State(s): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let consumers = all_consumers(&s, &caller, None);
    for e in visible_connections(&s, &caller) {
        for mut ch in connection_channels_json(&s, &e, &consumers) {
            if ch["name"] != name.as_str() {
                continue;
            }
            let number = ch["number"].as_u64();
            let details: Vec<Value> = consumers
                .iter()
                .filter(|(_, _, c)| c.owner == e.info.id && Some(c.channel) == number)
                .map(|(v, q, c)| consumer_json(&s, v, q, c))
                .collect();
            ch["consumer_details"] = Value::Array(details);
            ch["publishes"] = json!([]);
            ch["deliveries"] = json!([]);
            return Ok(Json(ch));
        }
    }
    Err(ApiError::ObjectNotFound)
}

async fn consumers(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    let items = all_consumers(&s, &caller, None)
        .iter()
        .map(|(v, q, c)| consumer_json(&s, v, q, c))
        .collect();
    list(&params, items)
}

async fn consumers_in(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    caller.vhost(&s.broker, &v)?;
    let items = all_consumers(&s, &caller, Some(&v))
        .iter()
        .map(|(v, q, c)| consumer_json(&s, v, q, c))
        .collect();
    list(&params, items)
}

// ---------------------------------------------------------------- exchanges

async fn exchanges(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    render_exchanges(&s, caller.visible_vhosts(&s.broker), &params)
}

async fn exchanges_in(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    render_exchanges(&s, vec![caller.vhost(&s.broker, &v)?], &params)
}

fn render_exchanges(s: &AppState, vhosts: Vec<Arc<VHost>>, params: &Q) -> ApiResult<Json<Value>> {
    let p = ListParams::parse(&params.0)?;
    let mut items = Vec::new();
    for vh in vhosts {
        for x in vh.exchanges() {
            items.push((
                vh.name.clone(),
                x.name.as_str().to_owned(),
                (vh.name.clone(), x),
            ));
        }
    }
    Ok(Json(
        p.page_by_name(items, |(v, x)| exchange_json(s, v, x))?,
    ))
}

async fn exchange_get(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let vh = caller.vhost(&s.broker, &v)?;
    let x = vh
        .exchange(exchange_path_name(&name))
        .map_err(|_| ApiError::ObjectNotFound)?;
    Ok(Json(exchange_json(&s, &v, &x)))
}

async fn exchange_put(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let vh = caller.vhost(&s.broker, &v)?;
    let b = body_json(&body)?;
    // RabbitMQ 3.10 makes a `direct` exchange when no type is given.
    let kind = str_field(&b, "type").unwrap_or("direct");
    let name = exchange_path_name(&name);
    caller.check(
        &s.broker,
        &v,
        Access::Configure,
        ResourceKind::Exchange,
        name,
    )?;
    let existed = vh.exchange(name).is_ok();
    let short = ShortString::try_new(name)
        .map_err(|_| ApiError::BadRequest("exchange name too long".into()))?;
    // The plugin makes the type an atom before it asks, so any unknown one is "invalid".
    if warren_core::ExchangeKind::parse(kind).is_err() {
        return Err(ApiError::BadRequest(format!(
            "invalid exchange type '{kind}'"
        )));
    }
    vh.declare_exchange(ExchangeDecl {
        name: short,
        kind: kind.to_owned(),
        passive: false,
        durable: bool_field(&b, "durable", false)?,
        auto_delete: bool_field(&b, "auto_delete", false)?,
        internal: bool_field(&b, "internal", false)?,
        arguments: b.get("arguments").map(json_to_table).unwrap_or_default(),
    })
    .await?;
    Ok(created(!existed))
}

async fn exchange_delete(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    params: Q,
) -> ApiResult<Response> {
    let vh = caller.vhost(&s.broker, &v)?;
    let name = exchange_path_name(&name);
    vh.exchange(name).map_err(|_| ApiError::ObjectNotFound)?;
    caller.check(
        &s.broker,
        &v,
        Access::Configure,
        ResourceKind::Exchange,
        name,
    )?;
    vh.delete_exchange(name, q_flag(&params, "if-unused"))
        .await?;
    Ok(no_content())
}

async fn exchange_publish(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let vh = caller.vhost(&s.broker, &v)?;
    let name = exchange_path_name(&name);
    // RabbitMQ publishes through a channel, so a missing exchange is the channel's 404
    // inside a 400.
    let x = vh.exchange(name).map_err(|_| {
        ApiError::BadRequest(format!(
            "404 NOT_FOUND - no exchange '{name}' in vhost '{v}'"
        ))
    })?;
    caller.check(&s.broker, &v, Access::Write, ResourceKind::Exchange, name)?;
    if x.internal {
        return Err(ApiError::NotAuthorised(format!(
            "cannot publish to internal exchange '{name}' in vhost '{v}'"
        )));
    }
    let b = body_json(&body)?;
    let rk = str_field(&b, "routing_key")
        .ok_or_else(|| ApiError::BadRequest("[{key_missing,routing_key}]".into()))?;
    // The management plugin publishes through a channel as the caller: topic rules apply.
    s.broker
        .check_topic_permission(&caller.name, &v, &x, Access::Write, rk)?;
    let payload = str_field(&b, "payload")
        .ok_or_else(|| ApiError::BadRequest("[{key_missing,payload}]".into()))?;
    let encoding = str_field(&b, "payload_encoding").unwrap_or("string");
    let body = decode_payload(payload, encoding)?;
    let props = json_to_properties(b.get("properties"))?;
    // The channel's checks of a publish (RabbitMQ publishes through one as the caller).
    if let Some(u) = props.user_id.as_ref().filter(|u| u.as_str() != caller.name) {
        return Err(ApiError::from_channel(CoreError::precondition(format!(
            "user_id property set to '{}' but authenticated user was '{}'",
            u.as_str(),
            caller.name
        ))));
    }
    let rk = ShortString::try_new(rk)
        .map_err(|_| ApiError::BadRequest("routing key too long".into()))?;
    let msg = Arc::new(Message::new(x.name.clone(), rk.into(), props, body));
    msg.expiration_ms().map_err(ApiError::from_channel)?;
    let queues = vh.route(&x, &msg);
    let outcome = vh
        .deliver_to(queues, msg)
        .await
        .map_err(ApiError::from_channel)?;
    if let Some(t) = outcome.ticket {
        // Persistent messages are on disk before the answer, as a confirm would be.
        s.broker
            .store()
            .wait_synced(t)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    Ok(Json(json!({"routed": outcome.routed > 0})))
}

async fn exchange_bindings_source(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let vh = caller.vhost(&s.broker, &v)?;
    let name = exchange_path_name(&name);
    let x = vh.exchange(name).map_err(|_| ApiError::ObjectNotFound)?;
    if name.is_empty() {
        let mut qs: Vec<String> = vh
            .queues()
            .iter()
            .map(|q| q.name.as_str().to_owned())
            .collect();
        qs.sort();
        return Ok(Json(Value::Array(
            qs.iter().map(|q| default_binding_json(&v, q)).collect(),
        )));
    }
    Ok(Json(Value::Array(
        x.bindings()
            .iter()
            .map(|b| binding_json(&v, name, b))
            .collect(),
    )))
}

async fn exchange_bindings_destination(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let vh = caller.vhost(&s.broker, &v)?;
    let name = exchange_path_name(&name);
    vh.exchange(name).map_err(|_| ApiError::ObjectNotFound)?;
    let items = vh
        .bindings()
        .iter()
        .filter(|(_, b)| !b.target.is_queue() && b.target.name() == name)
        .map(|(src, b)| binding_json(&v, src.as_str(), b))
        .collect();
    Ok(Json(Value::Array(items)))
}

// ---------------------------------------------------------------- queues

async fn queues(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    render_queues(&s, caller.visible_vhosts(&s.broker), &params)
}

async fn queues_in(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    let vh = caller.vhost(&s.broker, &v)?;
    render_queues(&s, vec![vh], &params)
}

fn render_queues(s: &AppState, vhosts: Vec<Arc<VHost>>, params: &Q) -> ApiResult<Json<Value>> {
    let p = ListParams::parse(&params.0)?;
    let windows = Windows::parse(&params.0)?;
    let mut items = Vec::new();
    for vh in vhosts {
        for q in vh.queues() {
            items.push((vh.name.clone(), q.name.as_str().to_owned(), q));
        }
    }
    Ok(Json(p.page_by_name(items, |q| {
        let vhost = q
            .vhost
            .upgrade()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        queue_json(s, &vhost, q, &windows)
    })?))
}

fn find_queue(
    s: &AppState,
    caller: &Caller,
    v: &str,
    name: &str,
) -> ApiResult<(Arc<VHost>, Arc<Queue>)> {
    let vh = caller.vhost(&s.broker, v)?;
    let q = vh.queue(name).map_err(|_| ApiError::ObjectNotFound)?;
    Ok((vh, q))
}

async fn queue_get(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    params: Q,
) -> ApiResult<Json<Value>> {
    let windows = Windows::parse(&params.0)?;
    let (_, q) = find_queue(&s, &caller, &v, &name)?;
    let mut json = queue_json(&s, &v, &q, &windows);
    // A single queue also lists its consumers, as RabbitMQ's queue page.
    let consumers: Vec<Value> = q
        .consumers_info()
        .iter()
        .map(|c| consumer_json(&s, &v, &q, c))
        .collect();
    json["consumer_details"] = Value::Array(consumers);
    json["deliveries"] = json!([]);
    json["incoming"] = json!([]);
    Ok(Json(json))
}

async fn queue_put(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let vh = caller.vhost(&s.broker, &v)?;
    let b = body_json(&body)?;
    caller.check(&s.broker, &v, Access::Configure, ResourceKind::Queue, &name)?;
    let short = ShortString::try_new(name.as_str())
        .map_err(|_| ApiError::BadRequest("queue name too long".into()))?;
    let (_, was_new) = vh
        .declare_queue(
            QueueDecl {
                name: short,
                passive: false,
                durable: bool_field(&b, "durable", false)?,
                exclusive: false,
                auto_delete: bool_field(&b, "auto_delete", false)?,
                arguments: b.get("arguments").map(json_to_table).unwrap_or_default(),
            },
            warren_core::ConnectionId(0),
        )
        .await?;
    Ok(created(was_new))
}

async fn queue_delete(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    params: Q,
) -> ApiResult<Response> {
    let (vh, _) = find_queue(&s, &caller, &v, &name)?;
    caller.check(&s.broker, &v, Access::Configure, ResourceKind::Queue, &name)?;
    vh.delete_queue(
        &name,
        None,
        q_flag(&params, "if-unused"),
        q_flag(&params, "if-empty"),
    )
    .await?;
    Ok(no_content())
}

async fn queue_purge(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (_, q) = find_queue(&s, &caller, &v, &name)?;
    caller.check(&s.broker, &v, Access::Read, ResourceKind::Queue, &name)?;
    if q.is_stream() {
        return Err(ApiError::BadRequest(q.stream_refusal("queue.purge").text));
    }
    q.purge().await;
    Ok(no_content())
}

/// `POST /api/queues/{vhost}/{name}/get` with `count`, `ackmode`
/// (`ack_requeue_true|ack_requeue_false|reject_requeue_true|reject_requeue_false`),
/// `encoding` (`auto|base64`) and optional `truncate`.
/// `{"action": "sync" | "cancel_sync"}`: mirror synchronisation. Queues have no mirrors
/// on one node, so both succeed doing nothing, as RabbitMQ answers for an unmirrored queue.
async fn queue_action(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    find_queue(&s, &caller, &v, &name)?;
    caller.require_admin()?;
    match required_str(&body_json(&body)?, "action")?.as_str() {
        "sync" | "cancel_sync" => Ok(no_content()),
        other => Err(ApiError::BadRequestTerm(vec![
            "unknown".into(),
            other.into(),
        ])),
    }
}

async fn queue_get_messages(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let (_, q) = find_queue(&s, &caller, &v, &name)?;
    caller.check(&s.broker, &v, Access::Read, ResourceKind::Queue, &name)?;
    if q.is_stream() {
        let e = q.stream_refusal("basic.get");
        return Err(ApiError::BadRequest(format!("540 {}", e.text)));
    }
    let b = body_json(&body)?;
    // rabbitmqadmin sends numbers as strings ("count":"5").
    let number = |k: &str| match b.get(k) {
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(v) => v.as_u64(),
        None => None,
    };
    let count = number("count").unwrap_or(1).min(10_000);
    let settle = match str_field(&b, "ackmode") {
        Some("ack_requeue_true") | Some("reject_requeue_true") => Settle::Requeue,
        Some("ack_requeue_false") => Settle::Ack,
        // Rejected: dead-lettered when the queue has a dead-letter exchange.
        Some("reject_requeue_false") => Settle::Reject,
        Some(other) => return Err(ApiError::BadRequest(format!("unknown ackmode {other}"))),
        // Before 3.7 the parameter was `requeue`.
        None => match b.get("requeue") {
            Some(r) if !r.as_bool().unwrap_or(true) => Settle::Ack,
            Some(_) => Settle::Requeue,
            None => return Err(ApiError::BadRequest("[{key_missing,ackmode}]".into())),
        },
    };
    let encoding = str_field(&b, "encoding").unwrap_or("auto");
    if encoding != "auto" && encoding != "base64" {
        return Err(ApiError::BadRequest(
            "Unsupported encoding. Please use auto or base64.".into(),
        ));
    }
    let truncate = number("truncate").map(|t| t as usize);
    let mut out = Vec::new();
    let mut taken: Vec<MsgSeq> = Vec::new();
    for _ in 0..count {
        let Some(r) = q.get(false).await else { break };
        let body = &r.message.body;
        let shown = &body[..truncate.unwrap_or(body.len()).min(body.len())];
        let (payload, enc) = encode_payload(shown, encoding);
        out.push(json!({
            "payload_bytes": body.len(),
            "redelivered": r.redelivered,
            "exchange": r.message.exchange.as_str(),
            "routing_key": r.message.routing_key.as_str(),
            "message_count": r.remaining,
            // Erlang's empty property list renders as [] (RabbitMQ's answer).
            "properties": match properties_to_json(&r.message.properties) {
                Value::Object(m) if m.is_empty() => json!([]),
                p => p,
            },
            "payload": payload,
            "payload_encoding": enc,
        }));
        taken.push(r.seq);
    }
    // All are taken before any is requeued, else the same message would come back.
    match settle {
        Settle::Requeue => q.requeue(&taken).await,
        Settle::Ack => q.ack(&taken).await,
        Settle::Reject => q.reject(&taken).await,
    }
    Ok(Json(Value::Array(out)))
}

/// What `/get` does with the messages it took (its `ackmode`).
enum Settle {
    Requeue,
    Ack,
    Reject,
}

async fn queue_bindings(
    State(s): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (vh, q) = find_queue(&s, &caller, &v, &name)?;
    let mut out = vec![default_binding_json(&v, &name)];
    let target = Target::Queue(q);
    out.extend(
        vh.bindings()
            .iter()
            .filter(|(_, b)| b.target == target)
            .map(|(src, b)| binding_json(&v, src.as_str(), b)),
    );
    Ok(Json(Value::Array(out)))
}

// ---------------------------------------------------------------- bindings

async fn bindings(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    let mut items = Vec::new();
    for vh in caller.visible_vhosts(&s.broker) {
        items.extend(vhost_bindings(&vh));
    }
    list(&params, items)
}

async fn bindings_in(
    State(s): St,
    caller: Caller,
    Path(v): Path<String>,
    params: Q,
) -> ApiResult<Json<Value>> {
    let vh = caller.vhost(&s.broker, &v)?;
    list(&params, vhost_bindings(&vh))
}

/// Resolves `e/{source}/{q|e}/{dest}` to the source exchange and the target.
fn binding_ends(
    s: &AppState,
    caller: &Caller,
    v: &str,
    source: &str,
    dtype: &str,
    dest: &str,
) -> ApiResult<(Arc<VHost>, Arc<Exchange>, Target)> {
    let vh = caller.vhost(&s.broker, v)?;
    let x = vh
        .exchange(exchange_path_name(source))
        .map_err(|_| ApiError::ObjectNotFound)?;
    let target = match dtype {
        "q" => Target::Queue(vh.queue(dest).map_err(|_| ApiError::ObjectNotFound)?),
        "e" => {
            let d = vh
                .exchange(exchange_path_name(dest))
                .map_err(|_| ApiError::ObjectNotFound)?;
            Target::Exchange(d.name.clone())
        }
        _ => return Err(ApiError::ObjectNotFound),
    };
    Ok((vh, x, target))
}

async fn bindings_between(
    State(s): St,
    caller: Caller,
    Path((v, source, dtype, dest)): Path<(String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (vh, x, target) = binding_ends(&s, &caller, &v, &source, &dtype, &dest)?;
    let mut out = Vec::new();
    if x.name.as_str().is_empty() {
        if let Target::Queue(q) = &target {
            out.push(default_binding_json(&vh.name, q.name.as_str()));
        }
    }
    out.extend(
        x.bindings()
            .iter()
            .filter(|b| b.target == target)
            .map(|b| binding_json(&v, x.name.as_str(), b)),
    );
    Ok(Json(Value::Array(out)))
}

async fn binding_create(
    State(s): St,
    caller: Caller,
    Path((v, source, dtype, dest)): Path<(String, String, String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let (vh, x, target) = binding_ends(&s, &caller, &v, &source, &dtype, &dest)?;
    let kind = if target.is_queue() {
        ResourceKind::Queue
    } else {
        ResourceKind::Exchange
    };
    caller.check(&s.broker, &v, Access::Write, kind, target.name())?;
    caller.check(
        &s.broker,
        &v,
        Access::Read,
        ResourceKind::Exchange,
        x.name.as_str(),
    )?;
    let b = body_json(&body)?;
    let rk = str_field(&b, "routing_key").unwrap_or("");
    s.broker
        .check_topic_permission(&caller.name, &v, &x, Access::Read, rk)?;
    let args = b.get("arguments").map(json_to_table).unwrap_or_default();
    let key = props_key(rk, &args);
    let rk = ShortString::try_new(rk)
        .map_err(|_| ApiError::BadRequest("routing key too long".into()))?;
    vh.bind(x.name.as_str(), target, rk.into(), args).await?;
    // RabbitMQ answers with the new binding's URI (relative to the binding list).
    let location = format!(
        "{}/{}",
        percent_encoding::utf8_percent_encode(&dest, QUOTE_SET),
        percent_encoding::utf8_percent_encode(&key, QUOTE_SET)
    );
    Ok((StatusCode::CREATED, [(header::LOCATION, location)]).into_response())
}

fn find_binding(x: &Exchange, target: &Target, props: &str) -> Option<Binding> {
    x.bindings()
        .into_iter()
        .find(|b| b.target == *target && props_key(b.routing_key.as_str(), &b.arguments) == props)
}

async fn binding_get(
    State(s): St,
    caller: Caller,
    Path((v, source, dtype, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (_, x, target) = binding_ends(&s, &caller, &v, &source, &dtype, &dest)?;
    let b = find_binding(&x, &target, &props).ok_or(ApiError::ObjectNotFound)?;
    Ok(Json(binding_json(&v, x.name.as_str(), &b)))
}

async fn binding_delete(
    State(s): St,
    caller: Caller,
    Path((v, source, dtype, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<Response> {
    let (vh, x, target) = binding_ends(&s, &caller, &v, &source, &dtype, &dest)?;
    let b = find_binding(&x, &target, &props).ok_or(ApiError::ObjectNotFound)?;
    let kind = if target.is_queue() {
        ResourceKind::Queue
    } else {
        ResourceKind::Exchange
    };
    caller.check(&s.broker, &v, Access::Write, kind, target.name())?;
    caller.check(
        &s.broker,
        &v,
        Access::Read,
        ResourceKind::Exchange,
        x.name.as_str(),
    )?;
    vh.unbind(
        x.name.as_str(),
        target,
        b.routing_key.as_str(),
        &b.arguments,
    )
    .await?;
    Ok(no_content())
}

// ---------------------------------------------------------------- health

async fn health_alarms(State(s): St, caller: Caller) -> ApiResult<Response> {
    caller.require_monitor()?;
    let a = s.broker.alarms.get();
    if !a.blocked() {
        return Ok(Json(json!({"status": "ok"})).into_response());
    }
    let mut alarms = Vec::new();
    if a.memory {
        alarms.push(json!({"node": s.broker.config.node_name, "resource": "memory"}));
    }
    if a.disk {
        alarms.push(json!({"node": s.broker.config.node_name, "resource": "disk"}));
    }
    Ok((
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "failed",
            "reason": "resource alarm(s) in effect in the cluster",
            "alarms": alarms,
        })),
    )
        .into_response())
}

/// 200 when a listener is bound to `port`, else 503 naming the ports there are.
async fn health_port(
    State(s): St,
    caller: Caller,
    Path(port): Path<String>,
) -> ApiResult<Response> {
    caller.require_monitor()?;
    let Ok(port) = port.parse::<u16>() else {
        return Err(ApiError::BadRequest("Invalid port".into()));
    };
    let ports: Vec<Value> = s
        .cfg
        .listeners
        .iter()
        .map(|l| json!(l.addr.port()))
        .collect();
    Ok(listener_health(("port", json!(port)), ("ports", ports)))
}

/// 200 when a listener speaks `protocol` (RabbitMQ's aliases accepted), else 503.
async fn health_protocol(
    State(s): St,
    caller: Caller,
    Path(protocol): Path<String>,
) -> ApiResult<Response> {
    caller.require_monitor()?;
    let protocols: Vec<Value> = s.cfg.listeners.iter().map(|l| json!(l.protocol)).collect();
    let wanted = json!(normalize_protocol(&protocol));
    Ok(listener_health(
        ("protocol", wanted),
        ("protocols", protocols),
    ))
}

/// RabbitMQ's listener checks: `{"status":"ok", <what>: wanted}` when `wanted` is among
/// `present`, else 503 `{"status":"failed","reason":…,"missing":wanted, <list>: present}`.
fn listener_health((what, wanted): (&str, Value), (list, present): (&str, Vec<Value>)) -> Response {
    let mut body = serde_json::Map::new();
    if present.contains(&wanted) {
        body.insert("status".into(), json!("ok"));
        body.insert(what.into(), wanted);
        return Json(Value::Object(body)).into_response();
    }
    body.insert("status".into(), json!("failed"));
    body.insert("reason".into(), json!("No active listener"));
    body.insert("missing".into(), wanted);
    body.insert(list.into(), Value::Array(present));
    (StatusCode::SERVICE_UNAVAILABLE, Json(Value::Object(body))).into_response()
}

/// The protocol names RabbitMQ's protocol-listener check accepts for its listeners'.
fn normalize_protocol(p: &str) -> String {
    let p = p.to_lowercase();
    let name = match p.as_str() {
        "amqp091" | "amqp0.9.1" | "amqp0-9-1" | "amqp0_9_1" | "amqp10" | "amqp1.0" | "amqp1-0"
        | "amqp1_0" => "amqp",
        "amqps" => "amqp/ssl",
        "mqtt3.1" | "mqtt3.1.1" | "mqtt31" | "mqtt311" | "mqtt3_1" | "mqtt3_1_1" | "mqtt5" => {
            "mqtt"
        }
        "mqtts" | "mqtt+tls" | "mqtt+ssl" => "mqtt/ssl",
        "stomp1.0" | "stomp1.1" | "stomp1.2" | "stomp10" | "stomp11" | "stomp12" | "stomp1_0"
        | "stomp1_1" | "stomp1_2" => "stomp",
        "stomps" | "stomp+tls" | "stomp+ssl" => "stomp/ssl",
        "http1" | "http1.1" | "http_api" | "management" | "management_ui" | "ui" => "http",
        "webmqtt" | "web-mqtt" | "web_mqtt" => "http/web-mqtt",
        "webmqtt/tls" | "web-mqtt/tls" | "webmqtt/ssl" | "web-mqtt/ssl" | "webmqtt+tls"
        | "web-mqtt+tls" | "webmqtt+ssl" | "web-mqtt+ssl" => "https/web-mqtt",
        "webstomp" | "web-stomp" | "web_stomp" => "http/web-stomp",
        "webstomp/tls" | "web-stomp/tls" | "webstomp/ssl" | "web-stomp/ssl" | "webstomp+tls"
        | "web-stomp+tls" | "webstomp+ssl" | "web-stomp+ssl" => "https/web-stomp",
        other => other,
    };
    name.to_owned()
}

async fn health_ok(_: Caller) -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Declares `aliveness-test`, publishes to it and gets the message back, as RabbitMQ.
async fn aliveness(State(s): St, caller: Caller, Path(v): Path<String>) -> ApiResult<Json<Value>> {
    let vh = caller.vhost(&s.broker, &v)?;
    caller.check(
        &s.broker,
        &v,
        Access::Configure,
        ResourceKind::Queue,
        "aliveness-test",
    )?;
    let (q, _) = vh
        .declare_queue(
            QueueDecl {
                name: "aliveness-test".into(),
                passive: false,
                durable: false,
                exclusive: false,
                auto_delete: false,
                arguments: FieldTable::default(),
            },
            warren_core::ConnectionId(0),
        )
        .await?;
    let x = vh.exchange("")?;
    let msg = Arc::new(Message::new(
        "".into(),
        "aliveness-test".into(),
        Default::default(),
        Bytes::from_static(b"test_message"),
    ));
    vh.deliver_to(vh.route(&x, &msg), msg).await?;
    match q.get(true).await {
        Some(r) if &r.message.body[..] == b"test_message" => Ok(Json(json!({"status": "ok"}))),
        _ => Ok(Json(
            json!({"status": "failed", "reason": "message did not come back"}),
        )),
    }
}
