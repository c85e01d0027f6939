//! One MQTT connection: CONNECT, the packet loop, QoS 0/1/2 in both directions, keep-alive,
//! wills, and the session queue it consumes from.
//!
//! Each session owns a queue `mqtt-subscription-<client id>qos1` (RabbitMQ's name); each
//! subscription is a binding of it on `amq.topic`. Clean sessions use an exclusive
//! auto-delete queue; persistent sessions a durable one that outlives the connection.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mqtt5_protocol::packet::connack::ConnAckPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::puback::PubAckPacket;
use mqtt5_protocol::packet::pubcomp::PubCompPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrec::PubRecPacket;
use mqtt5_protocol::packet::pubrel::PubRelPacket;
use mqtt5_protocol::packet::suback::{SubAckPacket, SubAckReasonCode};
use mqtt5_protocol::packet::unsuback::{UnsubAckPacket, UnsubAckReasonCode};
use mqtt5_protocol::{Packet, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use warren_core::{
    AMQPValue, ConnectionId, ConsumerId, ConsumerSpec, Credit, Delivery, FieldTable, Message,
    MsgSeq, Outbox, OutboxEvent, Properties, Queue, QueueDecl, ShortString, Target, VHost,
};

use crate::codec::{self, CodecError};
use crate::topic;
use crate::{MqttConfig, Shared};

/// The header carrying an MQTT publish's QoS through AMQP (RabbitMQ's name).
const QOS_HEADER: &str = "x-mqtt-publish-qos";

/// Why the connection ended (for the log, and whether the will fires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT: no will (MQTT-3.14.4-3).
    Normal,
    SocketClosed,
    ProtocolError,
    KeepAliveTimeout,
    TakenOver,
    Shutdown,
}

/// A delivery sent with QoS ≥ 1 and not yet acknowledged.
struct Inflight {
    queue: Option<Arc<Queue>>,
    seq: MsgSeq,
    /// PUBREC seen (QoS 2): waiting for PUBCOMP.
    released: bool,
}

struct Session {
    shared: Arc<Shared>,
    cfg: Arc<MqttConfig>,
    id: ConnectionId,
    peer: SocketAddr,
    version: u8,
    client_id: String,
    vhost: Arc<VHost>,
    queue: Option<Arc<Queue>>,
    consumer: Option<ConsumerId>,
    outbox: Arc<Outbox>,
    out: BytesMut,
    /// Filter → granted QoS.
    subscriptions: HashMap<String, u8>,
    /// Shared subscriptions `$share/<group>/<filter>`: the group's queue, this session's
    /// consumer on it, the granted QoS.
    shared_subs: HashMap<String, (Arc<Queue>, ConsumerId, u8)>,
    inflight: HashMap<u16, Inflight>,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids between PUBREC and PUBREL (duplicates are not routed twice).
    incoming_qos2: HashSet<u16>,
    topic_aliases: HashMap<u16, String>,
    will: Option<Arc<Message>>,
    will_retain: bool,
    clean: bool,
    keep_alive: u16,
}

/// Serves one MQTT connection over any byte stream (TCP, or a WebSocket's binary frames).
pub(crate) async fn run<S>(
    socket: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cfg: Arc<MqttConfig>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(socket);
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
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
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "mqtt: bad first packet");
            return;
        }
        _ => return,
    };
    let Some((mut session, mut deliveries, kicked)) =
        connect_session(&mut wr, peer, shared, cfg, *connect).await
    else {
        return;
    };
    let end = session
        .serve(rd, wr, rbuf, &mut deliveries, kicked, &mut shutdown)
        .await;
    session.close(end).await;
    warren_core::return_undelivered(&mut deliveries).await;
}

