//! One MQTT connection: CONNECT, the packet loop, QoS 0/1/2 in both directions, keep-alive,
//! wills, session expiry, and the session queue it consumes from.
//!
//! Each session owns a queue `mqtt-subscription-<client id>qos1` (RabbitMQ's name); each
//! subscription is a binding of it on `amq.topic` whose arguments carry the subscription
//! options. A session that ends with its connection (3.1.1 clean session, 5.0 session
//! expiry 0) uses an exclusive auto-delete queue; a persistent one a durable queue that
//! outlives the connection, plus a [`SessionRecord`] for what a queue cannot hold.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use litemap::LiteMap;
use mqtt5_protocol::packet::connack::ConnAckPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::disconnect::DisconnectPacket;
use mqtt5_protocol::packet::pubcomp::PubCompPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrec::PubRecPacket;
use mqtt5_protocol::packet::pubrel::PubRelPacket;
use mqtt5_protocol::packet::suback::{SubAckPacket, SubAckReasonCode};
use mqtt5_protocol::packet::subscribe::TopicFilter;
use mqtt5_protocol::packet::unsuback::{UnsubAckPacket, UnsubAckReasonCode};
use mqtt5_protocol::{Packet, PropertyId, PropertyValue, QoS, ReasonCode};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use warren_core::permissions::{Access, ResourceKind};
use warren_core::read_room::ReadRoom;
use warren_core::{
    AMQPValue, Broker, ConnectionId, ConsumerId, ConsumerSpec, Credit, Delivery, FieldTable,
    FollowUp, Message, MsgSeq, Outbox, OutboxEvent, Properties, Queue, QueueDecl, Target,
    TopicPermissions, VHost,
};
use warren_core::{ConnectionAuth, ConnectionGuard, ConnectionInfo};

use crate::codec::{self, CodecError};
use crate::shared_sub;
use crate::state::{now_ms, SessionRecord, StoredShared, StoredWill, NEVER};
use crate::topic;
use crate::{MqttConfig, Shared, MAX_SHORT};

/// The header carrying an MQTT publish's QoS through AMQP (RabbitMQ's name).
/// The exchange MQTT topics map onto (RabbitMQ's default `mqtt.exchange`).
const TOPIC_EXCHANGE: &str = "amq.topic";
const QOS_HEADER: &str = "x-mqtt-publish-qos";
/// The publishing client id, for no-local subscriptions (MQTT-3.8.3-3).
const ORIGIN_HEADER: &str = "x-mqtt-client-id";
/// Set when the message was published with RETAIN (for retain-as-published).
const RETAIN_HEADER: &str = "x-mqtt-retain";
/// Unix ms at which a message with an expiry interval expires, so deliveries carry the
/// remaining interval (MQTT-3.3.2-6).
const EXPIRY_HEADER: &str = "x-mqtt-expiry-at";
/// MQTT 5 user properties in their original order, with repeated names, when a header
/// table (one value per name, sorted) cannot hold them.
const USER_PROPS_HEADER: &str = "x-mqtt-user-properties";
/// MQTT 5 payload format indicator (1 = UTF-8), passed on to 5.0 subscribers.
const FORMAT_HEADER: &str = "x-mqtt-payload-format";
/// Correlation data that is no AMQP `correlation_id` (not UTF-8, or over 255 bytes), as
/// RabbitMQ's MQTT plugin keeps it.
const CORRELATION_HEADER: &str = "x-correlation-id";
/// A content type or response topic too long for the AMQP property (a short string):
/// kept whole for MQTT 5 subscribers (MQTT-3.3.2-15, -16, -20: forwarded unaltered).
const CONTENT_TYPE_HEADER: &str = "x-mqtt-content-type";
const RESPONSE_TOPIC_HEADER: &str = "x-mqtt-response-topic";
/// Binding arguments holding a subscription's options (survive restarts with the binding).
const SUB_OPTS_ARG: &str = "x-mqtt-sub-opts";
const SUB_ID_ARG: &str = "x-mqtt-sub-id";

/// Why the connection ended (for the log, and whether the will fires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT: no will (MQTT-3.14.4-3).
    Normal,
    /// 5.0 DISCONNECT with reason 0x04: a normal end that still sends the will.
    NormalWithWill,
    SocketClosed,
    ProtocolError,
    KeepAliveTimeout,
    TakenOver,
    /// Taken over by a connection resuming this persistent session.
    TakenOverResumed,
    /// Closed from the management API (or its vhost or user was deleted).
    AdminClosed,
    Shutdown,
}

/// The close reason a session takeover gives the older connection (MQTT-3.1.4-3).
const TAKEN_OVER_REASON: &str = "session taken over";
/// The registry's close reason for a server shutdown (see `Shared::watch_shutdown`).
pub(crate) const SHUTDOWN_REASON: &str = "server shutting down";
/// The same, by a connection that resumes the session (no clean start): a persistent
/// session goes on, so its will is not sent (as Mosquitto).
const TAKEN_OVER_RESUMED: &str = "session taken over and resumed";

/// 5.0 DISCONNECT reason codes the server sends (MQTT 5 §3.14.2.1).
mod rc {
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
}

/// A delivery sent with QoS ≥ 1 and not yet acknowledged.
struct Inflight {
    /// The queue message, until it is settled (PUBACK, or PUBREC for QoS 2).
    queue: Option<(Arc<Queue>, MsgSeq)>,
    /// Holds one unit of the session's credit (the client's receive maximum).
    credit: bool,
    /// PUBREC seen (QoS 2): PUBREL sent, waiting for PUBCOMP.
    released: bool,
    /// The QoS it went out with: the acknowledgement must be that QoS's.
    qos: u8,
}

/// A subscription's options (MQTT 5 §3.8.3.1). A persistent session's bindings carry them
/// as arguments, so the session is restored from its bindings after a restart; a session
/// that ends with its connection binds with none (as RabbitMQ's MQTT plugin did before
/// MQTT 5). The session rebuilds the arguments when it unbinds instead of keeping a second
/// copy: a `FieldTable` is a B-tree node of over 600 bytes, per subscription.
#[derive(Debug, Clone)]
struct Sub {
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    id: Option<u32>,
    bound: BoundArgs,
}

/// The arguments a subscription's binding was made with.
#[derive(Debug, Clone)]
enum BoundArgs {
    None,
    /// Those [`Sub::args`] builds from the options.
    Options,
    /// A restored binding's arguments that the options would not rebuild exactly (bound by
    /// hand over AMQP, say): unbinding needs them as they are.
    Odd(Box<FieldTable>),
}

impl Sub {
    fn from_args(args: FieldTable) -> Sub {
        let get = |k: &str| args.inner().get(k).and_then(warren_core::queue::int_value);
        let opts = get(SUB_OPTS_ARG).unwrap_or(0);
        let mut sub = Sub {
            qos: get(QOS_HEADER).unwrap_or(1).clamp(0, 2) as u8,
            no_local: opts & 1 != 0,
            retain_as_published: opts & 2 != 0,
            id: get(SUB_ID_ARG).and_then(|v| u32::try_from(v).ok()),
            bound: BoundArgs::Options,
        };
        if sub.args() != args {
            sub.bound = BoundArgs::Odd(Box::new(args));
        }
        sub
    }

    /// A new subscription; `persistent` sessions bind with the options as arguments.
    fn new(
        qos: u8,
        no_local: bool,
        retain_as_published: bool,
        id: Option<u32>,
        persistent: bool,
    ) -> Sub {
        Sub {
            qos,
            no_local,
            retain_as_published,
            id,
            bound: if persistent {
                BoundArgs::Options
            } else {
                BoundArgs::None
            },
        }
    }

    /// The binding's arguments, exactly as bound.
    fn args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        match &self.bound {
            BoundArgs::None => {}
            BoundArgs::Odd(odd) => args = (**odd).clone(),
            BoundArgs::Options => {
                args.insert(QOS_HEADER.into(), AMQPValue::ShortShortUInt(self.qos));
                let opts = u8::from(self.no_local) | (u8::from(self.retain_as_published) << 1);
                if opts != 0 {
                    args.insert(SUB_OPTS_ARG.into(), AMQPValue::ShortShortUInt(opts));
                }
                if let Some(id) = self.id {
                    args.insert(SUB_ID_ARG.into(), AMQPValue::LongUInt(id));
                }
            }
        }
        args
    }
}

/// A persistent session without a connection (see [`Shared::parked`]).
pub(crate) struct Parked {
    pub record: SessionRecord,
    /// Changes at every park, so a timer of an earlier disconnect does nothing.
    pub generation: u64,
}

/// A will waiting for its delay (MQTT 5 will delay interval).
struct PendingWill {
    msg: Arc<Message>,
    retain: bool,
    delay: Duration,
}

impl PendingWill {
    /// As the session record keeps it: due `delay` after `now` (unix ms).
    fn stored(&self, now: u64) -> StoredWill {
        StoredWill {
            due: now.saturating_add(self.delay.as_millis().min(u64::MAX as u128) as u64),
            retain: self.retain,
            message: self.msg.encode().to_vec(),
        }
    }

    /// A will read back from a session record at start-up; `None` if unreadable.
    fn from_stored(w: &StoredWill, now: u64) -> Option<PendingWill> {
        let msg = Message::decode(Bytes::from(w.message.clone())).ok()?;
        Some(PendingWill {
            msg: Arc::new(msg),
            retain: w.retain,
            delay: Duration::from_millis(w.due.saturating_sub(now)),
        })
    }
}

/// Its maps are `BTreeMap`s: 24 bytes and no allocation while empty (a `HashMap` is 48),
/// and they stay small; an idle connection keeps this struct for its whole life.
struct Session {
    /// Listed in the management API while it lives; its `closed()` is the API's close.
    registration: ConnectionGuard,
    /// The write check on `amq.topic` and the permission generation it was made at.
    publish_allowed: Option<(u64, bool)>,
    /// The user's topic permissions in the vhost with `{client_id}` expanded, and the
    /// permission generation they were read at.
    topic_perms: Option<(u64, Option<Arc<TopicPermissions>>)>,
    shared: Arc<Shared>,
    cfg: Arc<MqttConfig>,
    id: ConnectionId,
    peer: SocketAddr,
    /// 3 for MQTT 3.1 (decoded and answered as 3.1.1, with its DUP flags tolerated), 4, or 5.
    version: u8,
    client_id: String,
    vhost: Arc<VHost>,
    queue: Option<Arc<Queue>>,
    consumer: Option<ConsumerId>,
    outbox: Arc<Outbox>,
    /// Outbound QoS ≥ 1 deliveries in flight across all of this session's consumers,
    /// limited to the client's receive maximum (MQTT-3.3.4-9).
    credit: Arc<Credit>,
    out: BytesMut,
    /// A sorted vector: a device has one or a few subscriptions, and a `BTreeMap` node
    /// holds eleven entries (over 500 bytes) for the first.
    subscriptions: LiteMap<String, Sub>,
    /// Shared subscriptions, reserved packet ids and topic aliases, boxed: most sessions
    /// never have any, and four empty maps are 96 bytes of every idle connection.
    rare: Option<Box<Rare>>,
    inflight: BTreeMap<u16, Inflight>,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids between PUBREC and PUBREL (duplicates are not routed twice);
    /// at most the server's receive maximum.
    incoming_qos2: Vec<u16>,
    will: Option<PendingWill>,
    /// Seconds; 0 = the session ends with the connection, [`NEVER`] = it never expires.
    session_expiry: u32,
    /// The session expiry asked for in CONNECT (MQTT-3.14.2-2 forbids raising 0 later).
    connect_expiry: u32,
    keep_alive: u16,
    /// The client's Maximum Packet Size (MQTT-3.1.2-24); larger PUBLISHes are dropped.
    client_max_packet: usize,
    client_alias_max: u16,
}

/// A shared subscription `$share/<group>/<filter>` of a session (see [`shared_sub`]).
struct SharedSub {
    /// The group's queue and this session's consumer on it.
    queue: Arc<Queue>,
    consumer: ConsumerId,
    /// The granted QoS and the subscription identifier.
    qos: u8,
    id: Option<u32>,
}

/// The parts of a session that most sessions never use (see [`Session::rare`]).
#[derive(Default)]
struct Rare {
    /// Shared subscriptions by their full filter.
    shared_subs: BTreeMap<String, SharedSub>,
    /// Packet ids of PUBLISHes a previous connection of this session sent and never saw
    /// acknowledged, by session-queue seq: their redelivery reuses the id (MQTT-4.4.0-1).
    /// Cleared once the queue delivers a message that is not a redelivery.
    reserved_ids: BTreeMap<u64, u16>,
    /// Client → server topic aliases (at most `cfg.topic_alias_maximum`).
    topic_aliases: BTreeMap<u16, String>,
    /// Server → client topic aliases (at most min(client's maximum, 64)).
    out_aliases: BTreeMap<String, u16>,
}

impl Rare {
    /// Read access without allocating.
    fn of(rare: &Option<Box<Rare>>) -> &Rare {
        static NONE: Rare = Rare {
            shared_subs: BTreeMap::new(),
            reserved_ids: BTreeMap::new(),
            topic_aliases: BTreeMap::new(),
            out_aliases: BTreeMap::new(),
        };
        rare.as_deref().unwrap_or(&NONE)
    }

