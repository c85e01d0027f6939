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
use mqtt5_protocol::{Packet, QoS, ReasonCode};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use warren_core::permissions::{Access, ResourceKind};
use warren_core::read_room::ReadRoom;
use warren_core::{
    AMQPValue, Broker, ConnectionId, ConsumerId, ConsumerSpec, Credit, Delivery, FieldTable,
    FollowUp, Message, MsgSeq, Outbox, OutboxEvent, Queue, QueueDecl, Target, TopicPermissions,
    VHost,
};
use warren_core::{ConnectionAuth, ConnectionGuard, ConnectionInfo};

use crate::codec::{self, CodecError};
use crate::shared_sub;
use crate::state::{now_ms, SessionRecord, StoredShared, StoredWill, NEVER};
use crate::topic;
use crate::{MqttConfig, Shared, MAX_SHORT};

mod connect;
mod outbound;
mod props;
mod publish;
mod subscribe;

pub(crate) use connect::Accepted;
use connect::{connect, queue_name, Connected};

use props::{
    header, map_v5_properties, mqtt_message, msg_qos, remaining_expiry, set_origin, too_deep,
    v5_properties_of, EXPIRY_HEADER, MAX_TOPIC_DEPTH, ORIGIN_HEADER, QOS_HEADER, RETAIN_HEADER,
};

/// The exchange MQTT topics map onto (RabbitMQ's default `mqtt.exchange`).
const TOPIC_EXCHANGE: &str = "amq.topic";
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

/// MQTT-4.7.1-2, -4.7.1-3, MQTT-4.7.3-1: wildcards only as whole levels, `#` last, not
/// empty. Anything else is a malformed SUBSCRIBE / UNSUBSCRIBE: DISCONNECT 0x81 (5.0) and
/// close, as Mosquitto (`handle_subscribe.c`), not a failure code in the SUBACK.
fn valid_filter(filter: &str) -> bool {
    mqtt5_protocol::is_valid_topic_filter(filter)
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

    /// The authenticated user, for permission checks (kept once, in the registry entry).
    fn user(&self) -> &str {
        &self.registration.entry().info.user
    }

    fn is_own_queue(&self, q: &Arc<Queue>) -> bool {
        self.queue.as_ref().is_some_and(|own| Arc::ptr_eq(own, q))
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
