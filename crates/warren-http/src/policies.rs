//! `/api/policies` and `/api/operator-policies` as RabbitMQ's management plugin has
//! them: `GET` lists (all, or one vhost's), `GET`/`PUT`/`DELETE` one policy by vhost and
//! name. `PUT` takes
//! `{"pattern", "definition", "priority"?, "apply-to"?}`; a definition RabbitMQ would
//! refuse is a 400 with its "Validation failed" text. Policymakers and administrators
//! only, within the vhosts they may see.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use warren_core::definitions::policy_json;
use warren_core::policies::{Policy, PolicyKind};
use warren_core::PolicyRecord;

use crate::api::{body_json, created, list, no_content, required_str, Q};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

type St = State<AppState>;

pub fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for (kind, base) in [
        (PolicyKind::User, "/api/policies"),
        (PolicyKind::Operator, "/api/operator-policies"),
    ] {
        r = r
            .route(
                base,
                get(move |State(s): St, caller: Caller, params: Q| all(s, caller, kind, params)),
            )
            .route(
                &format!("{base}/{{vhost}}"),
                get(
                    move |State(s): St, caller: Caller, Path(v): Path<String>, params: Q| {
                        of_vhost(s, caller, kind, v, params)
                    },
                ),
            )
            .route(
                &format!("{base}/{{vhost}}/{{name}}"),
                get(
                    move |State(s): St, caller: Caller, Path(p): Path<(String, String)>| {
                        one(s, caller, kind, p)
                    },
                )
                .put(
                    move |State(s): St,
                          caller: Caller,
                          Path(p): Path<(String, String)>,
                          body: Bytes| { put(s, caller, kind, p, body) },
                )
                .delete(
                    move |State(s): St, caller: Caller, Path(p): Path<(String, String)>| {
                        delete(s, caller, kind, p)
                    },
                ),
            );
    }
    r
}

async fn all(s: AppState, caller: Caller, kind: PolicyKind, params: Q) -> ApiResult<Json<Value>> {
    caller.require_policymaker()?;
    let items = s
        .broker
        .policies(kind)
        .iter()
        .filter(|p| caller.sees_vhost(&s.broker, &p.vhost))
        .map(|p| policy_json(p, true))
        .collect();
    list(&params, items)
}

async fn of_vhost(
    s: AppState,
    caller: Caller,
    kind: PolicyKind,
    v: String,
    params: Q,
) -> ApiResult<Json<Value>> {
    caller.require_policymaker()?;
    let vh = caller.vhost(&s.broker, &v)?;
    let items = vh
        .policies(kind)
        .records()
        .map(|p| policy_json(p, true))
        .collect();
    list(&params, items)
}

async fn one(
    s: AppState,
    caller: Caller,
    kind: PolicyKind,
    (v, name): (String, String),
) -> ApiResult<Json<Value>> {
    caller.require_policymaker()?;
    let vh = caller.vhost(&s.broker, &v)?;
    let ps = vh.policies(kind);
    let p = ps.get(&name).ok_or(ApiError::ObjectNotFound)?;
    Ok(Json(policy_json(&p.record, true)))
}

async fn put(
    s: AppState,
    caller: Caller,
    kind: PolicyKind,
    (v, name): (String, String),
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_policymaker()?;
    caller.vhost(&s.broker, &v)?;
    let b = body_json(&body)?;
    let definition = match b.get("definition") {
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "definition must be a JSON object".into(),
            ))
        }
        None => return Err(ApiError::BadRequest("[{key_missing,definition}]".into())),
    };
    let priority = match b.get("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| ApiError::BadRequest("priority must be an integer".into()))?,
        // The management UI sends the priority as text.
        Some(Value::String(t)) if t.is_empty() => 0,
        Some(Value::String(t)) => t
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("priority {t:?} is not an integer")))?,
        Some(_) => return Err(ApiError::BadRequest("priority must be an integer".into())),
    };
    let record = PolicyRecord {
        vhost: v,
        name,
        pattern: required_str(&b, "pattern")?,
        apply_to: b
            .get("apply-to")
            .and_then(Value::as_str)
            .unwrap_or("all")
            .to_owned(),
        definition,
        priority,
    };
    // Validated here too, so the 400 carries RabbitMQ's text alone.
    Policy::new(kind, record.clone()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let new = s.broker.set_policy(kind, record).await?;
    Ok(created(new))
}

async fn delete(
    s: AppState,
    caller: Caller,
    kind: PolicyKind,
    (v, name): (String, String),
) -> ApiResult<Response> {
    caller.require_policymaker()?;
    caller.vhost(&s.broker, &v)?;
    if s.broker.clear_policy(kind, &v, &name).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}
