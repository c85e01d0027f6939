//! One AMQP connection: handshake, the frame loop, connection-class methods, heartbeats,
//! and turning errors into closes.
//!
//! The task owns all connection and channel state; it shares only `Arc` handles to the
//! core. Output is gathered in one `BytesMut` and written after each batch of input or
//! deliveries (batched socket writes).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{connection, AMQPClass};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use warren_amqp_codec::{self as codec, Frame, HeaderCheck};
use warren_core::{
    AMQPValue, AlarmState, Broker, ClientProperties, ConnectionAuth, ConnectionGuard, ConnectionId,
    ConnectionInfo, ConsumerId, Exchange, FastMap, FieldTable, FollowUp, LongString, Outbox,
    OutboxEvent, ShortString, TopicPermissions, Tuning, VHost,
};

use crate::channel::{Channel, FrameLater};
use crate::error::{code, connection_error, AmqpError};
use crate::AmqpConfig;

/// Where the connection is in its life (AMQP 0-9-1 §2.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitStartOk,
    AwaitTuneOk,
    AwaitOpen,
    Open,
    /// We sent connection.close and wait for close-ok.
    Closing,
    Done,
}

/// Why the connection ended, for the log.
#[derive(Debug, Clone, Copy)]
enum CloseReason {
    ClientClosed,
    ProtocolError,
    AuthFailure,
    HeartbeatTimeout,
    HandshakeTimeout,
    Shutdown,
    /// Closed from the management API (or its vhost/user was deleted).
    AdminClosed,
    SocketClosed,
}

pub(crate) struct Conn {
    pub broker: Arc<Broker>,
    pub cfg: Arc<AmqpConfig>,
    pub id: ConnectionId,
    pub peer: SocketAddr,
    pub vhost: Option<Arc<VHost>>,
    pub user: String,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub out: BytesMut,
    pub channels: FastMap<u16, Channel>,
    /// Delivery routing: consumer id → (channel, consumer tag).
    pub consumers: FastMap<ConsumerId, (u16, ShortString)>,
    pub outbox: Arc<Outbox>,
    /// The client announced `consumer_cancel_notify`.
    pub cancel_notify: bool,
    pub synced: watch::Receiver<u64>,
    /// Resource alarms: while one is up, a publishing connection is not read from.
    alarms: watch::Receiver<AlarmState>,
    /// The client announced the `connection.blocked` capability.
    blocked_notify: bool,
    /// We sent connection.blocked and owe an unblocked.
    blocked_sent: bool,
    /// The connection has published at least once (only publishers are blocked).
    pub publisher: bool,
    /// Whole seconds since the connection began, advanced by its 1 s tick: the cheap
    /// timestamp of each unacked delivery (consumer timeout).
    pub clock: u32,
    /// Publisher confirms were queued since the last flush: they go out once the frames
    /// read together are handled, so a burst is acked with `multiple` as RabbitMQ does.
    pub confirms_due: bool,
    phase: Phase,
    reason: CloseReason,
    /// A framing error desynchronised the input: everything read after it is dropped.
    input_broken: bool,
    /// The client answered our connection.close: nothing more is read, no linger.
    close_ok_received: bool,
    /// The broker's side of the socket (for the connection's name).
    local: SocketAddr,
    /// Client properties from connection.start-ok, shown by the management API.
    client_properties: FieldTable,
    /// What the transport vouches for (a client certificate's user, for EXTERNAL).
    auth: ConnectionAuth,
    /// The SASL mechanism the client logged in with.
    mechanism: &'static str,
    /// In the broker's connection registry from connection.open on; dropping it unregisters.
    pub registration: Option<ConnectionGuard>,
    /// Exchanges this connection may publish to, valid while the broker's permission
    /// generation equals `perm_generation`.
    pub write_allowed: HashSet<String>,
    pub perm_generation: u64,
    /// The exchange of the last publish and the permission generation its write check
    /// passed at: a publisher that sends to one exchange skips both name lookups.
    pub last_exchange: Option<(u64, Arc<Exchange>)>,
    /// The user's topic permissions in this vhost and the permission generation they were
    /// read at (`None` until first needed).
    pub topic_perms: Option<(u64, Option<Arc<TopicPermissions>>)>,
}

