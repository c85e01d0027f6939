//! Queues: ready messages (by priority level), unacked messages, consumers and their
//! credit, TTL, length limits and dead-lettering.
//!
//! # Concurrency
//! A queue's state sits behind one `parking_lot::Mutex`, held only for short in-memory
//! sections with no `.await`. Work that must await (store writes, routing dead letters,
//! deleting the queue) is collected into [`Effects`] under the lock and carried out after it
//! is released, by [`Queue::finish`].
//!
//! # Delivery
//! Delivery is pushed by credit: a message goes to a consumer only while that consumer has
//! prefetch room and its channel has global credit; the delivery is then handed to the
//! consumer's [`Outbox`] with `try_send`. A full outbox marks the consumer *stalled* and the
//! message stays at the head; the connection resumes the queue once it has drained. A slow
//! consumer therefore never blocks a publisher.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use tokio::sync::Notify;
use warren_store::{Op, StoreQueueId, Ticket};

use crate::consumer::{ConsumerSpec, Delivery, Outbox};
use crate::deadletter::DeadReason;
use crate::error::{CoreError, CoreResult};
use crate::ids::{ConnectionId, ConsumerId, MsgSeq};
use crate::message::Message;
use crate::paging::{Paged, Readiness, PAGE_AFTER_BYTES, PAGE_AFTER_MESSAGES};
use crate::policies::Policy;
use crate::stream::{StreamEntry, StreamLog};
use crate::vhost::{rabbit_type, VHost};

/// What to do when a queue is full (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

impl Overflow {
    /// RabbitMQ's names (`x-overflow`, the `overflow` policy key).
    pub fn parse(s: &str) -> Option<Overflow> {
        match s {
            "drop-head" => Some(Overflow::DropHead),
            "reject-publish" => Some(Overflow::RejectPublish),
            "reject-publish-dlx" => Some(Overflow::RejectPublishDlx),
            _ => None,
        }
    }
}

/// The queue arguments Warren acts on, parsed and validated at declare time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueConfig {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub dead_letter_exchange: Option<ShortString>,
    pub dead_letter_routing_key: Option<ShortString>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Option<Overflow>,
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    /// The policy these options came from in part, if any.
    pub policy: Option<Arc<Policy>>,
    /// The operator policy capping them, if any.
    pub operator_policy: Option<Arc<Policy>>,
    /// Declared `x-queue-type: quorum`: policies' `apply-to` tells the types apart, and
    /// redeliveries are counted (`x-delivery-count`, `x-delivery-limit`); otherwise the
    /// queue behaves as a classic one (docs/amqp.md).
    pub quorum: bool,
    /// `x-delivery-limit` (quorum queues): returns a message may have before it is
    /// dead-lettered with reason `delivery_limit`.
    pub delivery_limit: Option<u64>,
    /// Declared `x-queue-type: stream`: an append-only log (crate::stream).
    pub stream: bool,
    /// `x-max-age` (streams): segments older than this are dropped.
    pub max_age: Option<std::time::Duration>,
    /// `x-stream-max-segment-size-bytes` (streams).
    pub segment_bytes: Option<u64>,
}

impl QueueConfig {
    /// A stream's segment size (`x-stream-max-segment-size-bytes` or RabbitMQ's default).
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
            .unwrap_or(crate::stream::DEFAULT_SEGMENT_BYTES)
    }

    /// `x-overflow: reject-publish[-dlx]`: a full queue refuses publishes.
    pub fn refuses_when_full(&self) -> bool {
        matches!(
            self.overflow,
            Some(Overflow::RejectPublish | Overflow::RejectPublishDlx)
        )
    }

    /// These options (from the arguments) combined with `policy`'s, by RabbitMQ's rules
    /// (crate::policies): the smaller limit or TTL, the argument's DLX and overflow.
    pub fn with_policy(mut self, policy: Option<&Arc<Policy>>) -> Self {
        let Some(p) = policy else {
            return self;
        };
        self.cap_by(p);
        if self.dead_letter_exchange.is_none() {
            self.dead_letter_exchange = p.text("dead-letter-exchange").map(Into::into);
        }
        if self.dead_letter_routing_key.is_none() {
            self.dead_letter_routing_key = p.text("dead-letter-routing-key").map(Into::into);
        }
        if self.overflow.is_none() {
            self.overflow = p.text("overflow").and_then(Overflow::parse);
        }
        // Streams: the argument first, as for the DLX.
        if self.max_age.is_none() {
            self.max_age = p.text("max-age").and_then(crate::stream::parse_age);
        }
        if self.segment_bytes.is_none() {
            self.segment_bytes = p.int("stream-max-segment-size-bytes");
        }
        self.policy = Some(p.clone());
        self
    }

    /// These options capped by an operator policy: the smaller value of each limit and TTL
    /// it names (RabbitMQ's `rabbit_policy:effective_definition`).
    pub fn with_operator_policy(mut self, op: Option<&Arc<Policy>>) -> Self {
        let Some(p) = op else {
            return self;
        };
        self.cap_by(p);
        self.operator_policy = Some(p.clone());
        self
    }

    /// The smaller of each limit and TTL here and in `p` (either alone if one is unset).
    fn cap_by(&mut self, p: &Policy) {
        let cap = |cur: Option<u64>, key: &str| match (cur, p.int(key)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.message_ttl = cap(self.message_ttl, "message-ttl");
        self.expires = cap(self.expires, "expires");
        self.max_length = cap(self.max_length, "max-length");
        self.max_length_bytes = cap(self.max_length_bytes, "max-length-bytes");
        self.delivery_limit = cap(self.delivery_limit, "delivery-limit");
    }

    /// Parses RabbitMQ's `x-` queue arguments; bad values are a 406 with RabbitMQ 3.10's
    /// text (`rabbit_amqqueue:check_arguments`, checked against it).
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> CoreResult<Self> {
        let mut c = QueueConfig::default();
        let bad = |k: &str, why: String| {
            CoreError::precondition(format!(
                "invalid arg '{k}' for queue '{queue}' in vhost '{vhost}': {why}"
            ))
        };
        // The queue type decides which arguments are allowed at all.
        let kind = match args.inner().get("x-queue-type") {
            None => QueueKind::Classic,
            Some(v) => match text_value(v, "x-queue-type", queue, vhost)?.as_str() {
                "classic" => QueueKind::Classic,
                "quorum" => QueueKind::Quorum,
                "stream" => QueueKind::Stream,
                other => {
                    return Err(bad(
                        "x-queue-type",
                        format!("\"unsupported queue type '{other}'\""),
                    ))
                }
            },
        };
        c.quorum = kind == QueueKind::Quorum;
        c.stream = kind == QueueKind::Stream;
        let type_name = kind.module();
        for k in args.inner().keys() {
            let key = k.as_str();
            if !kind.takes(key) {
                return Err(CoreError::precondition(format!(
                    "invalid arg '{key}' for queue '{queue}' in vhost '{vhost}' of queue type {type_name}"
                )));
            }
        }
        for (k, v) in args.inner() {
            let key = k.as_str();
            match key {
                "x-message-ttl"
                | "x-expires"
                | "x-max-length"
                | "x-max-length-bytes"
                | "x-max-priority"
                | "x-stream-max-segment-size-bytes" => {
                    let n = int_value(v).ok_or_else(|| {
                        bad(key, format!("\"expected integer, got {}\"", rabbit_type(v)))
                    })?;
                    if n < 0 {
                        return Err(bad(key, format!("{{value_negative,{n}}}")));
                    }
                    if key == "x-expires" && n == 0 {
                        return Err(bad(key, "{value_zero,0}".into()));
                    }
                    let n = n as u64;
                    match key {
                        "x-message-ttl" => c.message_ttl = Some(n),
                        "x-expires" => c.expires = Some(n),
                        "x-max-length" => c.max_length = Some(n),
                        "x-max-length-bytes" => c.max_length_bytes = Some(n),
                        "x-stream-max-segment-size-bytes" => c.segment_bytes = Some(n),
                        _ => {
                            if n > 255 {
                                return Err(bad(key, format!("{{max_value_exceeded,{n}}}")));
                            }
                            c.max_priority = Some(n as u8)
                        }
                    }
                }
                "x-dead-letter-exchange" => {
                    c.dead_letter_exchange = Some(text_value(v, key, queue, vhost)?)
                }
                "x-dead-letter-routing-key" => {
                    c.dead_letter_routing_key = Some(text_value(v, key, queue, vhost)?)
                }
                "x-overflow" => {
                    let text = text_value(v, key, queue, vhost)?;
                    c.overflow = Some(
                        Overflow::parse(text.as_str())
                            .ok_or_else(|| bad(key, "invalid_overflow".into()))?,
                    )
                }
                "x-single-active-consumer" => match v {
                    AMQPValue::Boolean(b) => c.single_active_consumer = *b,
                    other => {
                        return Err(bad(
                            key,
                            format!("{{unacceptable_type,{}}}", rabbit_type(other)),
                        ))
                    }
                },
                "x-max-age" => match v {
                    AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
                        let text = text_value(v, key, queue, vhost)?;
                        c.max_age = Some(
                            crate::stream::parse_age(text.as_str())
                                .ok_or_else(|| bad(key, "invalid_max_age".into()))?,
                        );
                    }
                    other => {
                        return Err(bad(
                            key,
                            format!("{{unacceptable_type,{}}}", rabbit_type(other)),
                        ))
                    }
                },
                // RabbitMQ 3.10 takes any value and acts on a non-negative integer only.
                "x-delivery-limit" => {
                    c.delivery_limit = int_value(v).and_then(|n| u64::try_from(n).ok())
                }
                // Accepted (Warren pages long queues whatever the mode); bad values are
                // refused as RabbitMQ does.
                "x-queue-mode" => {
                    let mode = text_value(v, key, queue, vhost)?;
                    if !matches!(mode.as_str(), "default" | "lazy") {
                        return Err(bad(
                            key,
                            format!("\"unsupported queue mode '{}'\"", mode.as_str()),
                        ));
                    }
                }
                "x-queue-version" => match int_value(v) {
                    Some(1 | 2) => {}
                    Some(n) => {
                        return Err(bad(key, format!("\"unsupported queue version '{n}'\"")))
                    }
                    None => {
                        return Err(bad(
                            key,
                            format!("\"expected integer, got {}\"", rabbit_type(v)),
                        ))
                    }
                },
                _ => {}
            }
        }
        if c.dead_letter_routing_key.is_some() && c.dead_letter_exchange.is_none() {
            return Err(bad(
                "x-dead-letter-routing-key",
                "Dead letter routing key set, but no dead letter exchange".into(),
            ));
        }
        Ok(c)
    }
}

