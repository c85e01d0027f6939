//! One STOMP connection: CONNECT negotiation, the frame loop, subscriptions as consumers on
//! core queues, acks, transactions, receipts and heart-beats.
//!
//! Generic over the byte stream, so Web-STOMP runs this same code over a WebSocket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use warren_core::auth::AuthError;
use warren_core::permissions::{Access, ResourceKind};
use warren_core::read_room::ReadRoom;
use warren_core::stream::StreamStart;
use warren_core::{
    AlarmState, ConnectionAuth, ConnectionGuard, ConnectionId, ConnectionInfo, ConsumerId,
    ConsumerSpec, CoreError, Credit, Delivery, Exchange, ExchangeDecl, ExchangeKind, FastMap,
    FastSet, FieldTable, Message, MsgSeq, Outbox, OutboxEvent, Queue, QueueDecl, ShortString,
    Target, Ticket, TopicPermissions, VHost,
};

use crate::codec::{self, CodecError, Decoded, Frame, FrameWriter, Version};
use crate::destination::{self, DestError, Destination};
use crate::props;
use crate::StompFrontend;

/// What the server supports, in the order RabbitMQ lists it.
const VERSIONS: &str = "1.0,1.1,1.2";
/// Bounds on a transaction: frames buffered until COMMIT, and open transactions.
const MAX_TX_FRAMES: usize = 10_000;
const MAX_TXS: usize = 100;
/// Deliveries buffered between queues and this connection.
const OUTBOX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    Auto,
    /// Cumulative: an ACK settles every earlier message of the subscription.
    Client,
    ClientIndividual,
}

struct Subscription {
    id: String,
    /// STOMP 1.0 SUBSCRIBE without `id` (known by its destination): as in RabbitMQ, its
    /// MESSAGEs carry no `subscription` header and a `Q_<destination>` message-id.
    anonymous: bool,
    queue: Arc<Queue>,
    consumer: ConsumerId,
    ack: AckMode,
    /// A durable topic subscription: UNSUBSCRIBE with `durable:true` deletes its queue.
    durable_queue: bool,
}

/// A message sent with a client ack mode and not yet settled.
/// The queues [`Session::send`] made before the message: for a `/temp-queue/`
/// destination and for a `/temp-queue/` reply-to.
struct Declared {
    temp: Option<String>,
    reply: Option<String>,
}

/// What a frame leaves to await after [`Session::handle_now`].
enum Later {
    /// Everything but a plain SEND.
    Frame(Frame),
    /// A SEND's store writes (persistent messages) and its receipt.
    Deliver(warren_core::Unfinished, Option<String>),
}

struct Pending {
    token: u64,
    queue: Arc<Queue>,
    seq: MsgSeq,
}

/// Why a frame failed, or the frame loop stopped.
#[derive(Debug)]
enum Stop {
    /// ERROR frame: `message` header and a body (STOMP 1.2 "ERROR").
    Error {
        message: String,
        detail: String,
        receipt: Option<String>,
        /// The body ends with a newline, as most of RabbitMQ's do (a few have none).
        newline: bool,
        /// Whether the connection closes after it. STOMP 1.2 says a server closes after
        /// an ERROR, but RabbitMQ keeps the connection after a client's mistake in a
        /// frame (a missing header, an unknown transaction, destination or subscription:
        /// its `error/3`), and clients rely on that (php-stomp's commit test). It closes
        /// for what fails in the AMQP layer (403, 404, 406: its `amqp_death`), a second
        /// CONNECT, and everything outside a frame's handling (bad bytes, timeouts,
        /// shutdown), which always ends the connection whatever this says.
        closes: bool,
    },
    Disconnect,
}

impl Stop {
    /// A client's mistake in a frame: ERROR, and the connection stays.
    fn error(message: impl Into<String>, detail: impl Into<String>) -> Stop {
        Stop::Error {
            message: message.into(),
            detail: detail.into(),
            receipt: None,
            newline: true,
            closes: false,
        }
    }

    /// An ERROR whose body has no trailing newline, where RabbitMQ's has none.
    fn bare(message: impl Into<String>, detail: impl Into<String>) -> Stop {
        Stop::Error {
            message: message.into(),
            detail: detail.into(),
            receipt: None,
            newline: false,
            closes: false,
        }
    }

    /// The same ERROR, closing the connection.
    fn closing(mut self) -> Stop {
        if let Stop::Error { closes, .. } = &mut self {
            *closes = true;
        }
        self
    }

    /// The ERROR answering a frame that asked for `receipt`.
    fn for_receipt(mut self, r: Option<String>) -> Stop {
        if let Stop::Error { receipt, .. } = &mut self {
            *receipt = r;
        }
        self
    }

    /// An AMQP-layer refusal (RabbitMQ's `amqp_death`): closes.
    fn core(e: CoreError) -> Stop {
        Stop::error(e.kind.name().to_ascii_lowercase(), e.to_string()).closing()
    }
}

type Step = Result<(), Stop>;

/// The connection after a successful CONNECT.
struct Session {
    fe: Arc<StompFrontend>,
    id: ConnectionId,
    peer: SocketAddr,
    version: Version,
    session_id: String,
    user: String,
    vhost: Arc<VHost>,
    outbox: Arc<Outbox>,
    out: BytesMut,
    subs: FastMap<u64, Subscription>,
    sub_tokens: FastMap<String, u64>,
    next_token: u64,
    /// Client-ack deliveries by their message number (the `@@n` of their message-id).
    pending: BTreeMap<u64, Pending>,
    next_msg: u64,
    txs: HashMap<String, Vec<Frame>>,
    /// RECEIPTs in order, each waiting for its store ticket (if any) to be synced.
    receipts: VecDeque<(Option<Ticket>, String)>,
    /// `/queue/` names already declared by this connection.
    declared: FastSet<String>,
    /// `/temp-queue/<name>` → the real queue name.
    temp_queues: HashMap<String, String>,
    /// Whether this connection has published (alarms stop reading from publishers).
    publisher: bool,
    alarms: watch::Receiver<AlarmState>,
    /// Listed in the management API while it lives; its `closed()` is the API's close.
    registration: ConnectionGuard,
    /// Exchanges this session may publish to, valid at `perm_generation`.
    write_allowed: FastSet<String>,
    perm_generation: u64,
    /// The exchange of the last synchronous SEND, reused while it is not deleted: a
    /// connection usually sends to one exchange, and this saves a lookup under the
    /// vhost's lock per SEND.
    last_exchange: Option<Arc<Exchange>>,
    /// The user's topic permissions in the vhost and the generation they were read at.
    topic_perms: Option<(u64, Option<Arc<TopicPermissions>>)>,
    /// A delivery's destination and message-id, reused (see [`Session::deliver`]).
    scratch: (String, String),
}

