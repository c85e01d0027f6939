//! Stream queues (`x-queue-type: stream`, RabbitMQ 3.9+ over AMQP 0-9-1): an append-only
//! log that every consumer reads from an offset of its choosing, at its own pace. An ack
//! only returns credit; nothing leaves the log but by retention (`x-max-length-bytes`,
//! `x-max-age`), which, as in RabbitMQ's osiris, drops whole segments and never the one
//! being written.
//!
//! Every message is written to the store (whatever its delivery mode) under its offset.
//! The newest part of the log is also kept in memory; older messages are read back from
//! the store when a consumer gets to them, so a long stream does not live in RAM.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amq_protocol_types::AMQPValue;
use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{CoreError, CoreResult};
use crate::ids::ConsumerId;
use crate::message::Message;
use crate::vhost::rabbit_type;

/// `x-stream-max-segment-size-bytes` when not given (RabbitMQ's default, 500 MB).
pub const DEFAULT_SEGMENT_BYTES: u64 = 500_000_000;
/// The in-memory tail: past these, the oldest messages (once synced) are read from the
/// store instead (the same thresholds as a classic queue's paging, docs/storage.md).
const MEM_MESSAGES: usize = 16_384;
const MEM_BYTES: u64 = 64 * 1024 * 1024;
/// Messages read from the store in one go for a consumer behind the in-memory tail.
pub(crate) const READ_BATCH: u64 = 256;

/// Where a new consumer starts reading (`x-stream-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    First,
    /// The last message written (RabbitMQ: the start of the last chunk).
    Last,
    /// Only messages written from now on (the default).
    Next,
    Offset(u64),
    /// The first message that arrived at or after this time (ms since the epoch).
    Timestamp(i64),
}

impl StreamStart {
    /// Parses the consumer argument as RabbitMQ 3.10 does: "first", "last", "next", an
    /// integer offset (negative = first), an AMQP timestamp (seconds), or an interval such
    /// as "1h" back from now; anything else is a 406 with RabbitMQ's text.
    pub fn parse(v: Option<&AMQPValue>, queue: &str, vhost: &str) -> CoreResult<StreamStart> {
        let Some(v) = v else {
            return Ok(StreamStart::Next);
        };
        let refuse = |shown: String| {
            CoreError::precondition(format!(
                "invalid arg 'x-stream-offset' for queue '{queue}' in vhost '{vhost}': \
                 {{invalid_stream_offset_arg,{{{},{shown}}}}}",
                rabbit_type(v)
            ))
        };
        if let Some(n) = crate::queue::int_value(v) {
            return Ok(StreamStart::Offset(u64::try_from(n).unwrap_or(0)));
        }
        match v {
            AMQPValue::Timestamp(secs) => Ok(StreamStart::Timestamp(
                i64::try_from(*secs)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000),
            )),
            AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
                let text = match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.as_str().to_owned(),
                    _ => String::new(),
                };
                match text.as_str() {
                    "first" => Ok(StreamStart::First),
                    "last" => Ok(StreamStart::Last),
                    "next" => Ok(StreamStart::Next),
                    other => match parse_age(other) {
                        Some(age) => Ok(StreamStart::Timestamp(
                            now_ms().saturating_sub(age.as_millis() as i64),
                        )),
                        None => Err(refuse(format!("<<\"{other}\">>"))),
                    },
                }
            }
            other => Err(refuse(format!("{other:?}"))),
        }
    }
}

/// `x-max-age` and interval offsets: digits and one unit of Y, M, D, h, m, s
/// (rabbit_amqqueue:check_max_age; a month is 30 days, a year 365).
pub fn parse_age(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let digits = &s[..s.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(secs)?))
}

/// Milliseconds since the epoch now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A stream message as stored: its arrival time (ms, big-endian) then the message.
pub(crate) fn encode_stored(ts_ms: i64, msg: &Message) -> Bytes {
    let body = msg.encode();
    let mut out = BytesMut::with_capacity(8 + body.len());
    out.put_i64(ts_ms);
    out.put_slice(&body);
    out.freeze()
}

/// The inverse of [`encode_stored`].
pub(crate) fn decode_stored(mut data: Bytes) -> CoreResult<(i64, Message)> {
    if data.len() < 8 {
        return Err(CoreError::internal("stream record too short"));
    }
    let ts = data.split_to(8);
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&ts);
    Ok((i64::from_be_bytes(raw), Message::decode(data)?))
}

/// One message of the log.
#[derive(Debug, Clone)]
pub(crate) struct StreamEntry {
    pub offset: u64,
    pub msg: Arc<Message>,
    pub ts_ms: i64,
    /// The store submission that wrote it: it may leave memory once that is synced.
    pub ticket: u64,
}

impl StreamEntry {
    fn size(&self) -> u64 {
        self.msg.body.len() as u64
    }
}