/// Arguments both queue types take.
pub(crate) const COMMON_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-single-active-consumer",
    "x-queue-type",
];
pub(crate) const CLASSIC_ARGS: &[&str] = &[
    "x-max-priority",
    "x-queue-mode",
    "x-queue-version",
    "x-queue-master-locator",
];
pub(crate) const QUORUM_ARGS: &[&str] = &[
    "x-delivery-limit",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-quorum-initial-group-size",
    "x-dead-letter-strategy",
    "x-queue-leader-locator",
];
/// Stream queues take only these (checked against RabbitMQ 3.10: `x-message-ttl`,
/// `x-max-length`, dead-lettering, overflow and the rest are refused).
pub(crate) const STREAM_ARGS: &[&str] = &[
    "x-max-length-bytes",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
];

/// The queue types of RabbitMQ 3.10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueKind {
    Classic,
    Quorum,
    Stream,
}

impl QueueKind {
    pub(crate) fn of(config: &QueueConfig) -> QueueKind {
        if config.stream {
            QueueKind::Stream
        } else if config.quorum {
            QueueKind::Quorum
        } else {
            QueueKind::Classic
        }
    }

    /// RabbitMQ's module name, as its refusals print it.
    fn module(self) -> &'static str {
        match self {
            QueueKind::Classic => "rabbit_classic_queue",
            QueueKind::Quorum => "rabbit_quorum_queue",
            QueueKind::Stream => "rabbit_stream_queue",
        }
    }

    /// The arguments this type compares on re-declare (besides `x-queue-type`).
    pub(crate) fn own_args(self) -> Vec<&'static str> {
        match self {
            QueueKind::Classic => COMMON_ARGS.iter().chain(CLASSIC_ARGS).copied().collect(),
            QueueKind::Quorum => COMMON_ARGS.iter().chain(QUORUM_ARGS).copied().collect(),
            QueueKind::Stream => STREAM_ARGS.to_vec(),
        }
    }

    /// Whether a queue of this type takes `key`: an argument some other RabbitMQ 3.10
    /// type knows is refused (`rabbit_queue_type:check_invalid_arguments`); one no type
    /// knows is ignored.
    fn takes(self, key: &str) -> bool {
        let known = [COMMON_ARGS, CLASSIC_ARGS, QUORUM_ARGS, STREAM_ARGS]
            .iter()
            .any(|l| l.contains(&key));
        !known || key == "x-queue-type" || self.own_args().contains(&key)
    }
}

/// A text argument; another type is RabbitMQ's "invalid type" refusal.
fn text_value(v: &AMQPValue, key: &str, queue: &str, vhost: &str) -> CoreResult<ShortString> {
    match v {
        // Names are short strings: a longer one is refused, never truncated.
        AMQPValue::LongString(s) if s.as_bytes().len() > 255 => {
            Err(CoreError::precondition(format!(
                "invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': {{value_too_long}}"
            )))
        }
        AMQPValue::LongString(s) => Ok(String::from_utf8_lossy(s.as_bytes()).as_ref().into()),
        AMQPValue::ShortString(s) => Ok(s.clone()),
        other => Err(CoreError::precondition(format!(
            "invalid type '{}' for arg '{key}' in queue '{queue}' in vhost '{vhost}'",
            rabbit_type(other)
        ))),
    }
}

/// An integer argument of any AMQP integer width.
pub fn int_value(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(i) => *i as i64,
        AMQPValue::ShortShortUInt(i) => *i as i64,
        AMQPValue::ShortInt(i) => *i as i64,
        AMQPValue::ShortUInt(i) => *i as i64,
        AMQPValue::LongInt(i) => *i as i64,
        AMQPValue::LongUInt(i) => *i as i64,
        AMQPValue::LongLongInt(i) => *i,
        _ => return None,
    })
}

/// A message in a queue.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub seq: u64,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    /// Times it came back unsettled (quorum queues' delivery count; not kept across a
    /// restart).
    pub returns: u32,
    /// Written to the store (persistent message on a durable queue).
    pub persisted: bool,
    /// A delivery mark is in the store (so a restart sets redelivered).
    pub delivered_marked: bool,
    pub expires_at: Option<Instant>,
}

impl Entry {
    fn size(&self) -> u64 {
        self.msg.body.len() as u64
    }
}

struct Unacked {
    entry: Entry,
    consumer: Option<ConsumerId>,
}

struct ConsumerEntry {
    spec: ConsumerSpec,
    unacked: u32,
    stalled: bool,
    /// Stream queues: the next offset this consumer reads.
    cursor: u64,
}

impl ConsumerEntry {
    fn has_credit(&self) -> bool {
        if self.stalled {
            return false;
        }
        if self.spec.no_ack {
            return true;
        }
        (self.spec.prefetch == 0 || self.unacked < self.spec.prefetch)
            && self.spec.channel_credit.has_room()
    }
}

#[derive(Default)]
struct QueueState {
    /// Index = priority level (one level unless `x-max-priority`): the one level of an
    /// ordinary queue is kept inline, not in an allocation of its own.
    ready: SmallVec<[VecDeque<Entry>; 1]>,
    ready_count: usize,
    ready_bytes: u64,
    /// Keyed by the queue's own sequence numbers, which no peer chooses: Fx hashing is
    /// safe, faster than SipHash on the ack path, and its builder takes no room in every
    /// queue (32 bytes instead of 48).
    unacked: FxHashMap<u64, Unacked>,
    consumers: Vec<ConsumerEntry>,
    rr: usize,
    deleted: bool,
    had_consumer: bool,
    last_used: Option<Instant>,
    timer_running: bool,
    stats: QueueStats,
    /// The paged-out tail (counted in `ready_count`/`ready_bytes` too).
    paged: Paged,
    /// Stream queues: the log (the ready lists stay empty).
    stream: Option<Box<StreamLog>>,
}