/// CONNECT handling (MQTT-3.1.4): checks, auth, takeover, the session queue, CONNACK.
async fn connect_session<W: AsyncWrite + Unpin>(
    socket: &mut W,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cfg: Arc<MqttConfig>,
    c: ConnectPacket,
) -> Option<(Session, mpsc::Receiver<Delivery>, watch::Receiver<bool>)> {
    let version = c.protocol_version;
    let refuse = |code: ReasonCode| {
        let mut out = BytesMut::new();
        if version == 5 {
            codec::encode(&ConnAckPacket::new(false, code), &mut out);
        } else {
            codec::encode(&ConnAckPacket::new_v311(false, code), &mut out);
        }
        out
    };
    if version != 4 && version != 5 {
        // MQTT-3.1.2-2: unsupported level → return code 0x01 and close.
        let mut out = BytesMut::new();
        out.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
        let _ = socket.write_all(&out).await;
        return None;
    }
    // MQTT-3.1.3-7/8: an empty client id needs a clean session (3.1.1); 5.0 assigns one.
    let mut assigned = None;
    let client_id = if c.client_id.is_empty() {
        if version == 4 && !c.clean_start {
            let _ = socket
                .write_all(&refuse(ReasonCode::ClientIdentifierNotValid))
                .await;
            return None;
        }
        let id = warren_core::vhost::generated_name("warren-");
        assigned = Some(id.clone());
        id
    } else if c.client_id.len() > 200 {
        // Its queue name must stay a short string.
        let _ = socket
            .write_all(&refuse(ReasonCode::ClientIdentifierNotValid))
            .await;
        return None;
    } else {
        c.client_id.clone()
    };
    // Credentials: `vhost:user` selects the vhost, as RabbitMQ's MQTT plugin does; no
    // username means the configured default user (RabbitMQ's mqtt.default_user).
    let (vhost_name, user, pass) = match &c.username {
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
            (vh, user, pass)
        }
        None if cfg.allow_anonymous => (
            cfg.default_vhost.clone(),
            cfg.default_user.clone(),
            cfg.default_pass.clone(),
        ),
        None => {
            let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
            return None;
        }
    };
    if let Err(e) = shared.broker.authenticate(&user, &pass, peer.ip()) {
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
    let id = ConnectionId::next();
    // Session takeover (MQTT-3.1.4-2): the older connection with this client id goes.
    let (kick_tx, kicked) = watch::channel(false);
    let key = format!("{vhost_name}\0{client_id}");
    let previous = shared.sessions.lock().insert(key.clone(), (id, kick_tx));
    if let Some(old) = previous {
        let _ = old.1.send(true);
        // Give it a moment to release its exclusive queue.
        for _ in 0..50 {
            if vhost
                .queue(&queue_name(&client_id))
                .map(|q| q.exclusive_owner != Some(old.0))
                .unwrap_or(true)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let clean = c.clean_start;
    let qname = queue_name(&client_id);
    if clean {
        let _ = vhost.delete_queue(&qname, None, false, false).await;
    }
    let declared = vhost
        .declare_queue(
            QueueDecl {
                name: qname.as_str().into(),
                passive: false,
                durable: !clean,
                exclusive: clean,
                auto_delete: clean,
                arguments: FieldTable::default(),
            },
            id,
        )
        .await;
    let (queue, existed) = match declared {
        Ok((q, created)) => (q, !created),
        Err(e) => {
            tracing::warn!(%peer, client_id, error = %e, "mqtt session queue unavailable");
            let _ = socket
                .write_all(&refuse(ReasonCode::ServerUnavailable))
                .await;
            shared.sessions.lock().remove(&key);
            return None;
        }
    };
    let mut ack = if version == 5 {
        ConnAckPacket::new(!clean && existed, ReasonCode::Success)
            .with_receive_maximum(cfg.receive_maximum)
            .with_shared_subscription_available(true)
            .with_maximum_qos(2)
    } else {
        ConnAckPacket::new_v311(!clean && existed, ReasonCode::Success)
    };
    if let (Some(a), 5) = (assigned, version) {
        ack = ack.with_assigned_client_id(a);
    }
    let mut out = BytesMut::new();
    codec::encode(&ack, &mut out);
    if socket.write_all(&out).await.is_err() {
        return None;
    }
    let will = c
        .will
        .as_ref()
        .and_then(|w| mqtt_message(&w.topic, Bytes::from(w.payload.clone()), w.qos as u8))
        .map(Arc::new);
    let will_retain = c.will.as_ref().is_some_and(|w| w.retain);
    let (outbox, deliveries) = Outbox::new(cfg.receive_maximum as usize * 2);
    let mut s = Session {
        shared,
        cfg: cfg.clone(),
        id,
        peer,
        version,
        client_id,
        vhost,
        queue: Some(queue.clone()),
        consumer: None,
        outbox,
        out: BytesMut::with_capacity(8 * 1024),
        subscriptions: HashMap::new(),
        shared_subs: HashMap::new(),
        inflight: HashMap::new(),
        next_pkid: 1,
        incoming_qos2: HashSet::new(),
        topic_aliases: HashMap::new(),
        will,
        will_retain,
        clean,
        keep_alive: c.keep_alive,
    };
    if !clean {
        // Restore the filters of a persistent session from its bindings.
        for (_, b) in s.vhost.bindings() {
            if matches!(&b.target, Target::Queue(q) if Arc::ptr_eq(q, &queue)) {
                let qos = b
                    .arguments
                    .inner()
                    .get(QOS_HEADER)
                    .and_then(warren_core::queue::int_value)
                    .unwrap_or(1) as u8;
                s.subscriptions
                    .insert(topic::to_mqtt(b.routing_key.as_str()), qos);
            }
        }
    }
    let consumer = ConsumerId::next();
    let spec = ConsumerSpec {
        id: consumer,
        tag: Arc::from("mqtt"),
        token: 0,
        owner: id,
        no_ack: false,
        exclusive: false,
        priority: 0,
        prefetch: cfg.receive_maximum as u32,
        channel_credit: Arc::new(Credit::default()),
        outbox: s.outbox.clone(),
    };
    if queue.add_consumer(spec).await.is_ok() {
        s.consumer = Some(consumer);
    }
    tracing::info!(%peer, client_id = %s.client_id, version, clean, "mqtt connection opened");
    Some((s, deliveries, kicked))
}

fn queue_name(client_id: &str) -> String {
    format!("mqtt-subscription-{client_id}qos1")
}

/// AMQP routing keys are short strings: MQTT topics and filters longer than this cannot be
/// routed (RabbitMQ has the same limit).
const MAX_TOPIC_BYTES: usize = 255;

/// A message published over MQTT, as the core carries it; `None` for a topic too long to
/// be a routing key.
fn mqtt_message(topic_name: &str, payload: Bytes, qos: u8) -> Option<Message> {
    if topic_name.len() > MAX_TOPIC_BYTES {
        return None;
    }
    let mut headers = FieldTable::default();
    headers.insert(QOS_HEADER.into(), AMQPValue::ShortShortUInt(qos));
    Some(Message::new(
        "amq.topic".into(),
        ShortString::from(topic::to_amqp(topic_name)),
        Properties {
            headers: Some(headers),
            // QoS ≥ 1 messages are persistent, so durable sessions keep them.
            delivery_mode: Some(if qos > 0 { 2 } else { 1 }),
            ..Default::default()
        },
        payload,
    ))
}

impl Session {
    async fn serve<R, W>(
        &mut self,
        mut rd: R,
        mut wr: W,
        mut rbuf: BytesMut,
        deliveries: &mut mpsc::Receiver<Delivery>,
        mut kicked: watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let keep_alive = Duration::from_millis(self.cfg_keepalive_ms());
        let mut last_read = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            // Packets that arrived with CONNECT.
            loop {
                match codec::decode(&mut rbuf, self.version, self.cfg.max_packet_size) {
                    Ok(Some(p)) => {
                        if let Err(end) = self.handle(p).await {
                            let _ = wr.write_all(&self.out).await;
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.protocol_error(&e);
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
            }
            tokio::select! {
                r = rd.read_buf(&mut rbuf) => match r {
                    Ok(0) | Err(_) => return End::SocketClosed,
                    Ok(_) => last_read = Instant::now(),
                },
                Some(d) = deliveries.recv() => {
                    self.deliver(d).await;
                    while self.out.len() < 64 * 1024 {
                        match deliveries.try_recv() {
                            Ok(d) => self.deliver(d).await,
                            Err(_) => break,
                        }
                    }
                }
                _ = self.outbox.events_ready() => {
                    for ev in self.outbox.take_events() {
                        match ev {
                            OutboxEvent::Stalled(q) => if let Some(q) = q.upgrade() { q.resume(&self.outbox).await },
                            OutboxEvent::Cancelled(_) => { self.consumer = None; self.queue = None; }
                        }
                    }
                }
                _ = tick.tick() => {
                    // MQTT-3.1.2-24: one and a half keep-alive periods of silence.
                    if !keep_alive.is_zero() && last_read.elapsed() > keep_alive {
                        return End::KeepAliveTimeout;
                    }
                }
                _ = kicked.changed() => {
                    if self.version == 5 {
                        // 0x8E Session taken over.
                        self.out.extend_from_slice(&[0xE0, 0x01, 0x8E]);
                        let _ = wr.write_all(&self.out).await;
                    }
                    return End::TakenOver;
                }
                _ = shutdown.changed() => {
                    if self.version == 5 {
                        // 0x8B Server shutting down.
                        self.out.extend_from_slice(&[0xE0, 0x01, 0x8B]);
                        let _ = wr.write_all(&self.out).await;
                    }
                    return End::Shutdown;
                }
            }
        }
    }

    fn cfg_keepalive_ms(&self) -> u64 {
        self.keep_alive as u64 * 1500
    }

    fn protocol_error(&mut self, e: &CodecError) {
        tracing::info!(peer = %self.peer, client_id = %self.client_id, error = %e, "mqtt protocol error");
        if self.version == 5 {
            let code = match e {
                CodecError::TooLarge { .. } => 0x95,
                _ => 0x81,
            };
            self.out.extend_from_slice(&[0xE0, 0x01, code]);
        }
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    /// Handles one packet; `Err` ends the connection.
    async fn handle(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.publish(p).await,
            Packet::PubAck(a) => {
                self.settle(a.packet_id).await;
                Ok(())
            }
            Packet::PubRec(r) => {
                if let Some(i) = self.inflight.get_mut(&r.packet_id) {
                    i.released = true;
                }
                codec::encode(&PubRelPacket::new(r.packet_id), &mut self.out);
                Ok(())
            }
            Packet::PubComp(c) => {
                self.settle(c.packet_id).await;
                Ok(())
            }
            Packet::PubRel(r) => {
                // MQTT-4.3.3: release the packet id, answer PUBCOMP even if unknown.
                self.incoming_qos2.remove(&r.packet_id);
                codec::encode(&PubCompPacket::new(r.packet_id), &mut self.out);
                Ok(())
            }
            Packet::Subscribe(s) => {
                let mut ack = if self.version == 5 {
                    SubAckPacket::new(s.packet_id)
                } else {
                    SubAckPacket::new_v311(s.packet_id)
                };
                let mut retained = Vec::new();
                for f in s.filters {
                    let code = self
                        .subscribe(&f.filter, f.options.qos as u8, &mut retained)
                        .await;
                    ack = ack.add_reason_code(code);
                }
                codec::encode(&ack, &mut self.out);
                for (t, m, qos) in retained {
                    self.send_publish(&t, &m, qos, true, false, None);
                }
                Ok(())
            }
            Packet::Unsubscribe(u) => {
                let mut ack = if self.version == 5 {
                    UnsubAckPacket::new(u.packet_id)
                } else {
                    UnsubAckPacket::new_v311(u.packet_id)
                };
                for f in u.filters {
                    if let Some((q, c, _)) = self.shared_subs.remove(&f) {
                        q.remove_consumer(c).await;
                        if self.version == 5 {
                            ack.reason_codes.push(UnsubAckReasonCode::Success);
                        }
                        continue;
                    }
                    let existed = self.subscriptions.remove(&f).is_some();
                    if let Some(q) = &self.queue {
                        let _ = self
                            .vhost
                            .unbind(
                                "amq.topic",
                                Target::Queue(q.clone()),
                                &topic::to_amqp(&f),
                                &FieldTable::default(),
                            )
                            .await;
                    }
                    if self.version == 5 {
                        ack.reason_codes.push(if existed {
                            UnsubAckReasonCode::Success
                        } else {
                            UnsubAckReasonCode::NoSubscriptionExisted
                        });
                    }
                }
                codec::encode(&ack, &mut self.out);
                Ok(())
            }
            Packet::PingReq => {
                codec::encode_pingresp(&mut self.out);
                Ok(())
            }
            Packet::Disconnect(d) => {
                // MQTT 5: reason 0x04 asks for the will anyway.
                if d.reason_code != ReasonCode::DisconnectWithWillMessage {
                    self.will = None;
                }
                Err(End::Normal)
            }
            // MQTT-3.1.0-2: a second CONNECT is a protocol error.
            Packet::Connect(_) => {
                self.protocol_error(&CodecError::Malformed("second CONNECT".into()));
                Err(End::ProtocolError)
            }
            other => {
                self.protocol_error(&CodecError::Malformed(format!(
                    "unexpected {}",
                    other.packet_type_name()
                )));
                Err(End::ProtocolError)
            }
        }
    }

    async fn subscribe(
        &mut self,
        filter: &str,
        requested: u8,
        retained: &mut Vec<(String, Arc<Message>, u8)>,
    ) -> SubAckReasonCode {
        // MQTT-4.7.1: wildcards only as whole levels, `#` last.
        if !mqtt5_protocol::is_valid_topic_filter(filter) {
            return if self.version == 5 {
                SubAckReasonCode::TopicFilterInvalid
            } else {
                SubAckReasonCode::UnspecifiedError
            };
        }
        if filter.len() > MAX_TOPIC_BYTES {
            return if self.version == 5 {
                SubAckReasonCode::TopicFilterInvalid
            } else {
                SubAckReasonCode::UnspecifiedError
            };
        }
        if let Some(rest) = filter.strip_prefix("$share/") {
            return self.subscribe_shared(filter, rest, requested.min(2)).await;
        }
        let Some(q) = self.queue.clone() else {
            return SubAckReasonCode::UnspecifiedError;
        };
        let qos = requested.min(2);
        let key = topic::to_amqp(filter);
        // Re-subscribing replaces the subscription (MQTT-3.8.4-3): one binding per filter.
        let _ = self
            .vhost
            .unbind(
                "amq.topic",
                Target::Queue(q.clone()),
                &key,
                &FieldTable::default(),
            )
            .await;
        if let Err(e) = self
            .vhost
            .bind(
                "amq.topic",
                Target::Queue(q),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
        {
            tracing::warn!(error = %e, "mqtt subscribe failed");
            return SubAckReasonCode::UnspecifiedError;
        }
        self.subscriptions.insert(filter.to_owned(), qos);
        for (t, m) in self.shared.retained_matching(&self.vhost.name, filter) {
            let mq = msg_qos(&m).min(qos);
            retained.push((t, m, mq));
        }
        match qos {
            0 => SubAckReasonCode::GrantedQoS0,
            1 => SubAckReasonCode::GrantedQoS1,
            _ => SubAckReasonCode::GrantedQoS2,
        }
    }

    async fn publish(&mut self, p: PublishPacket) -> Result<(), End> {
        let qos = p.qos as u8;
        let mut topic_name = p.topic_name.clone();
        if self.version == 5 {
            if let Some(alias) = p.properties.get_topic_alias() {
                if topic_name.is_empty() {
                    match self.topic_aliases.get(&alias) {
                        Some(t) => topic_name = t.clone(),
                        None => {
                            self.protocol_error(&CodecError::Malformed(
                                "unknown topic alias".into(),
                            ));
                            return Err(End::ProtocolError);
                        }
                    }
                } else {
                    self.topic_aliases.insert(alias, topic_name.clone());
                }
            }
        }
        // MQTT-3.3.2-2: no wildcards in a topic name.
        if !mqtt5_protocol::is_valid_topic_name(&topic_name) {
            self.protocol_error(&CodecError::Malformed(format!(
                "invalid topic name {topic_name:?}"
            )));
            return Err(End::ProtocolError);
        }
        if qos == 2 {
            if let Some(id) = p.packet_id {
                if !self.incoming_qos2.insert(id) {
                    // A duplicate before PUBREL: acknowledged, not routed again (exactly once).
                    codec::encode(&PubRecPacket::new(id), &mut self.out);
                    return Ok(());
                }
            }
        }
        let Some(mut msg) = mqtt_message(&topic_name, p.payload.clone(), qos) else {
            self.protocol_error(&CodecError::Malformed(format!(
                "topic name longer than {MAX_TOPIC_BYTES} bytes"
            )));
            return Err(End::ProtocolError);
        };
        if self.version == 5 {
            map_v5_properties(&p.properties, &mut msg.properties);
        }
        if let Some(secs) = p.properties.get_message_expiry_interval() {
            msg.properties.expiration = Some((secs as u64 * 1000).to_string().as_str().into());
        }
        let msg = Arc::new(msg);
        let retained_ticket = if p.retain {
            self.shared
                .retain(&self.vhost.name, &topic_name, msg.clone())
                .await
        } else {
            None
        };
        let ticket = match self.vhost.publish("amq.topic", msg).await {
            Ok(o) => o.ticket.max(retained_ticket),
            Err(e) => {
                tracing::warn!(error = %e, "mqtt publish failed");
                retained_ticket
            }
        };
        if qos > 0 {
            // PUBACK/PUBREC only once a durable copy is synced.
            if let Some(t) = ticket {
                let _ = self.shared.broker.store().wait_synced(t).await;
            }
            if let Some(id) = p.packet_id {
                if qos == 1 {
                    codec::encode(&PubAckPacket::new(id), &mut self.out);
                } else {
                    codec::encode(&PubRecPacket::new(id), &mut self.out);
                }
            }
        }
        Ok(())
    }

    /// `$share/<group>/<filter>`: competing consumers on one queue per group and filter
    /// (MQTT 5 §4.8.2), bound on `amq.topic` like any subscription; the queue goes with
    /// its last member.
    async fn subscribe_shared(&mut self, full: &str, rest: &str, qos: u8) -> SubAckReasonCode {
        let invalid = if self.version == 5 {
            SubAckReasonCode::TopicFilterInvalid
        } else {
            SubAckReasonCode::UnspecifiedError
        };
        // MQTT-4.8.2-1/2: a non-empty group name without wildcards, then a filter.
        let Some((group, filter)) = rest.split_once('/') else {
            return invalid;
        };
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return invalid;
        }
        if let Some((q, c, _)) = self.shared_subs.remove(full) {
            q.remove_consumer(c).await;
        }
        let name = format!("mqtt-shared-{group}-{filter}");
        if name.len() > MAX_TOPIC_BYTES {
            return invalid;
        }
        let declared = self
            .vhost
            .declare_queue(
                QueueDecl {
                    name: name.as_str().into(),
                    passive: false,
                    durable: false,
                    exclusive: false,
                    auto_delete: true,
                    arguments: FieldTable::default(),
                },
                self.id,
            )
            .await;
        let Ok((q, _)) = declared else {
            return SubAckReasonCode::UnspecifiedError;
        };
        let key = topic::to_amqp(filter);
        if self
            .vhost
            .bind(
                "amq.topic",
                Target::Queue(q.clone()),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .is_err()
        {
            return SubAckReasonCode::UnspecifiedError;
        }
        let consumer = ConsumerId::next();
        let spec = ConsumerSpec {
            id: consumer,
            tag: Arc::from("mqtt-shared"),
            token: 0,
            owner: self.id,
            no_ack: false,
            exclusive: false,
            priority: 0,
            prefetch: self.cfg.receive_maximum as u32,
            channel_credit: Arc::new(Credit::default()),
            outbox: self.outbox.clone(),
        };
        if q.add_consumer(spec).await.is_err() {
            return SubAckReasonCode::UnspecifiedError;
        }
        self.shared_subs.insert(full.to_owned(), (q, consumer, qos));
        match qos {
            0 => SubAckReasonCode::GrantedQoS0,
            1 => SubAckReasonCode::GrantedQoS1,
            _ => SubAckReasonCode::GrantedQoS2,
        }
    }

    /// Writes a delivery from the session queue (or a shared-subscription queue) as PUBLISH.
    async fn deliver(&mut self, d: Delivery) {
        let t = topic::to_mqtt(d.message.routing_key.as_str());
        let shared = self
            .shared_subs
            .values()
            .find(|(q, c, _)| *c == d.consumer && Arc::ptr_eq(q, &d.queue))
            .map(|(_, _, qos)| *qos);
        let granted = shared.unwrap_or_else(|| {
            self.subscriptions
                .iter()
                .filter(|(f, _)| topic::matches(f, &t))
                .map(|(_, q)| *q)
                .max()
                .unwrap_or(0)
        });
        let qos = msg_qos(&d.message).min(granted);
        if qos == 0 {
            d.queue.ack(&[d.seq]).await;
            self.send_publish(&t, &d.message, 0, false, false, None);
        } else {
            let queue = d.queue.clone();
            self.send_publish(
                &t,
                &d.message,
                qos,
                false,
                d.redelivered,
                Some((queue, d.seq)),
            );
        }
    }

    fn send_publish(
        &mut self,
        topic_name: &str,
        msg: &Message,
        qos: u8,
        retain: bool,
        dup: bool,
        track: Option<(Arc<Queue>, MsgSeq)>,
    ) {
        let q = match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let payload = msg.body.clone();
        let mut p = if self.version == 5 {
            let mut p = PublishPacket::new(topic_name, payload, q);
            v5_properties_of(msg, &mut p);
            p
        } else {
            PublishPacket::new_v311(topic_name, payload, q)
        };
        p = p.with_retain(retain).with_dup(dup && qos > 0);
        if qos > 0 {
            let id = self.next_pkid();
            p = p.with_packet_id(id);
            let (queue, seq) = match track {
                Some((q, s)) => (Some(q), s),
                None => (None, MsgSeq(0)),
            };
            self.inflight.insert(
                id,
                Inflight {
                    queue,
                    seq,
                    released: false,
                },
            );
        }
        codec::encode(&p, &mut self.out);
    }

    async fn settle(&mut self, pkid: u16) {
        if let Some(i) = self.inflight.remove(&pkid) {
            if let Some(q) = i.queue {
                q.ack(&[i.seq]).await;
            }
        }
    }

    async fn close(&mut self, end: End) {
        tracing::info!(peer = %self.peer, client_id = %self.client_id, reason = ?end, "mqtt connection closed");
        // Unacknowledged deliveries go back to the session queue, redelivered (with DUP).
        let mut by_queue: Vec<(Arc<Queue>, Vec<MsgSeq>)> = Vec::new();
        for (_, i) in self.inflight.drain() {
            if let Some(q) = i.queue {
                match by_queue.iter_mut().find(|(x, _)| Arc::ptr_eq(x, &q)) {
                    Some((_, v)) => v.push(i.seq),
                    None => by_queue.push((q, vec![i.seq])),
                }
            }
            let _ = i.released;
        }
        if let (Some(q), Some(c)) = (&self.queue, self.consumer) {
            q.remove_consumer(c).await;
        }
        for (_, (q, c, _)) in self.shared_subs.drain() {
            q.remove_consumer(c).await;
        }
        for (q, seqs) in by_queue {
            q.requeue(&seqs).await;
        }
        if end != End::Normal {
            if let Some(will) = self.will.take() {
                let topic_name = topic::to_mqtt(will.routing_key.as_str());
                if self.will_retain {
                    self.shared
                        .retain(&self.vhost.name, &topic_name, will.clone())
                        .await;
                }
                let _ = self.vhost.publish("amq.topic", will).await;
            }
        }
        if self.clean {
            self.vhost.connection_closed(self.id).await;
        }
        let key = format!("{}\0{}", self.vhost.name, self.client_id);
        let mut sessions = self.shared.sessions.lock();
        if sessions.get(&key).is_some_and(|(id, _)| *id == self.id) {
            sessions.remove(&key);
        }
        drop(sessions);
    }
}

/// MQTT 5 PUBLISH properties into the core's AMQP-style properties, as RabbitMQ maps them:
/// content type, response topic (→ reply_to, as a routing key), correlation data (→
/// correlation_id when it is short UTF-8, else a header), user properties (→ headers).
fn map_v5_properties(p: &mqtt5_protocol::Properties, props: &mut Properties) {
    use mqtt5_protocol::{PropertyId, PropertyValue};
    if let Some(PropertyValue::Utf8String(ct)) = p.get(PropertyId::ContentType) {
        if ct.len() <= MAX_TOPIC_BYTES {
            props.content_type = Some(ct.as_str().into());
        }
    }
    if let Some(PropertyValue::Utf8String(rt)) = p.get(PropertyId::ResponseTopic) {
        if rt.len() <= MAX_TOPIC_BYTES {
            props.reply_to = Some(topic::to_amqp(rt).as_str().into());
        }
    }
    let headers = props.headers.get_or_insert_with(FieldTable::default);
    if let Some(PropertyValue::BinaryData(cd)) = p.get(PropertyId::CorrelationData) {
        match std::str::from_utf8(cd) {
            Ok(s) if s.len() <= 255 => props.correlation_id = Some(s.into()),
            _ => {
                headers.insert(
                    "x-correlation-id".into(),
                    AMQPValue::LongString(cd.to_vec().into()),
                );
            }
        }
    }
    for (id, v) in p.iter() {
        if let (PropertyId::UserProperty, PropertyValue::Utf8StringPair(k, v)) = (id, v) {
            if k.len() <= 255 {
                headers.insert(
                    k.as_str().into(),
                    AMQPValue::LongString(v.as_bytes().into()),
                );
            }
        }
    }
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
        for (k, v) in h.inner() {
            if k.as_str().starts_with("x-") {
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
