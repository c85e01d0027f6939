//! `/api/vhost-limits` and `/api/user-limits` as RabbitMQ's management plugin has them:
//! `GET` lists `[{"vhost"|"user": name, "value": {limit: n}}]` (all, or one owner's),
//! `PUT {"value": n}` sets one limit (204), `DELETE` clears it. Administrators only.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use warren_core::limits::{self, LimitOwner};

use crate::api::{body_json, no_content};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

type St = State<AppState>;

pub fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for (owner, base) in [
        (LimitOwner::VHost, "/api/vhost-limits"),
        (LimitOwner::User, "/api/user-limits"),
    ] {
        r = r
            .route(
                base,
                get(move |State(s): St, caller: Caller| listing(s, caller, owner, None)),
            )
            .route(
                &format!("{base}/{{who}}"),
                get(
                    move |State(s): St, caller: Caller, Path(who): Path<String>| {
                        listing(s, caller, owner, Some(who))
                    },
                ),
            )
            .route(
                &format!("{base}/{{who}}/{{name}}"),
                put(
                    move |State(s): St,
                          caller: Caller,
                          Path(p): Path<(String, String)>,
                          body: Bytes| { set(s, caller, owner, p, body) },
                )
                .delete(
                    move |State(s): St, caller: Caller, Path(p): Path<(String, String)>| {
                        clear(s, caller, owner, p)
                    },
                ),
            );
    }
    r
}

async fn listing(
    s: AppState,
    caller: Caller,
    owner: LimitOwner,
    only: Option<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let field = match owner {
        LimitOwner::VHost => "vhost",
        LimitOwner::User => "user",
    };
    if let Some(who) = &only {
        match owner {
            LimitOwner::VHost => {
                caller.vhost(&s.broker, who)?;
            }
            LimitOwner::User if s.broker.user(who).is_none() => {
                return Err(ApiError::ObjectNotFound)
            }
            LimitOwner::User => {}
        }
    }
    Ok(Json(Value::Array(
        s.broker
            .limits(owner)
            .into_iter()
            .filter(|(w, _)| only.as_ref().is_none_or(|o| o == w))
            .map(|(w, m)| json!({ field: w, "value": m }))
            .collect(),
    )))
}

async fn set(
    s: AppState,
    caller: Caller,
    owner: LimitOwner,
    (who, name): (String, String),
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let b = body_json(&body)?;
    let value = b
        .get("value")
        .ok_or_else(|| ApiError::BadRequest("[{key_missing,value}]".into()))?;
    // Validated here too, so the 400 carries RabbitMQ's text alone.
    limits::validate(owner, &name, value).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    s.broker.set_limit(owner, &who, &name, value).await?;
    Ok(no_content())
}

async fn clear(
    s: AppState,
    caller: Caller,
    owner: LimitOwner,
    (who, name): (String, String),
) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.clear_limit(owner, &who, &name).await? {
        Ok(no_content())
    } else {
        Err(ApiError::ObjectNotFound)
    }
}