    /// Write access, allocating on first use.
    fn get(rare: &mut Option<Box<Rare>>) -> &mut Rare {
        rare.get_or_insert_with(Default::default)
    }
}

/// Serves one MQTT connection over any byte stream (TCP, or a WebSocket's binary frames).
///
/// Connecting runs once, in its own boxed future (freed when CONNECT is answered); the
/// task then keeps only what serving needs. One `async fn` holding both would keep the
/// arguments, the socket halves and the session twice for the connection's whole life
/// (moved-from locals of an async fn keep their slots): 1.9 KB instead of under 1 KB.
pub(crate) fn run<S>(
    accepted: Accepted<S>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connecting = Box::pin(connect(accepted));
    async move {
        let Some(Connected {
            mut session,
            mut deliveries,
            mut rd,
            mut wr,
            mut rbuf,
        }) = connecting.await
        else {
            return;
        };
        let end = session
            .serve(&mut rd, &mut wr, &mut rbuf, &mut deliveries)
            .await;
        let refused = matches!(end, End::ProtocolError);
        Box::pin(session.close(end)).await;
        Box::pin(warren_core::return_undelivered(&mut deliveries)).await;
        // Unregistered now: a takeover waiting for this connection to end goes on.
        drop(session);
        if refused {
            // The client sees the end at once (FIN after any DISCONNECT), as Mosquitto
            // closes at once; what it still sends is read and dropped (no reset).
            let _ = wr.shutdown().await;
            // Boxed: only connections that end in error pay for this future.
            Box::pin(linger(&mut rd, &mut rbuf)).await;
        }
    }
}

/// After the server ends a connection for a protocol error (with a 5.0 DISCONNECT), the
/// client may still be sending (PUBRELs for PUBRECs it is reading): its bytes are read
/// and dropped until it closes, for at most 2 s, so it reads the DISCONNECT instead of a
/// connection reset.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            buf.clear();
            if buf.capacity() == 0 {
                buf.reserve(512);
            }
            match rd.read_buf(buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A connection whose CONNECT was accepted.
struct Connected<S> {
    session: Session,
    deliveries: warren_core::Deliveries,
    rd: tokio::io::ReadHalf<S>,
    wr: tokio::io::WriteHalf<S>,
    rbuf: BytesMut,
}

/// A connection before CONNECT: what [`run`] starts from.
pub(crate) struct Accepted<S> {
    pub socket: S,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub auth: ConnectionAuth,
    pub shared: Arc<Shared>,
    pub cfg: Arc<MqttConfig>,
    pub shutdown: watch::Receiver<bool>,
}

/// Reads and answers CONNECT.
async fn connect<S>(a: Accepted<S>) -> Option<Connected<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        socket,
        peer,
        local,
        auth,
        shared,
        cfg,
        shutdown,
    } = a;
    let (mut rd, mut wr) = tokio::io::split(socket);
    // Small at first: an idle connection keeps this buffer (docs/PERFORMANCE.md); it grows
    // to the packet being read, bounded by `max_packet_size`.
    let mut rbuf = BytesMut::with_capacity(128);
    // MQTT-3.1.0-1: the first packet must be CONNECT, within the connect timeout.
    let connect = match tokio::time::timeout(cfg.connect_timeout, async {
        loop {
            match codec::decode(&mut rbuf, 0, cfg.max_packet_size) {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            match rd.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    })
    .await
    {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Err(CodecError::UnsupportedLevel(level))) => {
            // MQTT-3.1.2-2: CONNACK 0x01 (unacceptable protocol level), then close.
            tracing::debug!(%peer, level, "mqtt: unsupported protocol level");
            let _ = wr.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "mqtt: bad first packet");
            return None;
        }
        // MQTT-3.1.0-1: anything else first closes the connection.
        _ => return None,
    };
    let (session, deliveries) =
        connect_session(&mut wr, peer, local, &auth, shared, cfg, connect).await?;
    close_if_shutting_down(&session, &shutdown);
    Some(Connected {
        session,
        deliveries,
        rd,
        wr,
        rbuf,
    })
}

/// A connection registered after the shutdown sweep of `Shared::watch_shutdown` closes
/// itself: it registered before checking, and the sweep runs after the flag is set, so
/// one of the two sees the other.
fn close_if_shutting_down(session: &Session, shutdown: &watch::Receiver<bool>) {
    if *shutdown.borrow() {
        session.registration.entry().request_close(SHUTDOWN_REASON);
    }
}

/// Loads the persistent session records at start-up and restarts their expiry clocks; a
/// session whose expiry passed while the broker was down is deleted now.
pub(crate) fn recover_sessions(shared: &Arc<Shared>) {
    let records = match shared.broker.load_mqtt_sessions() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "mqtt session records could not be loaded");
            return;
        }
    };
    let now = now_ms();
    for (vhost, client_id, raw) in records {
        let Some(mut record) = SessionRecord::decode(&raw) else {
            tracing::warn!(%vhost, %client_id, "skipping unreadable mqtt session record");
            continue;
        };
        // Connected when the broker stopped: the session was left at the restart.
        if record.disconnected_at == 0 {
            record.disconnected_at = now;
        }
        let key = format!("{vhost}\0{client_id}");
        for sub in &record.shared_subs {
            shared.groups.recovered(&vhost, &client_id, &sub.filter);
        }
        let expiry = record.expiry;
        let left = record.disconnected_at;
        // A delayed will still pending at the stop goes when it is due (or now, if late).
        let will = record.will.as_ref().and_then(|w| {
            let will = PendingWill::from_stored(w, now);
            if will.is_none() {
                tracing::warn!(%vhost, %client_id, "skipping unreadable delayed will");
            }
            will
        });
        let generation = warren_core::ids::next_id();
        shared
            .parked
            .lock()
            .insert(key.clone(), Parked { record, generation });
        let wait = if expiry == NEVER {
            Duration::MAX
        } else {
            let deadline = left.saturating_add(expiry as u64 * 1000);
            Duration::from_millis(deadline.saturating_sub(now))
        };
        if will.is_some() || expiry != NEVER {
            spawn_park_timer(shared.clone(), vhost, client_id, generation, will, wait);
        }
    }
    // Group queues whose members all ended in a crash go; missing ones come back.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let shared = shared.clone();
        rt.spawn(async move { shared.groups.reconcile(&shared.broker).await });
    }
}

/// Ends an ended or discarded session's shared subscriptions (from its record).
async fn leave_groups(shared: &Shared, vhost: &VHost, client_id: &str, record: &SessionRecord) {
    let filters: Vec<&str> = record
        .shared_subs
        .iter()
        .map(|s| s.filter.as_str())
        .collect();
    shared.groups.leave(vhost, client_id, &filters).await;
}

/// After `expire_in`, deletes the parked session (queue, bindings, record) unless a
/// connection resumed it; first publishes `will` after its delay, likewise only if the
/// session is still parked (MQTT-3.1.3-9).
///
/// The timer holds only a `Weak` to the front-end while it sleeps, so a stopped broker
/// releases its store (a restart on the same data dir must find it unlocked).
fn spawn_park_timer(
    shared: Arc<Shared>,
    vhost: String,
    client_id: String,
    generation: u64,
    will: Option<PendingWill>,
    expire_in: Duration,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(&shared);
    drop(shared);
    let key = format!("{vhost}\0{client_id}");
    rt.spawn(async move {
        let still_parked = |shared: &Shared| {
            shared
                .parked
                .lock()
                .get(&key)
                .is_some_and(|p| p.generation == generation)
        };
        let start = tokio::time::Instant::now();
        if let Some(w) = will {
            // The will waits for its delay or the end of the session, whichever is first.
            let wait = w.delay.min(expire_in);
            tokio::time::sleep(wait).await;
            let Some(shared) = weak.upgrade() else { return };
            if !still_parked(&shared) {
                return;
            }
            let Some(vh) = shared.broker.vhost(&vhost) else {
                return;
            };
            publish_will(&shared, &vh, w.msg, w.retain).await;
            // Sent: the record must not send it again after a restart.
            let record = shared.parked.lock().get_mut(&key).and_then(|p| {
                p.record.will.take()?;
                Some(p.record.clone())
            });
            if let Some(r) = record {
                let _ = shared
                    .broker
                    .store_mqtt_session(&vhost, &client_id, Some(r.encode()))
                    .await;
            }
        }
        if expire_in == Duration::MAX {
            return;
        }
        tokio::time::sleep_until(start + expire_in).await;
        let Some(shared) = weak.upgrade() else { return };
        let ended = {
            let mut parked = shared.parked.lock();
            if parked.get(&key).is_none_or(|p| p.generation != generation) {
                return;
            }
            parked.remove(&key)
        };
        tracing::info!(%vhost, %client_id, "mqtt session expired");
        if let Some(vh) = shared.broker.vhost(&vhost) {
            let _ = vh
                .delete_queue(&queue_name(&client_id), None, false, false)
                .await;
            if let Some(p) = ended {
                leave_groups(&shared, &vh, &client_id, &p.record).await;
            }
        }
        let _ = shared
            .broker
            .store_mqtt_session(&vhost, &client_id, None)
            .await;
    });
}

/// Whether `user` may publish to the MQTT `topic` (a will): write on `amq.topic` and the
/// topic permission for its AMQP form, `{client_id}` expanded.
fn will_allowed(broker: &Broker, user: &str, vhost: &str, client_id: &str, topic: &str) -> bool {
    if broker
        .check_permission(
            user,
            vhost,
            Access::Write,
            ResourceKind::Exchange,
            TOPIC_EXCHANGE,
        )
        .is_err()
    {
        return false;
    }
    match broker.topic_permissions_of(vhost, user) {
        Some(tp) if tp.covers(TOPIC_EXCHANGE) => {
            tp.for_client(client_id)
                .allows(TOPIC_EXCHANGE, Access::Write, &topic::to_amqp(topic))
        }
        _ => true,
    }
}

async fn publish_will(shared: &Shared, vhost: &VHost, mut msg: Arc<Message>, retain: bool) {
    // MQTT 5 §3.1.3.2.4: a will's Message Expiry Interval counts from when it is published.
    if let Ok(Some(ttl)) = msg.expiration_ms() {
        let mut properties = msg.properties.clone();
        if let Some(h) = properties.headers.as_mut() {
            h.insert(
                EXPIRY_HEADER.into(),
                AMQPValue::LongLongInt((now_ms() + ttl) as i64),
            );
        }
        msg = Arc::new(Message::new(
            msg.exchange.clone(),
            msg.routing_key.clone(),
            properties,
            msg.body.clone(),
        ));
    }
    let topic_name = topic::to_mqtt(msg.routing_key.as_str());
    if retain {
        shared.retain(&vhost.name, &topic_name, msg.clone()).await;
    }
    let _ = vhost.publish("amq.topic", msg).await;
}