/// The CONNECT exchange: everything up to the CONNECTED frame, which is left in the
/// session's output for the serving loop to write.
async fn connect<S>(
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
    auth: ConnectionAuth,
    fe: Arc<StompFrontend>,
    shutdown: watch::Receiver<bool>,
) -> Option<Connected<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Small: an idle connection keeps it (see `ReadRoom` for how a busy one grows).
    let mut rbuf = BytesMut::with_capacity(256);
    let limits = fe.config.limits;
    // The first frame must be CONNECT or STOMP, within the connect timeout.
    let first = tokio::time::timeout(fe.config.connect_timeout, async {
        loop {
            match codec::decode(&mut rbuf, Version::V1_0, &limits) {
                Ok(Some(Decoded::Frame(f))) => return Ok(Some(f)),
                Ok(Some(Decoded::HeartBeat)) => continue,
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            match rd.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    })
    .await;
    let connect = match first {
        Ok(Ok(Some(f))) => f,
        Ok(Err(e)) => {
            let mut out = BytesMut::new();
            error_frame(&mut out, Version::V1_0, &codec_stop(&e));
            let _ = wr.write_all(&out).await;
            return None;
        }
        _ => return None,
    };
    if connect.command != "CONNECT" && connect.command != "STOMP" {
        let mut out = BytesMut::new();
        let stop = Stop::error("Illegal command", "You must log in using CONNECT first");
        error_frame(&mut out, Version::V1_0, &stop);
        let _ = wr.write_all(&out).await;
        return None;
    }
    let (mut session, deliveries) = match connect_session(&fe, peer, local, &auth, &connect) {
        Ok(s) => s,
        Err((version, stop)) => {
            let mut out = BytesMut::new();
            error_frame(&mut out, version, &stop);
            let _ = wr.write_all(&out).await;
            tracing::info!(%peer, reason = ?stop, "stomp connection refused");
            return None;
        }
    };
    // STOMP 1.1 "Heart-beating": cx,cy from the client; we send every cy and expect a
    // frame or EOL at least every cx (as RabbitMQ answers: heart-beat:cy,cx), both in
    // whole seconds as RabbitMQ's reader rounds them.
    let (cx, cy) = heart_beat(connect.get("heart-beat"));
    let (cx, cy) = (whole_seconds(cx), whole_seconds(cy));
    let send_every = (cy > 0).then(|| Duration::from_millis(cy));
    let expect_every = (cx > 0).then(|| Duration::from_millis(cx));
    let mut connected = Frame::new("CONNECTED")
        // The RabbitMQ version whose behaviour Warren follows first, then Warren's own
        // (STOMP 1.2: `name/version` and comments), as the management API reports both:
        // clients and suites that look for `RabbitMQ/` find it.
        .with(
            "server",
            format!(
                "RabbitMQ/{} Warren/{}",
                warren_core::RABBITMQ_COMPAT_VERSION,
                env!("CARGO_PKG_VERSION")
            ),
        )
        .with("session", session.session_id.clone())
        .with("heart-beat", format!("{cy},{cx}"));
    // RabbitMQ names the version even for a 1.0 client that sent no accept-version.
    connected.push("version", session.version.as_str());
    codec::encode(&connected, session.version, &mut session.out);
    tracing::info!(conn = session.id.0, %peer, user = %session.user, vhost = %session.vhost.name, version = session.version.as_str(), "stomp connection opened");
    Some(Connected {
        session,
        deliveries,
        rd,
        wr,
        rbuf,
        shutdown,
        send_every,
        expect_every,
    })
}

/// What connecting hands to the serving loop.
struct Connected<S> {
    session: Session,
    deliveries: warren_core::Deliveries,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    rbuf: BytesMut,
    shutdown: watch::Receiver<bool>,
    send_every: Option<Duration>,
    expect_every: Option<Duration>,
}

/// Serves one STOMP connection over any byte stream (TCP, or a WebSocket's text frames).
///
/// Connecting runs once, in its own boxed future (freed when CONNECT is answered), so the
/// task keeps only what serving needs, as MQTT's: one `async fn` holding both kept the
/// arguments and the connect phase's locals for the connection's whole life (moved-from
/// locals of an `async fn` keep their slots).
pub(crate) fn run<S>(
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
    auth: ConnectionAuth,
    fe: Arc<StompFrontend>,
    shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connecting = Box::pin(connect(stream, peer, local, auth, fe, shutdown));
    async move {
        let Some(Connected {
            mut session,
            mut deliveries,
            mut rd,
            mut wr,
            rbuf,
            mut shutdown,
            send_every,
            expect_every,
        }) = connecting.await
        else {
            return;
        };
        let peer = session.peer;
        let end = session
            .serve(
                &mut rd,
                &mut wr,
                rbuf,
                &mut deliveries,
                &mut shutdown,
                send_every,
                expect_every,
            )
            .await;
        if let Err(stop) = &end {
            if let Stop::Error { .. } = stop {
                error_frame(&mut session.out, session.version, stop);
            }
            let _ = wr.write_all(&session.out).await;
            let _ = wr.flush().await;
        }
        session.registration.set_close_reason(match &end {
            Ok(_) => "socket_closed",
            Err(Stop::Disconnect) => "client_closed",
            Err(Stop::Error { .. }) => "error_frame",
        });
        session.close().await;
        warren_core::return_undelivered(&mut deliveries).await;
        tracing::info!(conn = session.id.0, %peer, reason = ?end, "stomp connection closed");
    }
}

/// rabbit_stomp_reader's rounding of a heart-beat interval: 0 stays off, anything under
/// a second is one second, the rest whole seconds (down). Clients asking for 100 ms are
/// not dropped after 200 ms of jitter, and get what RabbitMQ gives them.
fn whole_seconds(ms: u64) -> u64 {
    match ms {
        0 => 0,
        1..=999 => 1000,
        _ => ms / 1000 * 1000,
    }
}

/// `heart-beat: cx,cy` (absent or invalid = 0,0).
fn heart_beat(h: Option<&str>) -> (u64, u64) {
    let Some((a, b)) = h.and_then(|h| h.split_once(',')) else {
        return (0, 0);
    };
    (a.trim().parse().unwrap_or(0), b.trim().parse().unwrap_or(0))
}

fn codec_stop(e: &CodecError) -> Stop {
    let message = match e {
        CodecError::FrameTooLarge { .. } => "Frame too large",
        CodecError::TooManyHeaders { .. } => "Too many headers",
        CodecError::HeaderTooLong { .. } => "Header too long",
        CodecError::BadContentLength => "Invalid content-length",
        _ => "Malformed frame",
    };
    Stop::error(message, e.to_string()).closing()
}

fn error_frame(out: &mut BytesMut, version: Version, stop: &Stop) {
    let Stop::Error {
        message,
        detail,
        receipt,
        newline,
        ..
    } = stop
    else {
        return;
    };
    let mut f = Frame::new("ERROR")
        .with("message", message.clone())
        .with("content-type", "text/plain")
        .with("version", VERSIONS);
    if let Some(r) = receipt {
        f.push("receipt-id", r.clone());
    }
    let body = if *newline {
        format!("{detail}\n")
    } else {
        detail.clone()
    };
    f.push("content-length", body.len().to_string());
    f.body = body.into();
    codec::encode(&f, version, out);
}

/// Version negotiation and authentication (STOMP 1.2 "Connecting").
fn connect_session(
    fe: &Arc<StompFrontend>,
    peer: SocketAddr,
    local: SocketAddr,
    auth: &ConnectionAuth,
    c: &Frame,
) -> Result<(Session, warren_core::Deliveries), (Version, Stop)> {
    let version = match c.get("accept-version") {
        None => Version::V1_0,
        Some(list) => match list.split(',').filter_map(Version::parse).max() {
            Some(v) => v,
            None => {
                return Err((
                    Version::V1_0,
                    Stop::error(
                        "Version mismatch",
                        format!("Supported versions are {VERSIONS}"),
                    ),
                ))
            }
        },
    };
    let bad = |detail: String| (version, Stop::error("Bad CONNECT", detail));
    let denied = |vhost: &str| {
        let detail = format!("Virtual host '{vhost}' access denied");
        (version, Stop::bare("Bad CONNECT", detail))
    };
    // No login: the client certificate's user (RabbitMQ's stomp.ssl_cert_login), else the
    // configured default user (stomp.default_user). A login header always wins.
    let login = match (c.get("login"), &auth.cert_user) {
        (Some(l), _) => {
            let pass = c.get("passcode").unwrap_or("");
            fe.broker.authenticate(l, pass, peer.ip())
        }
        (None, Some(cert_user)) => fe.broker.authenticate_external(cert_user, peer.ip()),
        (None, None) if fe.config.allow_anonymous => {
            fe.broker
                .authenticate(&fe.config.default_user, &fe.config.default_pass, peer.ip())
        }
        (None, None) => return Err(bad("Access refused: no login".into())),
    };
    let user = match login {
        Ok(u) => u.name,
        Err(e) => {
            let user = match e {
                AuthError::InvalidCredentials(u) | AuthError::LoopbackOnly(u) => u,
            };
            return Err(bad(format!("Access refused for user '{user}'")));
        }
    };
    // The `host` header names the vhost, as in RabbitMQ.
    let vhost_name = c.get("host").unwrap_or(&fe.config.default_vhost);
    let Some(vhost) = fe.broker.vhost(vhost_name) else {
        return Err(denied(vhost_name));
    };
    if fe.broker.check_vhost_access(&user, vhost_name).is_err() {
        return Err(denied(vhost_name));
    }
    if let Err(e) = fe.broker.check_connection_limits(&user, vhost_name) {
        return Err(bad(e.text));
    }
    let id = ConnectionId::next();
    let registration = fe.broker.connections().register(ConnectionInfo {
        id,
        protocol: format!("STOMP {}", version.as_str()).into(),
        user: user.clone(),
        vhost: vhost_name.to_owned(),
        peer,
        local,
        client_properties: warren_core::ClientProperties::plugin("STOMP client", None),
        auth_mechanism: None,
        tuning: None,
        tls: auth.tls.clone(),
    });
    let (outbox, deliveries) = Outbox::new(OUTBOX);
    let session = Session {
        fe: fe.clone(),
        id,
        peer,
        version,
        session_id: warren_core::vhost::generated_name("session-"),
        user,
        vhost,
        outbox,
        out: BytesMut::new(),
        subs: FastMap::default(),
        sub_tokens: FastMap::default(),
        next_token: 1,
        pending: BTreeMap::new(),
        next_msg: 1,
        scratch: Default::default(),
        txs: HashMap::new(),
        receipts: VecDeque::new(),
        declared: FastSet::default(),
        temp_queues: HashMap::new(),
        publisher: false,
        alarms: fe.broker.alarms.subscribe(),
        registration,
        write_allowed: FastSet::default(),
        perm_generation: 0,
        last_exchange: None,
        topic_perms: None,
    };
    Ok((session, deliveries))
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    async fn serve<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        mut rbuf: BytesMut,
        deliveries: &mut warren_core::Deliveries,
        shutdown: &mut watch::Receiver<bool>,
        send_every: Option<Duration>,
        expect_every: Option<Duration>,
    ) -> Result<(), Stop>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let limits = self.fe.config.limits;
        let limits_timeout = self.fe.config.incomplete_frame_timeout;
        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        let period = [send_every]
            .into_iter()
            .flatten()
            .chain([limits_timeout])
            .min()
            .map(|d| (d / 2).max(Duration::from_millis(20)))
            .unwrap_or(Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A client silent for 2.9 of its heart-beat intervals is dropped: RabbitMQ 3.10
        // closes 2.90 s after the last byte for a 1 s heart-beat (measured; stompest's
        // integration test wants it under 3 s). One timer, moved forward only when it
        // fires, rather than at every read.
        let silence = expect_every.map(|every| every * 29 / 10);
        let silence_timer = tokio::time::sleep(silence.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(silence_timer);
        let store = self.fe.broker.store().clone();
        let mut room = ReadRoom::default();
        loop {
            // Frames already buffered (e.g. sent together with CONNECT).
            let paused = self.publisher && self.alarms.borrow().blocked();
            if !paused {
                loop {
                    match codec::decode(&mut rbuf, self.version, &limits) {
                        Ok(Some(Decoded::Frame(f))) => {
                            let receipt = f.get("receipt").map(str::to_owned);
                            // Only what must await is boxed: a frame's whole future,
                            // awaited inline, was copied for every SEND (perf).
                            let step = match self.handle_now(f) {
                                Ok(None) => Ok(()),
                                Ok(Some(later)) => self.handle_later(later).await,
                                Err(stop) => Err(stop),
                            };
                            match step {
                                Ok(()) => {}
                                Err(stop @ Stop::Error { closes: true, .. }) => {
                                    return Err(stop.for_receipt(receipt))
                                }
                                Err(stop @ Stop::Error { .. }) => {
                                    let stop = stop.for_receipt(receipt);
                                    tracing::debug!(conn = self.id.0, error = ?stop, "stomp frame refused");
                                    error_frame(&mut self.out, self.version, &stop);
                                }
                                Err(Stop::Disconnect) => {
                                    self.flush_receipts(&store);
                                    return Err(Stop::Disconnect);
                                }
                            }
                        }
                        Ok(Some(Decoded::HeartBeat)) => {}
                        Ok(None) => {
                            if !rbuf.is_empty() {
                                room.straddled();
                            }
                            break;
                        }
                        Err(e) => return Err(codec_stop(&e)),
                    }
                    if self.publisher && self.alarms.borrow().blocked() {
                        break;
                    }
                }
            }
            self.flush_receipts(&store);
            if !self.out.is_empty() {
                if wr.write_all(&self.out).await.is_err() {
                    return Ok(());
                }
                self.out.clear();
                // Do not keep a large write buffer on an idle connection.
                if self.out.capacity() > 64 * 1024 {
                    self.out = BytesMut::new();
                }
                last_write = Instant::now();
            }
            if rbuf.is_empty() && rbuf.capacity() > 64 * 1024 {
                rbuf = BytesMut::with_capacity(256);
            } else {
                room.make(&mut rbuf);
            }
            let spare = rbuf.capacity() - rbuf.len();
            let paused = self.publisher && self.alarms.borrow().blocked();
            let waiting = self.receipts.front().and_then(|(t, _)| *t);
            tokio::select! {
                r = rd.read_buf(&mut rbuf), if !paused => match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(n) => {
                        room.read(n, spare);
                        last_read = Instant::now();
                    }
                },
                r = self.alarms.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    // While blocked the client is not read from: don't count it as silent.
                    last_read = Instant::now();
                }
                Some(d) = deliveries.recv() => {
                    let mut next = Some(d);
                    while let Some(d) = next {
                        if let Some(d) = self.deliver(d) {
                            // Unsubscribed while in flight.
                            Box::pin(d.queue.requeue(&[d.seq])).await;
                        }
                        next = if self.out.len() < 64 * 1024 { deliveries.try_recv().ok() } else { None };
                    }
                }
                _ = self.outbox.events_ready() => {
                    for ev in self.outbox.take_events() {
                        match ev {
                            OutboxEvent::Stalled(q) => if let Some(q) = q.upgrade() { q.resume(&self.outbox).await },
                            OutboxEvent::Cancelled(c) => self.cancelled(c),
                        }
                    }
                }
                r = async { store.wait_synced(waiting.unwrap_or(Ticket(0))).await }, if waiting.is_some() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    if let Some(front) = self.receipts.front_mut() {
                        front.0 = None;
                    }
                }
                _ = &mut silence_timer, if silence.is_some() => {
                    let grace = silence.unwrap_or_default();
                    if !paused && last_read.elapsed() >= grace {
                        tracing::info!(conn = self.id.0, peer = %self.peer, "stomp heart-beat timeout");
                        return Ok(());
                    }
                    // While blocked the client is not read from: not silent.
                    let from = if paused { Instant::now() } else { last_read };
                    silence_timer.as_mut().reset((from + grace).into());
                }
                _ = tick.tick() => {
                    if !paused && !rbuf.is_empty() && last_read.elapsed() > limits_timeout {
                        return Err(Stop::error(
                            "Incomplete frame",
                            "A frame was started but not completed in time",
                        ));
                    }
                    if let Some(every) = send_every {
                        // Every half interval when idle, as RabbitMQ: a client that checks
                        // strictly still sees a beat well within the interval. Ticks come
                        // every half interval, a little late or early: half a tick of
                        // slack keeps them from slipping a whole tick.
                        if last_write.elapsed() + period / 2 >= every / 2 {
                            self.out.extend_from_slice(b"\n");
                        }
                    }
                }
                _ = shutdown.changed() => {
                    return Err(Stop::error("Server shutdown", "The broker is shutting down"));
                }
                reason = self.registration.closed() => {
                    return Err(Stop::error("Connection forced", format!("CONNECTION_FORCED - {reason}")));
                }
            }
        }
    }

    /// RabbitMQ's permission check for this session's user; 403 becomes an ERROR frame.
    fn allow(&self, access: Access, kind: ResourceKind, name: &str) -> Step {
        self.fe
            .broker
            .check_permission(&self.user, &self.vhost.name, access, kind, name)
            .map_err(Stop::core)
    }

    /// Write on `exchange`, remembered until the permissions change (every SEND asks).
    fn allow_publish(&mut self, exchange: &str) -> Step {
        let generation = self.fe.broker.permissions_generation();
        if generation != self.perm_generation {
            self.perm_generation = generation;
            self.write_allowed.clear();
        }
        if self.write_allowed.contains(exchange) {
            return Ok(());
        }
        self.allow(Access::Write, ResourceKind::Exchange, exchange)?;
        // Bounded: a client sending to many exchanges just re-checks the rest.
        if self.write_allowed.len() < 64 {
            self.write_allowed.insert(exchange.to_owned());
        }
        Ok(())
    }

    /// RabbitMQ's topic authorisation (STOMP goes through a channel there, so a SEND is
    /// a basic.publish and a subscription a queue.bind): `routing_key` against the user's
    /// rule for `exchange`, if `exchange` is a topic exchange. The rules are re-read only
    /// when the permissions change; the exchange's type is looked up only if a rule names
    /// it.
    fn allow_topic(&mut self, exchange: &str, access: Access, routing_key: &str) -> Step {
        let generation = self.fe.broker.permissions_generation();
        if self
            .topic_perms
            .as_ref()
            .is_none_or(|(g, _)| *g != generation)
        {
            let tp = self
                .fe
                .broker
                .topic_permissions_of(&self.vhost.name, &self.user);
            self.topic_perms = Some((generation, tp));
        }
        let Some((_, Some(tp))) = &self.topic_perms else {
            return Ok(());
        };
        // A missing exchange is left to the publish or bind to report (404), as RabbitMQ.
        if !tp.covers(exchange)
            || tp.allows(exchange, access, routing_key)
            || !self
                .vhost
                .exchange(exchange)
                .is_ok_and(|x| x.kind == ExchangeKind::Topic)
        {
            return Ok(());
        }
        Err(Stop::core(warren_core::topic_permissions::refused(
            access,
            routing_key,
            exchange,
            &self.vhost.name,
            &self.user,
        )))
    }

    /// Moves receipts whose writes are synced (or that wait for nothing) to the output.
    fn flush_receipts(&mut self, store: &warren_core::Store) {
        while let Some((t, _)) = self.receipts.front() {
            if let Some(t) = t {
                if !store.is_synced(*t) {
                    break;
                }
            }
            if let Some((_, id)) = self.receipts.pop_front() {
                let f = Frame::new("RECEIPT").with("receipt-id", id);
                codec::encode(&f, self.version, &mut self.out);
            }
        }
    }

    /// A frame's synchronous part: a SEND outside a transaction whose destination needs
    /// no declaration is routed here, and only its store writes (if any) are left to
    /// await. Every other frame comes back whole for [`Session::handle`].
    fn handle_now(&mut self, f: Frame) -> Result<Option<Later>, Stop> {
        if f.command != "SEND" || f.get("transaction").is_some() {
            return Ok(Some(Later::Frame(f)));
        }
        let receipt = f.get("receipt").map(str::to_owned);
        let (exchange, msg) = match self.send_message(f, None)? {
            Ok(m) => m,
            Err(f) => return Ok(Some(Later::Frame(f))),
        };
        let x = self.send_exchange(&exchange)?;
        let delivered = self
            .vhost
            .deliver_now(self.vhost.route(&x, &msg), msg)
            .map_err(Stop::core)?;
        match delivered {
            Ok(out) => {
                if let Some(r) = receipt {
                    self.receipts.push_back((out.ticket, r));
                }
                Ok(None)
            }
            Err(unfinished) => Ok(Some(Later::Deliver(unfinished, receipt))),
        }
    }

    /// The exchange a SEND goes to (its permission is checked by `send_message`).
    fn send_exchange(&mut self, name: &str) -> Result<Arc<Exchange>, Stop> {
        if let Some(x) = &self.last_exchange {
            if x.name.as_str() == name && !x.is_deleted() {
                return Ok(x.clone());
            }
        }
        let x = self.vhost.exchange(name).map_err(Stop::core)?;
        self.last_exchange = Some(x.clone());
        Ok(x)
    }

    /// The awaited rest of a frame, after [`Session::handle_now`]. Each kind boxes only
    /// its own future: a persistent SEND's store write is not allocated at the size of
    /// the largest frame's.
    async fn handle_later(&mut self, later: Later) -> Step {
        match later {
            Later::Frame(f) => Box::pin(self.handle(f)).await,
            Later::Deliver(unfinished, receipt) => {
                let out = Box::pin(self.vhost.finish_delivery(unfinished))
                    .await
                    .map_err(Stop::core)?;
                if let Some(r) = receipt {
                    self.receipts.push_back((out.ticket, r));
                }
                Ok(())
            }
        }
    }

    async fn handle(&mut self, f: Frame) -> Step {
        let mut receipt = f.get("receipt").map(str::to_owned);
        let ticket = match &*f.command {
            "SEND" | "ACK" | "NACK" => {
                // In a transaction the frame's receipt waits for the COMMIT, as RabbitMQ.
                if f.get("transaction").is_some() {
                    receipt = None;
                }
                self.in_tx_or(f).await?
            }
            "SUBSCRIBE" => {
                self.subscribe(&f).await?;
                None
            }
            "UNSUBSCRIBE" => {
                self.unsubscribe(&f).await?;
                None
            }
            "BEGIN" => {
                let tx = require(&f, "transaction")?;
                // A BEGIN of an open transaction starts it afresh, as RabbitMQ does
                // (no ERROR; the frames it held are dropped).
                if let Some(frames) = self.txs.get_mut(tx) {
                    frames.clear();
                } else if self.txs.len() >= MAX_TXS {
                    return Err(Stop::error(
                        "Too many transactions",
                        "Too many open transactions",
                    ));
                } else {
                    self.txs.insert(tx.to_owned(), Vec::new());
                }
                None
            }
            "COMMIT" => {
                let tx = require(&f, "transaction")?;
                let Some(frames) = self.txs.remove(tx) else {
                    return Err(unknown_tx(tx));
                };
                let mut last = None;
                let mut inner_receipts = Vec::new();
                for inner in frames {
                    let r = inner.get("receipt").map(str::to_owned);
                    let ticket = self.apply(inner).await?;
                    last = ticket.max(last);
                    inner_receipts.extend(r.map(|r| (ticket, r)));
                }
                // RabbitMQ answers the COMMIT first, then the receipts its frames asked for.
                if let Some(r) = receipt.take() {
                    self.receipts.push_back((last, r));
                }
                self.receipts.extend(inner_receipts);
                last
            }
            "ABORT" => {
                let tx = require(&f, "transaction")?;
                if self.txs.remove(tx).is_none() {
                    return Err(unknown_tx(tx));
                }
                None
            }
            "DISCONNECT" => {
                if let Some(r) = receipt {
                    self.receipts.push_back((None, r));
                }
                return Err(Stop::Disconnect);
            }
            "CONNECT" | "STOMP" => {
                return Err(
                    Stop::error("Already connected", "A second CONNECT is not allowed").closing(),
                )
            }
            other => {
                return Err(Stop::error(
                    "Bad command",
                    format!("Could not interpret command \"{other}\""),
                ))
            }
        };
        if let Some(r) = receipt {
            self.receipts.push_back((ticket, r));
        }
        Ok(())
    }

    /// SEND, ACK and NACK join their transaction, if any, or run now.
    async fn in_tx_or(&mut self, f: Frame) -> Result<Option<Ticket>, Stop> {
        if let Some(tx) = f.get("transaction") {
            let Some(frames) = self.txs.get_mut(tx) else {
                return Err(unknown_tx(tx));
            };
            if frames.len() >= MAX_TX_FRAMES {
                return Err(Stop::error(
                    "Transaction too large",
                    format!("More than {MAX_TX_FRAMES} frames in a transaction"),
                ));
            }
            frames.push(f);
            return Ok(None);
        }
        self.apply(f).await
    }

    async fn apply(&mut self, f: Frame) -> Result<Option<Ticket>, Stop> {
        match &*f.command {
            "SEND" => self.send(f).await,
            "ACK" => self.settle(&f, true).await.map(|_| None),
            _ => self.settle(&f, false).await.map(|_| None),
        }
    }

    /// `declare-exchange:true` on a SEND or SUBSCRIBE to `/exchange/<x>/…` declares `x`
    /// first (RabbitMQ 3.13's STOMP plugin): `exchange-type` (default `direct`),
    /// `exchange-durable` (default true), `exchange-auto-delete` (default false); an
    /// existing exchange must be equivalent, as with exchange.declare.
    async fn maybe_declare_exchange(&mut self, name: &str, f: &Frame) -> Result<(), Stop> {
        if props::flag(f, "declare-exchange") != Some(true) {
            return Ok(());
        }
        self.allow(Access::Configure, ResourceKind::Exchange, name)?;
        let decl = ExchangeDecl {
            name: short(name)?,
            kind: f.get("exchange-type").unwrap_or("direct").to_owned(),
            passive: false,
            durable: props::flag(f, "exchange-durable").unwrap_or(true),
            auto_delete: props::flag(f, "exchange-auto-delete").unwrap_or(false),
            internal: false,
            arguments: FieldTable::default(),
        };
        self.vhost
            .declare_exchange(decl)
            .await
            .map(|_| ())
            .map_err(Stop::core)
    }

    async fn send(&mut self, f: Frame) -> Result<Option<Ticket>, Stop> {
        // Declarations first (a queue not declared yet, `declare-exchange`, temporary
        // queues), then the message as on the synchronous path.
        let dest = require(&f, "destination")?;
        // Headers are checked before the destination, as RabbitMQ does.
        let properties =
            props::from_send(&f).map_err(|e| Stop::error("Invalid header", e.to_string()))?;
        let d = parse_destination(dest)?;
        match &d {
            Destination::Queue(name) if !self.declared.contains(name) => {
                self.declare_named(name, &f).await?;
                self.declared.insert(name.clone());
            }
            Destination::Exchange(x, _) => self.maybe_declare_exchange(x, &f).await?,
            _ => {}
        }
        let temp = match &d {
            Destination::TempQueue(name) => Some(self.temp_queue(name).await?),
            _ => None,
        };
        // reply-to:/temp-queue/x: this session's private reply queue (see send_message).
        let reply = properties.reply_to.as_ref().map(|r| r.as_str());
        let reply = match reply.and_then(|r| r.strip_prefix("/temp-queue/")) {
            Some(name) => Some(self.temp_queue(name).await?),
            None => None,
        };
        let declared = Declared { temp, reply };
        let (exchange, msg) = match self.send_message(f, Some(declared))? {
            Ok(m) => m,
            Err(_) => return Err(Stop::error("Internal error", "destination not declared")),
        };
        let out = self
            .vhost
            .publish(&exchange, msg)
            .await
            .map_err(Stop::core)?;
        Ok(out.ticket)
    }

    /// A SEND's exchange and message, after the permission checks. Without `declared`,
    /// a destination that needs an await first (a queue not declared yet,
    /// `declare-exchange`, a temporary queue) gives the frame back untouched.
    #[allow(clippy::type_complexity)]
    fn send_message(
        &mut self,
        f: Frame,
        declared: Option<Declared>,
    ) -> Result<Result<(String, Arc<Message>), Frame>, Stop> {
        let dest = require(&f, "destination")?;
        // Headers are checked before the destination, as RabbitMQ does.
        let mut properties =
            props::from_send(&f).map_err(|e| Stop::error("Invalid header", e.to_string()))?;
        let d = parse_destination(dest)?;
        let temp_reply = properties
            .reply_to
            .as_ref()
            .is_some_and(|r| r.as_str().starts_with("/temp-queue/"));
        let done = declared.is_some();
        let (exchange, routing_key) = match d {
            Destination::Queue(name) if done || self.declared.contains(&name) => {
                (String::new(), name)
            }
            Destination::AmqQueue(name) | Destination::ReplyQueue(name) => (String::new(), name),
            Destination::Topic(key) => ("amq.topic".to_owned(), key),
            Destination::Exchange(x, key)
                if done || props::flag(&f, "declare-exchange") != Some(true) =>
            {
                (x, key)
            }
            _ => match &declared {
                // The queue `send` made for it.
                Some(Declared {
                    temp: Some(real), ..
                }) => (String::new(), real.clone()),
                _ => return Ok(Err(f)),
            },
        };
        match declared {
            // reply-to:/temp-queue/x names this session's private reply queue so that
            // any client can answer through /reply-queue/ (RabbitMQ's rewrite).
            Some(Declared {
                reply: Some(real), ..
            }) => properties.reply_to = Some(short(&format!("/reply-queue/{real}"))?),
            None if temp_reply => return Ok(Err(f)),
            _ => {}
        }
        self.allow_publish(&exchange)?;
        self.allow_topic(&exchange, Access::Write, &routing_key)?;
        let msg = Message::new(
            short(&exchange)?,
            short(&routing_key)?.into(),
            properties,
            f.body,
        );
        self.publisher = true;
        Ok(Ok((exchange, Arc::new(msg))))
    }

    /// `/queue/<name>`: declared durable (RabbitMQ's defaults), `x-` headers as arguments.
    async fn declare_named(&mut self, name: &str, f: &Frame) -> Step {
        self.allow(Access::Configure, ResourceKind::Queue, name)?;
        let arguments =
            props::queue_arguments(f).map_err(|e| Stop::error("Invalid header", e.to_string()))?;
        let decl = QueueDecl {
            name: short(name)?,
            passive: false,
            durable: props::flag(f, "durable").unwrap_or(true),
            exclusive: props::flag(f, "exclusive") == Some(true),
            auto_delete: props::flag(f, "auto-delete") == Some(true),
            arguments,
        };
        self.vhost
            .declare_queue(decl, self.id)
            .await
            .map_err(Stop::core)?;
        Ok(())
    }

    /// The private queue behind `/temp-queue/<name>`, created and consumed (auto ack) on
    /// first use; its subscription id is the temp-queue destination itself.
    async fn temp_queue(&mut self, name: &str) -> Result<String, Stop> {
        if let Some(q) = self.temp_queues.get(name) {
            return Ok(q.clone());
        }
        let (q, _) = self
            .vhost
            .declare_queue(
                QueueDecl {
                    name: ShortString::from(""),
                    passive: false,
                    durable: false,
                    exclusive: true,
                    auto_delete: true,
                    arguments: FieldTable::default(),
                },
                self.id,
            )
            .await
            .map_err(Stop::core)?;
        let real = q.name.as_str().to_owned();
        let sub_id = format!("/temp-queue/{name}");
        let how = Reading {
            ack: AckMode::Auto,
            prefetch: 0,
            stream_start: None,
        };
        self.consume(sub_id, false, q, how, false).await?;
        self.temp_queues.insert(name.to_owned(), real.clone());
        Ok(real)
    }

    async fn subscribe(&mut self, f: &Frame) -> Step {
        let dest = require(f, "destination")?;
        let d = parse_destination(dest)?;
        // STOMP 1.0 allows a subscription without id: it is known by its destination.
        let anonymous = f.get("id").is_none();
        let id = f.get("id").unwrap_or(dest).to_owned();
        if self.sub_tokens.contains_key(&id) {
            // Named by its consumer tag, as RabbitMQ names it.
            let tag = consumer_tag(anonymous, &id);
            // RabbitMQ sends this ERROR and closes (not its `error/3`).
            return Err(Stop::bare(
                "Duplicated subscription identifier",
                format!("A subscription identified by '{tag}' already exists."),
            )
            .closing());
        }
        let topic_like = matches!(d, Destination::Topic(_) | Destination::Exchange(..));
        if anonymous && topic_like && wants_durable(f) {
            return Err(Stop::bare(
                "Missing Header",
                "Header 'id' is required for durable subscriptions",
            ));
        }
        let ack = match f.get("ack").unwrap_or("auto") {
            "auto" => AckMode::Auto,
            "client" => AckMode::Client,
            "client-individual" => AckMode::ClientIndividual,
            other => {
                return Err(Stop::error(
                    "Invalid header",
                    format!("Invalid ack mode '{other}'"),
                ))
            }
        };
        let prefetch = match f.get("prefetch-count") {
            None => 0,
            Some(v) => v
                .trim()
                .parse::<u32>()
                .map_err(|_| Stop::error("Invalid header", "Invalid prefetch-count"))?,
        };
        let (queue, durable_queue) = match d {
            Destination::Queue(name) => {
                self.declare_named(&name, f).await?;
                self.declared.insert(name.clone());
                (
                    self.vhost
                        .require_queue(&name, self.id)
                        .map_err(Stop::core)?,
                    false,
                )
            }
            Destination::AmqQueue(name) | Destination::ReplyQueue(name) => (
                self.vhost
                    .require_queue(&name, self.id)
                    .map_err(Stop::core)?,
                false,
            ),
            Destination::Topic(key) => self.bound_queue("amq.topic", &key, &id, f).await?,
            Destination::Exchange(x, key) => {
                self.maybe_declare_exchange(&x, f).await?;
                self.bound_queue(&x, &key, &id, f).await?
            }
            Destination::TempQueue(_) => {
                return Err(Stop::error(
                    "Invalid destination",
                    format!("'{dest}' is not a valid destination for 'SUBSCRIBE'"),
                ))
            }
        };
        let how = Reading {
            ack,
            prefetch,
            stream_start: stream_offset(f),
        };
        self.consume(id, anonymous, queue, how, durable_queue).await
    }

    /// The queue of a `/topic` or `/exchange` subscription: exclusive and auto-deleted, or
    /// durable and named after the subscription id with `durable:true` +
    /// `auto-delete:false` (RabbitMQ's durable topic subscriptions).
    async fn bound_queue(
        &mut self,
        exchange: &str,
        key: &str,
        id: &str,
        f: &Frame,
    ) -> Result<(Arc<Queue>, bool), Stop> {
        self.vhost.exchange(exchange).map_err(Stop::core)?;
        // Before the queue exists, so a refusal leaves nothing behind.
        self.allow_topic(exchange, Access::Read, key)?;
        let durable = durable_subscription(f);
        let name = match f.get("x-queue-name") {
            Some(n) => n.to_owned(),
            None if durable => durable_queue_name(key, id),
            None => String::new(),
        };
        let arguments =
            props::queue_arguments(f).map_err(|e| Stop::error("Invalid header", e.to_string()))?;
        if !name.is_empty() {
            self.allow(Access::Configure, ResourceKind::Queue, &name)?;
        }
        let (q, _) = self
            .vhost
            .declare_queue(
                QueueDecl {
                    name: short(&name)?,
                    passive: false,
                    durable,
                    exclusive: !durable,
                    auto_delete: !durable,
                    arguments,
                },
                self.id,
            )
            .await
            .map_err(Stop::core)?;
        self.allow(Access::Write, ResourceKind::Queue, q.name.as_str())?;
        self.allow(Access::Read, ResourceKind::Exchange, exchange)?;
        self.vhost
            .bind(
                exchange,
                Target::Queue(q.clone()),
                short(key)?.into(),
                FieldTable::default(),
            )
            .await
            .map_err(Stop::core)?;
        Ok((q, durable))
    }

    async fn consume(
        &mut self,
        id: String,
        anonymous: bool,
        queue: Arc<Queue>,
        how: Reading,
        durable_queue: bool,
    ) -> Step {
        let Reading {
            ack,
            prefetch,
            stream_start,
        } = how;
        self.allow(Access::Read, ResourceKind::Queue, queue.name.as_str())?;
        queue
            .check_consumer(ack == AckMode::Auto, prefetch)
            .map_err(Stop::core)?;
        let token = self.next_token;
        self.next_token += 1;
        let consumer = ConsumerId::next();
        let spec = ConsumerSpec {
            id: consumer,
            tag: Arc::from(id.as_str()),
            token,
            owner: self.id,
            no_ack: ack == AckMode::Auto,
            exclusive: false,
            priority: 0,
            prefetch,
            channel_credit: Arc::new(Credit::default()),
            outbox: self.outbox.clone(),
            stream_start,
            arguments: Default::default(),
        };
        queue.add_consumer(spec).await.map_err(Stop::core)?;
        self.sub_tokens.insert(id.clone(), token);
        self.subs.insert(
            token,
            Subscription {
                id,
                anonymous,
                queue,
                consumer,
                ack,
                durable_queue,
            },
        );
        Ok(())
    }

    async fn unsubscribe(&mut self, f: &Frame) -> Step {
        let id = match f.get("id").or_else(|| f.get("destination")) {
            Some(id) => id.to_owned(),
            None => {
                return Err(Stop::bare(
                    "Missing destination or id",
                    "UNSUBSCRIBE must include a 'destination' or 'id' header",
                ))
            }
        };
        let Some(token) = self.sub_tokens.remove(&id) else {
            let by = if f.get("id").is_some() {
                "id"
            } else {
                "destination"
            };
            return Err(Stop::error(
                "No subscription found",
                format!(
                    "UNSUBSCRIBE must refer to an existing subscription.\nSubscription to \"{by}='{id}'\" not found."
                ),
            ));
        };
        if let Some(sub) = self.subs.remove(&token) {
            sub.queue.remove_consumer(sub.consumer).await;
            // Unsettled messages of this subscription go back to its queue.
            let seqs: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.token == token)
                .map(|(n, _)| *n)
                .collect();
            let mut back = Vec::new();
            for n in seqs {
                if let Some(p) = self.pending.remove(&n) {
                    back.push(p.seq);
                }
            }
            if !back.is_empty() {
                sub.queue.requeue(&back).await;
            }
            if sub.durable_queue && wants_durable(f) {
                let _ = self
                    .vhost
                    .delete_queue(sub.queue.name.as_str(), Some(self.id), false, false)
                    .await;
            }
        }
        Ok(())
    }

    /// ACK (settle) or NACK (requeue, or dead-letter with `requeue:false`).
    async fn settle(&mut self, f: &Frame, ack: bool) -> Step {
        // 1.2 names the message by its `ack` header value in `id`; earlier versions by
        // `message-id`.
        let header = if self.version == Version::V1_2 {
            "id"
        } else {
            "message-id"
        };
        let cmd = if ack { "ACK" } else { "NACK" };
        let invalid = || {
            Stop::error(
                "Invalid header",
                format!("\"{cmd}\" must include a valid \"{header}\" header"),
            )
        };
        let id = f.get(header).ok_or_else(|| {
            Stop::error(
                "Missing header",
                format!("\"{cmd}\" must include the \"{header}\" header"),
            )
        })?;
        let n: u64 = id
            .rsplit_once("@@")
            .and_then(|(_, n)| n.parse().ok())
            .ok_or_else(invalid)?;
        // A well-formed id naming no unsettled message: RabbitMQ's channel error, which
        // closes.
        let Some(p) = self.pending.get(&n) else {
            return Err(Stop::bare(
                "precondition_failed",
                format!("PRECONDITION_FAILED - unknown delivery tag {n}"),
            )
            .closing());
        };
        let token = p.token;
        let mode = self.subs.get(&token).map(|s| s.ack);
        let numbers: Vec<u64> = if mode == Some(AckMode::Client) {
            self.pending
                .range(..=n)
                .filter(|(_, p)| p.token == token)
                .map(|(k, _)| *k)
                .collect()
        } else {
            vec![n]
        };
        let mut by_queue: Vec<(Arc<Queue>, Vec<MsgSeq>)> = Vec::new();
        for k in numbers {
            if let Some(p) = self.pending.remove(&k) {
                match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &p.queue)) {
                    Some((_, v)) => v.push(p.seq),
                    None => by_queue.push((p.queue, vec![p.seq])),
                }
            }
        }
        let requeue = props::flag(f, "requeue") != Some(false);
        for (q, seqs) in by_queue {
            if ack {
                q.ack(&seqs).await;
            } else if requeue {
                q.requeue(&seqs).await;
            } else {
                q.reject(&seqs).await;
            }
        }
        Ok(())
    }

    /// Writes a MESSAGE; a delivery for a subscription that is gone comes back to be
    /// requeued (unless it was auto-acked).
    fn deliver(&mut self, d: Delivery) -> Option<Delivery> {
        let Some(sub) = self.subs.get(&d.token) else {
            return (!d.no_ack).then_some(d);
        };
        let n = self.next_msg;
        self.next_msg += 1;
        // Written straight into the output: a `Frame` took some twenty allocations per
        // delivery (perf). Two strings of the session are reused for the joined values.
        let (dest, message_id) = &mut self.scratch;
        let m = &d.message;
        destination::write_of_message(m.exchange.as_str(), m.routing_key.as_str(), dest);
        message_id.clear();
        let tag = ConsumerTag(sub.anonymous, &sub.id);
        let _ = write!(message_id, "{tag}@@{}@@{n}", self.session_id);
        let mut w = FrameWriter::new(&mut self.out, "MESSAGE", self.version);
        if !sub.anonymous {
            w.header("subscription", &sub.id);
        }
        w.header("destination", dest);
        w.header("message-id", message_id);
        w.header("redelivered", if d.redelivered { "true" } else { "false" });
        if sub.ack != AckMode::Auto && self.version == Version::V1_2 {
            w.header("ack", message_id);
        }
        props::to_message(&m.properties, &mut |k, v| w.header(k, v));
        w.header("content-length", itoa::Buffer::new().format(m.body.len()));
        w.finish(&m.body);
        if sub.ack != AckMode::Auto {
            self.pending.insert(
                n,
                Pending {
                    token: d.token,
                    queue: d.queue.clone(),
                    seq: d.seq,
                },
            );
        }
        None
    }

    /// The queue of a subscription went away (deleted): RabbitMQ ends the subscription.
    fn cancelled(&mut self, c: ConsumerId) {
        if let Some((&token, _)) = self.subs.iter().find(|(_, s)| s.consumer == c) {
            if let Some(sub) = self.subs.remove(&token) {
                self.sub_tokens.remove(&sub.id);
            }
        }
    }

    async fn close(&mut self) {
        for (_, sub) in self.subs.drain() {
            sub.queue.remove_consumer(sub.consumer).await;
        }
        // Unacknowledged messages go back to their queues, redelivered.
        let mut by_queue: Vec<(Arc<Queue>, Vec<MsgSeq>)> = Vec::new();
        for (_, p) in std::mem::take(&mut self.pending) {
            match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &p.queue)) {
                Some((_, v)) => v.push(p.seq),
                None => by_queue.push((p.queue, vec![p.seq])),
            }
        }
        for (q, seqs) in by_queue {
            q.requeue(&seqs).await;
        }
        self.vhost.connection_closed(self.id).await;
    }
}

