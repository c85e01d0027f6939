//! The one place AMQP errors become closes: a channel error closes the channel, a
//! connection error closes the connection, each with RabbitMQ's reply code and text.

use warren_core::CoreError;

/// Reply codes of AMQP 0-9-1 §1.7 (constants) that Warren sends.
pub mod code {
    pub const CONNECTION_FORCED: u16 = 320;
    pub const NO_ROUTE: u16 = 312;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// RabbitMQ's reply-text prefix for a code.
pub fn code_name(c: u16) -> &'static str {
    match c {
        320 => "CONNECTION_FORCED",
        312 => "NO_ROUTE",
        403 => "ACCESS_REFUSED",
        404 => "NOT_FOUND",
        405 => "RESOURCE_LOCKED",
        406 => "PRECONDITION_FAILED",
        501 => "FRAME_ERROR",
        502 => "SYNTAX_ERROR",
        503 => "COMMAND_INVALID",
        504 => "CHANNEL_ERROR",
        505 => "UNEXPECTED_FRAME",
        506 => "RESOURCE_ERROR",
        530 => "NOT_ALLOWED",
        540 => "NOT_IMPLEMENTED",
        541 => "INTERNAL_ERROR",
        _ => "ERROR",
    }
}

/// An error while handling a frame.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// Soft error: close this channel (403, 404, 405, 406).
    #[error("channel {channel}: {code} {text}")]
    Channel {
        channel: u16,
        code: u16,
        text: String,
        class_id: u16,
        method_id: u16,
    },
    /// Hard error: close the connection (5xx, 530).
    #[error("connection: {code} {text}")]
    Connection {
        code: u16,
        text: String,
        class_id: u16,
        method_id: u16,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl AmqpError {
    pub fn connection(code: u16, text: impl Into<String>) -> Self {
        AmqpError::Connection {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Maps a core error raised by a method on `channel`: soft kinds close the channel,
    /// the others the connection.
    pub fn from_core(e: CoreError, channel: u16, class_id: u16, method_id: u16) -> Self {
        let text = format!("{} - {}", e.kind.name(), e.text);
        if e.kind.is_soft() {
            AmqpError::Channel {
                channel,
                code: e.kind.code(),
                text,
                class_id,
                method_id,
            }
        } else {
            AmqpError::Connection {
                code: e.kind.code(),
                text,
                class_id,
                method_id,
            }
        }
    }

    /// Fills in the failing method's ids (0 when unknown).
    pub fn at(mut self, class: u16, method: u16) -> Self {
        match &mut self {
            AmqpError::Channel {
                class_id,
                method_id,
                ..
            }
            | AmqpError::Connection {
                class_id,
                method_id,
                ..
            } => {
                if *class_id == 0 {
                    *class_id = class;
                    *method_id = method;
                }
            }
            AmqpError::Io(_) => {}
        }
        self
    }
}

/// Builds a soft (channel) error with RabbitMQ's `NAME - text` reply text.
pub fn channel_error(channel: u16, c: u16, text: impl std::fmt::Display) -> AmqpError {
    AmqpError::Channel {
        channel,
        code: c,
        text: format!("{} - {text}", code_name(c)),
        class_id: 0,
        method_id: 0,
    }
}

/// Builds a hard (connection) error with RabbitMQ's `NAME - text` reply text.
pub fn connection_error(c: u16, text: impl std::fmt::Display) -> AmqpError {
    AmqpError::Connection {
        code: c,
        text: format!("{} - {text}", code_name(c)),
        class_id: 0,
        method_id: 0,
    }
}