/// The byte streams a connection runs over: TCP, TLS, a WebSocket's bytes.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

pub(crate) async fn run<S: Stream>(
    socket: S,
    peer: SocketAddr,
    local: SocketAddr,
    auth: ConnectionAuth,
    broker: Arc<Broker>,
    cfg: Arc<AmqpConfig>,
    shutdown: watch::Receiver<bool>,
) {
    let (outbox, deliveries) = Outbox::new(cfg.outbox_capacity);
    let synced = broker.store().synced();
    let alarms = broker.alarms.subscribe();
    let mut conn = Conn {
        local,
        auth,
        mechanism: "PLAIN",
        client_properties: FieldTable::default(),
        registration: None,
        write_allowed: HashSet::new(),
        perm_generation: 0,
        last_exchange: None,
        topic_perms: None,
        alarms,
        blocked_notify: false,
        blocked_sent: false,
        confirms_due: false,
        clock: 0,
        publisher: false,
        frame_max: cfg.frame_max,
        channel_max: cfg.channel_max,
        heartbeat: 0,
        broker,
        cfg,
        id: ConnectionId::next(),
        peer,
        vhost: None,
        user: String::new(),
        out: BytesMut::with_capacity(16 * 1024),
        channels: FastMap::default(),
        consumers: FastMap::default(),
        outbox,
        cancel_notify: false,
        synced,
        phase: Phase::AwaitStartOk,
        reason: CloseReason::SocketClosed,
        input_broken: false,
        close_ok_received: false,
    };
    tracing::debug!(conn = conn.id.0, %peer, "amqp connection accepted");
    let mut deliveries = deliveries;
    let result = conn.serve(socket, &mut deliveries, shutdown).await;
    conn.cleanup().await;
    // Unregister only after cleanup, so the API never lists a connection whose consumers
    // are gone while it is still there (or the reverse).
    if let Some(r) = conn.registration.as_mut() {
        r.set_close_reason(match conn.reason {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::AuthFailure => "auth_failure",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::Shutdown => "server_closed",
            CloseReason::AdminClosed => "admin_closed",
            CloseReason::SocketClosed => "socket_closed",
        });
    }
    conn.registration = None;
    warren_core::return_undelivered(&mut deliveries).await;
    let result = match result {
        Ok(Some(rd)) => {
            linger(rd).await;
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            tracing::info!(conn = conn.id.0, %peer, user = %conn.user, reason = ?conn.reason, "amqp connection closed")
        }
        Err(e) => {
            tracing::info!(conn = conn.id.0, %peer, user = %conn.user, reason = ?conn.reason, error = %e, "amqp connection closed")
        }
    }
}

/// After connection.close-ok the client closes the socket (AMQP 0-9-1 §4.2.3); frames it
/// sent before reading close-ok are read and dropped until then. Closing at once with
/// them unread would reset the connection, and a client still writing (amqplib
/// interleaves channels) would see ECONNRESET instead of its close completing. At most
/// `CLOSE_LINGER`, as a misbehaving client may never close.
async fn linger<S: Stream>(mut rd: ReadHalf<S>) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// How long a closed connection's socket is kept for the client to close it.
const CLOSE_LINGER: Duration = Duration::from_secs(3);

