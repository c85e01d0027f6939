//! Runtime parameters (`/api/parameters`). Warren has no plugin components (shovel,
//! federation); the components it has are RabbitMQ's own policy stores: `policy` and
//! `operator_policy` list the policies as parameters, as RabbitMQ keeps them. The
//! top-level list leaves `policy` out, as RabbitMQ's does; an unknown component is a 400.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use warren_core::definitions::policy_parameter_json;
use warren_core::policies::PolicyKind;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

type St = State<AppState>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/parameters", get(all))
        .route("/api/parameters/{component}", get(of_component))
        .route("/api/parameters/{component}/{vhost}", get(in_vhost))
        .route(
            "/api/parameters/{component}/{vhost}/{name}",
            get(one).put(refuse_write).delete(refuse_write),
        )
}

/// The policy kind a component names (`None`: a component Warren has not).
fn kind(component: &str) -> Option<PolicyKind> {
    match component {
        "policy" => Some(PolicyKind::User),
        "operator_policy" => Some(PolicyKind::Operator),
        _ => None,
    }
}

/// The parameters of `component` the caller may see, optionally of one vhost.
fn listed(s: &AppState, caller: &Caller, component: &str, vhost: Option<&str>) -> Vec<Value> {
    let Some(k) = kind(component) else {
        return Vec::new();
    };
    let mut ps = s.broker.policies(k);
    ps.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
    ps.iter()
        .filter(|p| vhost.is_none_or(|v| v == p.vhost))
        .filter(|p| caller.vhost(&s.broker, &p.vhost).is_ok())
        .map(|p| policy_parameter_json(p, component))
        .collect()
}

async fn all(State(s): St, caller: Caller) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(listed(
        &s,
        &caller,
        "operator_policy",
        None,
    ))))
}

async fn of_component(
    State(s): St,
    caller: Caller,
    Path(component): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(listed(&s, &caller, &component, None))))
}

async fn in_vhost(
    State(s): St,
    caller: Caller,
    Path((component, v)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.vhost(&s.broker, &v)?;
    Ok(Json(Value::Array(listed(
        &s,
        &caller,
        &component,
        Some(&v),
    ))))
}

async fn one(
    State(s): St,
    caller: Caller,
    Path((component, v, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    caller.vhost(&s.broker, &v)?;
    listed(&s, &caller, &component, Some(&v))
        .into_iter()
        .find(|p| p["name"] == name.as_str())
        .map(Json)
        .ok_or(ApiError::ObjectNotFound)
}

/// Policies are set through `/api/policies` and `/api/operator-policies`; any other
/// component is one Warren has not (RabbitMQ's answer without the plugin).
async fn refuse_write(
    State(s): St,
    caller: Caller,
    Path((component, v, _name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    caller.vhost(&s.broker, &v)?;
    match kind(&component) {
        Some(_) => Err(ApiError::MethodNotAllowed),
        None => Err(ApiError::BadRequest(format!(
            "Validation failed\n\ncomponent {component} not found\n"
        ))),
    }
}
