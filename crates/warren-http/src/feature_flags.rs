//! `/api/feature-flags`: RabbitMQ 3.10's stable flags, every one enabled. They name
//! behaviours Warren has from the start (quorum and stream queues, user limits, vhost
//! metadata, implicit default bindings…), so there is nothing to switch on; enabling a
//! known flag succeeds and an unknown one is refused as RabbitMQ refuses it.

use axum::extract::Path;
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::no_content;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// (name, description, provided by), as RabbitMQ 3.10.8 lists them.
const FLAGS: &[(&str, &str, &str)] = &[
    (
        "classic_mirrored_queue_version",
        "Support setting version for classic mirrored queues",
        "rabbit",
    ),
    (
        "drop_unroutable_metric",
        "Count unroutable publishes to be dropped in stats",
        "rabbitmq_management_agent",
    ),
    (
        "empty_basic_get_metric",
        "Count AMQP `basic.get` on empty queues in stats",
        "rabbitmq_management_agent",
    ),
    (
        "implicit_default_bindings",
        "Default bindings are now implicit, instead of being stored in the database",
        "rabbit",
    ),
    (
        "maintenance_mode_status",
        "Maintenance mode status",
        "rabbit",
    ),
    ("quorum_queue", "Support queues of type `quorum`", "rabbit"),
    ("stream_queue", "Support queues of type `stream`", "rabbit"),
    (
        "user_limits",
        "Configure connection and channel limits for a user",
        "rabbit",
    ),
    (
        "virtual_host_metadata",
        "Virtual host metadata (description, tags, etc)",
        "rabbit",
    ),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/feature-flags", get(all))
        .route("/api/feature-flags/{name}/enable", put(enable))
}

async fn all(caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_monitor()?;
    let flags = FLAGS
        .iter()
        .map(|(name, desc, by)| {
            json!({"name": name, "desc": desc, "doc_url": "", "state": "enabled",
                   "stability": "stable", "provided_by": by})
        })
        .collect();
    Ok(Json(Value::Array(flags)))
}

async fn enable(caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require_admin()?;
    if FLAGS.iter().any(|(n, _, _)| *n == name) {
        Ok(no_content())
    } else {
        Err(ApiError::BadRequest("unsupported".into()))
    }
}