/// A run of offsets retention drops as a whole.
#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    count: u64,
    bytes: u64,
    last_ts: i64,
}

/// The log of one stream queue, kept in its queue's state.
#[derive(Debug, Default)]
pub(crate) struct StreamLog {
    segments: VecDeque<Segment>,
    /// The newest messages, contiguous and ending at `next - 1`.
    mem: VecDeque<StreamEntry>,
    mem_bytes: u64,
    next: u64,
    bytes: u64,
    /// Deliveries awaiting an ack: delivery id → consumer (credit only).
    pub unacked: HashMap<u64, ConsumerId>,
    next_delivery: u64,
}

impl StreamLog {
    /// The oldest offset still in the log.
    pub fn first(&self) -> u64 {
        self.segments.front().map_or(self.next, |s| s.first)
    }

    /// The offset the next message gets.
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn count(&self) -> u64 {
        self.next - self.first()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Messages held only in the store.
    pub fn on_disk_only(&self) -> u64 {
        self.count() - self.mem.len() as u64
    }

    /// A fresh id for one delivery (deliveries of one offset to two consumers differ).
    pub fn delivery_id(&mut self) -> u64 {
        self.next_delivery += 1;
        self.next_delivery
    }

    /// Appends the message at `offset` (the log's next; a recovered log may start later).
    pub fn append(&mut self, entry: StreamEntry, segment_bytes: u64) {
        self.next = entry.offset + 1;
        let size = entry.size();
        let roll = self
            .segments
            .back()
            .is_none_or(|s| s.bytes >= segment_bytes);
        if roll {
            self.segments.push_back(Segment {
                first: entry.offset,
                count: 0,
                bytes: 0,
                last_ts: entry.ts_ms,
            });
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.count += 1;
            seg.bytes += size;
            seg.last_ts = entry.ts_ms;
        }
        self.bytes += size;
        self.mem_bytes += size;
        self.mem.push_back(entry);
    }

    /// Drops whole segments, oldest first, while the log is over `max_bytes` or a segment
    /// is older than `max_age`; the segment being written always stays. Returns the
    /// offsets removed (`first..=last`) for the store.
    pub fn apply_retention(
        &mut self,
        max_bytes: Option<u64>,
        max_age: Option<Duration>,
        now_ms: i64,
    ) -> Option<(u64, u64)> {
        let mut removed: Option<(u64, u64)> = None;
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.front() else {
                break;
            };
            let too_big = max_bytes.is_some_and(|m| self.bytes > m);
            let too_old = max_age.is_some_and(|a| oldest.last_ts < now_ms - a.as_millis() as i64);
            if !(too_big || too_old) {
                break;
            }
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            self.bytes -= seg.bytes;
            let last = seg.first + seg.count - 1;
            removed = Some((removed.map_or(seg.first, |r| r.0), last));
            while self.mem.front().is_some_and(|e| e.offset <= last) {
                if let Some(e) = self.mem.pop_front() {
                    self.mem_bytes -= e.size();
                }
            }
        }
        removed
    }

    /// Lets the oldest in-memory messages go once the tail is over its bounds and their
    /// writes are synced (`synced` = the store's synced ticket): readers then get them
    /// from the store.
    pub fn evict(&mut self, synced: u64) {
        while (self.mem.len() > MEM_MESSAGES || self.mem_bytes > MEM_BYTES)
            && self.mem.front().is_some_and(|e| e.ticket <= synced)
        {
            if let Some(e) = self.mem.pop_front() {
                self.mem_bytes -= e.size();
            }
        }
    }

    /// The message at `offset` if it is in memory.
    pub fn in_memory(&self, offset: u64) -> Option<&StreamEntry> {
        let front = self.mem.front()?.offset;
        let i = offset.checked_sub(front)?;
        self.mem.get(i as usize)
    }