/// CONNECT handling (MQTT-3.1.4): checks, auth, takeover, the session queue, CONNACK.
async fn connect_session<W: AsyncWrite + Unpin>(
    socket: &mut W,
    peer: SocketAddr,
    local: SocketAddr,
    auth: &ConnectionAuth,
    shared: Arc<Shared>,
    cfg: Arc<MqttConfig>,
    c: Box<ConnectPacket>,
) -> Option<(Session, warren_core::Deliveries)> {
    // Taken boxed: moving out of the decoder's box in `run` would keep its allocation for
    // the connection's whole life; here it is freed when connecting ends.
    let c = *c;
    let level = c.protocol_version;
    // MQTT 3.1 (level 3) is decoded as 3.1.1 and answered as 3.1.1 (same CONNACK).
    let version = if level == 3 { 4 } else { level };
    let refuse = |code: ReasonCode| {
        let mut out = BytesMut::new();
        if version == 5 {
            codec::encode(&ConnAckPacket::new(false, code), &mut out);
        } else {
            codec::encode(&ConnAckPacket::new_v311(false, code), &mut out);
        }
        out
    };
    // MQTT-3.1.3-7/8: an empty client id needs a clean session (3.1.1); 5.0 assigns one.
    // MQTT 3.1 has no empty ids: identifier rejected, as Mosquitto answers. The 3.1 limit
    // of 23 characters is not enforced (as in RabbitMQ).
    let mut assigned = None;
    let client_id = if c.client_id.is_empty() {
        if (version == 4 && !c.clean_start) || level == 3 {
            let _ = socket
                .write_all(&refuse(ReasonCode::ClientIdentifierNotValid))
                .await;
            return None;
        }
        let id = assigned_client_id();
        assigned = Some(id.clone());
        id
    } else if c.client_id.contains('\0') {
        // NUL separates the parts of store keys.
        let _ = socket
            .write_all(&refuse(ReasonCode::ClientIdentifierNotValid))
            .await;
        return None;
    } else {
        c.client_id.clone()
    };
    // MQTT-4.7.3-1 / MQTT-3.3.2-2: a will topic is a topic name, at least one character and
    // no wildcards. Like Mosquitto, the connection closes without a CONNACK.
    if let Some(w) = &c.will {
        if w.topic.is_empty() || w.topic.contains(['+', '#']) {
            tracing::info!(%peer, topic = %w.topic, "mqtt will topic is not a valid topic name");
            return None;
        }
    }
    // Session lifetime: 3.1.1 clean session ↔ 5.0 clean start + session expiry interval
    // (MQTT-3.1.2-11: absent = 0; 0xFFFFFFFF = never).
    let session_expiry = if version == 5 {
        c.properties.get_session_expiry_interval().unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        NEVER
    };
    // MQTT-3.1.2-21/22 (5.0 §3.1.2.11): the client's limits on what it receives.
    let client_receive_max = c.properties.get_receive_maximum().unwrap_or(u16::MAX);
    let client_max_packet = c
        .properties
        .get_maximum_packet_size()
        .map(|m| m as usize)
        .unwrap_or(usize::MAX);
    if version == 5 && (client_receive_max == 0 || client_max_packet == 0) {
        // Receive Maximum / Maximum Packet Size 0 is a protocol error.
        let _ = socket.write_all(&refuse(ReasonCode::ProtocolError)).await;
        return None;
    }
    // MQTT-4.12.0-1: no enhanced authentication method is supported, so a CONNECT that
    // names one gets 0x8C Bad Authentication Method (as in Mosquitto without plugins).
    if version == 5 && c.properties.get_authentication_method().is_some() {
        tracing::info!(%peer, "mqtt enhanced authentication refused: no method supported");
        let _ = socket
            .write_all(&refuse(ReasonCode::BadAuthenticationMethod))
            .await;
        return None;
    }
    // Credentials: `vhost:user` selects the vhost, as RabbitMQ's MQTT plugin does; no
    // username means the client certificate's user (RabbitMQ's mqtt.ssl_cert_login),
    // else the configured default user (mqtt.default_user). A username always wins.
    // An empty user name without a password (or with an empty one) is no user name, as
    // Mosquitto takes it: some clients always set the flags.
    let username = c
        .username
        .as_ref()
        .filter(|u| !(u.is_empty() && c.password.as_deref().is_none_or(|p| p.is_empty())));
    let (vhost_name, user, pass) = match username {
        Some(u) => {
            let (vh, user) = match u.split_once(':') {
                Some((vh, user)) => (vh.to_owned(), user.to_owned()),
                None => (cfg.default_vhost.clone(), u.clone()),
            };
            let pass = c
                .password
                .as_deref()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            (vh, user, Some(pass))
        }
        None => match &auth.cert_user {
            Some(user) => (cfg.default_vhost.clone(), user.clone(), None),
            None if cfg.allow_anonymous => (
                cfg.default_vhost.clone(),
                cfg.default_user.clone(),
                Some(cfg.default_pass.clone()),
            ),
            None => {
                let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
                return None;
            }
        },
    };
    let login = match &pass {
        Some(pass) => shared.broker.authenticate(&user, pass, peer.ip()),
        None => shared.broker.authenticate_external(&user, peer.ip()),
    };
    // A refused login is CONNACK 4 / 0x86, as RabbitMQ's (its TLS tests expect the same
    // for a certificate user that does not exist).
    if let Err(e) = login {
        tracing::warn!(%peer, error = %e, "mqtt login refused");
        let _ = socket
            .write_all(&refuse(ReasonCode::BadUsernameOrPassword))
            .await;
        return None;
    }
    let Some(vhost) = shared.broker.vhost(&vhost_name) else {
        let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
        return None;
    };
    // No permissions in the vhost: CONNACK 5 / 0x87, as RabbitMQ's MQTT plugin.
    if shared
        .broker
        .check_vhost_access(&user, &vhost_name)
        .is_err()
    {
        tracing::warn!(%peer, %user, vhost = %vhost_name, "mqtt vhost access refused");
        let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
        return None;
    }
    // Vhost and user connection limits: 5.0 says so (0x97 Quota exceeded); 3.1.1 has only
    // "not authorised" (5), which RabbitMQ's MQTT plugin answers.
    if let Err(e) = shared.broker.check_connection_limits(&user, &vhost_name) {
        tracing::warn!(%peer, %user, vhost = %vhost_name, error = %e, "mqtt connection limit reached");
        let code = if version == 5 {
            ReasonCode::QuotaExceeded
        } else {
            ReasonCode::NotAuthorized
        };
        let _ = socket.write_all(&refuse(code)).await;
        return None;
    }
    // The will is a publish the client asks for now: RabbitMQ's MQTT plugin checks its
    // topic at CONNECT (write on amq.topic, then the topic permission) and answers
    // CONNACK 5 / 0x87.
    if let Some(w) = &c.will {
        if !will_allowed(&shared.broker, &user, &vhost_name, &client_id, &w.topic) {
            tracing::warn!(%peer, %user, topic = %w.topic, "mqtt will topic refused");
            let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
            return None;
        }
    }
    let id = ConnectionId::next();
    let registration = shared.broker.connections().register(ConnectionInfo {
        id,
        protocol: if version == 5 {
            "MQTT 5.0".into()
        } else {
            "MQTT 3.1.1".into()
        },
        user: user.clone(),
        vhost: vhost_name.clone(),
        peer,
        local,
        client_properties: warren_core::ClientProperties::plugin(
            "MQTT client",
            Some(client_id.as_str()),
        ),
        auth_mechanism: None,
        tuning: None,
        tls: auth.tls.clone(),
    });
    // Session takeover (MQTT-3.1.4-2): the older connection with this client id goes.
    let key = format!("{vhost_name}\0{client_id}");
    let previous = shared.sessions.lock().insert(key.clone(), id);
    let qname = queue_name(&client_id);
    if let Some(old) = previous {
        // Through the connection registry, like a close from the management API; the
        // reason tells the old connection to answer 0x8E.
        if let Some(e) = shared.broker.connections().get(old) {
            e.request_close(if c.clean_start {
                TAKEN_OVER_REASON
            } else {
                TAKEN_OVER_RESUMED
            });
        }
        // Wait for it to end (it may be closing already, for a DISCONNECT read before
        // this CONNECT): to release or delete its queue and hand over its session state
        // (parked below, even when it had no queue: MQTT-3.2.2-2). Bounded: a connection
        // stuck writing to a dead peer does not hold its client id for long.
        // It leaves the registry only after its close has released the session.
        for _ in 0..200 {
            if shared.broker.connections().get(old).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // A parked session is resumed (or, with clean start, discarded): its timers stop.
    let mut parked = shared.parked.lock().remove(&key);
    // One past its expiry is gone, though its timer may not have run yet (a reconnect in
    // that instant found it, 1 in 31 in a Mosquitto-suite loop): its will goes now, and
    // the session starts anew.
    let now = now_ms();
    let expired = |p: &mut Parked| {
        p.record.expiry != NEVER
            && now >= (p.record.disconnected_at).saturating_add(u64::from(p.record.expiry) * 1000)
    };
    if let Some(p) = parked.take_if(expired) {
        if let Some(w) = p
            .record
            .will
            .as_ref()
            .and_then(|w| PendingWill::from_stored(w, now))
        {
            publish_will(&shared, &vhost, w.msg, w.retain).await;
        }
        let _ = vhost.delete_queue(&qname, None, false, false).await;
        leave_groups(&shared, &vhost, &client_id, &p.record).await;
        let _ = shared
            .broker
            .store_mqtt_session(&vhost_name, &client_id, None)
            .await;
    }
    // MQTT-3.1.2-4 / 3.1.2-5: clean start discards any existing session.
    let parked_record = parked.is_some();
    let had_session = parked_record || vhost.queue(&qname).is_ok();
    let mut record = parked.map(|p| p.record).unwrap_or_default();
    if c.clean_start {
        let _ = vhost.delete_queue(&qname, None, false, false).await;
        leave_groups(&shared, &vhost, &client_id, &record).await;
        if had_session {
            let _ = shared
                .broker
                .store_mqtt_session(&vhost_name, &client_id, None)
                .await;
        }
        record = SessionRecord::default();
    }
    // The session queue exists once the session has subscribed (it is created on the
    // first SUBSCRIBE, as in RabbitMQ): a device that only publishes holds no queue.
    let existing = vhost.queue(&qname).ok().filter(|q| !q.is_deleted());
    let had_record = parked_record && !c.clean_start;
    let existed = existing.is_some() || had_record;
    if !existed {
        // A new session starts without QoS 2 state.
        record = SessionRecord::default();
    }
    // MQTT-3.2.2-2/3: Session Present only when an existing session is resumed. MQTT 3.1
    // has no such flag: the byte is reserved, 0.
    let session_present = !c.clean_start && existed && level != 3;
    let mut out = BytesMut::new();
    if version == 5 {
        // Only what differs from the defaults, as Mosquitto: absent Retain, Wildcard,
        // Subscription Identifier and Shared Subscription Available mean 1 (MQTT 5
        // §3.2.2.3), and a CONNACK of 16 bytes fits a client's small Maximum Packet Size
        // (Mosquitto's 12-prop-maximum-packet-size-publish sets 20). No Maximum QoS:
        // absent means QoS 2 is supported, and 2 is not a value the property may take
        // (§3.2.2.3.4; clients treat it as a protocol error).
        codec::encode_connack_v5(
            &codec::ConnAckV5 {
                session_present,
                topic_alias_maximum: cfg.topic_alias_maximum,
                assigned_client_id: assigned.as_deref(),
                receive_maximum: cfg.receive_maximum,
                maximum_packet_size: cfg.max_packet_size.min(u32::MAX as usize) as u32,
            },
            &mut out,
        );
    } else {
        let ack = ConnAckPacket::new_v311(session_present, ReasonCode::Success);
        codec::encode(&ack, &mut out);
    }
    // MQTT-3.1.2-24: nothing larger than the client's Maximum Packet Size is sent; without
    // its CONNACK the connection closes, as Mosquitto closes it.
    if out.len() > client_max_packet || socket.write_all(&out).await.is_err() {
        let mut sessions = shared.sessions.lock();
        if sessions.get(&key).is_some_and(|i| *i == id) {
            sessions.remove(&key);
        }
        return None;
    }
    let will = c.will.as_ref().and_then(|w| {
        let mut msg = mqtt_message(&w.topic, Bytes::from(w.payload.clone()), w.qos as u8)?;
        if version == 5 {
            let mut props = mqtt5_protocol::Properties::default();
            w.properties.apply_to_publish_properties(&mut props);
            map_v5_properties(&props, &mut msg.properties);
        }
        set_origin(&mut msg, &client_id, w.retain);
        Some(PendingWill {
            msg: Arc::new(msg),
            retain: w.retain,
            delay: Duration::from_secs(w.properties.will_delay_interval.unwrap_or(0) as u64),
        })
    });
    let credit = Arc::new(Credit::default());
    credit.limit.store(
        u32::from(client_receive_max.min(cfg.max_inflight).max(1)),
        std::sync::atomic::Ordering::Relaxed,
    );
    let (outbox, deliveries) = Outbox::new(cfg.max_inflight as usize * 2);
    let mut s = Session {
        registration,
        publish_allowed: None,
        topic_perms: None,
        shared,
        cfg: cfg.clone(),
        id,
        peer,
        // MQTT 3.1 sessions keep level 3 for the decoder's DUP leniency; everything else
        // treats them as 3.1.1.
        version: level.min(version),
        client_id,
        vhost,
        queue: None,
        consumer: None,
        outbox,
        credit,
        out: BytesMut::new(),
        subscriptions: LiteMap::new(),
        rare: None,
        inflight: BTreeMap::new(),
        next_pkid: 1,
        incoming_qos2: record.incoming_qos2.clone(),
        will,
        session_expiry,
        connect_expiry: session_expiry,
        keep_alive: c.keep_alive,
        client_max_packet,
        client_alias_max: if version == 5 && cfg.outbound_topic_aliases {
            c.properties.get_topic_alias_maximum().unwrap_or(0)
        } else {
            0
        },
    };
    if let Some(queue) = &existing {
        // Restore the subscriptions of a resumed session from its bindings.
        for (_, b) in s.vhost.bindings() {
            if matches!(&b.target, Target::Queue(q) if Arc::ptr_eq(q, queue)) {
                s.subscriptions.insert(
                    topic::filter_to_mqtt(b.routing_key.as_str()),
                    Sub::from_args(b.arguments.clone()),
                );
            }
        }
    }
    if existed {
        // Shared subscriptions are the group's bindings: the record names them.
        for sub in &record.shared_subs {
            if !s.join_shared(&sub.filter, sub.qos, sub.id).await {
                tracing::warn!(client_id = %s.client_id, filter = %sub.filter, "mqtt shared subscription not restored");
            }
        }
        // MQTT-4.4.0-1: unacknowledged PUBLISHes go again with their original ids.
        if !record.outgoing_unacked.is_empty() {
            Rare::get(&mut s.rare).reserved_ids = record.outgoing_unacked.iter().copied().collect();
        }
        // MQTT-4.4.0-1: PUBREL again for outbound QoS 2 messages the client has (PUBREC
        // seen) but whose PUBCOMP never came.
        for pkid in &record.outgoing_pubrel {
            s.inflight.insert(
                *pkid,
                Inflight {
                    queue: None,
                    credit: false,
                    released: true,
                    qos: 2,
                },
            );
            codec::encode(&PubRelPacket::new(*pkid), &mut s.out);
        }
    }
    if s.session_expiry > 0 {
        // Connected: the record says so (a crash counts from the restart).
        s.persist().await;
    } else if had_session && !c.clean_start {
        // Resumed with expiry 0: the session ends with this connection; its old record
        // (and any delayed will in it) must not outlive it in the store.
        let _ = s
            .shared
            .broker
            .store_mqtt_session(&s.vhost.name, &s.client_id, None)
            .await;
    }
    if let Some(queue) = existing {
        s.attach(queue).await;
    }
    tracing::info!(%peer, client_id = %s.client_id, level, session_expiry, session_present, "mqtt connection opened");
    Some((s, deliveries))
}

/// A client id for a 5.0 client that sent none (MQTT-3.1.3-6): `auto-` and a random UUID,
/// as Mosquitto assigns them.
fn assigned_client_id() -> String {
    let r: [u8; 16] = rand::random();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    format!(
        "auto-{}-{}-{}-{}-{}",
        hex(&r[..4]),
        hex(&r[4..6]),
        hex(&r[6..8]),
        hex(&r[8..10]),
        hex(&r[10..])
    )
}

/// The session queue: RabbitMQ's name, `mqtt-subscription-<client id>qos1`, while it fits
/// an AMQP short string. A longer client id (MQTT allows 65,535 bytes, and Mosquitto takes
/// them) keeps its first 180 bytes and adds a digest of the whole id, so the name stays
/// one per client id and readable in the management API.
fn queue_name(client_id: &str) -> String {
    let name = format!("mqtt-subscription-{client_id}qos1");
    if name.len() <= MAX_SHORT {
        return name;
    }
    let mut cut = 180;
    while !client_id.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = sha2::Sha256::digest(client_id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("mqtt-subscription-{}~{hex}qos1", &client_id[..cut])
}

/// Topic names and filters may have at most this many `/` (Mosquitto's hierarchy limit,
/// with its answers: DISCONNECT 0x81 for such a filter and 0x82 for such a PUBLISH, the
/// connection closed in 3.1.1).
/// It bounds the topic trie's work per message; the spec's limit is the 65,535-byte
/// string (MQTT-1.5.3), which the core carries whole (version 2 of the store's message
/// encoding; an AMQP 0-9-1 consumer sees the routing key cut to 255 bytes).
const MAX_TOPIC_DEPTH: usize = 200;

/// MQTT-4.7.1-2, -4.7.1-3, MQTT-4.7.3-1: wildcards only as whole levels, `#` last, not
/// empty. Anything else is a malformed SUBSCRIBE / UNSUBSCRIBE: DISCONNECT 0x81 (5.0) and
/// close, as Mosquitto (`handle_subscribe.c`), not a failure code in the SUBACK.
fn valid_filter(filter: &str) -> bool {
    mqtt5_protocol::is_valid_topic_filter(filter)
}

fn too_deep(topic: &str) -> bool {
    topic.bytes().filter(|b| *b == b'/').count() > MAX_TOPIC_DEPTH
}

/// A message published over MQTT, as the core carries it; `None` for a topic deeper than
/// [`MAX_TOPIC_DEPTH`].
fn mqtt_message(topic_name: &str, payload: Bytes, qos: u8) -> Option<Message> {
    if too_deep(topic_name) {
        return None;
    }
    let mut headers = FieldTable::default();
    headers.insert(QOS_HEADER.into(), AMQPValue::ShortShortUInt(qos));
    Some(Message::new(
        "amq.topic".into(),
        topic::to_amqp(topic_name).into(),
        Properties {
            headers: Some(headers),
            // QoS ≥ 1 messages are persistent, so durable sessions keep them.
            delivery_mode: Some(if qos > 0 { 2 } else { 1 }),
            ..Default::default()
        },
        payload,
    ))
}

/// Marks who published a message and whether with RETAIN (for no-local and
/// retain-as-published at delivery).
fn set_origin(msg: &mut Message, client_id: &str, retain: bool) {
    let h = msg
        .properties
        .headers
        .get_or_insert_with(FieldTable::default);
    // A long string: the AMQP field-table codec has no short-string values.
    h.insert(
        ORIGIN_HEADER.into(),
        AMQPValue::LongString(client_id.as_bytes().into()),
    );
    if retain {
        h.insert(RETAIN_HEADER.into(), AMQPValue::Boolean(true));
    }
}

fn header<'a>(m: &'a Message, k: &str) -> Option<&'a AMQPValue> {
    m.properties.headers.as_ref().and_then(|h| h.inner().get(k))
}

/// Seconds left of a message's expiry interval: `None` without one, `Some(0)` when expired.
fn remaining_expiry(m: &Message) -> Option<u32> {
    let at = warren_core::queue::int_value(header(m, EXPIRY_HEADER)?)? as u64;
    let now = now_ms();
    if at <= now {
        return Some(0);
    }
    Some(((at - now).div_ceil(1000)).min(u32::MAX as u64) as u32)
}

/// What a delivery is sent with.
struct Outgoing<'a> {
    /// The MQTT topic name, owned: it moves into the packet.
    topic: String,
    msg: &'a Message,
    qos: u8,
    retain: bool,
    dup: bool,
    /// The packet id to reuse (a redelivery, MQTT-4.4.0-1); `None` takes a fresh one.
    pkid: Option<u16>,
    /// The queue message it settles, and whether it holds a credit unit.
    track: Option<(Arc<Queue>, MsgSeq)>,
    sub_ids: Vec<u32>,
}