impl Conn {
    async fn serve<S: Stream>(
        &mut self,
        socket: S,
        deliveries: &mut warren_core::Deliveries,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Option<ReadHalf<S>>, AmqpError> {
        let (mut rd, mut wr) = tokio::io::split(socket);
        let mut rbuf = BytesMut::with_capacity(64 * 1024);
        // Protocol header (AMQP 0-9-1 §4.2.2): a wrong one is answered with ours, then close.
        let deadline = tokio::time::Instant::now() + self.cfg.handshake_timeout;
        loop {
            match codec::decode_protocol_header(&mut rbuf) {
                Some(HeaderCheck::Ok) => break,
                Some(HeaderCheck::Wrong) => {
                    wr.write_all(codec::PROTOCOL_HEADER).await?;
                    self.reason = CloseReason::ProtocolError;
                    return Ok(None);
                }
                None => {}
            }
            match tokio::time::timeout_at(deadline, rd.read_buf(&mut rbuf)).await {
                Err(_) => {
                    self.reason = CloseReason::HandshakeTimeout;
                    return Ok(None);
                }
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        self.send_start();
        wr.write_all(&self.out).await?;
        self.out.clear();

        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing_since: Option<Instant> = None;
        let started = Instant::now();
        loop {
            let want_sync = self.channels.values().any(|c| c.waiting_for_sync());
            // While an alarm is up, publishers are not read from (RabbitMQ's blocking);
            // consumers keep acking, which is what frees memory.
            let paused = self.publisher && self.alarms.borrow().blocked();
            if paused {
                last_read = Instant::now();
            }
            tokio::select! {
                r = self.alarms.changed() => {
                    if r.is_ok() {
                        self.on_alarm();
                    }
                }
                r = rd.read_buf(&mut rbuf), if !paused => {
                    let n = r?;
                    if n == 0 {
                        if self.phase != Phase::Done && self.phase != Phase::Closing {
                            self.reason = CloseReason::SocketClosed;
                        }
                        return Ok(None);
                    }
                    last_read = Instant::now();
                    if let Some(g) = &self.registration {
                        g.add_octets(n as u64, 0);
                    }
                    self.process_input(&mut rbuf).await;
                    if self.confirms_due {
                        // Deliveries these publishes made to this connection's own
                        // consumers go out before their confirms, in RabbitMQ's order
                        // (aiormq's tests wait for the delivery once the confirm is in).
                        if self.phase == Phase::Open {
                            self.write_ready_deliveries(deliveries).await;
                        }
                        self.flush_confirms();
                    }
                }
                Some(d) = deliveries.recv(), if self.phase == Phase::Open => {
                    if let Some(d) = self.write_delivery(d) {
                        Box::pin(Conn::requeue_undeliverable(d)).await;
                    }
                    self.write_ready_deliveries(deliveries).await;
                }
                _ = self.outbox.events_ready() => {
                    Box::pin(self.handle_events()).await;
                }
                r = self.synced.changed(), if want_sync => {
                    // Nothing may follow a connection.close the broker sent (§4.2.3):
                    // confirms still waiting for their sync then are never sent.
                    if r.is_ok() && self.phase == Phase::Open {
                        self.flush_confirms();
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.clock = u32::try_from(now.duration_since(started).as_secs()).unwrap_or(u32::MAX);
                    if self.phase == Phase::Open {
                        self.enforce_consumer_timeout().await;
                    }
                    if self.phase != Phase::Open && self.phase != Phase::Closing
                        && tokio::time::Instant::now() > deadline
                    {
                        self.reason = CloseReason::HandshakeTimeout;
                        return Ok(None);
                    }
                    if self.heartbeat > 0 {
                        let hb = Duration::from_secs(self.heartbeat as u64);
                        // Two missed heartbeats, as RabbitMQ.
                        if now.duration_since(last_read) > hb * 2 {
                            self.reason = CloseReason::HeartbeatTimeout;
                            tracing::warn!(conn = self.id.0, peer = %self.peer, "missed heartbeats from client, closing");
                            return Ok(None);
                        }
                        if now.duration_since(last_write) >= hb / 2 && self.out.is_empty() {
                            codec::encode_heartbeat(&mut self.out);
                        }
                    }
                    if let Some(t) = closing_since {
                        if now.duration_since(t) > Duration::from_secs(3) {
                            return Ok(None);
                        }
                    }
                }
                reason = wait_close_request(&mut self.registration), if self.phase == Phase::Open => {
                    self.reason = CloseReason::AdminClosed;
                    tracing::info!(conn = self.id.0, peer = %self.peer, %reason, "amqp connection closed by request");
                    self.send_connection_close(
                        code::CONNECTION_FORCED,
                        &format!("CONNECTION_FORCED - {reason}"),
                        0,
                        0,
                    );
                    // Channels and exclusive queues go now, as RabbitMQ ends them with
                    // the close it sends; the close-ok is still awaited.
                    Box::pin(self.cleanup()).await;
                    if let Some(g) = &self.registration {
                        g.mark_released();
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        if self.phase == Phase::Open {
                            self.reason = CloseReason::Shutdown;
                            self.send_connection_close(
                                code::CONNECTION_FORCED,
                                "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
                                0,
                                0,
                            );
                        } else {
                            return Ok(None);
                        }
                    }
                }
            }
            if self.publisher && !self.blocked_sent && self.alarms.borrow().blocked() {
                // It published during an alarm: now it is blocked, and told so.
                self.on_alarm();
            }
            if self.phase == Phase::Closing && closing_since.is_none() {
                closing_since = Some(Instant::now());
            }
            if !self.out.is_empty() {
                if let Some(g) = &self.registration {
                    g.add_octets(0, self.out.len() as u64);
                }
                wr.write_all(&self.out).await?;
                self.out.clear();
                last_write = Instant::now();
            }
            if self.phase == Phase::Done {
                wr.flush().await?;
                // The side that receives close-ok closes the socket (RabbitMQ does at
                // once; amqp091-go waits for it before its Close returns).
                return Ok((!self.close_ok_received).then_some(rd));
            }
        }
    }

    /// Writes the deliveries already waiting, up to 256 KB, so they share one socket write.
    async fn write_ready_deliveries(&mut self, deliveries: &mut warren_core::Deliveries) {
        while self.out.len() < 256 * 1024 {
            match deliveries.try_recv() {
                Ok(d) => {
                    if let Some(d) = self.write_delivery(d) {
                        Box::pin(Conn::requeue_undeliverable(d)).await;
                    }
                }
                Err(_) => break,
            }
        }
    }

    /// Decodes and handles every complete frame in `rbuf`.
    async fn process_input(&mut self, rbuf: &mut BytesMut) {
        if self.input_broken {
            rbuf.clear();
            return;
        }
        loop {
            if matches!(self.phase, Phase::Done) {
                return;
            }
            let frame = match codec::decode_frame(rbuf, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) if e.frame_consumed() => {
                    let (class, method) = e.method();
                    let err = connection_error(e.reply_code(), e.reply_text()).at(class, method);
                    Box::pin(self.handle_error(err)).await;
                    continue;
                }
                Err(e) => {
                    // Nothing after a framing error can be trusted: drop the input, now
                    // and until the socket closes (no frame boundary can be found again).
                    rbuf.clear();
                    self.input_broken = true;
                    self.reason = CloseReason::ProtocolError;
                    let (class, method) = e.method();
                    self.fail_connection(
                        connection_error(e.reply_code(), e.reply_text()).at(class, method),
                    );
                    return;
                }
            };
            let later = match self.handle_frame_now(frame) {
                Ok(FrameLater::Done) => continue,
                Ok(later) => self.handle_frame_later(later).await,
                Err(e) => Err(e),
            };
            if let Err(e) = later {
                Box::pin(self.handle_error(e)).await;
            }
        }
    }

    async fn handle_error(&mut self, e: AmqpError) {
        match e {
            AmqpError::Channel {
                channel,
                code,
                text,
                class_id,
                method_id,
            } => {
                tracing::debug!(conn = self.id.0, channel, code, %text, "channel error");
                self.close_channel_with_error(channel, code, &text, class_id, method_id)
                    .await;
            }
            other => {
                self.reason = CloseReason::ProtocolError;
                self.fail_connection(other);
            }
        }
    }

    /// Sends connection.close for a hard error and stops handling further frames.
    fn fail_connection(&mut self, e: AmqpError) {
        if let AmqpError::Connection {
            code,
            text,
            class_id,
            method_id,
        } = e
        {
            if matches!(self.phase, Phase::Closing | Phase::Done) {
                tracing::debug!(conn = self.id.0, code, %text, "amqp error while closing");
                return;
            }
            tracing::info!(conn = self.id.0, peer = %self.peer, code, %text, "amqp connection error");
            self.send_connection_close(code, &text, class_id, method_id);
        } else {
            self.phase = Phase::Done;
        }
    }

    pub(crate) fn send_connection_close(
        &mut self,
        code: u16,
        text: &str,
        class_id: u16,
        method_id: u16,
    ) {
        // Confirms owed so far go first: nothing may follow connection.close.
        self.flush_confirms();
        codec::encode_method(
            &mut self.out,
            0,
            &AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: code,
                reply_text: truncate_short(text),
                class_id,
                method_id,
            })),
        );
        self.phase = Phase::Closing;
    }