/// A required header (`destination`, `transaction`), or RabbitMQ's "Missing destination"
/// / "Missing transaction" ERROR.
fn require<'a>(f: &'a Frame, name: &str) -> Result<&'a str, Stop> {
    f.get(name).ok_or_else(|| {
        Stop::error(
            format!("Missing {name}"),
            format!("\"{}\" must include a '{name}' header", f.command),
        )
    })
}

fn unknown_tx(tx: &str) -> Stop {
    Stop::error(
        "Bad transaction",
        format!("Invalid transaction identifier: \"{tx}\""),
    )
}

/// RabbitMQ's consumer tag of a subscription: `T_<id>`, or `Q_<destination>` for one
/// without an id (STOMP 1.0); message ids and error texts start with it.
fn consumer_tag(anonymous: bool, id: &str) -> String {
    ConsumerTag(anonymous, id).to_string()
}

/// [`consumer_tag`] written in place (a delivery's message-id starts with it).
struct ConsumerTag<'a>(bool, &'a str);

impl std::fmt::Display for ConsumerTag<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.0 { 'Q' } else { 'T' };
        write!(f, "{kind}_{}", self.1)
    }
}

/// A `destination` header, parsed, or RabbitMQ's ERROR for it.
fn parse_destination(dest: &str) -> Result<Destination, Stop> {
    Destination::parse(dest).map_err(|e| match e {
        DestError::Unknown(d) => Stop::error(
            "Unknown destination",
            format!(
                "'{d}' is not a valid destination.\nValid destination types are: {}.",
                destination::VALID_TYPES
            ),
        ),
        DestError::Invalid { kind, rest } => Stop::error(
            "Invalid destination",
            format!("'{rest}' is not a valid {kind} destination"),
        ),
    })
}

