//! Pure AMQP 0-9-1 frame codec: bytes in, typed frames out (`Ok(None)` = need more bytes),
//! and server frames appended to a reused `BytesMut`. No tokio, no clock, so it is
//! unit-tested on spec byte strings and fuzzed (fuzz/fuzz_targets/amqp_frame.rs).
//!
//! Methods and content headers are parsed by amq-protocol (generated from the spec);
//! framing, size limits and bodies are handled here so that:
//! * a frame larger than `frame_max` is refused from its 7-byte header, before its payload
//!   is buffered (amq-protocol alone would trust the 32-bit size);
//! * body payloads stay `Bytes` slices of the receive buffer (zero copy).

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::{basic::gen_properties, gen_class, parse_class};
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use amq_protocol::frame::AMQPContentHeader;
pub use amq_protocol::protocol::{AMQPClass, BasicProperties};

/// AMQP 0-9-1 §4.2.2 protocol header.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// §4.2.3 frame types and end octet.
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Hard cap when no frame_max is negotiated yet (0): 128 MiB.
const HARD_FRAME_CAP: u32 = 128 * 1024 * 1024;

/// The outcome of reading the protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCheck {
    Ok,
    /// Not `AMQP 0 0 9 1`: answer with [`PROTOCOL_HEADER`] and close (§4.2.2).
    Wrong,
}

/// The AMQP 0-9 header (`AMQP 1 1 0 9`) that older clients (Perl's Net::AMQP, used by
/// AnyEvent::RabbitMQ) send: RabbitMQ speaks 0-9-1 to them, whose methods 0-9 shares.
const PROTOCOL_HEADER_0_9: [u8; 8] = *b"AMQP\x01\x01\x00\x09";

/// Checks the 8-byte protocol header; `None` until 8 bytes (or a mismatch) are buffered.
pub fn decode_protocol_header(buf: &mut BytesMut) -> Option<HeaderCheck> {
    let n = buf.len().min(8);
    if buf[..n] != PROTOCOL_HEADER[..n] && buf[..n] != PROTOCOL_HEADER_0_9[..n] {
        return Some(HeaderCheck::Wrong);
    }
    if buf.len() < 8 {
        return None;
    }
    buf.advance(8);
    Some(HeaderCheck::Ok)
}

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Boxed: methods are large and rare next to bodies.
    Method(u16, Box<AMQPClass>),
    Header(u16, Box<ContentHeader>),
    Body(u16, Bytes),
    Heartbeat(u16),
}

/// A decoded content header with its property bytes as the client sent them: delivered
/// unchanged when the broker does not change the properties, as RabbitMQ passes them
/// through (header tables keep their order and field types byte for byte).
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    pub header: AMQPContentHeader,
    /// Property flags and list (the header frame's payload after class, weight and body
    /// size), in the layout [`encode_properties`] writes.
    pub raw_properties: Bytes,
}

impl std::ops::Deref for ContentHeader {
    type Target = AMQPContentHeader;
    fn deref(&self) -> &AMQPContentHeader {
        &self.header
    }
}

/// Why the input cannot be framed; all are connection errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RabbitMQ's text: the payload size and the payload limit (frame_max less the 8
    /// bytes of frame header and end).
    #[error("type {ty}, all octets = <<>>: {{frame_too_large,{size},{}}}", max.saturating_sub(8))]
    FrameTooLarge { ty: u8, size: u32, max: u32 },
    #[error("bad frame end octet {0:#04x}")]
    BadFrameEnd(u8),
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    #[error("unknown method {class}.{method}")]
    UnknownMethod { class: u16, method: u16 },
    #[error("malformed {0} frame")]
    Syntax(&'static str),
    /// basic.qos with a prefetch_size (which amq-protocol's parser drops): RabbitMQ
    /// does not implement it.
    #[error("prefetch_size!=0 ({0})")]
    PrefetchSize(u32),
}

impl FrameError {
    /// The reply code of the connection.close RabbitMQ sends for this error.
    pub fn reply_code(&self) -> u16 {
        match self {
            FrameError::FrameTooLarge { .. }
            | FrameError::BadFrameEnd(_)
            | FrameError::UnknownFrameType(_) => 501,
            FrameError::UnknownMethod { .. } | FrameError::PrefetchSize(_) => 540,
            FrameError::Syntax(_) => 502,
        }
    }

    /// The frame was read whole and only its method is refused: the input stays in step,
    /// so the connection can read the client's close-ok afterwards.
    pub fn frame_consumed(&self) -> bool {
        matches!(self, FrameError::PrefetchSize(_))
    }

    /// The class and method ids the connection.close names (0, 0 when none).
    pub fn method(&self) -> (u16, u16) {
        match self {
            FrameError::PrefetchSize(_) => (60, 10),
            _ => (0, 0),
        }
    }