/// What is left of a packet after [`Session::handle_now`]: most QoS 0/1 PUBLISHes and
/// PUBACKs leave nothing; the rest is awaited in a boxed future ([`Session::handle_later`]).
enum Later {
    Done,
    Publish(PublishLater),
    /// Queue work after the locks (store deletes of acked persistent messages, …).
    FollowUps(Vec<FollowUp>),
    /// Packets handled only the awaiting way (SUBSCRIBE, PUBREL, DISCONNECT, …).
    Packet(Packet),
}

/// The part of a PUBLISH that needs an await.
enum PublishLater {
    /// Retained or QoS 2: stored before it is acknowledged, routed the awaiting way.
    Stored {
        msg: Arc<Message>,
        topic_name: String,
        retain: bool,
        qos: u8,
        packet_id: Option<u16>,
    },
    /// Routed; its enqueues need store writes or may be refused.
    Deliver {
        unfinished: warren_core::Unfinished,
        qos: u8,
        packet_id: Option<u16>,
    },
    /// Enqueued; the acknowledgement waits for the store's sync.
    Synced {
        ticket: warren_core::Ticket,
        routed: usize,
        qos: u8,
        packet_id: Option<u16>,
    },
}

impl Session {
    /// Before a taken-over connection ends, the PUBLISHes and the DISCONNECT its client
    /// already sent (read or waiting in the socket) are handled: a client that publishes,
    /// disconnects and connects again expects them handled in that order, as Mosquitto
    /// reads them. A DISCONNECT ends the connection as the client asked (its session
    /// expiry included), not as a takeover. Nothing else is acted on: the session now
    /// belongs to the newer connection.
    async fn drain_before_takeover<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        rbuf: &mut BytesMut,
    ) -> Option<End> {
        // A zero timeout still polls the read once: only what is already there.
        let _ = tokio::time::timeout(Duration::ZERO, rd.read_buf(rbuf)).await;
        while let Ok(Some(p)) = codec::decode(rbuf, self.version, self.cfg.max_packet_size) {
            let disconnect = matches!(p, Packet::Disconnect(_));
            if disconnect || matches!(p, Packet::Publish(_)) {
                let handled = Box::pin(self.handle(p)).await;
                if disconnect {
                    return handled.err();
                }
                if handled.is_err() {
                    return None;
                }
            }
        }
        None
    }

    async fn serve<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        rbuf: &mut BytesMut,
        deliveries: &mut warren_core::Deliveries,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // MQTT-3.1.2-24: one and a half keep-alive periods of silence. One timer, moved
        // forward only when it fires (not at every read), so an idle connection costs no
        // wake-ups until its keep-alive is due.
        let keep_alive = Duration::from_millis(self.keep_alive as u64 * 1500);
        let mut last_read = tokio::time::Instant::now();
        let keep_alive_timer = tokio::time::sleep(keep_alive);
        tokio::pin!(keep_alive_timer);
        let mut backlog = false;
        let mut room = ReadRoom::default();
        loop {
            // Packets that arrived with CONNECT.
            loop {
                let packet_type = rbuf.first().map_or(0, |b| b >> 4);
                match codec::decode(rbuf, self.version, self.cfg.max_packet_size) {
                    Ok(Some(p)) => {
                        let handled = match self.handle_packet(p) {
                            Ok(Some(later)) => later.await,
                            Ok(None) => Ok(()),
                            Err(end) => Err(end),
                        };
                        if let Err(end) = handled {
                            let _ = wr.write_all(&self.out).await;
                            return end;
                        }
                    }
                    Ok(None) => {
                        if !rbuf.is_empty() {
                            room.straddled();
                        }
                        break;
                    }
                    Err(e) => {
                        // As Mosquitto answers (see `protocol_error_quiet`): DISCONNECT
                        // for a packet over our Maximum Packet Size (MQTT 5 §4.13), a
                        // malformed PUBLISH / SUBSCRIBE / UNSUBSCRIBE (MQTT-1.5.5-1,
                        // MQTT-3.3.1-4) or a reserved packet type; other malformed
                        // packets and a bad remaining length just close.
                        let why = e.to_string();
                        match (e, packet_type) {
                            (CodecError::TooLarge { .. }, _) => {
                                self.protocol_error(rc::PACKET_TOO_LARGE, &why)
                            }
                            (CodecError::BadLength, _) => self.protocol_error_quiet(&why),
                            (_, 0) => self.protocol_error(rc::PROTOCOL_ERROR, &why),
                            (_, 3 | 8 | 10) => self.protocol_error(rc::MALFORMED, &why),
                            _ => self.protocol_error_quiet(&why),
                        }
                        let _ = wr.write_all(&self.out).await;
                        return End::ProtocolError;
                    }
                }
            }
            if !self.out.is_empty() {
                if wr.write_all(&self.out).await.is_err() {
                    return End::SocketClosed;
                }
                self.out.clear();
                // Do not keep a large write buffer on an idle connection.
                if self.out.capacity() > 64 * 1024 {
                    self.out = BytesMut::new();
                }
            }
            if rbuf.is_empty() && rbuf.capacity() > 64 * 1024 {
                *rbuf = BytesMut::with_capacity(128);
            } else {
                room.make(rbuf);
            }
            let spare = rbuf.capacity() - rbuf.len();
            tokio::select! {
                r = rd.read_buf(rbuf) => match r {
                    Ok(0) | Err(_) => return End::SocketClosed,
                    Ok(n) => {
                        room.read(n, spare);
                        last_read = tokio::time::Instant::now();
                    }
                },
                // Deliveries and outbox events wake this one branch.
                _ = deliveries.ready(), if !backlog => backlog = self.drain(deliveries).await,
                // The last drain stopped at a full write buffer: the rest wakes no one.
                _ = std::future::ready(()), if backlog => backlog = self.drain(deliveries).await,
                _ = &mut keep_alive_timer, if !keep_alive.is_zero() => {
                    if last_read.elapsed() >= keep_alive {
                        self.disconnect(rc::KEEP_ALIVE_TIMEOUT, "keep alive timeout");
                        let _ = wr.write_all(&self.out).await;
                        return End::KeepAliveTimeout;
                    }
                    keep_alive_timer.as_mut().reset(last_read + keep_alive);
                }
                // The management API's close, a takeover, or the server's shutdown.
                reason = self.registration.closed() => {
                    if reason == SHUTDOWN_REASON {
                        self.disconnect(rc::SHUTTING_DOWN, SHUTDOWN_REASON);
                        let _ = wr.write_all(&self.out).await;
                        return End::Shutdown;
                    }
                    if reason == TAKEN_OVER_REASON || reason == TAKEN_OVER_RESUMED {
                        if let Some(end) = self.drain_before_takeover(rd, rbuf).await {
                            return end;
                        }
                        // MQTT-3.1.4-3: DISCONNECT 0x8E to the connection taken over.
                        self.disconnect(rc::TAKEN_OVER, TAKEN_OVER_REASON);
                        let _ = wr.write_all(&self.out).await;
                        if reason == TAKEN_OVER_RESUMED && self.session_expiry != 0 {
                            return End::TakenOverResumed;
                        }
                        return End::TakenOver;
                    }
                    // Closed from the management API: 0x98 Administrative action (5.0).
                    self.disconnect(0x98, &reason);
                    let _ = wr.write_all(&self.out).await;
                    return End::AdminClosed;
                }
            }
        }
    }

    /// Writes waiting deliveries into the write buffer until it holds 64 KB, then handles
    /// the outbox's events (a queue stalled on the full outbox resumes once it drained);
    /// true when it stopped at 64 KB (more may be waiting).
    async fn drain(&mut self, deliveries: &mut warren_core::Deliveries) -> bool {
        let mut later = Vec::new();
        let more = loop {
            if self.out.len() >= 64 * 1024 {
                break true;
            }
            match deliveries.try_recv() {
                Ok(d) => self.deliver(d, &mut later),
                Err(_) => break false,
            }
        };
        FollowUp::run_all(later).await;
        for ev in self.outbox.take_events() {
            match ev {
                OutboxEvent::Stalled(q) => {
                    if let Some(q) = q.upgrade() {
                        Box::pin(q.resume(&self.outbox)).await
                    }
                }
                OutboxEvent::Cancelled(_) => {
                    self.consumer = None;
                    self.queue = None;
                }
            }
        }
        more
    }

    /// Queues a 5.0 DISCONNECT with `code`; nothing for 3.1.1, which has no server
    /// DISCONNECT. The reason goes to the log, not on the wire: Mosquitto sends the bare
    /// reason code (`e0 01 82`), and clients and test suites compare those bytes.
    fn disconnect(&mut self, code: u8, reason: &str) {
        if self.version != 5 {
            return;
        }
        tracing::debug!(client_id = %self.client_id, code, reason, "mqtt disconnect sent");
        let code = ReasonCode::from_u8(code).unwrap_or(ReasonCode::UnspecifiedError);
        codec::encode(&DisconnectPacket::new(code), &mut self.out);
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) of packet `id` with reason `code`: two bytes for
    /// success and always in 3.1.1 (which has no reason codes, so a refusal is a plain
    /// ack there); otherwise the code without properties, whose length is then left out
    /// (§3.4.2.2.1), 3 bytes, as Mosquitto sends them.
    fn ack_publish(&mut self, qos: u8, id: u16, code: u8) {
        let kind = if qos == 1 { 0x40 } else { 0x50 };
        let [hi, lo] = id.to_be_bytes();
        if code == 0 || self.version != 5 {
            self.out.extend_from_slice(&[kind, 2, hi, lo]);
        } else {
            self.out.extend_from_slice(&[kind, 3, hi, lo, code]);
        }
    }

    fn protocol_error(&mut self, code: u8, why: &str) {
        tracing::info!(peer = %self.peer, client_id = %self.client_id, error = why, "mqtt protocol error");
        self.disconnect(code, why);
    }

    /// A protocol error in a packet after which the connection just closes, without a
    /// DISCONNECT (MQTT 5 §4.13.1 leaves it to the server): Mosquitto 2.0 sends one only
    /// for errors in PUBLISH, SUBSCRIBE, UNSUBSCRIBE and unknown packet types
    /// (`read_handle.c`) and for a DISCONNECT raising the session expiry from 0, and its
    /// tests expect the socket to close at once after a second CONNECT, a wrong-kind
    /// acknowledgement or a server-to-client packet.
    fn protocol_error_quiet(&mut self, why: &str) {
        tracing::info!(peer = %self.peer, client_id = %self.client_id, error = why, "mqtt protocol error");
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id)
                && !Rare::of(&self.rare).reserved_ids.values().any(|r| *r == id)
            {
                return id;
            }
        }
    }

    /// Writes the session record (persistent sessions only); the ticket to wait for before
    /// telling the client anything that depends on it.
    async fn persist(&self) -> Option<warren_core::Ticket> {
        if self.session_expiry == 0 {
            return None;
        }
        let record = self.record(0);
        match self
            .shared
            .broker
            .store_mqtt_session(&self.vhost.name, &self.client_id, Some(record.encode()))
            .await
        {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "mqtt session record not stored");
                None
            }
        }
    }

    fn record(&self, disconnected_at: u64) -> SessionRecord {
        let mut outgoing_pubrel: Vec<u16> = self
            .inflight
            .iter()
            .filter(|(_, i)| i.released)
            .map(|(k, _)| *k)
            .collect();
        outgoing_pubrel.sort_unstable();
        let mut outgoing_unacked: Vec<(u64, u16)> = Rare::of(&self.rare)
            .reserved_ids
            .iter()
            .map(|(s, id)| (*s, *id))
            .collect();
        for (id, i) in &self.inflight {
            if let Some((q, seq)) = &i.queue {
                if self.is_own_queue(q) {
                    outgoing_unacked.push((seq.0, *id));
                }
            }
        }
        outgoing_unacked.sort_unstable();
        SessionRecord {
            expiry: self.session_expiry,
            disconnected_at,
            incoming_qos2: self.incoming_qos2.clone(),
            outgoing_pubrel,
            outgoing_unacked,
            will: None,
            shared_subs: Rare::of(&self.rare)
                .shared_subs
                .iter()
                .map(|(filter, s)| StoredShared {
                    filter: filter.clone(),
                    qos: s.qos,
                    id: s.id,
                })
                .collect(),
        }
    }

    async fn wait(&self, ticket: Option<warren_core::Ticket>) {
        if let Some(t) = ticket {
            let _ = self.shared.broker.store().wait_synced(t).await;
        }
    }

    /// Handles one packet; `Err` ends the connection. What needs an await comes back as
    /// a boxed future: the awaiting paths make a future of ~2.7 KB, which is neither
    /// built (and copied) for the common packets nor kept in the connection's task.
    #[allow(clippy::type_complexity)]
    fn handle_packet(
        &mut self,
        p: Packet,
    ) -> Result<
        Option<std::pin::Pin<Box<impl std::future::Future<Output = Result<(), End>> + '_>>>,
        End,
    > {
        Ok(match self.handle_now(p)? {
            Later::Done => None,
            later => Some(Box::pin(self.handle_later(later))),
        })
    }

    async fn handle(&mut self, p: Packet) -> Result<(), End> {
        match self.handle_packet(p)? {
            Some(later) => later.await,
            None => Ok(()),
        }
    }

    /// The part of handling a packet that needs no await.
    fn handle_now(&mut self, p: Packet) -> Result<Later, End> {
        Ok(match p {
            Packet::Publish(p) => match self.publish_now(p)? {
                Some(later) => Later::Publish(later),
                None => Later::Done,
            },
            Packet::PubAck(a) => {
                self.check_ack(a.packet_id, "PUBACK", |i| i.qos == 1)?;
                let later = self.settle_now(a.packet_id);
                if later.is_empty() {
                    Later::Done
                } else {
                    Later::FollowUps(later)
                }
            }
            p => Later::Packet(p),
        })
    }

    async fn handle_later(&mut self, later: Later) -> Result<(), End> {
        match later {
            Later::Done => Ok(()),
            Later::Publish(p) => self.publish_later(p).await,
            Later::FollowUps(f) => {
                FollowUp::run_all(f).await;
                Ok(())
            }
            Later::Packet(p) => self.handle_slow(p).await,
        }
    }

    /// The packets [`Session::handle_now`] leaves whole.
    async fn handle_slow(&mut self, p: Packet) -> Result<(), End> {
        match p {
            // Taken by `handle_now`; never here.
            Packet::Publish(_) | Packet::PubAck(_) => Ok(()),
            Packet::PubRec(r) => {
                self.check_ack(r.packet_id, "PUBREC", |i| i.qos == 2 && !i.released)?;
                // MQTT-4.3.3-? (method A): the message is the client's now: settle it in the
                // queue, remember the id (durably) until PUBCOMP, send PUBREL.
                let mut settle = None;
                if let Some(i) = self.inflight.get_mut(&r.packet_id) {
                    if r.reason_code.is_error() {
                        // 5.0: PUBREC ≥ 0x80 ends the exchange; the message is not redelivered.
                        let i = self.inflight.remove(&r.packet_id);
                        if let Some(i) = i {
                            self.finish_inflight(i, true).await;
                        }
                        return Ok(());
                    }
                    i.released = true;
                    settle = i.queue.take();
                }
                if let Some((q, seq)) = settle {
                    let t = self.persist().await;
                    self.wait(t).await;
                    q.ack(&[seq]).await;
                }
                codec::encode(&PubRelPacket::new(r.packet_id), &mut self.out);
                Ok(())
            }
            Packet::PubComp(c) => {
                self.check_ack(c.packet_id, "PUBCOMP", |i| i.qos == 2 && i.released)?;
                let was_released = self.inflight.get(&c.packet_id).is_some_and(|i| i.released);
                self.settle(c.packet_id).await;
                if was_released {
                    self.persist().await;
                }
                Ok(())
            }
            Packet::PubRel(r) => {
                // MQTT-4.3.3-10: release the packet id; PUBCOMP even if unknown. The record
                // without the id is synced first, or a restart could take the client's next
                // PUBLISH reusing this id for a duplicate.
                if let Some(pos) = self.incoming_qos2.iter().position(|i| *i == r.packet_id) {
                    self.incoming_qos2.swap_remove(pos);
                    let t = self.persist().await;
                    self.wait(t).await;
                }
                codec::encode(&PubCompPacket::new(r.packet_id), &mut self.out);
                Ok(())
            }
            Packet::Subscribe(s) => {
                let mut ack = if self.version == 5 {
                    SubAckPacket::new(s.packet_id)
                } else {
                    SubAckPacket::new_v311(s.packet_id)
                };
                // MQTT 5 §3.8.2.1.2: one subscription identifier per SUBSCRIBE; 0 is a
                // protocol error.
                let sub_id = s.properties.get_subscription_identifier();
                if sub_id == Some(0) {
                    self.protocol_error(rc::PROTOCOL_ERROR, "subscription identifier 0");
                    return Err(End::ProtocolError);
                }
                if s.filters.iter().any(|f| too_deep(&f.filter)) {
                    let why = format!("topic filter with more than {MAX_TOPIC_DEPTH} levels");
                    self.protocol_error(rc::MALFORMED, &why);
                    return Err(End::ProtocolError);
                }
                if !s.filters.iter().all(|f| valid_filter(&f.filter)) {
                    self.protocol_error(rc::MALFORMED, "invalid subscription string");
                    return Err(End::ProtocolError);
                }
                let mut retained = Vec::new();
                for f in &s.filters {
                    let code = self.subscribe(f, sub_id, &mut retained).await;
                    ack = ack.add_reason_code(code);
                }
                codec::encode(&ack, &mut self.out);
                for (t, m, qos, ids) in retained {
                    // MQTT-3.3.1-8: retained messages sent for a new subscription have
                    // RETAIN set.
                    self.send_publish(Outgoing {
                        topic: t,
                        msg: &m,
                        qos,
                        retain: true,
                        dup: false,
                        pkid: None,
                        track: None,
                        sub_ids: ids,
                    });
                }
                Ok(())
            }
            Packet::Unsubscribe(u) => {
                let mut ack = if self.version == 5 {
                    UnsubAckPacket::new(u.packet_id)
                } else {
                    UnsubAckPacket::new_v311(u.packet_id)
                };
                if !u.filters.iter().all(|f| valid_filter(f)) {
                    self.protocol_error(rc::MALFORMED, "invalid unsubscription string");
                    return Err(End::ProtocolError);
                }
                let mut shared_left = false;
                for f in u.filters {
                    if let Some(s) = self.rare.as_mut().and_then(|r| r.shared_subs.remove(&f)) {
                        s.queue.remove_consumer(s.consumer).await;
                        self.shared
                            .groups
                            .leave(&self.vhost, &self.client_id, &[f.as_str()])
                            .await;
                        shared_left = true;
                        if self.version == 5 {
                            ack.reason_codes.push(UnsubAckReasonCode::Success);
                        }
                        continue;
                    }
                    let existed = self.subscriptions.remove(&f);
                    if let (Some(q), Some(sub)) = (&self.queue, &existed) {
                        let _ = self
                            .vhost
                            .unbind(
                                "amq.topic",
                                Target::Queue(q.clone()),
                                &topic::to_amqp(&f),
                                &sub.args(),
                            )
                            .await;
                    }
                    if self.version == 5 {
                        ack.reason_codes.push(if existed.is_some() {
                            UnsubAckReasonCode::Success
                        } else {
                            UnsubAckReasonCode::NoSubscriptionExisted
                        });
                    }
                }
                if shared_left {
                    // The record lists shared subscriptions: UNSUBACK once it is stored.
                    let t = self.persist().await;
                    self.wait(t).await;
                }
                codec::encode(&ack, &mut self.out);
                Ok(())
            }
            Packet::PingReq => {
                codec::encode_pingresp(&mut self.out);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if self.version == 5 {
                    if let Some(e) = d.properties.get_session_expiry_interval() {
                        // MQTT-3.14.2-2: a session expiry of 0 at CONNECT cannot be raised.
                        if self.connect_expiry == 0 && e != 0 {
                            self.protocol_error(
                                rc::PROTOCOL_ERROR,
                                "session expiry raised from 0 at DISCONNECT",
                            );
                            return Err(End::ProtocolError);
                        }
                        self.session_expiry = e;
                    }
                }
                // MQTT-3.14.4-3: no will after DISCONNECT; 5.0 reason 0x04 asks for it.
                if d.reason_code == ReasonCode::DisconnectWithWillMessage {
                    return Err(End::NormalWithWill);
                }
                self.will = None;
                Err(End::Normal)
            }
            // MQTT-3.1.0-2: a second CONNECT is a protocol error.
            Packet::Connect(_) => {
                self.protocol_error_quiet("second CONNECT");
                Err(End::ProtocolError)
            }
            other => {
                // Server-to-client packets (CONNACK, SUBACK, …) from a client; AUTH is not
                // supported (no authentication method was agreed).
                let why = format!("unexpected {}", other.packet_type_name());
                self.protocol_error_quiet(&why);
                Err(End::ProtocolError)
            }
        }
    }

    async fn subscribe(
        &mut self,
        f: &TopicFilter,
        sub_id: Option<u32>,
        retained: &mut Vec<(String, Arc<Message>, u8, Vec<u32>)>,
    ) -> SubAckReasonCode {
        let filter = f.filter.as_str();
        let o = &f.options;
        let invalid = if self.version == 5 {
            SubAckReasonCode::TopicFilterInvalid
        } else {
            SubAckReasonCode::UnspecifiedError
        };
        let qos = (o.qos as u8).min(2);
        // Subscribing binds to amq.topic: read on the exchange (RabbitMQ's check).
        // And RabbitMQ's topic authorisation on the filter (without `$share/<group>/`).
        let plain = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
            None => filter,
        };
        if !self.may_use_topic_exchange(Access::Read) || !self.topic_allowed(Access::Read, plain) {
            return if self.version == 5 {
                SubAckReasonCode::NotAuthorized
            } else {
                SubAckReasonCode::UnspecifiedError
            };
        }
        if filter.starts_with("$share/") {
            // MQTT-3.8.3-4: no-local on a shared subscription is a protocol error; refuse
            // the filter rather than the connection.
            if o.no_local {
                return invalid;
            }
            return self.subscribe_shared(filter, qos, sub_id).await;
        }
        let Some(q) = self.ensure_queue().await else {
            return SubAckReasonCode::UnspecifiedError;
        };
        let key = topic::to_amqp(filter);
        let sub = Sub::new(
            qos,
            o.no_local,
            o.retain_as_published,
            sub_id,
            q.is_stored(),
        );
        // Re-subscribing replaces the subscription (MQTT-3.8.4-3): one binding per filter.
        let previous = self.subscriptions.get(filter).cloned();
        if let Some(prev) = &previous {
            let _ = self
                .vhost
                .unbind("amq.topic", Target::Queue(q.clone()), &key, &prev.args())
                .await;
        }
        if let Err(e) = self
            .vhost
            .bind(
                "amq.topic",
                Target::Queue(q),
                key.as_str().into(),
                sub.args(),
            )
            .await
        {
            tracing::warn!(error = %e, "mqtt subscribe failed");
            return SubAckReasonCode::UnspecifiedError;
        }
        if self.subscriptions.is_empty() {
            // Room for one, not four: most devices subscribe to one filter.
            self.subscriptions = LiteMap::with_capacity(1);
        }
        self.subscriptions.insert(filter.to_owned(), sub);
        // MQTT 5 §3.8.3.1 retain handling: 0 always, 1 only for a new subscription, 2
        // never (3.1.1: always).
        let send_retained = match o.retain_handling as u8 {
            0 => true,
            1 => previous.is_none(),
            _ => false,
        };
        if send_retained {
            for (t, m) in self.shared.retained_matching(&self.vhost.name, filter) {
                if remaining_expiry(&m) == Some(0) {
                    continue;
                }
                let mq = msg_qos(&m).min(qos);
                retained.push((t, m, mq, sub_id.into_iter().collect()));
            }
        }
        granted(qos)
    }

    /// The session queue, declared on first use: exclusive and auto-delete for a session
    /// that ends with the connection, durable for a persistent one.
    async fn ensure_queue(&mut self) -> Option<Arc<Queue>> {
        if let Some(q) = self.queue.as_ref().filter(|q| !q.is_deleted()) {
            return Some(q.clone());
        }
        let persistent = self.session_expiry > 0;
        let declared = self
            .vhost
            .declare_queue(
                QueueDecl {
                    name: queue_name(&self.client_id).as_str().into(),
                    passive: false,
                    durable: persistent,
                    exclusive: !persistent,
                    auto_delete: !persistent,
                    arguments: FieldTable::default(),
                },
                self.id,
            )
            .await;
        match declared {
            Ok((q, _)) => {
                self.attach(q.clone()).await;
                Some(q)
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, client_id = %self.client_id, error = %e, "mqtt session queue unavailable");
                None
            }
        }
    }

    /// A consumer of this session (acknowledged deliveries, credit shared by the session).
    fn consumer_spec(&self, tag: &str) -> (ConsumerId, ConsumerSpec) {
        let id = ConsumerId::next();
        let spec = ConsumerSpec {
            id,
            tag: Arc::from(tag),
            token: 0,
            owner: self.id,
            no_ack: false,
            exclusive: false,
            priority: 0,
            prefetch: 0,
            channel_credit: self.credit.clone(),
            outbox: self.outbox.clone(),
            stream_start: None,
            arguments: Default::default(),
        };
        (id, spec)
    }

    /// Makes `queue` the session queue and consumes from it.
    async fn attach(&mut self, queue: Arc<Queue>) {
        let (consumer, spec) = self.consumer_spec("mqtt");
        if queue.add_consumer(spec).await.is_ok() {
            self.consumer = Some(consumer);
        }
        self.queue = Some(queue);
    }

    /// A PUBLISH up to where it needs an await: checked, routed and, for a QoS 0/1
    /// message whose enqueues write nothing to the store, acknowledged. Retained and
    /// QoS 2 messages, and enqueues that need the store, come back as [`PublishLater`].
    fn publish_now(&mut self, mut p: PublishPacket) -> Result<Option<PublishLater>, End> {
        let qos = p.qos as u8;
        let mut topic_name = std::mem::take(&mut p.topic_name);
        if self.version == 5 {
            if let Some(alias) = p.properties.get_topic_alias() {
                // MQTT-3.3.2-8/9: alias 0 or above our Topic Alias Maximum.
                if alias == 0 || alias > self.cfg.topic_alias_maximum {
                    self.protocol_error(rc::TOPIC_ALIAS_INVALID, "topic alias out of range");
                    return Err(End::ProtocolError);
                }
                if topic_name.is_empty() {
                    match Rare::of(&self.rare).topic_aliases.get(&alias) {
                        Some(t) => topic_name = t.clone(),
                        None => {
                            // MQTT-3.3.4-? : an alias never set is a protocol error.
                            self.protocol_error(rc::PROTOCOL_ERROR, "unknown topic alias");
                            return Err(End::ProtocolError);
                        }
                    }
                } else {
                    Rare::get(&mut self.rare)
                        .topic_aliases
                        .insert(alias, topic_name.clone());
                }
            }
        }
        // MQTT-3.3.2-2: no wildcards in a topic name; MQTT-4.7.3-1: not empty.
        if !mqtt5_protocol::is_valid_topic_name(&topic_name) {
            let why = format!("invalid topic name {topic_name:?}");
            self.protocol_error(rc::TOPIC_NAME_INVALID, &why);
            return Err(End::ProtocolError);
        }
        if qos == 2 {
            if let Some(id) = p.packet_id {
                if self.incoming_qos2.contains(&id) {
                    // A duplicate before PUBREL: acknowledged, not routed again (exactly once,
                    // MQTT-4.3.3-? method B); this survives restarts through the record.
                    codec::encode(&PubRecPacket::new(id), &mut self.out);
                    return Ok(None);
                }
                // MQTT-3.3.4-8: more unreleased QoS 2 publishes than our Receive Maximum.
                // 3.1.1 has no such limit; its 16-bit packet ids bound the set anyway.
                if self.version == 5
                    && self.incoming_qos2.len() >= self.cfg.receive_maximum as usize
                {
                    self.protocol_error(rc::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded");
                    return Err(End::ProtocolError);
                }
            }
        }
        // Publishing needs write on amq.topic (RabbitMQ's MQTT plugin). 5.0 answers a
        // QoS ≥ 1 publish with 0x87 and drops it; 3.1.1 has no negative ack, so the
        // connection closes, as in RabbitMQ.
        // Topic permissions on the routing key answer the same way (RabbitMQ's MQTT plugin).
        if !self.may_publish() || !self.topic_allowed(Access::Write, &topic_name) {
            tracing::info!(client_id = %self.client_id, user = %self.user(), topic = %topic_name, "mqtt publish refused: no write permission");
            if self.version != 5 {
                return Err(End::ProtocolError);
            }
            if let Some(id) = p.packet_id {
                self.ack_publish(qos, id, rc::NOT_AUTHORIZED);
            }
            return Ok(None);
        }
        // Clients may not publish to `$SYS/` (but a bridge's connection state topic) or
        // to `$share/` names, as Mosquitto refuses them: 0x87 in 5.0, dropped
        // with a plain acknowledgement in 3.1.1.
        if reserved_topic(&topic_name) {
            tracing::debug!(client_id = %self.client_id, topic = %topic_name, "mqtt publish to a reserved topic dropped");
            if let Some(id) = p.packet_id {
                self.ack_publish(qos, id, rc::NOT_AUTHORIZED);
            }
            return Ok(None);
        }
        let Some(mut msg) = mqtt_message(&topic_name, p.payload.clone(), qos) else {
            let why = format!("topic name with more than {MAX_TOPIC_DEPTH} levels");
            // Mosquitto 2.0's answer (03-publish-long-topic).
            self.protocol_error(rc::PROTOCOL_ERROR, &why);
            return Err(End::ProtocolError);
        };
        if self.version == 5 {
            map_v5_properties(&p.properties, &mut msg.properties);
        }
        set_origin(&mut msg, &self.client_id, p.retain);
        let msg = Arc::new(msg);
        let packet_id = p.packet_id;
        if p.retain || qos == 2 {
            return Ok(Some(PublishLater::Stored {
                msg,
                topic_name,
                retain: p.retain,
                qos,
                packet_id,
            }));
        }
        let delivered = self
            .vhost
            .exchange("amq.topic")
            .and_then(|x| self.vhost.deliver_now(self.vhost.route(&x, &msg), msg));
        Ok(match delivered {
            Ok(Ok(o)) => match o.ticket {
                // PUBACK only once a durable copy is synced.
                Some(ticket) if qos > 0 => Some(PublishLater::Synced {
                    ticket,
                    routed: o.routed,
                    qos,
                    packet_id,
                }),
                _ => {
                    self.acknowledge_publish(qos, packet_id, o.routed);
                    None
                }
            },
            Ok(Err(unfinished)) => Some(PublishLater::Deliver {
                unfinished,
                qos,
                packet_id,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "mqtt publish failed");
                self.acknowledge_publish(qos, packet_id, 0);
                None
            }
        })
    }

    /// The awaiting rest of a PUBLISH (see [`Session::publish_now`]).
    async fn publish_later(&mut self, later: PublishLater) -> Result<(), End> {
        let (ticket, routed, qos, packet_id) = match later {
            PublishLater::Stored {
                msg,
                topic_name,
                retain,
                qos,
                packet_id,
            } => {
                let retained_ticket = if retain {
                    self.shared
                        .retain(&self.vhost.name, &topic_name, msg.clone())
                        .await
                } else {
                    None
                };
                let (mut ticket, routed) = match self.vhost.publish("amq.topic", msg).await {
                    Ok(o) => (o.ticket.max(retained_ticket), o.routed),
                    Err(e) => {
                        tracing::warn!(error = %e, "mqtt publish failed");
                        (retained_ticket, 0)
                    }
                };
                if qos == 2 {
                    if let Some(id) = packet_id {
                        self.incoming_qos2.push(id);
                        ticket = ticket.max(self.persist().await);
                    }
                }
                (ticket, routed, qos, packet_id)
            }
            PublishLater::Deliver {
                unfinished,
                qos,
                packet_id,
            } => match self.vhost.finish_delivery(unfinished).await {
                Ok(o) => (o.ticket, o.routed, qos, packet_id),
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt publish failed");
                    (None, 0, qos, packet_id)
                }
            },
            PublishLater::Synced {
                ticket,
                routed,
                qos,
                packet_id,
            } => (Some(ticket), routed, qos, packet_id),
        };
        if qos > 0 {
            // PUBACK/PUBREC only once a durable copy (and the QoS 2 id) is synced.
            self.wait(ticket).await;
        }
        self.acknowledge_publish(qos, packet_id, routed);
        Ok(())
    }

    /// PUBACK / PUBREC for a routed QoS 1 / 2 PUBLISH.
    fn acknowledge_publish(&mut self, qos: u8, packet_id: Option<u16>, routed: usize) {
        if let (1 | 2, Some(id)) = (qos, packet_id) {
            // MQTT 5 §3.4.2.1: 0x10 tells the sender nobody was subscribed (accepted all
            // the same), as Mosquitto answers a QoS 1 PUBLISH (its PUBREC stays plain).
            let code = if routed == 0 && qos == 1 {
                rc::NO_MATCHING_SUBSCRIBERS
            } else {
                0
            };
            self.ack_publish(qos, id, code);
        }
    }

    /// `$share/<group>/<filter>`: competing consumers on one queue per group and filter
    /// (MQTT 5 §4.8.2, see [`shared_sub`]). No retained messages are sent for it (MQTT 5
    /// §4.8.2). A persistent session's record lists it, stored before the SUBACK.
    async fn subscribe_shared(
        &mut self,
        full: &str,
        qos: u8,
        sub_id: Option<u32>,
    ) -> SubAckReasonCode {
        // MQTT-4.8.2-1/2: a non-empty group name without wildcards, then a filter.
        let parts = shared_sub::split(full);
        if parts
            .and_then(|(g, f)| shared_sub::queue_name(g, f))
            .is_none()
        {
            return if self.version == 5 {
                SubAckReasonCode::TopicFilterInvalid
            } else {
                SubAckReasonCode::UnspecifiedError
            };
        }
        if !self.join_shared(full, qos, sub_id).await {
            return SubAckReasonCode::UnspecifiedError;
        }
        let t = self.persist().await;
        self.wait(t).await;
        granted(qos)
    }

    /// Joins the group of `full` and consumes from its queue: a new subscription, one
    /// that replaces it (MQTT-3.8.4-3), or one restored with its session.
    async fn join_shared(&mut self, full: &str, qos: u8, id: Option<u32>) -> bool {
        if let Some(old) = self.rare.as_mut().and_then(|r| r.shared_subs.remove(full)) {
            old.queue.remove_consumer(old.consumer).await;
        }
        let groups = &self.shared.groups;
        let persistent = self.session_expiry > 0;
        let joined = groups
            .join(&self.vhost, self.id, &self.client_id, full, persistent)
            .await;
        if let Some(queue) = joined {
            let (consumer, spec) = self.consumer_spec("mqtt-shared");
            if queue.add_consumer(spec).await.is_ok() {
                Rare::get(&mut self.rare).shared_subs.insert(
                    full.to_owned(),
                    SharedSub {
                        queue,
                        consumer,
                        qos,
                        id,
                    },
                );
                return true;
            }
        }
        groups.leave(&self.vhost, &self.client_id, &[full]).await;
        false
    }

    /// Writes a delivery from the session queue (or a shared-subscription queue) as PUBLISH:
    /// once per message however many subscriptions match (MQTT-3.3.4-2), at the highest
    /// granted QoS, with every matching subscription identifier (MQTT-3.3.4-3).
    /// Writes one delivery into the write buffer; the queue work it leaves that needs an
    /// await is added to `later`.
    fn deliver(&mut self, d: Delivery, later: &mut Vec<FollowUp>) {
        let t = topic::to_mqtt(d.message.routing_key.as_str());
        let mut granted_qos = None;
        let mut sub_ids = Vec::new();
        let mut rap = false;
        if let Some(s) = Rare::of(&self.rare)
            .shared_subs
            .values()
            .find(|s| s.consumer == d.consumer && Arc::ptr_eq(&s.queue, &d.queue))
        {
            granted_qos = Some(s.qos);
            sub_ids.extend(s.id);
        } else {
            let from_self = matches!(header(&d.message, ORIGIN_HEADER),
                Some(AMQPValue::LongString(o)) if o.as_bytes() == self.client_id.as_bytes());
            // MQTT-4.7.2-1 ($-topics and leading wildcards) is applied here too: the AMQP
            // binding `#` matches `$SYS.x`, the MQTT filter `#` does not.
            for (f, s) in &self.subscriptions {
                if !topic::matches(f, &t) || (s.no_local && from_self) {
                    continue;
                }
                granted_qos = Some(granted_qos.unwrap_or(0).max(s.qos));
                sub_ids.extend(s.id);
                rap |= s.retain_as_published;
            }
            // In the order the client numbered its subscriptions, not the filters' order
            // (Paho C's test10/test11 expect 1 then 2).
            sub_ids.sort_unstable();
        }
        let expired = remaining_expiry(&d.message) == Some(0);
        let Some(granted_qos) = granted_qos.filter(|_| !expired) else {
            // No subscription wants it (no-local, `$` topic, literal `*`), or it expired.
            self.give_back_now(1, later);
            later.extend(d.queue.ack_now(&[d.seq]));
            return;
        };
        let qos = msg_qos(&d.message).min(granted_qos);
        // MQTT-3.3.1-12/13: RETAIN is kept only for retain-as-published subscriptions.
        let retain = rap
            && matches!(
                header(&d.message, RETAIN_HEADER),
                Some(AMQPValue::Boolean(true))
            );
        let msg = d.message.clone();
        if qos == 0 {
            self.give_back_now(1, later);
            later.extend(d.queue.ack_now(&[d.seq]));
            self.send_publish(Outgoing {
                topic: t,
                msg: &msg,
                qos: 0,
                retain,
                dup: false,
                pkid: None,
                track: None,
                sub_ids,
            });
        } else {
            let pkid = self.reused_pkid(&d);
            let sent = self.send_publish(Outgoing {
                topic: t,
                msg: &msg,
                qos,
                retain,
                dup: d.redelivered,
                pkid,
                track: Some((d.queue.clone(), d.seq)),
                sub_ids,
            });
            if !sent {
                self.give_back_now(1, later);
                later.extend(d.queue.ack_now(&[d.seq]));
            }
        }
    }

    /// The original packet id of a redelivery from the session queue (MQTT-4.4.0-1). A
    /// first delivery means the redeliveries are through (requeued messages go first), so
    /// the ids left reserved are of messages gone otherwise (expired, purged) and are freed.
    fn reused_pkid(&mut self, d: &Delivery) -> Option<u16> {
        if Rare::of(&self.rare).reserved_ids.is_empty() || !self.is_own_queue(&d.queue) {
            return None;
        }
        if !d.redelivered {
            if let Some(r) = self.rare.as_mut() {
                r.reserved_ids.clear();
            }
            return None;
        }
        self.rare
            .as_mut()
            .and_then(|r| r.reserved_ids.remove(&d.seq.0))
    }

    /// The authenticated user, for permission checks (kept once, in the registry entry).
    fn user(&self) -> &str {
        &self.registration.entry().info.user
    }

    fn is_own_queue(&self, q: &Arc<Queue>) -> bool {
        self.queue.as_ref().is_some_and(|own| Arc::ptr_eq(own, q))
    }

    /// Returns credit units; if the session was at the client's receive maximum, its
    /// queues may deliver again. The queue work that needs an await is added to `later`.
    fn give_back_now(&mut self, n: u32, later: &mut Vec<FollowUp>) {
        if self.credit.give_back(n) {
            if let Some(q) = &self.queue {
                later.extend(q.kick_now());
            }
            for s in Rare::of(&self.rare).shared_subs.values() {
                later.extend(s.queue.kick_now());
            }
        }
    }

    /// Encodes a PUBLISH; false if it was dropped: over the client's Maximum Packet Size
    /// (MQTT-3.1.2-25: discarded as if sent), or a topic MQTT cannot carry.
    fn send_publish(&mut self, o: Outgoing<'_>) -> bool {
        let q = match o.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let payload = o.msg.body.clone();
        let mut new_alias = None;
        let mut p = if self.version == 5 {
            let mut p = PublishPacket::new(o.topic, payload, q);
            v5_properties_of(o.msg, &mut p);
            if let Some(secs) = remaining_expiry(o.msg) {
                p.properties.set_message_expiry_interval(secs.max(1));
            }
            for id in &o.sub_ids {
                p.properties.set_subscription_identifier(*id);
            }
            // Server → client topic aliases when the client allows them (MQTT 5 §3.3.2.3.4).
            if self.client_alias_max > 0 {
                if let Some(a) = Rare::of(&self.rare).out_aliases.get(&p.topic_name) {
                    p.properties.set_topic_alias(*a);
                    p.topic_name.clear();
                } else if Rare::of(&self.rare).out_aliases.len()
                    < self.client_alias_max.min(64) as usize
                {
                    let a = Rare::of(&self.rare).out_aliases.len() as u16 + 1;
                    p.properties.set_topic_alias(a);
                    new_alias = Some(a);
                }
            }
            p
        } else {
            PublishPacket::new_v311(o.topic, payload, q)
        };
        p = p.with_retain(o.retain).with_dup(o.dup && o.qos > 0);
        let id = if o.qos > 0 {
            let id = o
                .pkid
                .filter(|id| !self.inflight.contains_key(id))
                .unwrap_or_else(|| self.next_pkid());
            p = p.with_packet_id(id);
            Some(id)
        } else {
            None
        };
        let before = self.out.len();
        if !codec::encode_publish(&p, &mut self.out) {
            return false;
        }
        if self.out.len() - before > self.client_max_packet {
            self.out.truncate(before);
            tracing::debug!(client_id = %self.client_id, "publish larger than the client's maximum packet size dropped");
            return false;
        }
        if let Some(a) = new_alias {
            Rare::get(&mut self.rare)
                .out_aliases
                .insert(p.topic_name, a);
        }
        if let Some(id) = id {
            let credit = o.track.is_some();
            self.inflight.insert(
                id,
                Inflight {
                    queue: o.track,
                    credit,
                    released: false,
                    qos: o.qos,
                },
            );
        }
        true
    }

    /// An acknowledgement of an outbound PUBLISH must be the one its QoS and state call
    /// for (PUBACK for QoS 1; PUBREC, then PUBCOMP after our PUBREL, for QoS 2); another
    /// is a protocol error that ends the connection, as Mosquitto ends it (MQTT-4.3). One
    /// for an id not in flight is let pass (it may answer a delivery of an earlier
    /// connection).
    fn check_ack(&mut self, pkid: u16, kind: &str, fits: fn(&Inflight) -> bool) -> Result<(), End> {
        match self.inflight.get(&pkid) {
            Some(i) if !fits(i) => {
                let why = format!("{kind} for packet {pkid} sent at QoS {}", i.qos);
                self.protocol_error_quiet(&why);
                Err(End::ProtocolError)
            }
            _ => Ok(()),
        }
    }

    async fn settle(&mut self, pkid: u16) {
        FollowUp::run_all(self.settle_now(pkid)).await;
    }

    /// Settles an outbound delivery up to the awaits, which it returns (usually none).
    fn settle_now(&mut self, pkid: u16) -> Vec<FollowUp> {
        let mut later = Vec::new();
        if let Some(i) = self.inflight.remove(&pkid) {
            self.finish_inflight_now(i, &mut later);
        }
        later
    }

    /// Acks the queue message of a finished delivery and returns its credit, up to the
    /// awaits, which are added to `later`.
    fn finish_inflight_now(&mut self, i: Inflight, later: &mut Vec<FollowUp>) {
        if let Some((q, seq)) = i.queue {
            later.extend(q.ack_now(&[seq]));
        }
        if i.credit {
            self.give_back_now(1, later);
        }
    }

    /// Acks (`ack`) or requeues the queue message of a finished delivery and returns its
    /// credit.
    async fn finish_inflight(&mut self, mut i: Inflight, ack: bool) {
        if !ack {
            if let Some((q, seq)) = i.queue.take() {
                q.requeue(&[seq]).await;
            }
        }
        let mut later = Vec::new();
        self.finish_inflight_now(i, &mut later);
        FollowUp::run_all(later).await;
    }

    /// Write on `amq.topic`, checked once per permission change rather than per publish.
    fn may_publish(&mut self) -> bool {
        let generation = self.shared.broker.permissions_generation();
        match self.publish_allowed {
            Some((g, ok)) if g == generation => ok,
            _ => {
                let ok = self.may_use_topic_exchange(Access::Write);
                self.publish_allowed = Some((generation, ok));
                ok
            }
        }
    }

    /// RabbitMQ's topic authorisation for an MQTT topic or filter: the AMQP routing key
    /// (`/`→`.`, `+`→`*`) against the user's rule for `amq.topic`, with `{client_id}`
    /// expanded. The rules are re-read only when the permissions change, and the key is
    /// built only if a rule exists, so an unrestricted publish allocates nothing here.
    fn topic_allowed(&mut self, access: Access, mqtt_topic: &str) -> bool {
        let generation = self.shared.broker.permissions_generation();
        if self
            .topic_perms
            .as_ref()
            .is_none_or(|(g, _)| *g != generation)
        {
            let tp = self
                .shared
                .broker
                .topic_permissions_of(&self.vhost.name, self.user())
                .map(|tp| {
                    if tp.per_client() {
                        Arc::new(tp.for_client(&self.client_id))
                    } else {
                        tp
                    }
                });
            self.topic_perms = Some((generation, tp));
        }
        let Some((_, Some(tp))) = &self.topic_perms else {
            return true;
        };
        if !tp.covers(TOPIC_EXCHANGE) {
            return true;
        }
        let key = topic::to_amqp(mqtt_topic);
        let ok = tp.allows(TOPIC_EXCHANGE, access, &key);
        if !ok {
            let e = warren_core::topic_permissions::refused(
                access,
                &key,
                TOPIC_EXCHANGE,
                &self.vhost.name,
                self.user(),
            );
            tracing::warn!(client_id = %self.client_id, "MQTT topic access refused: {e}");
        }
        ok
    }

    /// RabbitMQ's MQTT checks: write on `amq.topic` to publish, read to subscribe.
    fn may_use_topic_exchange(&self, access: Access) -> bool {
        self.shared
            .broker
            .check_permission(
                self.user(),
                &self.vhost.name,
                access,
                ResourceKind::Exchange,
                "amq.topic",
            )
            .is_ok()
    }

    async fn close(&mut self, end: End) {
        tracing::info!(peer = %self.peer, client_id = %self.client_id, reason = ?end, "mqtt connection closed");
        self.registration.set_close_reason(match end {
            End::Normal | End::NormalWithWill => "client_closed",
            End::SocketClosed => "socket_closed",
            End::ProtocolError => "protocol_error",
            End::KeepAliveTimeout => "keep_alive_timeout",
            End::TakenOver | End::TakenOverResumed => "taken_over",
            End::AdminClosed => "admin_closed",
            End::Shutdown => "server_closed",
        });
        // Still the session's connection (not taken over)? The entry stays until the
        // session is released below: a client connecting again meanwhile finds this
        // connection there and waits for it to end (see `connect_session`), so it sees
        // the session as this close leaves it.
        // `vhost \0 client id`: the key of [`Shared::sessions`] and [`Shared::parked`],
        // made when needed rather than kept by every idle connection.
        let key = format!("{}\0{}", self.vhost.name, self.client_id);
        let owner = self.shared.sessions.lock().get(&key) == Some(&self.id);
        self.release_session(end, owner, &key).await;
        let mut sessions = self.shared.sessions.lock();
        if sessions.get(&key) == Some(&self.id) {
            sessions.remove(&key);
        }
    }

    /// What ends with the connection: consumers, unacknowledged deliveries (back to their
    /// queues), the will, and the session itself (ended, or parked until it expires).
    async fn release_session(&mut self, end: End, owner: bool, key: &str) {
        if let (Some(q), Some(c)) = (&self.queue, self.consumer) {
            q.remove_consumer(c).await;
        }
        // Shared subscriptions stay in the session (its record lists them) while it is
        // parked; their messages go to the group's other members meanwhile.
        for s in Rare::of(&self.rare).shared_subs.values() {
            s.queue.remove_consumer(s.consumer).await;
        }
        // Unacknowledged deliveries go back to their queues, redelivered with DUP and, from
        // the session queue, their packet ids (MQTT-4.4.0-1); released QoS 2 ids stay in
        // the session for PUBREL on reconnect.
        let own = self.queue.clone();
        let mut by_queue: Vec<(Arc<Queue>, Vec<MsgSeq>)> = Vec::new();
        for (id, i) in self.inflight.iter_mut() {
            if let Some((q, seq)) = i.queue.take() {
                if own.as_ref().is_some_and(|o| Arc::ptr_eq(o, &q)) {
                    Rare::get(&mut self.rare).reserved_ids.insert(seq.0, *id);
                }
                match by_queue.iter_mut().find(|(x, _)| Arc::ptr_eq(x, &q)) {
                    Some((_, v)) => v.push(seq),
                    None => by_queue.push((q, vec![seq])),
                }
            }
        }
        for (q, seqs) in by_queue {
            q.requeue(&seqs).await;
        }
        // Session expiry 0: the session ends with this connection, taken over or not; a
        // newer connection resuming it finds none (Session Present 0, as Mosquitto).
        let ends = self.session_expiry == 0;
        // The will: on any end but DISCONNECT (MQTT-3.1.2-8), after the will delay or when
        // the session ends, whichever is first (MQTT-3.1.3-9); not if another connection
        // resumed the session within the delay.
        let mut delayed_will = None;
        // A persistent session resumed by the connection that took it over goes on:
        // no will (as Mosquitto).
        if end != End::Normal && end != End::TakenOverResumed {
            if let Some(w) = self.will.take() {
                if w.delay.is_zero() || ends {
                    publish_will(&self.shared, &self.vhost, w.msg, w.retain).await;
                } else if owner {
                    delayed_will = Some(w);
                }
            }
        }
        if ends {
            // MQTT-3.1.2-23 (5.0), MQTT-3.1.2-6 (3.1.1 clean session): the session ends
            // with the connection. Taken over, the newer connection waited for this
            // close before looking at the session queue.
            if owner || self.queue.is_some() {
                let _ = self
                    .vhost
                    .delete_queue(&queue_name(&self.client_id), None, false, false)
                    .await;
            }
            let shared_subs: Vec<&str> = Rare::of(&self.rare)
                .shared_subs
                .keys()
                .map(String::as_str)
                .collect();
            self.shared
                .groups
                .leave(&self.vhost, &self.client_id, &shared_subs)
                .await;
            self.vhost.connection_closed(self.id).await;
            if self.connect_expiry != 0 {
                let _ = self
                    .shared
                    .broker
                    .store_mqtt_session(&self.vhost.name, &self.client_id, None)
                    .await;
            }
            return;
        }
        let now = now_ms();
        let mut record = self.record(now);
        record.will = delayed_will.as_ref().map(|w| w.stored(now));
        let _ = self
            .shared
            .broker
            .store_mqtt_session(&self.vhost.name, &self.client_id, Some(record.encode()))
            .await;
        let generation = warren_core::ids::next_id();
        {
            // Lock order: sessions, parked. A newer connection (there since the takeover
            // or since this close began) is waiting to take the parked session at once:
            // no timers for it.
            let sessions = self.shared.sessions.lock();
            let ours = sessions.get(key) == Some(&self.id);
            self.shared
                .parked
                .lock()
                .insert(key.to_owned(), Parked { record, generation });
            if !ours {
                return;
            }
        }
        let expire_in = if self.session_expiry == NEVER {
            Duration::MAX
        } else {
            Duration::from_secs(self.session_expiry as u64)
        };
        if delayed_will.is_some() || expire_in != Duration::MAX {
            spawn_park_timer(
                self.shared.clone(),
                self.vhost.name.clone(),
                self.client_id.clone(),
                generation,
                delayed_will,
                expire_in,
            );
        }
    }
}