/// Names and keys from peers must fit an AMQP short string.
fn short(s: &str) -> Result<ShortString, Stop> {
    if s.len() > 255 {
        return Err(Stop::error(
            "Invalid destination",
            format!(
                "name longer than 255 bytes: '{}…'",
                s.chars().take(40).collect::<String>()
            ),
        ));
    }
    Ok(ShortString::from(s))
}

/// `durable:true` (or the older `persistent:true`) with `auto-delete:false`: a topic or
/// exchange subscription whose queue outlives the connection (RabbitMQ's durable topic
/// subscriptions).
fn durable_subscription(f: &Frame) -> bool {
    wants_durable(f) && props::flag(f, "auto-delete") == Some(false)
}

/// `durable:true`, or the older `persistent:true`.
fn wants_durable(f: &Frame) -> bool {
    props::flag(f, "durable") == Some(true) || props::flag(f, "persistent") == Some(true)
}

/// RabbitMQ's name for the queue of a durable subscription (rabbit_stomp_util:
/// subscription_queue_name): `stomp-subscription-` and the unpadded base64url MD5 of the
/// Erlang term `{Key, Id}` (both strings), so an application that finds the queue by
/// name finds it here too.
fn durable_queue_name(key: &str, id: &str) -> String {
    use base64::Engine;
    use md5::Digest;
    // Erlang's external term format: a string is STRING_EXT (107, u16 length, bytes) or
    // NIL_EXT (106) when empty; longer ones are lists of small integers.
    fn string(out: &mut Vec<u8>, s: &str) {
        let b = s.as_bytes();
        match u16::try_from(b.len()) {
            Ok(0) => out.push(106),
            Ok(n) => {
                out.push(107);
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(b);
            }
            Err(_) => {
                out.push(108);
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                for &c in b {
                    out.extend_from_slice(&[97, c]);
                }
                out.push(106);
            }
        }
    }
    // Version 131, SMALL_TUPLE_EXT of arity 2.
    let mut term = vec![131, 104, 2];
    string(&mut term, key);
    string(&mut term, id);
    let digest = md5::Md5::digest(&term);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
    format!("stomp-subscription-{b64}")
}

