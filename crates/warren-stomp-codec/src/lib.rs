//! The STOMP 1.0–1.2 wire format: bytes in, frames out, `None` = need more bytes.
//!
//! Pure (no tokio, no clock) so it can be unit-tested on the spec's examples and fuzzed.
//! Bodies and header blocks are zero-copy slices of the read buffer. nom parses the
//! header block once the frame's extent is known; finding that extent is a bounded scan, so
//! a peer can never make us buffer more than the configured limits.

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use bytestring::ByteString;
use nom::bytes::complete::{tag, take_till};
use nom::sequence::terminated;
use nom::{IResult, Parser};

/// The protocol version in effect on a connection; it decides header escaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    pub fn parse(s: &str) -> Option<Version> {
        match s.trim() {
            "1.0" => Some(Version::V1_0),
            "1.1" => Some(Version::V1_1),
            "1.2" => Some(Version::V1_2),
            _ => None,
        }
    }
}

/// One STOMP frame. Header order is kept: for a repeated header the first one wins
/// (STOMP 1.2 "Repeated Header Entries").
///
/// A decoded frame's header names and values are ranges of its header block, which shares
/// the read buffer: decoding allocates one vector of ranges per frame, not two strings per
/// header, and takes one reference count for the block, not one per header. Only an
/// escaped name or value is copied.
#[derive(Clone)]
pub struct Frame {
    pub command: ByteString,
    /// What decoded headers point into; empty for a frame built here.
    block: ByteString,
    headers: Vec<(Piece, Piece)>,
    pub body: Bytes,
}

/// A header name or value: where it lies in the header block, or its own text.
#[derive(Clone)]
enum Piece {
    At(u32, u32),
    Owned(Box<str>),
}

impl Piece {
    /// `part` is a subslice of `block`, whose length fits a u32 (frames are bounded well
    /// below 4 GB by [`Limits`]).
    fn at(block: &str, part: &str) -> Piece {
        let from = part.as_ptr() as usize - block.as_ptr() as usize;
        Piece::At(from as u32, (from + part.len()) as u32)
    }

    fn as_str<'a>(&'a self, block: &'a str) -> &'a str {
        match self {
            Piece::At(from, to) => block.get(*from as usize..*to as usize).unwrap_or(""),
            Piece::Owned(s) => s,
        }
    }
}

impl Frame {
    pub fn new(command: &'static str) -> Frame {
        Frame {
            command: ByteString::from_static(command),
            block: ByteString::new(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header (builder style).
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Frame {
        self.push(name, value);
        self
    }

    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.headers.push((
            Piece::Owned(name.into()),
            Piece::Owned(value.into().into_boxed_str()),
        ));
    }

    /// The headers in frame order, repeats included.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(&self.block), v.as_str(&self.block)))
    }

    /// The first value of a header. Called many times per frame by the session, so names
    /// are compared as bytes and only the value found is taken as a `str`.
    pub fn get(&self, name: &str) -> Option<&str> {
        let block = self.block.as_bytes();
        self.headers
            .iter()
            .find(|(k, _)| match k {
                Piece::At(from, to) => {
                    block.get(*from as usize..*to as usize) == Some(name.as_bytes())
                }
                Piece::Owned(k) => **k == *name,
            })
            .map(|(_, v)| v.as_str(&self.block))
    }

    /// CONNECT, STOMP and CONNECTED frames never escape headers (STOMP 1.2 "Value Encoding").
    fn unescaped_command(command: &str) -> bool {
        matches!(command, "CONNECT" | "STOMP" | "CONNECTED")
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.command == other.command
            && self.headers().eq(other.headers())
            && self.body == other.body
    }
}

impl Eq for Frame {}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("command", &self.command)
            .field("headers", &self.headers().collect::<Vec<_>>())
            .field("body", &self.body)
            .finish()
    }
}

/// What a decode step yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// An end-of-line between frames: a heart-beat (STOMP 1.1 "Heart-beating").
    HeartBeat,
}