fn granted(qos: u8) -> SubAckReasonCode {
    match qos {
        0 => SubAckReasonCode::GrantedQoS0,
        1 => SubAckReasonCode::GrantedQoS1,
        _ => SubAckReasonCode::GrantedQoS2,
    }
}

/// MQTT 5 PUBLISH properties into the core's AMQP-style properties, as RabbitMQ maps them:
/// content type, response topic (→ reply_to, as a routing key), correlation data (→
/// correlation_id when it is short UTF-8, else a header), user properties (→ headers);
/// message expiry (→ per-message TTL `expiration`, plus the deadline for the remaining
/// interval at delivery), payload format indicator (→ a header for 5.0 subscribers).
fn map_v5_properties(p: &mqtt5_protocol::Properties, props: &mut Properties) {
    let expiry = p.get_message_expiry_interval();
    if let Some(secs) = expiry {
        // Capped at the longest TTL the core takes (~49.7 days, RabbitMQ's limit): a
        // longer expiry would make the publish a 406 instead.
        let ms = (secs as u64 * 1000).min(warren_core::message::MAX_EXPIRATION_MS);
        props.expiration = Some(ms.to_string().as_str().into());
    }
    let headers = props.headers.get_or_insert_with(FieldTable::default);
    // What no AMQP property can hold travels whole in a header (see v5_properties_of).
    let mut keep = |name: &str, bytes: &[u8]| {
        headers.insert(name.into(), AMQPValue::LongString(bytes.into()));
    };
    if let Some(PropertyValue::Utf8String(ct)) = p.get(PropertyId::ContentType) {
        if ct.len() <= MAX_SHORT {
            props.content_type = Some(ct.as_str().into());
        } else {
            keep(CONTENT_TYPE_HEADER, ct.as_bytes());
        }
    }
    if let Some(PropertyValue::Utf8String(rt)) = p.get(PropertyId::ResponseTopic) {
        let amqp = topic::to_amqp(rt);
        if amqp.len() <= MAX_SHORT {
            props.reply_to = Some(amqp.as_str().into());
        } else {
            keep(RESPONSE_TOPIC_HEADER, rt.as_bytes());
        }
    }
    if let Some(PropertyValue::BinaryData(cd)) = p.get(PropertyId::CorrelationData) {
        match std::str::from_utf8(cd) {
            Ok(s) if s.len() <= MAX_SHORT => props.correlation_id = Some(s.into()),
            _ => keep(CORRELATION_HEADER, cd),
        }
    }
    if let Some(secs) = expiry {
        headers.insert(
            EXPIRY_HEADER.into(),
            AMQPValue::LongLongInt((now_ms() + secs as u64 * 1000) as i64),
        );
    }
    // MQTT-3.3.2-4: forwarded unaltered, 0 (unspecified bytes) as well as 1 (UTF-8).
    if let Some(PropertyValue::Byte(b)) = p.get(PropertyId::PayloadFormatIndicator) {
        headers.insert(FORMAT_HEADER.into(), AMQPValue::ShortShortUInt(*b));
    }
    // User properties become headers; a table keeps one value per name in name order, so
    // when the list has repeated names or another order the list itself travels too
    // (MQTT-3.3.2-17/18: forwarded unaltered, in order).
    let mut last: Option<&str> = None;
    let mut in_table_order = true;
    for (id, v) in p.iter() {
        if let (PropertyId::UserProperty, PropertyValue::Utf8StringPair(k, v)) = (id, v) {
            // A name too long for a header key travels in the list only.
            if k.len() <= MAX_SHORT {
                headers.insert(
                    k.as_str().into(),
                    AMQPValue::LongString(v.as_bytes().into()),
                );
            } else {
                in_table_order = false;
            }
            in_table_order &= last.is_none_or(|l| l < k.as_str());
            last = Some(k.as_str());
        }
    }
    // The list is built only in that case: no extra allocation per publish otherwise.
    if !in_table_order {
        let pairs: Vec<AMQPValue> = p
            .iter()
            .filter_map(|(id, v)| match (id, v) {
                (PropertyId::UserProperty, PropertyValue::Utf8StringPair(k, v)) => {
                    Some(AMQPValue::FieldArray(
                        vec![
                            AMQPValue::LongString(k.as_bytes().into()),
                            AMQPValue::LongString(v.as_bytes().into()),
                        ]
                        .into(),
                    ))
                }
                _ => None,
            })
            .collect();
        headers.insert(
            USER_PROPS_HEADER.into(),
            AMQPValue::FieldArray(pairs.into()),
        );
    }
}