    /// RabbitMQ-style reply text.
    pub fn reply_text(&self) -> String {
        self.to_string()
    }
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed.
///
/// `frame_max` is the negotiated limit for the whole frame (header, payload and end
/// octet, §4.2.3), with RabbitMQ's allowance of 8 bytes over it: clients such as
/// AMQPStorm fill body frames with frame_max bytes of payload, and RabbitMQ takes them
/// (`?FRAME_SIZE_FUDGE`). 0 means "not negotiated", bounded by a hard cap.
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let ty = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    if !matches!(
        ty,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(FrameError::UnknownFrameType(ty));
    }
    let max = if frame_max == 0 {
        HARD_FRAME_CAP
    } else {
        frame_max
    };
    if size > max {
        return Err(FrameError::FrameTooLarge { ty, size, max });
    }
    let total = size as usize + 8;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(FrameError::BadFrameEnd(end));
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(7);
    frame.truncate(size as usize);
    match ty {
        FRAME_METHOD => {
            if frame.len() < 4 {
                return Err(FrameError::Syntax("method"));
            }
            // basic.qos: `prefetch-size long` first (RabbitMQ's 540 NOT_IMPLEMENTED).
            if frame[..4] == [0, 60, 0, 10] && frame.len() >= 8 {
                let size = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
                if size != 0 {
                    return Err(FrameError::PrefetchSize(size));
                }
            }
            if let Some(m) = hot_methods::decode(&frame) {
                return Ok(Some(Frame::Method(channel, Box::new(m))));
            }
            match parse_class(&frame[..]) {
                Ok((&[], m)) => Ok(Some(Frame::Method(channel, Box::new(m)))),
                Ok(_) => Err(FrameError::Syntax("method")),
                Err(_) => {
                    let class = u16::from_be_bytes([frame[0], frame[1]]);
                    let method = u16::from_be_bytes([frame[2], frame[3]]);
                    if is_known(class, method) {
                        Err(FrameError::Syntax("method"))
                    } else {
                        Err(FrameError::UnknownMethod { class, method })
                    }
                }
            }
        }
        FRAME_HEADER => match parse_content_header(&frame[..]) {
            // The parse took class, weight and body size (12 bytes) before the properties.
            Ok((&[], header)) if frame.len() >= 12 => Ok(Some(Frame::Header(
                channel,
                Box::new(ContentHeader {
                    header,
                    raw_properties: frame.slice(12..),
                }),
            ))),
            _ => Err(FrameError::Syntax("content header")),
        },
        FRAME_BODY => Ok(Some(Frame::Body(channel, frame))),
        _ => Ok(Some(Frame::Heartbeat(channel))),
    }
}

/// Methods of AMQP 0-9-1 (with RabbitMQ's extensions) by class.
fn is_known(class: u16, method: u16) -> bool {
    let methods: &[u16] = match class {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => &[],
    };
    methods.contains(&method)
}

/// Writes `payload_fn`'s bytes as one frame of type `ty`.
fn put_frame(out: &mut BytesMut, ty: u8, channel: u16, payload: &[u8]) {
    out.reserve(payload.len() + 8);
    out.put_u8(ty);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.put_u8(FRAME_END);
}

/// Appends a method frame.
pub fn encode_method(out: &mut BytesMut, channel: u16, method: &AMQPClass) {
    // cookie-factory writes into a Vec; methods other than deliveries are not hot.
    let payload =
        cookie_factory::gen_simple(gen_class(method), Vec::with_capacity(64)).unwrap_or_default();
    put_frame(out, FRAME_METHOD, channel, &payload);
}

/// Appends a heartbeat frame (`08 0000 00000000 CE`).
pub fn encode_heartbeat(out: &mut BytesMut) {
    put_frame(out, FRAME_HEARTBEAT, 0, &[]);
}

/// The property flags and list of a content header, encoded once per message and reused
/// for every delivery.
pub fn encode_properties(props: &BasicProperties) -> Bytes {
    let encoded = cookie_factory::gen_simple(gen_properties(props), Vec::with_capacity(32))
        .unwrap_or_else(|_| vec![0, 0]);
    match x_death::reorder(props, &encoded) {
        Some(reordered) => Bytes::from(reordered),
        None => Bytes::from(encoded),
    }
}

/// Appends a content header and the body split into frames of at most `frame_max`.
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    props: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) {
    encode_content_preencoded(out, channel, &encode_properties(props), body, frame_max);
}

/// Like [`encode_content`] with properties from [`encode_properties`].
pub fn encode_content_preencoded(
    out: &mut BytesMut,
    channel: u16,
    encoded_props: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    let header_len = 12 + encoded_props.len();
    out.reserve(header_len + 8 + body.len() + 8);
    out.put_u8(FRAME_HEADER);
    out.put_u16(channel);
    out.put_u32(header_len as u32);
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    out.put_slice(encoded_props);
    out.put_u8(FRAME_END);
    let chunk = if frame_max == 0 {
        HARD_FRAME_CAP as usize
    } else {
        (frame_max as usize).saturating_sub(8).max(1)
    };
    for part in body.chunks(chunk) {
        put_frame(out, FRAME_BODY, channel, part);
    }
}

mod hot_methods;
#[cfg(test)]
mod tests;
mod x_death;
