//! The STOMP 1.0–1.2 wire format: bytes in, frames out, `None` = need more bytes.
//!
//! Pure (no tokio, no clock) so it can be unit-tested on the spec's examples and fuzzed.
//! Bodies are zero-copy slices of the read buffer. nom parses the header block once the
//! frame's extent is known; finding that extent is a bounded scan, so a peer can never make
//! us buffer more than the configured limits.

use bytes::{Buf, BufMut, Bytes, BytesMut};
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Frame {
    pub fn new(command: &str) -> Frame {
        Frame {
            command: command.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header (builder style).
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Frame {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.headers.push((name.to_owned(), value.into()));
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// CONNECT, STOMP and CONNECTED frames never escape headers (STOMP 1.2 "Value Encoding").
    fn unescaped_command(command: &str) -> bool {
        matches!(command, "CONNECT" | "STOMP" | "CONNECTED")
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
    let Some(body_start) = header_block_end(buf, limits)? else {
        return Ok(None);
    };
    let block = &buf[..body_start];
    let (command, headers) = parse_header_block(block, version, limits)?;
    let content_length = match headers.iter().find(|(k, _)| k == "content-length") {
        None => None,
        Some((_, v)) => {
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
    buf.advance(body_start);
    let body = buf.split_to(body_len).freeze();
    buf.advance(1); // NUL
    Ok(Some(Decoded::Frame(Frame {
        command,
        headers,
        body,
    })))
}

/// The offset just past the blank line ending the command and headers, or `None` if it
/// has not arrived yet. Errors as soon as a line or the block outgrows the limits.
fn header_block_end(buf: &[u8], limits: &Limits) -> Result<Option<usize>, CodecError> {
    let max_block = limits.max_frame.min(
        limits
            .max_header_len
            .saturating_mul(limits.max_headers.saturating_add(2)),
    );
    let mut line_start = 0;
    let mut lines = 0usize;
    while let Some(off) = buf[line_start..].iter().position(|&b| b == b'\n') {
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
            return Ok(Some(nl + 1));
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

/// One line without its EOL (`\n` or `\r\n`).
fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    terminated(take_till(|c| c == b'\n'), tag(&b"\n"[..]))
        .map(|l: &[u8]| l.strip_suffix(b"\r").unwrap_or(l))
        .parse(input)
}

/// `name:value` split at the first colon.
fn header_line(input: &[u8]) -> IResult<&[u8], (&[u8], &[u8])> {
    let (value, name) = terminated(take_till(|c| c == b':'), tag(&b":"[..])).parse(input)?;
    Ok((&[][..], (name, value)))
}

type HeaderBlock = (String, Vec<(String, String)>);

fn parse_header_block(
    block: &[u8],
    version: Version,
    limits: &Limits,
) -> Result<HeaderBlock, CodecError> {
    let malformed = |_| CodecError::Malformed("bad header block");
    let (mut rest, cmd) = line(block).map_err(malformed)?;
    if cmd.is_empty() || !cmd.iter().all(|c| c.is_ascii_uppercase()) {
        return Err(CodecError::Malformed("bad command"));
    }
    let command = String::from_utf8(cmd.to_vec()).map_err(|_| CodecError::NotUtf8)?;
    let escaped = version > Version::V1_0 && !Frame::unescaped_command(&command);
    let mut headers = Vec::new();
    loop {
        let (next, l) = line(rest).map_err(malformed)?;
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
        let (name, value) = if escaped {
            (unescape(name, version)?, unescape(value, version)?)
        } else if version == Version::V1_0 {
            // STOMP 1.0 clients write `name: value`; RabbitMQ drops the leading blanks.
            (utf8(name)?, utf8(value.trim_ascii_start())?)
        } else {
            (utf8(name)?, utf8(value)?)
        };
        headers.push((name, value));
    }
    Ok((command, headers))
}

fn utf8(b: &[u8]) -> Result<String, CodecError> {
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::NotUtf8)
}

/// STOMP 1.2 "Value Encoding": `\r` (1.2 only), `\n`, `\c`, `\\`; anything else after a
/// backslash is a fatal protocol error.
fn unescape(b: &[u8], version: Version) -> Result<String, CodecError> {
    if !b.contains(&b'\\') {
        return utf8(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut it = b.iter();
    while let Some(&c) = it.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'c') => out.push(b':'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'r') if version == Version::V1_2 => out.push(b'\r'),
            _ => return Err(CodecError::BadEscape),
        }
    }
    String::from_utf8(out).map_err(|_| CodecError::NotUtf8)
}

fn escape_into(s: &str, version: Version, out: &mut BytesMut) {
    // Most header values need no escape: copied whole, and runs between escapes too.
    let b = s.as_bytes();
    if !b.iter().any(|c| matches!(c, b'\n' | b':' | b'\\' | b'\r')) {
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
    for (k, v) in &frame.headers {
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