/// How a subscription reads its queue: the SUBSCRIBE's `ack`, `prefetch-count` and
/// `x-stream-offset`.
struct Reading {
    ack: AckMode,
    prefetch: u32,
    stream_start: Option<StreamStart>,
}

/// The `x-stream-offset` header of a SUBSCRIBE to a stream, as RabbitMQ's STOMP plugin
/// reads it: `first`, `last`, `next`, `offset=<n>` or `timestamp=<unix seconds>`; anything
/// else (or none) is `next`.
fn stream_offset(f: &Frame) -> Option<StreamStart> {
    let v = f.get("x-stream-offset")?.trim();
    Some(match v {
        "first" => StreamStart::First,
        "last" => StreamStart::Last,
        _ => {
            if let Some(n) = v.strip_prefix("offset=").and_then(|n| n.parse().ok()) {
                StreamStart::Offset(n)
            } else if let Some(t) = v
                .strip_prefix("timestamp=")
                .and_then(|t| t.parse::<i64>().ok())
            {
                StreamStart::Timestamp(t.saturating_mul(1000))
            } else {
                StreamStart::Next
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_queue_names_are_rabbitmqs() {
        // Names RabbitMQ 3.10 gave these subscriptions (/topic/abc and
        // /exchange/amq.topic/kk, ids sub1 and sub2).
        assert_eq!(
            durable_queue_name("abc", "sub1"),
            "stomp-subscription-OaSVA3pDFAdnf1Afw5PyEw"
        );
        assert_eq!(
            durable_queue_name("kk", "sub2"),
            "stomp-subscription-T9_qZG1Fr1UutKw2hLp7eg"
        );
    }
}
