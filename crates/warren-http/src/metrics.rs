//! Prometheus text exposition at `/metrics` (and `/metrics/per-object`), named like
//! rabbitmq_prometheus so existing dashboards and alerts work. Hand-written: a few dozen
//! lines of text need no metrics registry, and every value is read from the broker at
//! scrape time (nothing is counted twice). Unauthenticated, as rabbitmq_prometheus.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/per-object", get(metrics))
}

/// Escapes a label value (`\`, `"` and newlines), per the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.family(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let b = &s.broker;
    let mut o = Out(String::with_capacity(16 * 1024));
    let conns = b.connections().list();
    let (opened, closed) = b.connections().totals();
    let channels: usize = conns.iter().map(|c| c.channel_count()).sum();
    let (totals, _) = s.sampler.global(b);
    let mut per_queue = Vec::new();
    let mut consumers = 0u64;
    for vh in b.vhosts() {
        for q in vh.queues() {
            let c = q.counts();
            consumers += c.consumers as u64;
            per_queue.push((vh.name.clone(), q.name.as_str().to_owned(), c));
        }
    }
    per_queue.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let _ = writeln!(
        o.0,
        "# TYPE rabbitmq_identity_info gauge\nrabbitmq_identity_info{{rabbitmq_node=\"{n}\",rabbitmq_cluster=\"{n}\"}} 1",
        n = label(&s.broker.config.node_name)
    );
    o.one(
        "rabbitmq_connections",
        "gauge",
        "Connections currently open",
        conns.len(),
    );
    o.one(
        "rabbitmq_connections_opened_total",
        "counter",
        "Total number of connections opened",
        opened,
    );
    o.one(
        "rabbitmq_connections_closed_total",
        "counter",
        "Total number of connections closed or terminated",
        closed,
    );
    // Every close by its typed reason (Warren's own family; RabbitMQ has no such metric).
    o.family(
        "warren_connections_closed_by_reason_total",
        "counter",
        "Connections closed, by protocol and reason",
    );
    for ((protocol, reason), n) in b.connections().closed_by_reason() {
        let _ = writeln!(
            o.0,
            "warren_connections_closed_by_reason_total{{protocol=\"{protocol}\",reason=\"{reason}\"}} {n}"
        );
    }
    o.one(
        "rabbitmq_channels",
        "gauge",
        "Channels currently open",
        channels,
    );
    o.one(
        "rabbitmq_consumers",
        "gauge",
        "Consumers currently connected",
        consumers,
    );
    o.one(
        "rabbitmq_queues",
        "gauge",
        "Queues available",
        per_queue.len(),
    );
    o.one(
        "rabbitmq_queue_messages_ready_total",
        "gauge",
        "Messages ready to be delivered to consumers, all queues",
        totals.ready,
    );
    o.one(
        "rabbitmq_queue_messages_unacked_total",
        "gauge",
        "Messages delivered to consumers but not yet acknowledged, all queues",
        totals.unacked,
    );
    o.one(
        "rabbitmq_global_messages_received_total",
        "counter",
        "Total number of messages received from publishers (counted per queue routed to)",
        totals.publish,
    );
    o.one(
        "rabbitmq_global_messages_delivered_total",
        "counter",
        "Total number of messages delivered to consumers or fetched",
        totals.deliver_get,
    );
    o.one(
        "rabbitmq_global_messages_acknowledged_total",
        "counter",
        "Total number of messages acknowledged by consumers",
        totals.ack,
    );
    o.one(
        "rabbitmq_global_messages_redelivered_total",
        "counter",
        "Total number of messages redelivered to consumers",
        totals.redeliver,
    );
    let alarms = b.alarms.get();
    o.one(
        "rabbitmq_alarms_memory_used_watermark",
        "gauge",
        "Is 1 when the memory alarm is in effect",
        u8::from(alarms.memory),
    );
    o.one(
        "rabbitmq_alarms_free_disk_space_watermark",
        "gauge",
        "Is 1 when the disk alarm is in effect",
        u8::from(alarms.disk),
    );
    let r = s.resources();
    o.one(
        "rabbitmq_process_resident_memory_bytes",
        "gauge",
        "Memory used in bytes",
        r.mem_used,
    );
    o.one(
        "rabbitmq_resident_memory_limit_bytes",
        "gauge",
        "Memory high watermark in bytes",
        r.mem_limit,
    );
    o.one(
        "rabbitmq_disk_space_available_bytes",
        "gauge",
        "Disk space available in bytes",
        r.disk_free,
    );
    o.one(
        "rabbitmq_disk_space_available_limit_bytes",
        "gauge",
        "Free disk space low watermark in bytes",
        r.disk_free_limit,
    );
    type Field = fn(&warren_core::QueueCounts) -> u64;
    let families: [(&str, &str, &str, Field); 7] = [
        (
            "rabbitmq_queue_messages_ready",
            "gauge",
            "Messages ready to be delivered to consumers",
            |c| c.ready as u64,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "gauge",
            "Messages delivered to consumers but not yet acknowledged",
            |c| c.unacked as u64,
        ),
        (
            "rabbitmq_queue_messages",
            "gauge",
            "Sum of ready and unacknowledged messages",
            |c| c.ready as u64 + c.unacked as u64,
        ),
        (
            "rabbitmq_queue_consumers",
            "gauge",
            "Consumers on a queue",
            |c| c.consumers as u64,
        ),
        (
            "rabbitmq_queue_messages_published_total",
            "counter",
            "Total number of messages published to queues",
            |c| c.stats.published,
        ),
        (
            "rabbitmq_queue_messages_delivered_total",
            "counter",
            "Total number of messages delivered or fetched from a queue",
            |c| c.stats.delivered,
        ),
        (
            "rabbitmq_queue_messages_acked_total",
            "counter",
            "Total number of messages acknowledged on a queue",
            |c| c.stats.acked,
        ),
    ];
    for (name, kind, help, f) in families {
        o.family(name, kind, help);
        for (v, q, c) in &per_queue {
            let _ = writeln!(
                o.0,
                "{name}{{vhost=\"{}\",queue=\"{}\"}} {}",
                label(v),
                label(q),
                f(c)
            );
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        o.0,
    )
}
