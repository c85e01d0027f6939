//! `/api/global-parameters` and `/api/cluster-name`, as RabbitMQ's management plugin has
//! them: the cluster name is the global parameter `cluster_name`
//! (warren_core::global_parameters).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use warren_core::global_parameters::CLUSTER_NAME;

use crate::api::{body_json, created, list, no_content, required_str, Q};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

type St = State<AppState>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/global-parameters", get(all))
        .route(
            "/api/global-parameters/{name}",
            get(one).put(put).delete(delete),
        )
        .route("/api/cluster-name", get(cluster_name).put(set_cluster_name))
}

fn parameter_json(name: &str, value: Value) -> Value {
    json!({"name": name, "value": value})
}

async fn all(State(s): St, caller: Caller, params: Q) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let items = s
        .broker
        .global_parameters()
        .into_iter()
        .map(|(name, value)| parameter_json(&name, value))
        .collect();
    list(&params, items)
}

async fn one(State(s): St, caller: Caller, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let value = s
        .broker
        .global_parameter(&name)
        .ok_or(ApiError::ObjectNotFound)?;
    Ok(Json(parameter_json(&name, value)))
}

/// `{"value": …}` (a `name` in the body is ignored: the path names the parameter).
async fn put(
    State(s): St,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let value = body_json(&body)?
        .get("value")
        .cloned()
        .ok_or_else(|| ApiError::BadRequest("[{key_missing,value}]".into()))?;
    Ok(created(s.broker.set_global_parameter(&name, value).await?))
}

async fn delete(State(s): St, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.clear_global_parameter(&name).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}

async fn cluster_name(State(s): St, _: Caller) -> Json<Value> {
    Json(json!({"name": s.broker.cluster_name()}))
}

async fn set_cluster_name(State(s): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.require_admin()?;
    let name = required_str(&body_json(&body)?, "name")?;
    s.broker
        .set_global_parameter(CLUSTER_NAME, Value::from(name))
        .await?;
    Ok(no_content())
}