    /// A frame's synchronous part. A transient publish (method, header, body) and an
    /// ack finish here without an await; what is left is boxed by the caller, so no
    /// frame copies a large future (docs/PERFORMANCE.md, "AMQP and STOMP frames without
    /// a per-frame future").
    fn handle_frame_now(&mut self, frame: Frame) -> Result<FrameLater, AmqpError> {
        if self.phase != Phase::Open {
            return Ok(FrameLater::Frame(frame));
        }
        match frame {
            Frame::Heartbeat(_) => Ok(FrameLater::Done),
            Frame::Method(ch, m) if ch != 0 => self.channel_method_now(ch, m),
            Frame::Header(ch, h) if ch != 0 => {
                Ok(FrameLater::publish(self.handle_content_header(ch, h)?))
            }
            Frame::Body(ch, b) if ch != 0 => {
                Ok(FrameLater::publish(self.handle_content_body(ch, b)?))
            }
            Frame::Header(..) | Frame::Body(..) => Err(connection_error(
                code::COMMAND_INVALID,
                "content frame on channel 0",
            )),
            other => Ok(FrameLater::Frame(other)),
        }
    }

    /// The awaited rest of a frame, after [`Conn::handle_frame_now`]. Each kind boxes
    /// only its own future: a persistent publish's store write (1,272 B) or an ack's
    /// store delete is not allocated at the size of the largest method (2 KB).
    async fn handle_frame_later(&mut self, later: FrameLater) -> Result<(), AmqpError> {
        match later {
            FrameLater::Done => Ok(()),
            FrameLater::Publish(p) => Box::pin(self.finish_publish(p)).await,
            FrameLater::FollowUps(f) => {
                Box::pin(FollowUp::run_all(f)).await;
                Ok(())
            }
            FrameLater::DropChannel(ch) => {
                Box::pin(self.drop_channel(ch)).await;
                Ok(())
            }
            FrameLater::Dispatch(ch, m) => Box::pin(self.dispatch_method(ch, m)).await,
            FrameLater::Frame(f) => Box::pin(self.handle_frame(f)).await,
        }
    }

