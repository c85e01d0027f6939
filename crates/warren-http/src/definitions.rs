//! `/api/definitions`: export and import in RabbitMQ's JSON format. The format lives in
//! [`warren_core::definitions`] (the binary loads a file at boot with the same code);
//! these handlers add authorisation and map errors to RabbitMQ's status codes.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use warren_core::definitions::{self, DefinitionsError};

use crate::api::body_json;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::{AppState, RABBITMQ_COMPAT_VERSION};

impl From<DefinitionsError> for ApiError {
    fn from(e: DefinitionsError) -> Self {
        match e {
            DefinitionsError::Invalid(r) => ApiError::BadRequest(r),
            DefinitionsError::Core(c) => ApiError::from(c),
        }
    }
}

pub async fn export_all(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    Ok(Json(definitions::export(
        &s.broker,
        None,
        RABBITMQ_COMPAT_VERSION,
    )))
}

pub async fn export_vhost(
    State(s): State<AppState>,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    caller.vhost(&s.broker, &v)?;
    Ok(Json(definitions::export(
        &s.broker,
        Some(&v),
        RABBITMQ_COMPAT_VERSION,
    )))
}

pub async fn import_all(
    State(s): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let defs = body_json(&body)?;
    definitions::import(&s.broker, &defs, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn import_vhost(
    State(s): State<AppState>,
    caller: Caller,
    Path(v): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    caller.vhost(&s.broker, &v)?;
    let defs = body_json(&body)?;
    definitions::import(&s.broker, &defs, Some(&v)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
