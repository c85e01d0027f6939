//! The API's errors, answered as RabbitMQ's management plugin does:
//! `{"error": ..., "reason": ...}` with its status codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use warren_core::{CoreError, ErrorKind};

/// An error response.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 for a path naming something that does not exist (RabbitMQ's exact body).
    #[error("Object Not Found")]
    ObjectNotFound,
    /// 401: no or bad credentials. `challenge` adds `WWW-Authenticate` as RabbitMQ does;
    /// it is off for script requests (`X-Requested-With: XMLHttpRequest`, sent by the
    /// dashboard) because a challenge makes browsers pop up their own login dialog over
    /// the page's form, and a headless browser waits on it forever.
    #[error("login failed: {reason}")]
    LoginFailed { reason: String, challenge: bool },
    /// 401 without a challenge: authenticated but not allowed (RabbitMQ's not_authorised).
    #[error("not authorised: {0}")]
    NotAuthorised(String),
    /// 400 bad_request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 400 bad_request whose reason is an Erlang term RabbitMQ renders as a JSON list,
    /// e.g. `["not_base64", "…"]`.
    #[error("bad request: {0:?}")]
    BadRequestTerm(Vec<String>),
    /// 404 not_found from an operation (e.g. binding to a missing queue).
    #[error("not found: {0}")]
    NotFound(String),
    /// 405 method not allowed.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 500.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<CoreError> for ApiError {
    /// A declaration or deletion, which the management plugin makes without a channel
    /// (`direct_request`): 404 → not_found, 403 → not_authorised, other AMQP errors →
    /// bad_request with the bare explanation; store failures are 500s.
    fn from(e: CoreError) -> Self {
        match e.kind {
            ErrorKind::NotFound => ApiError::NotFound(e.to_string()),
            ErrorKind::AccessRefused | ErrorKind::NotAllowed => {
                ApiError::NotAuthorised(e.to_string())
            }
            ErrorKind::InternalError => ApiError::Internal(e.to_string()),
            _ => ApiError::BadRequest(e.text),
        }
    }
}

impl ApiError {
    /// An operation the management plugin makes on a channel (publish, get): the
    /// channel's close becomes a 400 with its code and reply text
    /// (`406 PRECONDITION_FAILED - …`, rabbit_mgmt_util:bad_request_exception).
    pub fn from_channel(e: CoreError) -> Self {
        match e.kind {
            ErrorKind::NotFound
            | ErrorKind::AccessRefused
            | ErrorKind::NotAllowed
            | ErrorKind::InternalError => e.into(),
            kind => ApiError::BadRequest(format!("{} {e}", kind.code())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, reason) = match &self {
            ApiError::ObjectNotFound => (
                StatusCode::NOT_FOUND,
                "Object Not Found".to_owned(),
                "Not Found".to_owned(),
            ),
            ApiError::LoginFailed { reason, .. } => (
                StatusCode::UNAUTHORIZED,
                "not_authorized".into(),
                reason.clone(),
            ),
            ApiError::NotAuthorised(r) => {
                (StatusCode::UNAUTHORIZED, "not_authorised".into(), r.clone())
            }
            ApiError::BadRequest(r) => (StatusCode::BAD_REQUEST, "bad_request".into(), r.clone()),
            ApiError::BadRequestTerm(term) => {
                let body = serde_json::json!({"error": "bad_request", "reason": term});
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
            ApiError::NotFound(r) => (StatusCode::NOT_FOUND, "not_found".into(), r.clone()),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed".into(),
                "Method Not Allowed".into(),
            ),
            ApiError::Internal(r) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error".into(),
                r.clone(),
            ),
        };
        let mut resp = (
            status,
            Json(serde_json::json!({"error": error, "reason": reason})),
        )
            .into_response();
        if matches!(
            self,
            ApiError::LoginFailed {
                challenge: true,
                ..
            }
        ) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        resp
    }
}