/// Counters for the management API.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueStats {
    pub published: u64,
    /// Every delivery and basic.get-ok (RabbitMQ's `deliver_get`); the next three count
    /// the kinds other than deliveries to consumers that ack.
    pub delivered: u64,
    /// Deliveries to consumers with no_ack.
    pub delivered_no_ack: u64,
    /// basic.get-ok without and with no_ack.
    pub got: u64,
    pub got_no_ack: u64,
    /// basic.get finding the queue empty.
    pub get_empty: u64,
    pub acked: u64,
    pub redelivered: u64,
}

/// A consumer as the management API lists it.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    pub tag: Arc<str>,
    pub owner: ConnectionId,
    /// The front-end's token: the AMQP channel number.
    pub channel: u64,
    pub no_ack: bool,
    pub exclusive: bool,
    pub prefetch: u32,
    pub priority: i32,
    pub unacked: u32,
    /// With single-active-consumer, whether this is the one that receives.
    pub activity: ConsumerActivity,
    pub arguments: FieldTable,
}

/// What the management API shows as a consumer's `activity_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerActivity {
    /// Receives messages (any consumer of a queue without single-active-consumer).
    Up,
    /// The single active consumer.
    SingleActive,
    /// Waits to take over from the single active consumer.
    Waiting,
}

impl ConsumerActivity {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerActivity::Up => "up",
            ConsumerActivity::SingleActive => "single_active",
            ConsumerActivity::Waiting => "waiting",
        }
    }
}

/// A point-in-time view of a queue's counts.
#[derive(Debug, Clone, Copy)]
pub struct QueueCounts {
    pub ready: u32,
    pub unacked: u32,
    pub consumers: u32,
    pub ready_bytes: u64,
    /// Ready messages kept only in the store (a long backlog), not in memory.
    pub paged_out: u32,
    pub stats: QueueStats,
}

/// A queue's persistence, memory and head, for the management API ([`Queue::footprint`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueFootprint {
    /// Persistent messages (ready, paged out and unacknowledged) and their body bytes.
    pub persistent: u64,
    pub persistent_bytes: u64,
    /// Body bytes kept only in the store.
    pub paged_out_bytes: u64,
    /// Body bytes of the deliveries awaiting an ack (RabbitMQ's
    /// `message_bytes_unacknowledged`), summed when asked, not kept per delivery. A
    /// stream's unacked deliveries are still in its log: 0.
    pub unacked_bytes: u64,
    /// Messages held in memory (ready and unacknowledged).
    pub ram_entries: usize,
    /// The head message's `timestamp` property.
    pub head_timestamp: Option<u64>,
    /// Consumers that could take a message now (prefetch and channel credit allow it).
    pub consumers_with_credit: usize,
}

/// What a queue step left to do after its lock (store writes, dead-lettering, deleting
/// the queue): returned by the `*_now` methods, run with [`FollowUp::run`].
#[must_use = "a follow-up does nothing unless run"]
pub struct FollowUp {
    queue: Arc<Queue>,
    fx: Effects,
}

impl FollowUp {
    pub async fn run(self) {
        self.queue.finish(self.fx).await;
    }

    /// Runs `later` in order, each boxed: most steps leave none, and the awaiting future
    /// would otherwise sit in every caller's.
    pub async fn run_all(later: Vec<FollowUp>) {
        for f in later {
            Box::pin(f.run()).await;
        }
    }
}

impl std::fmt::Debug for FollowUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowUp")
            .field("queue", &self.queue.name)
            .finish()
    }
}

/// Work decided under the queue lock and carried out after it is released.
#[derive(Default)]
pub(crate) struct Effects {
    pub ops: Vec<Op>,
    pub dead: Vec<(Arc<Message>, DeadReason)>,
    /// The queue must be deleted (auto-delete after the last consumer, or x-expires).
    pub delete_queue: bool,
    /// Chunks whose transient writes are among `ops` (their ticket is known after submit).
    pub paged_out: Vec<u64>,
    /// Wake the head once the store has synced this ticket (a chunk waits for it).
    pub wait_sync: Option<u64>,
}

impl Effects {
    /// Nothing to do after the lock (most enqueues): no `finish` to await.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
            && self.dead.is_empty()
            && !self.delete_queue
            && self.paged_out.is_empty()
            && self.wait_sync.is_none()
    }
}

/// The answer to basic.get.
#[derive(Debug)]
pub struct GetResult {
    pub seq: MsgSeq,
    pub message: Arc<Message>,
    pub redelivered: bool,
    /// Messages still ready after this one.
    pub remaining: u32,
}

/// The outcome of putting a message into a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    Accepted,
    /// `x-overflow: reject-publish[-dlx]` refused it: the publisher gets a nack.
    Rejected,
}

/// A queue.
pub struct Queue {
    pub name: ShortString,
    pub vhost: Weak<VHost>,
    pub store_id: StoreQueueId,
    pub durable: bool,
    pub exclusive_owner: Option<ConnectionId>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// The options in force (arguments combined with the policy), swapped when a policy
    /// changes. Shared by every queue without options (most of them: one per MQTT
    /// session), so those do not carry ~120 bytes of empty options each.
    options: ArcSwap<QueueConfig>,
    state: Mutex<QueueState>,
    next_seq: AtomicU64,
    /// Wakes the housekeeping task (TTL and x-expires) when a nearer deadline appears.
    timer: Notify,
    /// Stream queues: held from taking an offset until the message is in the log, so the
    /// log, the offsets and the store writes keep one order.
    append: Option<Box<tokio::sync::Mutex<()>>>,
}

/// `config` itself, or the one shared default when it has no options.
fn shared_config(config: QueueConfig) -> Arc<QueueConfig> {
    static DEFAULT: std::sync::LazyLock<Arc<QueueConfig>> =
        std::sync::LazyLock::new(|| Arc::new(QueueConfig::default()));
    if config == QueueConfig::default() {
        DEFAULT.clone()
    } else {
        Arc::new(config)
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish()
    }
}