    /// The offset a consumer starting at `start` reads first.
    pub fn start_offset(&self, start: StreamStart) -> u64 {
        match start {
            StreamStart::First => self.first(),
            StreamStart::Next => self.next,
            StreamStart::Last => self.next.saturating_sub(1).max(self.first()),
            StreamStart::Offset(n) => n.clamp(self.first(), self.next),
            StreamStart::Timestamp(ts) => {
                let Some(seg) = self.segments.iter().find(|s| s.last_ts >= ts) else {
                    return self.next;
                };
                // Exact where the segment is in memory; otherwise its start (RabbitMQ is
                // chunk-granular too). Earlier segments hold only older messages.
                let mem_front = self.mem.front().map_or(self.next, |e| e.offset);
                if mem_front <= seg.first {
                    self.mem
                        .iter()
                        .find(|e| e.ts_ms >= ts)
                        .map_or(self.next, |e| e.offset)
                } else {
                    seg.first
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{LongString, ShortString};

    fn entry(offset: u64, size: usize, ts: i64) -> StreamEntry {
        let msg = Message::new(
            ShortString::from(""),
            "s".into(),
            Default::default(),
            Bytes::from(vec![0u8; size]),
        );
        StreamEntry {
            offset,
            msg: Arc::new(msg),
            ts_ms: ts,
            ticket: offset + 1,
        }
    }

    #[test]
    fn ages_as_rabbitmq_writes_them() {
        assert_eq!(parse_age("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_age("7D"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("30s"), Some(Duration::from_secs(30)));
        for bad in ["", "h", "10", "10X", "1.5h", "-1h", "1hh"] {
            assert_eq!(parse_age(bad), None, "{bad}");
        }
    }

    #[test]
    fn offset_arguments() {
        let p = |v: AMQPValue| StreamStart::parse(Some(&v), "s", "/");
        assert_eq!(
            StreamStart::parse(None, "s", "/").ok(),
            Some(StreamStart::Next)
        );
        assert_eq!(
            p(AMQPValue::LongString(LongString::from("first"))).ok(),
            Some(StreamStart::First)
        );
        assert_eq!(
            p(AMQPValue::LongLongInt(5)).ok(),
            Some(StreamStart::Offset(5))
        );
        assert_eq!(
            p(AMQPValue::LongLongInt(-1)).ok(),
            Some(StreamStart::Offset(0))
        );
        assert_eq!(
            p(AMQPValue::Timestamp(10)).ok(),
            Some(StreamStart::Timestamp(10_000))
        );
        assert!(matches!(
            p(AMQPValue::LongString(LongString::from("1h"))),
            Ok(StreamStart::Timestamp(_))
        ));
        let e = p(AMQPValue::LongString(LongString::from("3"))).unwrap_err();
        assert_eq!(
            e.text,
            "invalid arg 'x-stream-offset' for queue 's' in vhost '/': \
             {invalid_stream_offset_arg,{longstr,<<\"3\">>}}"
        );
    }

    #[test]
    fn retention_drops_whole_segments_and_keeps_the_last() {
        let mut log = StreamLog::default();
        for i in 0..10 {
            log.append(entry(i, 100, i as i64), 250);
        }
        // A segment is full once it reaches 250 bytes: 0-2, 3-5, 6-8, 9.
        assert_eq!(log.count(), 10);
        assert_eq!(log.apply_retention(Some(500), None, 0), Some((0, 5)));
        assert_eq!(log.first(), 6);
        assert_eq!(log.count(), 4);
        assert!(log.in_memory(5).is_none());
        assert_eq!(log.in_memory(6).map(|e| e.offset), Some(6));
        // Age: everything older than the newest segment goes, never the last segment.
        assert_eq!(
            log.apply_retention(None, Some(Duration::ZERO), 1_000),
            Some((6, 8))
        );
        assert_eq!(log.first(), 9);
        assert_eq!(log.apply_retention(None, Some(Duration::ZERO), 1_000), None);
        assert_eq!(log.count(), 1);
    }

    #[test]
    fn start_offsets() {
        let mut log = StreamLog::default();
        assert_eq!(log.start_offset(StreamStart::Last), 0);
        for i in 0..5 {
            log.append(entry(i, 10, 100 * i as i64), DEFAULT_SEGMENT_BYTES);
        }
        assert_eq!(log.start_offset(StreamStart::First), 0);
        assert_eq!(log.start_offset(StreamStart::Last), 4);
        assert_eq!(log.start_offset(StreamStart::Next), 5);
        assert_eq!(log.start_offset(StreamStart::Offset(3)), 3);
        assert_eq!(log.start_offset(StreamStart::Offset(99)), 5);
        assert_eq!(log.start_offset(StreamStart::Timestamp(250)), 3);
        assert_eq!(log.start_offset(StreamStart::Timestamp(0)), 0);
        assert_eq!(log.start_offset(StreamStart::Timestamp(1_000)), 5);
    }

    #[test]
    fn eviction_waits_for_the_sync() {
        let mut log = StreamLog::default();
        for i in 0..(MEM_MESSAGES as u64 + 10) {
            log.append(entry(i, 1, 0), DEFAULT_SEGMENT_BYTES);
        }
        log.evict(0);
        assert_eq!(log.on_disk_only(), 0);
        log.evict(5);
        assert_eq!(log.on_disk_only(), 5);
        assert!(log.in_memory(4).is_none());
        log.evict(u64::MAX);
        assert_eq!(log.on_disk_only(), 10);
        assert_eq!(log.in_memory(10).map(|e| e.offset), Some(10));
    }

    #[test]
    fn stored_records_round_trip() {
        let e = entry(0, 3, 0);
        let data = encode_stored(1234, &e.msg);
        let (ts, msg) = decode_stored(data).unwrap();
        assert_eq!(ts, 1234);
        assert_eq!(msg.body.len(), 3);
        assert!(decode_stored(Bytes::from_static(b"short")).is_err());
    }
}
