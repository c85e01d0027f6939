//! Errors of the core, shaped like RabbitMQ's: each names the soft/hard error a front-end
//! reports (AMQP reply codes; MQTT and STOMP map the same kinds to their own answers).

/// What went wrong, in RabbitMQ's vocabulary. The AMQP reply code is [`ErrorKind::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 403: reserved names, permissions, exclusive consumers.
    AccessRefused,
    /// 404: no such exchange or queue.
    NotFound,
    /// 405: an exclusive queue of another connection.
    ResourceLocked,
    /// 406: inequivalent re-declare, non-empty/in-use delete, bad arguments.
    PreconditionFailed,
    /// 503 (connection error): e.g. an unknown exchange type.
    CommandInvalid,
    /// 530 (connection error): e.g. an unknown vhost.
    NotAllowed,
    /// 541 (connection error): the store failed.
    InternalError,
    /// 540 (connection error): a feature Warren does not have.
    NotImplemented,
}

impl ErrorKind {
    /// The AMQP 0-9-1 reply code RabbitMQ uses for this kind.
    pub fn code(self) -> u16 {
        match self {
            ErrorKind::AccessRefused => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::ResourceLocked => 405,
            ErrorKind::PreconditionFailed => 406,
            ErrorKind::CommandInvalid => 503,
            ErrorKind::NotAllowed => 530,
            ErrorKind::NotImplemented => 540,
            ErrorKind::InternalError => 541,
        }
    }

    /// The AMQP reply-text prefix (`NOT_FOUND - ...`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::AccessRefused => "ACCESS_REFUSED",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::ResourceLocked => "RESOURCE_LOCKED",
            ErrorKind::PreconditionFailed => "PRECONDITION_FAILED",
            ErrorKind::CommandInvalid => "COMMAND_INVALID",
            ErrorKind::NotAllowed => "NOT_ALLOWED",
            ErrorKind::NotImplemented => "NOT_IMPLEMENTED",
            ErrorKind::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Channel-level (soft) errors close only the channel in AMQP.
    pub fn is_soft(self) -> bool {
        matches!(
            self,
            ErrorKind::AccessRefused
                | ErrorKind::NotFound
                | ErrorKind::ResourceLocked
                | ErrorKind::PreconditionFailed
        )
    }
}

/// An error of a core operation with RabbitMQ's reply text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} - {text}", kind.name())]
pub struct CoreError {
    pub kind: ErrorKind,
    pub text: String,
}

impl CoreError {
    pub fn new(kind: ErrorKind, text: impl Into<String>) -> Self {
        Self {
            kind,
            text: text.into(),
        }
    }
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, text)
    }
    pub fn precondition(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::PreconditionFailed, text)
    }
    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::AccessRefused, text)
    }
    pub fn locked(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceLocked, text)
    }
    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::InternalError, text)
    }
}

impl From<warren_store::StoreError> for CoreError {
    fn from(e: warren_store::StoreError) -> Self {
        CoreError::internal(format!("store: {e}"))
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

/// A policy or limit RabbitMQ's validators would refuse; the text is the reason, shown as
/// RabbitMQ shows it (`Validation failed…`, a 400 in the API).
#[derive(Debug, Clone, thiserror::Error)]
#[error("Validation failed\n\n{0}\n")]
pub struct ValidationFailed(pub String);

impl From<ValidationFailed> for CoreError {
    fn from(e: ValidationFailed) -> Self {
        CoreError::precondition(e.to_string())
    }
}