impl Queue {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: ShortString,
        vhost: Weak<VHost>,
        store_id: StoreQueueId,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
        config: QueueConfig,
    ) -> Arc<Self> {
        let levels = config.max_priority.map(|p| p as usize + 1).unwrap_or(1);
        let stream = config.stream;
        let state = QueueState {
            ready: (0..levels).map(|_| VecDeque::new()).collect(),
            last_used: Some(Instant::now()),
            stream: stream.then(Box::default),
            ..Default::default()
        };
        let q = Arc::new(Queue {
            name,
            vhost,
            store_id,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            options: ArcSwap::new(shared_config(config)),
            state: Mutex::new(state),
            next_seq: AtomicU64::new(1),
            timer: Notify::new(),
            append: stream.then(|| Box::new(tokio::sync::Mutex::new(()))),
        });
        if q.config().message_ttl.is_some() || q.config().expires.is_some() {
            q.ensure_timer();
        }
        q
    }

    /// The options in force now.
    pub fn config(&self) -> arc_swap::Guard<Arc<QueueConfig>> {
        self.options.load()
    }

    /// The policy in force, if any.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.config().policy.clone()
    }

    /// The operator policy in force, if any.
    pub fn operator_policy(&self) -> Option<Arc<Policy>> {
        self.config().operator_policy.clone()
    }

    /// Re-evaluates the options after a policy change: the arguments combined with
    /// `policy`. A new length limit trims the queue now (drop-head) and a new TTL or
    /// `expires` starts the housekeeping timer, as RabbitMQ applies a policy at once.
    pub async fn apply_policy(
        self: &Arc<Self>,
        vhost: &str,
        policy: Option<&Arc<Policy>>,
        operator: Option<&Arc<Policy>>,
    ) {
        let base =
            QueueConfig::parse(&self.arguments, self.name.as_str(), vhost).unwrap_or_default();
        let next = base.with_policy(policy).with_operator_policy(operator);
        let before = self.options.load_full();
        if *before == next {
            return;
        }
        self.options.store(shared_config(next));
        let cfg = self.config();
        let mut fx = Effects::default();
        {
            let mut s = self.state.lock();
            if s.deleted {
                return;
            }
            // A new `expires` counts from now, as RabbitMQ restarts its expiry timer.
            if cfg.expires != before.expires {
                s.last_used = Some(Instant::now());
            }
            // Trimmed to the new limit whatever the overflow mode: RabbitMQ 3.10 drops the
            // heads on applying a reject-publish policy too (checked against it).
            while self.over_limit(s.ready_count as u64, s.ready_bytes) {
                let Some(old) = self.pop_ready(&mut s, &mut fx) else {
                    break;
                };
                self.discard(old, DeadReason::Maxlen, &mut fx);
            }
        }
        if cfg.message_ttl.is_some() || cfg.expires.is_some() {
            self.ensure_timer();
            self.timer.notify_one();
        }
        self.finish(fx).await;
    }

    /// Next message sequence number (also the store key suffix).
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the queue lives in the store: durable and not exclusive (an exclusive queue
    /// dies with its connection, so RabbitMQ never recovers one).
    pub fn is_stored(&self) -> bool {
        self.durable && self.exclusive_owner.is_none()
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    pub fn counts(&self) -> QueueCounts {
        let s = self.state.lock();
        if let Some(log) = &s.stream {
            return QueueCounts {
                ready: log.count() as u32,
                unacked: log.unacked.len() as u32,
                consumers: s.consumers.len() as u32,
                ready_bytes: log.bytes(),
                paged_out: log.on_disk_only() as u32,
                stats: s.stats,
            };
        }
        QueueCounts {
            ready: s.ready_count as u32,
            unacked: s.unacked.len() as u32,
            consumers: s.consumers.len() as u32,
            ready_bytes: s.ready_bytes,
            paged_out: s.paged.count() as u32,
            stats: s.stats,
        }
    }

    /// What the management API shows beyond the counts, taken under one lock: persistent
    /// messages are counted over the in-memory ones (at most the paging threshold) and
    /// the paged-out chunks' totals.
    pub fn footprint(&self) -> QueueFootprint {
        let s = self.state.lock();
        if s.stream.is_some() {
            return QueueFootprint::default();
        }
        let (mut persistent, mut persistent_bytes) = s.paged.persistent();
        let mut ram_entries = 0;
        let unacked_bytes = s.unacked.values().map(|u| u.entry.size()).sum();
        let stored = s
            .ready
            .iter()
            .flatten()
            .chain(s.unacked.values().map(|u| &u.entry));
        for e in stored {
            ram_entries += 1;
            // A transient message read back from the paged-out tail is in the store too.
            if e.persisted && e.msg.is_persistent() {
                persistent += 1;
                persistent_bytes += e.size();
            }
        }
        let head_timestamp = s
            .ready
            .iter()
            .rev()
            .find_map(|level| level.front())
            .and_then(|e| e.msg.properties.timestamp);
        QueueFootprint {
            persistent: persistent as u64,
            persistent_bytes,
            paged_out_bytes: s.paged.bytes(),
            unacked_bytes,
            ram_entries,
            head_timestamp,
            consumers_with_credit: s.consumers.iter().filter(|c| c.has_credit()).count(),
        }
    }

    /// The consumers attached now, for the management API; with single-active-consumer
    /// the first is the active one (see `pick_consumer`).
    pub fn consumers_info(&self) -> Vec<ConsumerInfo> {
        let single = self.config().single_active_consumer;
        let s = self.state.lock();
        s.consumers
            .iter()
            .enumerate()
            .map(|(i, c)| ConsumerInfo {
                activity: match (single, i) {
                    (false, _) => ConsumerActivity::Up,
                    (true, 0) => ConsumerActivity::SingleActive,
                    (true, _) => ConsumerActivity::Waiting,
                },
                tag: c.spec.tag.clone(),
                owner: c.spec.owner,
                channel: c.spec.token,
                no_ack: c.spec.no_ack,
                exclusive: c.spec.exclusive,
                prefetch: c.spec.prefetch,
                priority: c.spec.priority,
                unacked: c.unacked,
                arguments: c.spec.arguments.clone(),
            })
            .collect()
    }

    pub fn message_count(&self) -> u32 {
        let s = self.state.lock();
        match &s.stream {
            Some(log) => log.count() as u32,
            None => s.ready_count as u32,
        }
    }

    /// A stream queue (`x-queue-type: stream`): consumers read, nothing is dequeued.
    pub fn is_stream(&self) -> bool {
        self.append.is_some()
    }

    /// RabbitMQ's refusal of an operation streams do not have (540): `what` is e.g.
    /// "basic.get".
    pub fn stream_refusal(&self, what: &str) -> CoreError {
        CoreError::new(
            crate::error::ErrorKind::NotImplemented,
            format!(
                "{what} not supported by stream queues queue '{}' in vhost '{}'",
                self.name.as_str(),
                self.vhost_name()
            ),
        )
    }

    /// Whether a consumer may read this queue: a stream needs acks and a per-consumer
    /// prefetch, as RabbitMQ 3.10 requires (406 before 540).
    pub fn check_consumer(&self, no_ack: bool, prefetch: u32) -> CoreResult<()> {
        if !self.is_stream() {
            return Ok(());
        }
        if prefetch == 0 {
            return Err(CoreError::precondition(format!(
                "consumer prefetch count is not set for 'queue '{}' in vhost '{}''",
                self.name.as_str(),
                self.vhost_name()
            )));
        }
        if no_ack {
            return Err(self.stream_refusal("automatic acknowledgement"));
        }
        Ok(())
    }

    pub fn consumer_count(&self) -> u32 {
        self.state.lock().consumers.len() as u32
    }

    /// Marks the queue used (for `x-expires`): declare, consume, get.
    pub(crate) fn touch(&self) {
        self.state.lock().last_used = Some(Instant::now());
        if self.config().expires.is_some() {
            self.timer.notify_one();
        }
    }

    /// 405 unless `conn` may use this queue (exclusive queues belong to one connection).
    pub fn check_access(&self, conn: ConnectionId, vhost: &str) -> CoreResult<()> {
        match self.exclusive_owner {
            Some(owner) if owner != conn => Err(CoreError::locked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be \
                 originally declared on another connection or the exclusive property value does \
                 not match that of the original declaration.",
                self.name.as_str(),
                vhost
            ))),
            _ => Ok(()),
        }
    }

    fn priority_level(&self, msg: &Message) -> usize {
        match self.config().max_priority {
            None => 0,
            Some(max) => msg.properties.priority.unwrap_or(0).min(max) as usize,
        }
    }

    /// Whether a publish would be refused by `x-overflow: reject-publish[-dlx]` right now.
    pub(crate) fn would_reject(&self, msg: &Message) -> bool {
        if self.is_stream() || !self.config().refuses_when_full() {
            return false;
        }
        let s = self.state.lock();
        self.over_limit(
            s.ready_count as u64 + 1,
            s.ready_bytes + msg.body.len() as u64,
        )
    }

    fn over_limit(&self, count: u64, bytes: u64) -> bool {
        self.config().max_length.is_some_and(|m| count > m)
            || self.config().max_length_bytes.is_some_and(|m| bytes > m)
    }

    /// Puts a routed message at the tail and delivers what credit allows. `ticket` is the
    /// store submission that wrote it, when `persisted`. The effects are the caller's to
    /// [`Queue::finish`] (none, for most transient messages, so the publish path need not
    /// await).
    pub(crate) fn enqueue_now(
        self: &Arc<Self>,
        seq: u64,
        msg: Arc<Message>,
        persisted: bool,
        ticket: Option<Ticket>,
        now: Instant,
    ) -> (EnqueueOutcome, Effects) {
        let ttl = [
            self.config().message_ttl,
            msg.expiration_ms().ok().flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let expires_at = ttl.map(|t| now + Duration::from_millis(t));
        let mut fx = Effects::default();
        // Streams take the ordered path: VHost::deliver_awaiting → append_stream.
        debug_assert!(!self.is_stream(), "enqueue_now on a stream");
        let outcome = {
            let mut s = self.state.lock();
            if s.deleted {
                return (EnqueueOutcome::Accepted, fx);
            }
            let entry = Entry {
                seq,
                msg,
                redelivered: false,
                returns: 0,
                persisted,
                delivered_marked: false,
                expires_at,
            };
            let size = entry.size();
            let reject = self.config().refuses_when_full()
                && self.over_limit(s.ready_count as u64 + 1, s.ready_bytes + size);
            if reject {
                if persisted {
                    fx.ops.push(self.delete_op(seq));
                }
                if self.config().overflow == Some(Overflow::RejectPublishDlx) {
                    fx.dead.push((entry.msg, DeadReason::Maxlen));
                }
                EnqueueOutcome::Rejected
            } else {
                let page_out = self.pages_out(&s);
                s.stats.published += 1;
                s.ready_count += 1;
                s.ready_bytes += size;
                if page_out {
                    let ticket = if persisted {
                        Some(ticket.map_or(0, |t| t.0))
                    } else {
                        // Transient: written now (unsynced) so the backlog can leave memory.
                        fx.ops.push(Op::PageOut {
                            queue: self.store_id,
                            seq,
                            data: entry.msg.encode(),
                        });
                        None
                    };
                    let chunk = s.paged.push(seq, size, ticket, false, persisted);
                    if ticket.is_none() {
                        fx.paged_out.push(chunk);
                    }
                } else {
                    let level = self.priority_level(&entry.msg);
                    let was_empty = s.ready[level].is_empty();
                    s.ready[level].push_back(entry);
                    if expires_at.is_some() && was_empty {
                        if !s.timer_running {
                            s.timer_running = true;
                            self.spawn_timer();
                        } else {
                            self.timer.notify_one();
                        }
                    }
                }
                // drop-head (the default) keeps the newest messages.
                while self.over_limit(s.ready_count as u64, s.ready_bytes) {
                    let Some(old) = self.pop_ready(&mut s, &mut fx) else {
                        break;
                    };
                    self.discard(old, DeadReason::Maxlen, &mut fx);
                }
                self.dispatch(&mut s, &mut fx, now);
                EnqueueOutcome::Accepted
            }
        };
        (outcome, fx)
    }

    /// Takes the append lock of a stream (None for other queues): see [`Queue::append`].
    pub(crate) async fn lock_append(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.append {
            Some(m) => Some(m.lock().await),
            None => None,
        }
    }

    /// The offset the next message of this stream gets (hold the append lock).
    pub(crate) fn stream_next_offset(&self) -> u64 {
        self.state.lock().stream.as_ref().map_or(0, |l| l.next())
    }

    /// Appends a message written (or being written) to the store at `offset` with
    /// `ticket`, applies retention and feeds the consumers.
    pub(crate) fn append_stream(
        self: &Arc<Self>,
        offset: u64,
        msg: Arc<Message>,
        ts_ms: i64,
        ticket: u64,
    ) -> Effects {
        let mut fx = Effects::default();
        let synced = self
            .vhost
            .upgrade()
            .map_or(0, |v| *v.store.synced().borrow());
        let cfg = self.config();
        let mut s = self.state.lock();
        if s.deleted {
            return fx;
        }
        s.stats.published += 1;
        let Some(log) = s.stream.as_mut() else {
            return fx;
        };
        let entry = StreamEntry {
            offset,
            msg,
            ts_ms,
            ticket,
        };
        log.append(entry, cfg.segment_bytes());
        if let Some((first, last)) = log.apply_retention(cfg.max_length_bytes, cfg.max_age, ts_ms) {
            fx.ops.push(Op::DeleteMessageRange {
                queue: self.store_id,
                first,
                last,
            });
        }
        log.evict(synced);
        self.dispatch(&mut s, &mut fx, Instant::now());
        fx
    }

    /// Puts a recovered stream record back (startup only).
    pub(crate) fn restore_stream(&self, offset: u64, data: bytes::Bytes) -> CoreResult<()> {
        let (ts_ms, msg) = crate::stream::decode_stored(data)?;
        let segment = self.config().segment_bytes();
        let mut s = self.state.lock();
        if let Some(log) = s.stream.as_mut() {
            let entry = StreamEntry {
                offset,
                msg: Arc::new(msg),
                ts_ms,
                ticket: 0,
            };
            log.append(entry, segment);
            log.evict(0);
        }
        Ok(())
    }

    /// Puts a recovered message back (startup only, no consumers yet). Past the paging
    /// threshold only its count is kept: the head reads the rest from the store.
    pub(crate) fn restore(&self, seq: u64, msg: Arc<Message>, delivered: bool) {
        let mut s = self.state.lock();
        let _ = self
            .next_seq
            .fetch_max(seq.saturating_add(1), Ordering::Relaxed);
        if self.pages_out(&s) {
            let size = msg.body.len() as u64;
            s.ready_count += 1;
            s.ready_bytes += size;
            s.paged.push(seq, size, Some(0), true, msg.is_persistent());
            return;
        }
        let level = self.priority_level(&msg);
        s.ready_count += 1;
        let entry = Entry {
            seq,
            msg,
            redelivered: delivered,
            // A delivery cut short by the restart counts as one return (the count itself
            // is not stored).
            returns: u32::from(delivered),
            persisted: true,
            delivered_marked: delivered,
            expires_at: self
                .config()
                .message_ttl
                .map(|t| Instant::now() + Duration::from_millis(t)),
        };
        s.ready_bytes += entry.size();
        s.ready[level].push_back(entry);
    }

    /// Whether new arrivals go to the paged-out tail: a stored queue (its messages can be
    /// read back) without priorities or a queue TTL (both need every message at hand),
    /// that already pages or holds too much in memory.
    fn pages_out(&self, s: &QueueState) -> bool {
        if !self.is_stored() || self.config().max_priority.is_some() {
            return false;
        }
        if self.config().message_ttl.is_some() {
            return false;
        }
        !s.paged.is_empty()
            || s.ready_count - s.paged.count() >= PAGE_AFTER_MESSAGES
            || s.ready_bytes - s.paged.bytes() >= PAGE_AFTER_BYTES
    }

    /// The head message, reading the next paged-out chunk when memory ran dry.
    fn pop_ready(self: &Arc<Self>, s: &mut QueueState, fx: &mut Effects) -> Option<Entry> {
        loop {
            for level in s.ready.iter_mut().rev() {
                if let Some(e) = level.pop_front() {
                    s.ready_count -= 1;
                    s.ready_bytes -= e.size();
                    return Some(e);
                }
            }
            if !self.page_in(s, fx) {
                return None;
            }
        }
    }

    /// Reads the front chunk back into memory if its writes are on disk; otherwise arranges
    /// to be woken when they are. Returns whether anything was loaded.
    fn page_in(self: &Arc<Self>, s: &mut QueueState, fx: &mut Effects) -> bool {
        let Some(store) = self.vhost.upgrade().map(|v| v.store.clone()) else {
            return false;
        };
        let synced = *store.synced().borrow();
        match s.paged.readiness(synced) {
            Readiness::Empty => return false,
            Readiness::WaitPending => {
                s.paged.stalled = true;
                return false;
            }
            Readiness::WaitSync(t) => {
                if !s.paged.waiter {
                    s.paged.waiter = true;
                    fx.wait_sync = Some(t);
                }
                return false;
            }
            Readiness::Ready => {}
        }
        let Some(chunk) = s.paged.pop_front() else {
            return false;
        };
        let now = Instant::now();
        let (mut loaded, mut bytes, mut expiring) = (0usize, 0u64, false);
        let mut visit = |m: warren_store::StoredMessage| {
            let msg = match Message::decode(m.data) {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::warn!(queue = %self.name.as_str(), seq = m.seq, error = %e, "dropping unreadable paged message");
                    fx.ops.push(self.delete_op(m.seq));
                    return true;
                }
            };
            let expires_at = msg
                .expiration_ms()
                .ok()
                .flatten()
                .map(|t| now + Duration::from_millis(t));
            let entry = Entry {
                seq: m.seq,
                msg: Arc::new(msg),
                redelivered: m.delivered,
                returns: u32::from(m.delivered),
                persisted: true,
                delivered_marked: m.delivered,
                expires_at,
            };
            loaded += 1;
            bytes += entry.size();
            expiring |= expires_at.is_some();
            s.ready[0].push_back(entry);
            true
        };
        for &(first, last) in &chunk.runs {
            if let Err(e) = store.scan_queue(self.store_id, first, last, &mut visit) {
                tracing::error!(queue = %self.name.as_str(), error = %e, "reading a paged-out chunk failed");
            }
        }
        // The totals counted the chunk as paged; correct them by what was really there.
        s.ready_count = s.ready_count - chunk.count + loaded;
        s.ready_bytes = s.ready_bytes - chunk.bytes + bytes;
        if expiring && !s.timer_running {
            s.timer_running = true;
            self.spawn_timer();
        }
        loaded > 0 || !s.paged.is_empty()
    }

    /// Returns a message to the ready list at its original place (by sequence), as RabbitMQ
    /// does for requeues.
    fn push_back_in_order(&self, s: &mut QueueState, entry: Entry) {
        let level = self.priority_level(&entry.msg);
        let dq = &mut s.ready[level];
        let pos = dq.partition_point(|e| e.seq < entry.seq);
        s.ready_count += 1;
        s.ready_bytes += entry.size();
        dq.insert(pos, entry);
    }

    /// A delivered message coming back unsettled (requeue, recover, a closed channel).
    /// Quorum queues count the returns and, past `x-delivery-limit`, dead-letter it with
    /// reason `delivery_limit` instead (RabbitMQ's poison-message handling).
    fn put_back(&self, s: &mut QueueState, mut e: Entry, fx: &mut Effects) {
        e.redelivered = true;
        let config = self.config();
        if config.quorum {
            e.returns = e.returns.saturating_add(1);
            if config
                .delivery_limit
                .is_some_and(|limit| u64::from(e.returns) > limit)
            {
                self.discard(e, DeadReason::DeliveryLimit, fx);
                return;
            }
        }
        self.push_back_in_order(s, e);
    }

    /// The message as a consumer receives it: a quorum queue adds `x-delivery-count` (the
    /// returns so far) to redeliveries, and to every basic.get, as RabbitMQ 3.10 does.
    fn outgoing(&self, e: &Entry, get: bool) -> Arc<Message> {
        if (e.returns == 0 && !get) || !self.config().quorum {
            return e.msg.clone();
        }
        let count = AMQPValue::LongLongInt(i64::from(e.returns));
        Arc::new(e.msg.with_headers(|h| {
            h.insert("x-delivery-count".into(), count);
        }))
    }

    fn delete_op(&self, seq: u64) -> Op {
        Op::DeleteMessage {
            queue: self.store_id,
            seq,
        }
    }

    /// Drops a message from the queue: dead-letters it if configured, deletes it from the
    /// store.
    fn discard(&self, entry: Entry, reason: DeadReason, fx: &mut Effects) {
        if entry.persisted {
            fx.ops.push(self.delete_op(entry.seq));
        }
        if self.config().dead_letter_exchange.is_some() {
            fx.dead.push((entry.msg, reason));
        }
    }

    /// Index of the consumer to receive the next message: the highest priority with
    /// credit, round-robin among equals; only the first consumer with
    /// single-active-consumer.
    fn pick_consumer(&self, s: &mut QueueState) -> Option<usize> {
        if self.config().single_active_consumer {
            return s.consumers.first().filter(|c| c.has_credit()).map(|_| 0);
        }
        let n = s.consumers.len();
        let best = s
            .consumers
            .iter()
            .filter(|c| c.has_credit())
            .map(|c| c.spec.priority)
            .max()?;
        for k in 0..n {
            let i = (s.rr + k) % n;
            let c = &s.consumers[i];
            if c.spec.priority == best && c.has_credit() {
                s.rr = i + 1;
                return Some(i);
            }
        }
        None
    }

    /// Hands ready messages to consumers while credit lasts.
    fn dispatch(self: &Arc<Self>, s: &mut QueueState, fx: &mut Effects, now: Instant) {
        if s.stream.is_some() {
            self.dispatch_stream(s);
            return;
        }
        while s.ready_count > 0 && !s.consumers.is_empty() {
            let Some(ci) = self.pick_consumer(s) else {
                break;
            };
            let Some(entry) = self.pop_ready(s, fx) else {
                break;
            };
            // Strictly before `now`: a message with TTL 0 still reaches a consumer that is
            // ready when it arrives, as in RabbitMQ; otherwise it expires.
            if entry.expires_at.is_some_and(|t| t < now) {
                self.discard(entry, DeadReason::Expired, fx);
                continue;
            }
            let c = &mut s.consumers[ci];
            let delivery = self.delivery(
                c,
                entry.seq,
                self.outgoing(&entry, false),
                entry.redelivered,
            );
            if let Err(_returned) = c.spec.outbox.try_deliver(delivery) {
                c.stalled = true;
                c.spec.outbox.note_stalled(Arc::downgrade(self));
                self.push_back_in_order(s, entry);
                continue;
            }
            s.stats.delivered += 1;
            if entry.redelivered {
                s.stats.redelivered += 1;
            }
            if c.spec.no_ack {
                s.stats.delivered_no_ack += 1;
                if entry.persisted {
                    fx.ops.push(self.delete_op(entry.seq));
                }
                continue;
            }
            c.unacked += 1;
            c.spec.channel_credit.take();
            let cid = c.spec.id;
            let mut entry = entry;
            if entry.persisted && !entry.delivered_marked {
                entry.delivered_marked = true;
                fx.ops.push(Op::MarkDelivered {
                    queue: self.store_id,
                    seq: entry.seq,
                });
            }
            s.unacked.insert(
                entry.seq,
                Unacked {
                    entry,
                    consumer: Some(cid),
                },
            );
        }
    }

    /// A delivery of `message` to consumer `c` under `seq` (what its settle names).
    fn delivery(
        self: &Arc<Self>,
        c: &ConsumerEntry,
        seq: u64,
        message: Arc<Message>,
        redelivered: bool,
    ) -> Delivery {
        Delivery {
            consumer: c.spec.id,
            tag: c.spec.tag.clone(),
            token: c.spec.token,
            no_ack: c.spec.no_ack,
            queue: self.clone(),
            seq: MsgSeq(seq),
            message,
            redelivered,
        }
    }

    /// Hands each stream consumer the messages from its cursor on while its credit lasts.
    /// Messages no longer in memory are read from the store in batches.
    fn dispatch_stream(self: &Arc<Self>, s: &mut QueueState) {
        let QueueState {
            stream: Some(log),
            consumers,
            stats,
            ..
        } = s
        else {
            return;
        };
        let store = self.vhost.upgrade().map(|v| v.store.clone());
        for c in consumers.iter_mut() {
            let mut batch: VecDeque<StreamEntry> = VecDeque::new();
            while c.has_credit() && c.cursor < log.next() {
                c.cursor = c.cursor.max(log.first());
                let entry = match log.in_memory(c.cursor) {
                    Some(e) => e.clone(),
                    None => {
                        if batch.front().is_none_or(|e| e.offset < c.cursor) {
                            batch = self.read_stream(store.as_ref(), c.cursor, log.next());
                            batch.retain(|e| e.offset >= c.cursor);
                        }
                        match batch.pop_front() {
                            Some(e) => e,
                            None => {
                                // Not in the store either (trimmed meanwhile): skip to
                                // what memory holds.
                                let skip_to = (c.cursor + 1).max(log.first());
                                c.cursor = skip_to;
                                continue;
                            }
                        }
                    }
                };
                let offset = entry.offset;
                let message = Arc::new(entry.msg.with_headers(|h| {
                    h.insert(
                        "x-stream-offset".into(),
                        AMQPValue::LongLongInt(offset as i64),
                    );
                }));
                let id = log.delivery_id();
                let delivery = self.delivery(c, id, message, false);
                if c.spec.outbox.try_deliver(delivery).is_err() {
                    c.stalled = true;
                    c.spec.outbox.note_stalled(Arc::downgrade(self));
                    break;
                }
                c.cursor = offset + 1;
                stats.delivered += 1;
                if c.spec.no_ack {
                    stats.delivered_no_ack += 1;
                } else {
                    c.unacked += 1;
                    c.spec.channel_credit.take();
                    log.unacked.insert(id, c.spec.id);
                }
            }
        }
    }

    /// Up to a batch of stream records from `from` on, read back from the store.
    fn read_stream(
        &self,
        store: Option<&warren_store::Store>,
        from: u64,
        next: u64,
    ) -> VecDeque<StreamEntry> {
        let mut out = VecDeque::new();
        let Some(store) = store else {
            return out;
        };
        let last = (from + crate::stream::READ_BATCH - 1).min(next.saturating_sub(1));
        let read = store.scan_queue(self.store_id, from, last, |m| {
            match crate::stream::decode_stored(m.data) {
                Ok((ts_ms, msg)) => out.push_back(StreamEntry {
                    offset: m.seq,
                    msg: Arc::new(msg),
                    ts_ms,
                    ticket: 0,
                }),
                Err(e) => {
                    tracing::warn!(queue = %self.name.as_str(), offset = m.seq, error = %e, "skipping an unreadable stream record")
                }
            }
            true
        });
        if let Err(e) = read {
            tracing::error!(queue = %self.name.as_str(), error = %e, "reading a stream failed");
        }
        out
    }

    /// Carries out what was decided under the lock.
    pub(crate) async fn finish(self: &Arc<Self>, fx: Effects) {
        let Effects {
            ops,
            dead,
            delete_queue,
            paged_out,
            mut wait_sync,
        } = fx;
        let vhost = self.vhost.upgrade();
        if !ops.is_empty() {
            if let Some(v) = &vhost {
                match v.store.submit(ops).await {
                    Ok(t) if !paged_out.is_empty() => {
                        let mut s = self.state.lock();
                        for id in paged_out {
                            s.paged.resolve(id, t.0);
                        }
                        // The head waited for these writes: wake it once they are synced.
                        if std::mem::take(&mut s.paged.stalled) && !s.paged.waiter {
                            s.paged.waiter = true;
                            wait_sync = Some(t.0);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(queue = %self.name.as_str(), error = %e, "store write failed")
                    }
                }
            }
        }
        if let (Some(t), Some(v)) = (wait_sync, &vhost) {
            tokio::spawn(Self::wake_when_synced(
                Arc::downgrade(self),
                v.store.clone(),
                t,
            ));
        }
        if let Some(v) = &vhost {
            for (msg, reason) in dead {
                v.dead_letter(self, msg, reason).await;
            }
            if delete_queue {
                // Boxed: rare, and its future is large; unboxed it was part of (and copied
                // with) every enqueue's future on the publish path.
                let _ = Box::pin(v.delete_queue(self.name.as_str(), None, false, false)).await;
            }
        }
    }

    /// Delivers again once the store has synced `ticket` (a paged-out chunk waited for it).
    /// Boxed with an explicit `Send` bound: it calls back into `kick` → `finish`, a cycle
    /// the compiler cannot check for `Send` otherwise.
    fn wake_when_synced(
        weak: Weak<Self>,
        store: warren_store::Store,
        ticket: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let _ = store.wait_synced(Ticket(ticket)).await;
            if let Some(q) = weak.upgrade() {
                q.state.lock().paged.waiter = false;
                q.kick().await;
            }
        })
    }

    /// Registers a consumer and starts delivering to it.
    pub async fn add_consumer(self: &Arc<Self>, spec: ConsumerSpec) -> CoreResult<()> {
        let mut fx = Effects::default();
        {
            let mut s = self.state.lock();
            if s.deleted {
                return Err(CoreError::not_found(format!(
                    "no queue '{}' in vhost",
                    self.name.as_str()
                )));
            }
            if s.consumers.iter().any(|c| c.spec.exclusive) {
                return Err(CoreError::access_refused(format!(
                    "queue '{}' in vhost '{}' in exclusive use",
                    self.name.as_str(),
                    self.vhost_name()
                )));
            }
            if spec.exclusive && !s.consumers.is_empty() {
                return Err(CoreError::access_refused(format!(
                    "queue '{}' in vhost '{}' in exclusive use",
                    self.name.as_str(),
                    self.vhost_name()
                )));
            }
            s.had_consumer = true;
            s.last_used = Some(Instant::now());
            // Most queues have one consumer (every MQTT session queue): no room for four.
            if s.consumers.capacity() == 0 {
                s.consumers.reserve_exact(1);
            }
            let cursor = match (&s.stream, spec.stream_start) {
                (Some(log), Some(start)) => log.start_offset(start),
                (Some(log), None) => log.next(),
                (None, _) => 0,
            };
            s.consumers.push(ConsumerEntry {
                spec,
                unacked: 0,
                stalled: false,
                cursor,
            });
            self.dispatch(&mut s, &mut fx, Instant::now());
        }
        self.finish(fx).await;
        Ok(())
    }

    fn vhost_name(&self) -> String {
        self.vhost
            .upgrade()
            .map(|v| v.name.clone())
            .unwrap_or_default()
    }

    /// Removes a consumer; its unacked messages stay with its channel. Auto-delete queues
    /// go when their last consumer does.
    pub async fn remove_consumer(self: &Arc<Self>, id: ConsumerId) -> bool {
        self.remove_consumer_requeue(id, &[]).await
    }

    /// Removes a consumer and, in the same step, puts `seqs` (its channel's unacked
    /// messages of this queue) back in order before anything is dispatched again — so with
    /// single-active-consumer the next consumer gets them first, as in RabbitMQ.
    pub async fn remove_consumer_requeue(
        self: &Arc<Self>,
        id: ConsumerId,
        seqs: &[MsgSeq],
    ) -> bool {
        let mut fx = Effects::default();
        let found = {
            let mut s = self.state.lock();
            if !s.deleted {
                for &seq in seqs {
                    if let Some(e) = self.settle(&mut s, seq) {
                        self.put_back(&mut s, e, &mut fx);
                    }
                }
            }
            // The single active consumer leaving with messages still unacked (a
            // basic.cancel; its channel stays open): RabbitMQ activates the next consumer
            // but feeds it only at the next event, typically the cancelled channel's
            // requeue on close, so the requeued messages go first. Hold dispatch likewise.
            let held = self.config().single_active_consumer
                && s.consumers.first().is_some_and(|c| c.spec.id == id)
                && s.unacked.values().any(|u| u.consumer == Some(id));
            let before = s.consumers.len();
            s.consumers.retain(|c| c.spec.id != id);
            let found = s.consumers.len() != before;
            for u in s.unacked.values_mut() {
                if u.consumer == Some(id) {
                    u.consumer = None;
                }
            }
            s.last_used = Some(Instant::now());
            if found && s.consumers.is_empty() && self.auto_delete && s.had_consumer {
                fx.delete_queue = true;
            } else if !held {
                // Another consumer may now be the single active one.
                self.dispatch(&mut s, &mut fx, Instant::now());
            }
            if self.config().expires.is_some() {
                self.timer.notify_one();
            }
            found
        };
        self.finish(fx).await;
        found
    }

    /// Clears the stall of this outbox's consumers and delivers again.
    pub async fn resume(self: &Arc<Self>, outbox: &Arc<Outbox>) {
        let mut fx = Effects::default();
        {
            let mut s = self.state.lock();
            for c in s.consumers.iter_mut() {
                if Arc::ptr_eq(&c.spec.outbox, outbox) {
                    c.stalled = false;
                }
            }
            self.dispatch(&mut s, &mut fx, Instant::now());
        }
        self.finish(fx).await;
    }

    /// Delivers again after credit was returned elsewhere (a channel's global prefetch).
    pub async fn kick(self: &Arc<Self>) {
        if let Some(f) = self.kick_now() {
            f.run().await;
        }
    }

    /// [`Queue::kick`] without an await where none is needed (see [`Queue::ack_now`]).
    pub fn kick_now(self: &Arc<Self>) -> Option<FollowUp> {
        let mut fx = Effects::default();
        {
            let mut s = self.state.lock();
            self.dispatch(&mut s, &mut fx, Instant::now());
        }
        self.follow_up(fx)
    }

    /// basic.get: the head message, unacked unless `no_ack`. When only paged-out messages
    /// are left and their writes are still in flight, waits for them (milliseconds) rather
    /// than answer get-empty for a queue that has messages.
    pub async fn get(self: &Arc<Self>, no_ack: bool) -> Option<GetResult> {
        for _ in 0..200 {
            let found = self.get_once(no_ack).await;
            let paged = {
                let s = self.state.lock();
                !s.deleted && s.paged.count() > 0 && s.ready_count == s.paged.count()
            };
            if found.is_some() || !paged {
                if found.is_none() {
                    self.state.lock().stats.get_empty += 1;
                }
                return found;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.state.lock().stats.get_empty += 1;
        None
    }

    async fn get_once(self: &Arc<Self>, no_ack: bool) -> Option<GetResult> {
        if self.is_stream() {
            // Front-ends refuse basic.get on streams (RabbitMQ: 540).
            return None;
        }
        let mut fx = Effects::default();
        let now = Instant::now();
        let result = {
            let mut s = self.state.lock();
            s.last_used = Some(now);
            let mut found = None;
            while let Some(mut entry) = self.pop_ready(&mut s, &mut fx) {
                if entry.expires_at.is_some_and(|t| t <= now) {
                    self.discard(entry, DeadReason::Expired, &mut fx);
                    continue;
                }
                s.stats.delivered += 1;
                if no_ack {
                    s.stats.got_no_ack += 1;
                } else {
                    s.stats.got += 1;
                }
                let result = GetResult {
                    seq: MsgSeq(entry.seq),
                    message: self.outgoing(&entry, true),
                    redelivered: entry.redelivered,
                    remaining: s.ready_count as u32,
                };
                if no_ack {
                    if entry.persisted {
                        fx.ops.push(self.delete_op(entry.seq));
                    }
                } else {
                    if entry.persisted && !entry.delivered_marked {
                        entry.delivered_marked = true;
                        fx.ops.push(Op::MarkDelivered {
                            queue: self.store_id,
                            seq: entry.seq,
                        });
                    }
                    s.unacked.insert(
                        entry.seq,
                        Unacked {
                            entry,
                            consumer: None,
                        },
                    );
                }
                found = Some(result);
                break;
            }
            found
        };
        self.finish(fx).await;
        result
    }

    fn settle(&self, s: &mut QueueState, seq: MsgSeq) -> Option<Entry> {
        if let Some(log) = s.stream.as_mut() {
            // A stream delivery only held credit: nothing goes back or away.
            let cid = log.unacked.remove(&seq.0)?;
            if let Some(c) = s.consumers.iter_mut().find(|c| c.spec.id == cid) {
                c.unacked = c.unacked.saturating_sub(1);
            }
            s.stats.acked += 1;
            return None;
        }
        let u = s.unacked.remove(&seq.0)?;
        if let Some(cid) = u.consumer {
            if let Some(c) = s.consumers.iter_mut().find(|c| c.spec.id == cid) {
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
        Some(u.entry)
    }

    /// basic.ack of these messages.
    pub async fn ack(self: &Arc<Self>, seqs: &[MsgSeq]) {
        if let Some(f) = self.ack_now(seqs) {
            f.run().await;
        }
    }

    /// [`Queue::ack`] without an await where none is needed (a transient message, no
    /// store delete to write): what is left, if anything, comes back to be run. A
    /// front-end's hot path calls this and boxes only the rest, as with
    /// [`crate::VHost::deliver_now`].
    pub fn ack_now(self: &Arc<Self>, seqs: &[MsgSeq]) -> Option<FollowUp> {
        let mut fx = Effects::default();
        {
            let mut s = self.state.lock();
            for &seq in seqs {
                if let Some(e) = self.settle(&mut s, seq) {
                    s.stats.acked += 1;
                    if e.persisted {
                        fx.ops.push(self.delete_op(e.seq));
                    }
                }
            }
            self.dispatch(&mut s, &mut fx, Instant::now());
        }
        self.follow_up(fx)
    }

    /// The effects of a locked step, if any need an await.
    fn follow_up(self: &Arc<Self>, fx: Effects) -> Option<FollowUp> {
        (!fx.is_empty()).then(|| FollowUp {
            queue: self.clone(),
            fx,
        })
    }

    /// nack/reject with requeue, recover, or a closed channel: back to ready, redelivered.
    pub async fn requeue(self: &Arc<Self>, seqs: &[MsgSeq]) {
        let mut fx = Effects::default();
        {
            let mut s = self.state.lock();
            if s.deleted {
                return;
            }
            for &seq in seqs {
                if let Some(e) = self.settle(&mut s, seq) {
                    self.put_back(&mut s, e, &mut fx);
                }
            }
            self.dispatch(&mut s, &mut fx, Instant::now());
        }
        self.finish(fx).await;
    }

    /// nack/reject without requeue: dead-lettered (reason `rejected`) or dropped.
    pub async fn reject(self: &Arc<Self>, seqs: &[MsgSeq]) {
        let mut fx = Effects::default();
        {
            let mut s = self.state.lock();
            for &seq in seqs {
                if let Some(e) = self.settle(&mut s, seq) {
                    self.discard(e, DeadReason::Rejected, &mut fx);
                }
            }
            self.dispatch(&mut s, &mut fx, Instant::now());
        }
        self.finish(fx).await;
    }

    /// queue.purge: drops the ready messages, returns how many.
    pub async fn purge(self: &Arc<Self>) -> u32 {
        if self.is_stream() {
            // Front-ends refuse queue.purge on streams (RabbitMQ: 540).
            return 0;
        }
        let mut fx = Effects::default();
        let n = {
            let mut s = self.state.lock();
            let n = s.ready_count as u32;
            let mut seqs = Vec::new();
            for level in s.ready.iter_mut() {
                for e in level.drain(..) {
                    if e.persisted {
                        seqs.push(e.seq);
                    }
                }
            }
            let ranges = s.paged.clear();
            s.ready_count = 0;
            s.ready_bytes = 0;
            if s.unacked.is_empty() && !(seqs.is_empty() && ranges.is_empty()) {
                fx.ops.push(Op::DeleteQueueMessages {
                    queue: self.store_id,
                });
            } else {
                fx.ops.extend(seqs.into_iter().map(|q| self.delete_op(q)));
                fx.ops.extend(
                    ranges
                        .into_iter()
                        .map(|(first, last)| Op::DeleteMessageRange {
                            queue: self.store_id,
                            first,
                            last,
                        }),
                );
            }
            n
        };
        self.finish(fx).await;
        n
    }

    /// Marks the queue deleted and tells its consumers. Returns the ready count and the
    /// consumers that were cancelled.
    pub(crate) fn mark_deleted(&self) -> (u32, Vec<(ConsumerId, Arc<Outbox>)>) {
        let mut s = self.state.lock();
        s.deleted = true;
        let n = s.ready_count as u32;
        s.stream = None;
        let consumers = s
            .consumers
            .drain(..)
            .map(|c| (c.spec.id, c.spec.outbox))
            .collect();
        for level in s.ready.iter_mut() {
            level.clear();
        }
        s.paged.clear();
        s.ready_count = 0;
        s.ready_bytes = 0;
        s.unacked.clear();
        drop(s);
        self.timer.notify_one();
        (n, consumers)
    }

    pub(crate) fn is_unused(&self) -> bool {
        self.state.lock().consumers.is_empty()
    }

    fn ensure_timer(self: &Arc<Self>) {
        let mut s = self.state.lock();
        if !s.timer_running {
            s.timer_running = true;
            self.spawn_timer();
        }
    }

    fn spawn_timer(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(housekeeping(weak));
    }

    /// Expires messages at the heads and checks `x-expires`; returns the next deadline.
    async fn housekeep(self: &Arc<Self>) -> Option<Option<Instant>> {
        let now = Instant::now();
        let mut fx = Effects::default();
        let next = {
            let mut s = self.state.lock();
            if s.deleted {
                return None;
            }
            let mut next: Option<Instant> = None;
            for li in 0..s.ready.len() {
                while let Some(t) = s.ready[li].front().and_then(|e| e.expires_at) {
                    if t > now {
                        next = Some(next.map_or(t, |n: Instant| n.min(t)));
                        break;
                    }
                    if let Some(e) = s.ready[li].pop_front() {
                        s.ready_count -= 1;
                        s.ready_bytes -= e.size();
                        self.discard(e, DeadReason::Expired, &mut fx);
                    }
                }
            }
            if let (Some(exp), true) = (self.config().expires, s.consumers.is_empty()) {
                let deadline = s.last_used.unwrap_or(now) + Duration::from_millis(exp);
                if deadline <= now {
                    fx.delete_queue = true;
                } else {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                }
            }
            next
        };
        self.finish(fx).await;
        Some(next)
    }
}

/// One task per queue with TTLs or `x-expires`: sleeps until the next deadline.
async fn housekeeping(weak: Weak<Queue>) {
    loop {
        let Some(q) = weak.upgrade() else {
            return;
        };
        let notified = q.timer.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(next) = q.housekeep().await else {
            return;
        };
        if q.is_deleted() {
            return;
        }
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = &mut notified => {}
                }
            }
            None => notified.await,
        }
    }
}