/// Bounds on what one peer may make us buffer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame: header block plus body.
    pub max_frame: usize,
    pub max_headers: usize,
    /// Longest single header line.
    pub max_header_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 16 * 1024 * 1024,
            max_headers: 1000,
            max_header_len: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame larger than {limit} bytes")]
    FrameTooLarge { limit: usize },
    #[error("more than {limit} headers")]
    TooManyHeaders { limit: usize },
    #[error("header longer than {limit} bytes")]
    HeaderTooLong { limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("undefined escape sequence in header")]
    BadEscape,
    #[error("invalid content-length")]
    BadContentLength,
    #[error("header is not valid UTF-8")]
    NotUtf8,
}

/// Decodes the next frame or heart-beat from `buf`, consuming it. `version` selects the
/// header escaping of the connection (1.0: none).
pub fn decode(
    buf: &mut BytesMut,
    version: Version,
    limits: &Limits,
) -> Result<Option<Decoded>, CodecError> {
    // Heart-beats and the optional EOLs after a frame's NUL (STOMP 1.2 "Augmented BNF").
    // A stray NUL between frames is skipped the same way, as RabbitMQ does.
    match buf.first() {
        None => return Ok(None),
        Some(b'\n') | Some(0) => {
            buf.advance(1);
            return Ok(Some(Decoded::HeartBeat));
        }
        Some(b'\r') => {
            return match buf.get(1) {
                None => Ok(None),
                Some(b'\n') => {
                    buf.advance(2);
                    Ok(Some(Decoded::HeartBeat))
                }
                Some(_) => Err(CodecError::Malformed("stray carriage return")),
            };
        }
        Some(_) => {}
    }
    let Some((body_start, lines)) = header_block_end(buf, limits)? else {
        return Ok(None);
    };
    if body_start > u32::MAX as usize {
        // Header ranges are u32s.
        return Err(CodecError::FrameTooLarge {
            limit: limits.max_frame,
        });
    }
    let block = std::str::from_utf8(&buf[..body_start]).map_err(|_| CodecError::NotUtf8)?;
    let parsed = parse_header_block(block, lines, version, limits)?;
    let content_length = match parsed.get(block, "content-length") {
        None => None,
        Some(v) => {
            let n: usize = v.trim().parse().map_err(|_| CodecError::BadContentLength)?;
            if n.saturating_add(body_start) > limits.max_frame {
                return Err(CodecError::FrameTooLarge {
                    limit: limits.max_frame,
                });
            }
            Some(n)
        }
    };
    let body_len = match content_length {
        Some(n) => {
            if buf.len() < body_start + n + 1 {
                return Ok(None);
            }
            if buf[body_start + n] != 0 {
                return Err(CodecError::Malformed("body not followed by NUL"));
            }
            n
        }
        None => match buf[body_start..].iter().position(|&b| b == 0) {
            Some(n) => n,
            None => {
                if buf.len() > limits.max_frame {
                    return Err(CodecError::FrameTooLarge {
                        limit: limits.max_frame,
                    });
                }
                return Ok(None);
            }
        },
    };
    if body_start + body_len > limits.max_frame {
        return Err(CodecError::FrameTooLarge {
            limit: limits.max_frame,
        });
    }
    // Checked as UTF-8 above, and the split moves no bytes.
    let block =
        ByteString::try_from(buf.split_to(body_start).freeze()).map_err(|_| CodecError::NotUtf8)?;
    let body = buf.split_to(body_len).freeze();
    buf.advance(1); // NUL
    Ok(Some(Decoded::Frame(parsed.into_frame(block, body))))
}

