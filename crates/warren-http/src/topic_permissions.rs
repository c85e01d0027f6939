//! `/api/topic-permissions` and the per-user and per-vhost lists, as RabbitMQ's management
//! plugin has them: `GET` lists, `PUT {"exchange","write","read"}` sets the rule for one
//! exchange, `DELETE` removes all of the user's rules in the vhost, or with the exchange in
//! the path that exchange's rule.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use warren_core::definitions::topic_permission_json;
use warren_core::TopicPermissionRecord;

use crate::api::{body_json, created, list, no_content, required_str, Q};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

type St = State<AppState>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/topic-permissions", get(all))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(of_user_in_vhost).put(put).delete(delete),
        )
        .route(
            "/api/topic-permissions/{vhost}/{user}/{exchange}",
            axum::routing::delete(delete_one),
        )
        .route("/api/users/{user}/topic-permissions", get(of_user))
        .route("/api/vhosts/{vhost}/topic-permissions", get(of_vhost))
}

fn matching(s: &AppState, keep: impl Fn(&TopicPermissionRecord) -> bool) -> Vec<Value> {
    s.broker
        .topic_permissions()
        .iter()
        .filter(|p| keep(p))
        .map(topic_permission_json)
        .collect()
}

async fn all(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    list(&params, matching(&s, |_| true))
}

/// RabbitMQ answers 404 when the user has no topic permission in the vhost.
async fn of_user_in_vhost(
    State(s): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let items = matching(&s, |p| p.vhost == v && p.user == u);
    if items.is_empty() {
        return Err(ApiError::ObjectNotFound);
    }
    Ok(Json(Value::Array(items)))
}

async fn put(
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
    let rec = TopicPermissionRecord {
        user: u.clone(),
        vhost: v.clone(),
        exchange: field("exchange")?,
        write: field("write")?,
        read: field("read")?,
    };
    let existed = s.broker.topic_permissions_of(&v, &u).is_some();
    s.broker.set_topic_permission(rec).await?;
    Ok(created(!existed))
}

async fn delete(
    State(s): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.clear_topic_permissions(&v, &u, None).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}

async fn delete_one(
    State(s): St,
    caller: Caller,
    Path((v, u, x)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.clear_topic_permissions(&v, &u, Some(&x)).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}

async fn of_user(State(s): St, caller: Caller, Path(u): Path<String>) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    if s.broker.user(&u).is_none() {
        return Err(ApiError::ObjectNotFound);
    }
    Ok(Json(Value::Array(matching(&s, |p| p.user == u))))
}

async fn of_vhost(State(s): St, caller: Caller, Path(v): Path<String>) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    caller.vhost(&s.broker, &v)?;
    Ok(Json(Value::Array(matching(&s, |p| p.vhost == v))))
}