    /// Frames before the connection is open, after connection.close, and on channel 0.
    async fn handle_frame(&mut self, frame: Frame) -> Result<(), AmqpError> {
        match self.phase {
            Phase::Closing => {
                // After connection.close only close/close-ok matter (§4.2.3).
                if let Frame::Method(0, m) = &frame {
                    match m.as_ref() {
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                            self.phase = Phase::Done;
                            self.close_ok_received = true;
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                            self.write_method(
                                0,
                                connection::AMQPMethod::CloseOk(connection::CloseOk {}),
                            );
                            self.phase = Phase::Done;
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            Phase::Done => Ok(()),
            Phase::AwaitStartOk | Phase::AwaitTuneOk | Phase::AwaitOpen => {
                self.handle_handshake(frame).await
            }
            Phase::Open => match frame {
                Frame::Method(0, m) => self.handle_connection_method(*m).await,
                // handle_frame_now took every other frame of an open connection.
                _ => Ok(()),
            },
        }
    }

    fn send_start(&mut self) {
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        // RabbitMQ's product and the version whose behaviour Warren follows (as the API's
        // rabbitmq_version and STOMP's server header): clients and their suites switch
        // RabbitMQ's extensions on by it (amqp091-go's RabbitMQ-only tests, which also
        // leak their connection on any other product). Warren names itself beside it.
        props.insert("product".into(), text("RabbitMQ"));
        props.insert("version".into(), text(warren_core::RABBITMQ_COMPAT_VERSION));
        props.insert("warren_version".into(), text(env!("CARGO_PKG_VERSION")));
        props.insert("platform".into(), text("Rust"));
        props.insert("cluster_name".into(), text(&self.broker.cluster_name()));
        props.insert("copyright".into(), text("The Warren authors"));
        props.insert(
            "information".into(),
            text(concat!(
                "Warren ",
                env!("CARGO_PKG_VERSION"),
                ": a multi-protocol message broker compatible with RabbitMQ"
            )),
        );
        self.write_method(
            0,
            connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                // EXTERNAL only where a verified client certificate names a user, as
                // RabbitMQ's rabbitmq_auth_mechanism_ssl offers it only then.
                mechanisms: LongString::from(if self.auth.cert_user.is_some() {
                    &b"PLAIN AMQPLAIN EXTERNAL"[..]
                } else {
                    &b"PLAIN AMQPLAIN"[..]
                }),
                locales: LongString::from(&b"en_US"[..]),
            }),
        );
    }

    pub(crate) fn write_method(&mut self, channel: u16, m: connection::AMQPMethod) {
        codec::encode_method(&mut self.out, channel, &AMQPClass::Connection(m));
    }

    async fn handle_handshake(&mut self, frame: Frame) -> Result<(), AmqpError> {
        let Frame::Method(0, m) = frame else {
            return Err(connection_error(
                code::COMMAND_INVALID,
                "expected a connection method during the handshake",
            ));
        };
        match (self.phase, *m) {
            (Phase::AwaitStartOk, AMQPClass::Connection(connection::AMQPMethod::StartOk(s))) => {
                self.cancel_notify =
                    client_capability(&s.client_properties, "consumer_cancel_notify");
                self.blocked_notify = client_capability(&s.client_properties, "connection.blocked");
                self.client_properties = s.client_properties.clone();
                let mechanism = s.mechanism.as_str().to_owned();
                let (login, name) = match (mechanism.as_str(), &self.auth.cert_user) {
                    ("PLAIN", _) => (
                        parse_plain(s.response.as_bytes()).map(|(user, pass)| {
                            self.broker.authenticate(&user, &pass, self.peer.ip())
                        }),
                        "PLAIN",
                    ),
                    ("AMQPLAIN", _) => (
                        parse_amqplain(s.response.as_bytes()).map(|(user, pass)| {
                            self.broker.authenticate(&user, &pass, self.peer.ip())
                        }),
                        "AMQPLAIN",
                    ),
                    // The response is ignored: the certificate names the user (RabbitMQ's
                    // rabbit_auth_mechanism_ssl), which must exist; no password.
                    ("EXTERNAL", Some(user)) => (
                        Some(self.broker.authenticate_external(user, self.peer.ip())),
                        "EXTERNAL",
                    ),
                    (other, _) => {
                        return Err(connection_error(
                            code::COMMAND_INVALID,
                            format!("unknown authentication mechanism '{other}'"),
                        ))
                    }
                };
                match login {
                    Some(Ok(u)) => {
                        self.user = u.name;
                        self.mechanism = name;
                    }
                    refusal => {
                        if let Some(Err(e)) = refusal {
                            tracing::warn!(conn = self.id.0, peer = %self.peer, %mechanism, error = %e, "amqp login refused");
                        }
                        self.reason = CloseReason::AuthFailure;
                        // RabbitMQ's auth-notification: connection.close 403 only to a
                        // client that asked for it with this capability; any other
                        // gets no frame, and the socket closes after the same delay
                        // (aioamqp's tests expect the bare close).
                        if !client_capability(&s.client_properties, "authentication_failure_close")
                        {
                            self.phase = Phase::Closing;
                            return Ok(());
                        }
                        return Err(refused(&mechanism));
                    }
                }
                self.write_method(
                    0,
                    connection::AMQPMethod::Tune(connection::Tune {
                        channel_max: self.cfg.channel_max,
                        frame_max: self.cfg.frame_max,
                        heartbeat: self.cfg.heartbeat,
                    }),
                );
                self.phase = Phase::AwaitTuneOk;
                Ok(())
            }
            (Phase::AwaitTuneOk, AMQPClass::Connection(connection::AMQPMethod::TuneOk(t))) => {
                // 0 means "no limit of the client's": the server's limit applies.
                let frame_max = if t.frame_max == 0 {
                    self.cfg.frame_max
                } else {
                    t.frame_max
                };
                if frame_max < 4096 {
                    return Err(connection_error(
                        code::NOT_ALLOWED,
                        format!("failed to negotiate connection parameters: frame_max={frame_max} < 4096 min"),
                    ));
                }
                if frame_max > self.cfg.frame_max {
                    return Err(connection_error(
                        code::NOT_ALLOWED,
                        format!(
                            "failed to negotiate connection parameters: frame_max={frame_max} > {} max",
                            self.cfg.frame_max
                        ),
                    )
                    .at(10, 31));
                }
                self.frame_max = frame_max;
                self.channel_max = if t.channel_max == 0 {
                    self.cfg.channel_max
                } else {
                    t.channel_max.min(self.cfg.channel_max)
                };
                self.heartbeat = t.heartbeat;
                self.phase = Phase::AwaitOpen;
                Ok(())
            }
            (Phase::AwaitOpen, AMQPClass::Connection(connection::AMQPMethod::Open(o))) => {
                let name = o.virtual_host.as_str();
                match self.broker.vhost(name) {
                    Some(v) => {
                        if let Err(e) = self.broker.check_vhost_access(&self.user, name) {
                            tracing::warn!(conn = self.id.0, peer = %self.peer, user = %self.user, vhost = name, "amqp vhost access refused");
                            return Err(connection_error(code::NOT_ALLOWED, e.text).at(10, 40));
                        }
                        if let Err(e) = self.broker.check_connection_limits(&self.user, name) {
                            tracing::warn!(conn = self.id.0, peer = %self.peer, user = %self.user, vhost = name, "amqp connection limit reached");
                            return Err(connection_error(code::NOT_ALLOWED, e.text).at(10, 40));
                        }
                        self.vhost = Some(v);
                        self.registration =
                            Some(self.broker.connections().register(ConnectionInfo {
                                id: self.id,
                                protocol: "AMQP 0-9-1".into(),
                                user: self.user.clone(),
                                vhost: name.to_owned(),
                                peer: self.peer,
                                local: self.local,
                                client_properties: ClientProperties::Amqp(std::mem::take(
                                    &mut self.client_properties,
                                )),
                                auth_mechanism: Some(self.mechanism),
                                tuning: Some(Tuning {
                                    channel_max: self.channel_max,
                                    frame_max: self.frame_max,
                                    heartbeat: self.heartbeat,
                                }),
                                tls: self.auth.tls.clone(),
                            }));
                        self.write_method(0, connection::AMQPMethod::OpenOk(connection::OpenOk {}));
                        self.phase = Phase::Open;
                        self.on_alarm();
                        tracing::info!(conn = self.id.0, peer = %self.peer, user = %self.user, vhost = name, "amqp connection opened");
                        Ok(())
                    }
                    // RabbitMQ names the failing method: connection.open (10, 40).
                    None => Err(connection_error(
                        code::NOT_ALLOWED,
                        format!("vhost {name} not found"),
                    )
                    .at(10, 40)),
                }
            }
            (_, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                self.write_method(0, connection::AMQPMethod::CloseOk(connection::CloseOk {}));
                self.phase = Phase::Done;
                self.reason = CloseReason::ClientClosed;
                Ok(())
            }
            (_, other) => Err(connection_error(
                code::COMMAND_INVALID,
                format!(
                    "unexpected method {}.{} during the handshake",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ),
            )),
        }
    }

    async fn handle_connection_method(&mut self, m: AMQPClass) -> Result<(), AmqpError> {
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                // As RabbitMQ, close-ok only once the channels are gone: a client that
                // reconnects on close-ok finds its exclusive consumers and queues released
                // (amqp091-go's reconnect example consumes exclusively again at once).
                Box::pin(self.cleanup()).await;
                self.write_method(0, connection::AMQPMethod::CloseOk(connection::CloseOk {}));
                self.phase = Phase::Done;
                self.reason = CloseReason::ClientClosed;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                self.phase = Phase::Done;
                self.close_ok_received = true;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                self.write_method(
                    0,
                    connection::AMQPMethod::UpdateSecretOk(connection::UpdateSecretOk {}),
                );
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(()),
            other => Err(connection_error(
                code::COMMAND_INVALID,
                format!(
                    "unexpected method {}.{} on channel 0",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ),
            )
            .at(other.get_amqp_class_id(), other.get_amqp_method_id())),
        }
    }