/// The offset just past the blank line ending the command and headers, and the number of
/// lines before it, or `None` if it has not arrived yet. Errors as soon as a line or the
/// block outgrows the limits.
fn header_block_end(buf: &[u8], limits: &Limits) -> Result<Option<(usize, usize)>, CodecError> {
    let max_block = limits.max_frame.min(
        limits
            .max_header_len
            .saturating_mul(limits.max_headers.saturating_add(2)),
    );
    let mut line_start = 0;
    let mut lines = 0usize;
    while let Some(off) = memchr::memchr(b'\n', &buf[line_start..]) {
        let nl = line_start + off;
        let mut line = &buf[line_start..nl];
        if let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        if line.len() > limits.max_header_len {
            return Err(CodecError::HeaderTooLong {
                limit: limits.max_header_len,
            });
        }
        if line.is_empty() && lines > 0 {
            return Ok(Some((nl + 1, lines)));
        }
        lines += 1;
        if lines > limits.max_headers + 1 {
            return Err(CodecError::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        line_start = nl + 1;
    }
    if buf.len() - line_start > limits.max_header_len {
        return Err(CodecError::HeaderTooLong {
            limit: limits.max_header_len,
        });
    }
    if buf.len() > max_block {
        return Err(CodecError::FrameTooLarge {
            limit: limits.max_frame,
        });
    }
    Ok(None)
}

/// The next line without its EOL (`\n` or `\r\n`), and what follows it.
fn line(input: &str) -> Result<(&str, &str), CodecError> {
    let r: IResult<&str, &str> = terminated(take_till(|c| c == '\n'), tag("\n"))
        .map(|l: &str| l.strip_suffix('\r').unwrap_or(l))
        .parse(input);
    let (rest, l) = r.map_err(|_| CodecError::Malformed("bad header block"))?;
    Ok((l, rest))
}

/// `name:value` split at the first colon.
fn header_line(input: &str) -> IResult<&str, (&str, &str)> {
    let (value, name) = terminated(take_till(|c| c == ':'), tag(":")).parse(input)?;
    Ok(("", (name, value)))
}

/// The commands of STOMP 1.0–1.2: a decoded frame names its command without taking a
/// reference to the read buffer.
const COMMANDS: &[&str] = &[
    "SEND",
    "ACK",
    "NACK",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "BEGIN",
    "COMMIT",
    "ABORT",
    "DISCONNECT",
    "CONNECT",
    "STOMP",
    "CONNECTED",
    "MESSAGE",
    "RECEIPT",
    "ERROR",
];

/// A parsed header block, before the frame is taken out of the read buffer (the body may
/// not have arrived yet, and then nothing is taken).
struct ParsedBlock {
    command: Piece,
    headers: Vec<(Piece, Piece)>,
}

impl ParsedBlock {
    fn get<'a>(&'a self, block: &'a str, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k.as_str(block) == name)
            .map(|(_, v)| v.as_str(block))
    }

    fn into_frame(self, block: ByteString, body: Bytes) -> Frame {
        let command = self.command.as_str(&block);
        let command = match COMMANDS.iter().find(|c| **c == command) {
            Some(c) => ByteString::from_static(c),
            None => ByteString::from(command),
        };
        Frame {
            command,
            block,
            headers: self.headers,
            body,
        }
    }
}

fn parse_header_block(
    block: &str,
    lines: usize,
    version: Version,
    limits: &Limits,
) -> Result<ParsedBlock, CodecError> {
    let (cmd, mut rest) = line(block)?;
    if cmd.is_empty() || !cmd.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err(CodecError::Malformed("bad command"));
    }
    let escaped = version > Version::V1_0 && !Frame::unescaped_command(cmd);
    // The command line is not a header.
    let mut headers = Vec::with_capacity(lines.saturating_sub(1));
    loop {
        let (l, next) = line(rest)?;
        rest = next;
        if l.is_empty() {
            break;
        }
        if headers.len() == limits.max_headers {
            return Err(CodecError::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        let (_, (name, value)) =
            header_line(l).map_err(|_| CodecError::Malformed("header without colon"))?;
        let value = if version == Version::V1_0 {
            // STOMP 1.0 clients write `name: value`; RabbitMQ drops the leading blanks.
            value.trim_ascii_start()
        } else {
            value
        };
        let piece = |part: &str| -> Result<Piece, CodecError> {
            if escaped && part.contains('\\') {
                unescape(part, version).map(|s| Piece::Owned(s.into_boxed_str()))
            } else {
                Ok(Piece::at(block, part))
            }
        };
        headers.push((piece(name)?, piece(value)?));
    }
    Ok(ParsedBlock {
        command: Piece::at(block, cmd),
        headers,
    })
}

/// STOMP 1.2 "Value Encoding": `\r` (1.2 only), `\n`, `\c`, `\\`; anything else after a
/// backslash is a fatal protocol error.
fn unescape(s: &str, version: Version) -> Result<String, CodecError> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('c') => out.push(':'),
            Some('\\') => out.push('\\'),
            Some('r') if version == Version::V1_2 => out.push('\r'),
            _ => return Err(CodecError::BadEscape),
        }
    }
    Ok(out)
}