/// The user properties list kept by [`map_v5_properties`], as (name, value) pairs.
fn user_props_list(h: &FieldTable) -> Option<Vec<(String, String)>> {
    let AMQPValue::FieldArray(a) = h.inner().get(USER_PROPS_HEADER)? else {
        return None;
    };
    a.as_slice()
        .iter()
        .map(|pair| match pair {
            AMQPValue::FieldArray(kv) => match kv.as_slice() {
                [AMQPValue::LongString(k), AMQPValue::LongString(v)] => Some((
                    String::from_utf8_lossy(k.as_bytes()).into_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The reverse of [`map_v5_properties`] for a delivery to an MQTT 5 client.
fn v5_properties_of(m: &Message, p: &mut PublishPacket) {
    let props = &m.properties;
    if let Some(ct) = &props.content_type {
        p.properties.set_content_type(ct.as_str().to_owned());
    }
    if let Some(rt) = &props.reply_to {
        p.properties.set_response_topic(topic::to_mqtt(rt.as_str()));
    }
    if let Some(c) = &props.correlation_id {
        p.properties
            .set_correlation_data(Bytes::copy_from_slice(c.as_str().as_bytes()));
    }
    if let Some(h) = &props.headers {
        // MQTT-3.3.2-4: the byte as published, whatever its value (Mosquitto 2.0 forwards
        // values other than 0 and 1 too).
        if let Some(AMQPValue::ShortShortUInt(b)) = h.inner().get(FORMAT_HEADER) {
            let _ = p
                .properties
                .add(PropertyId::PayloadFormatIndicator, PropertyValue::Byte(*b));
        }
        let listed = user_props_list(h);
        if let Some(list) = &listed {
            for (k, v) in list {
                p.properties.add_user_property(k.clone(), v.clone());
            }
        }
        for (k, v) in h.inner() {
            // The properties `map_v5_properties` kept in headers, read in this one pass.
            if let AMQPValue::LongString(s) = v {
                let text = || String::from_utf8_lossy(s.as_bytes()).into_owned();
                match k.as_str() {
                    CONTENT_TYPE_HEADER if props.content_type.is_none() => {
                        p.properties.set_content_type(text())
                    }
                    RESPONSE_TOPIC_HEADER if props.reply_to.is_none() => {
                        p.properties.set_response_topic(text())
                    }
                    CORRELATION_HEADER if props.correlation_id.is_none() => p
                        .properties
                        .set_correlation_data(Bytes::copy_from_slice(s.as_bytes())),
                    _ => {}
                }
            }
            if k.as_str().starts_with("x-")
                || listed
                    .as_ref()
                    .is_some_and(|l| l.iter().any(|(n, _)| n == k.as_str()))
            {
                continue;
            }
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::Boolean(b) => b.to_string(),
                other => match warren_core::queue::int_value(other) {
                    Some(i) => i.to_string(),
                    None => continue,
                },
            };
            p.properties.add_user_property(k.as_str().to_owned(), text);
        }
    }
}

/// The MQTT QoS a message was published with (AMQP messages: 1 if persistent, else 0).
fn msg_qos(m: &Message) -> u8 {
    match m
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.inner().get(QOS_HEADER))
    {
        Some(v) => warren_core::queue::int_value(v).unwrap_or(0).clamp(0, 2) as u8,
        None => u8::from(m.is_persistent()),
    }
}

/// A topic name clients may not publish to: `$SYS/…` other than a bridge's
/// `$SYS/broker/connection/<name>/state`, and `$share/…`.
fn reserved_topic(topic: &str) -> bool {
    if topic.starts_with("$share/") {
        return true;
    }
    match topic.strip_prefix("$SYS/") {
        None => false,
        Some(rest) => !rest
            .strip_prefix("broker/connection/")
            .and_then(|r| r.strip_suffix("/state"))
            .is_some_and(|name| !name.is_empty() && !name.contains('/')),
    }
}

#[cfg(test)]
mod tests {
    use super::reserved_topic;

    #[test]
    fn reserved_topics_as_mosquitto_refuses_them() {
        assert!(reserved_topic("$SYS/broker/uptime"));
        assert!(reserved_topic("$SYS/broker/connection/me"));
        assert!(!reserved_topic("$SYS/broker/connection/me/state"));
        assert!(reserved_topic("$SYS/broker/connection/a/b/state"));
        assert!(reserved_topic("$share/g/t"));
        assert!(!reserved_topic("$test/test"));
        assert!(!reserved_topic("a/$SYS/b"));
    }
}