    /// Tells a publishing client that announced `connection.blocked` when an alarm goes up
    /// or down. As in RabbitMQ, only connections that publish are blocked (and told so):
    /// a consumer-only connection keeps working, which is what relieves memory.
    fn on_alarm(&mut self) {
        let state = *self.alarms.borrow_and_update();
        if self.phase != Phase::Open || !self.blocked_notify {
            return;
        }
        if state.blocked() && self.publisher && !self.blocked_sent {
            tracing::info!(
                conn = self.id.0,
                reason = state.reason(),
                "connection blocked"
            );
            self.write_method(
                0,
                connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: state.reason().into(),
                }),
            );
            self.blocked_sent = true;
        } else if !state.blocked() && self.blocked_sent {
            self.write_method(
                0,
                connection::AMQPMethod::Unblocked(connection::Unblocked {}),
            );
            self.blocked_sent = false;
        }
    }

    /// Core news for this connection: cancelled consumers and stalled queues.
    async fn handle_events(&mut self) {
        for ev in self.outbox.take_events() {
            match ev {
                OutboxEvent::Cancelled(id) => self.server_cancel(id).await,
                OutboxEvent::Stalled(q) => {
                    if let Some(q) = q.upgrade() {
                        q.resume(&self.outbox).await;
                    }
                }
            }
        }
    }

    /// Releases everything the connection holds: consumers, unacked messages (requeued),
    /// exclusive queues. Once (the vhost is taken): on connection.close, before its
    /// close-ok, or when the connection ends.
    async fn cleanup(&mut self) {
        let channels: Vec<u16> = self.channels.keys().copied().collect();
        for ch in channels {
            self.drop_channel(ch).await;
        }
        if let Some(v) = self.vhost.take() {
            v.connection_closed(self.id).await;
        }
    }
}