/// The bytes a header name or value may need escaped (STOMP 1.2 "Value Encoding"): one
/// table load per byte in the scan every header of every MESSAGE takes.
const MAY_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    t[b'\n' as usize] = true;
    t[b':' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'\r' as usize] = true;
    t
};

fn escape_into(s: &str, version: Version, out: &mut BytesMut) {
    // Most header values need no escape: copied whole, and runs between escapes too.
    let b = s.as_bytes();
    if !b.iter().any(|&c| MAY_ESCAPE[usize::from(c)]) {
        out.put_slice(b);
        return;
    }
    let mut from = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'\n' => b"\\n",
            b':' => b"\\c",
            b'\\' => b"\\\\",
            b'\r' if version == Version::V1_2 => b"\\r",
            _ => continue,
        };
        out.put_slice(&b[from..i]);
        out.put_slice(esc);
        from = i + 1;
    }
    out.put_slice(&b[from..]);
}

/// Appends `frame` to `out`. The caller adds `content-length` where it wants one (the
/// session always does for MESSAGE, so bodies may hold NUL bytes).
pub fn encode(frame: &Frame, version: Version, out: &mut BytesMut) {
    out.reserve(frame.command.len() + 64 + frame.body.len());
    let mut w = FrameWriter::new(out, &frame.command, version);
    for (k, v) in frame.headers() {
        w.header(k, v);
    }
    w.finish(&frame.body);
}

/// Writes a frame header by header straight into the output, for the frame the broker
/// sends per delivery (MESSAGE): a [`Frame`] would take two strings per header.
pub struct FrameWriter<'a> {
    out: &'a mut BytesMut,
    version: Version,
    escaped: bool,
}

impl<'a> FrameWriter<'a> {
    pub fn new(out: &'a mut BytesMut, command: &str, version: Version) -> FrameWriter<'a> {
        out.put_slice(command.as_bytes());
        out.put_u8(b'\n');
        FrameWriter {
            out,
            version,
            escaped: version > Version::V1_0 && !Frame::unescaped_command(command),
        }
    }

    pub fn header(&mut self, name: &str, value: &str) {
        self.header_parts(name, &[value]);
    }

    /// A header whose value is `parts` joined, without joining them first.
    pub fn header_parts(&mut self, name: &str, parts: &[&str]) {
        if self.escaped {
            escape_into(name, self.version, self.out);
            self.out.put_u8(b':');
            for p in parts {
                escape_into(p, self.version, self.out);
            }
        } else {
            // 1.0 and CONNECT/CONNECTED cannot carry these; drop rather than corrupt.
            self.out
                .put_slice(name.replace(['\n', ':'], " ").as_bytes());
            self.out.put_u8(b':');
            for p in parts {
                self.out.put_slice(p.replace('\n', " ").as_bytes());
            }
        }
        self.out.put_u8(b'\n');
    }

    pub fn finish(self, body: &[u8]) {
        self.out.put_u8(b'\n');
        self.out.put_slice(body);
        // `NULL *(EOL)`: RabbitMQ ends every frame with `\0\n` (its `trailing_lf`, on by
        // default), and clients rely on it: php-stomp drops the byte after a NUL, stomper's
        // StompBuffer only completes a frame at `\0\n`.
        self.out.put_slice(b"\0\n");
    }
}

#[cfg(test)]
mod tests;