/// Resolves when the management API asks this connection to close; never if unregistered.
async fn wait_close_request(registration: &mut Option<ConnectionGuard>) -> String {
    match registration {
        Some(g) => g.closed().await,
        None => std::future::pending().await,
    }
}

fn refused(mechanism: &str) -> AmqpError {
    connection_error(
        code::ACCESS_REFUSED,
        format!(
            "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
        ),
    )
}

fn client_capability(props: &FieldTable, name: &str) -> bool {
    match props.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(c)) => {
            matches!(c.inner().get(name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

/// SASL PLAIN: `authzid \0 authcid \0 passwd` (RFC 4616).
fn parse_plain(resp: &[u8]) -> Option<(String, String)> {
    let mut parts = resp.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(pass.to_vec()).ok()?,
    ))
}

/// AMQPLAIN: a field table without its length prefix, with LOGIN and PASSWORD.
fn parse_amqplain(resp: &[u8]) -> Option<(String, String)> {
    let mut raw = (resp.len() as u32).to_be_bytes().to_vec();
    raw.extend_from_slice(resp);
    let t = warren_core::message::decode_table(&raw)?;
    let get = |k: &str| match t.inner().get(k)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

/// Reply texts are short strings: at most 255 bytes, cut on a char boundary.
pub(crate) fn truncate_short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain() {
        assert_eq!(
            parse_plain(b"\0guest\0secret"),
            Some(("guest".into(), "secret".into()))
        );
        assert_eq!(parse_plain(b"guest"), None);
        // AMQPLAIN as pika sends it: LOGIN S "guest", PASSWORD S "guest"
        let mut t = Vec::new();
        t.extend_from_slice(b"\x05LOGINS\x00\x00\x00\x05guest");
        t.extend_from_slice(b"\x08PASSWORDS\x00\x00\x00\x05guest");
        assert_eq!(parse_amqplain(&t), Some(("guest".into(), "guest".into())));
        assert_eq!(parse_amqplain(b"\x05LOG"), None);
    }

    #[test]
    fn reply_text_is_cut_to_a_short_string() {
        let long = "é".repeat(200);
        assert!(truncate_short(&long).as_str().len() <= 255);
    }
}
