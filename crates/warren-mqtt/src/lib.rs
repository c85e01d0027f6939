//! MQTT 3.1.1 and 5.0 front-end: sessions are queues, subscriptions are bindings on
//! `amq.topic`, so MQTT traffic meets AMQP traffic in the same exchanges and queues
//! (docs/mqtt.md). The codec is mqtt5-protocol behind a framing layer ([`codec`]).

pub mod codec;
mod session;
mod shared_sub;
mod state;
pub mod topic;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use warren_core::{Broker, ConnectionAuth, ConnectionId, Message};

/// AMQP short strings (queue names, `content-type`, `reply-to`) hold at most this.
const MAX_SHORT: usize = 255;

/// Settings of the MQTT listener.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Largest packet accepted (MQTT-3.1.2-24 maximum packet size).
    pub max_packet_size: usize,
    /// Time allowed for CONNECT after the TCP accept.
    pub connect_timeout: Duration,
    /// Unreleased inbound QoS 2 publishes a 5.0 client may have (CONNACK Receive
    /// Maximum): 20, Mosquitto's `max_inflight_messages`. Paho C's flow-control test
    /// counts on a server value below its own 100-message buffer.
    pub receive_maximum: u16,
    /// QoS ≥ 1 deliveries in flight per session (at most the client's Receive Maximum).
    pub max_inflight: u16,
    /// Vhost when the username has no `vhost:` prefix.
    pub default_vhost: String,
    /// Credentials used for a CONNECT without username (RabbitMQ's mqtt.default_user).
    pub default_user: String,
    pub default_pass: String,
    /// Refuse CONNECT without username when false.
    pub allow_anonymous: bool,
    /// Topic aliases a 5.0 client may use towards the server (CONNACK Topic Alias
    /// Maximum); each costs one stored topic per connection. 10, Mosquitto's
    /// `max_topic_alias`: its tests count an alias of 11 as invalid.
    pub topic_alias_maximum: u16,
    /// Whether deliveries to a 5.0 client that allows topic aliases use them (MQTT 5
    /// §3.3.2.3.4 lets the server choose). Off by default, as Mosquitto never sends
    /// them: mqtt.js 4.3 advertises a Topic Alias Maximum it cannot read aliases for.
    pub outbound_topic_aliases: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 16 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            receive_maximum: 20,
            max_inflight: 100,
            default_vhost: "/".into(),
            default_user: "guest".into(),
            default_pass: "guest".into(),
            allow_anonymous: true,
            topic_alias_maximum: 10,
            outbound_topic_aliases: false,
        }
    }
}

/// State shared by every MQTT connection.
///
/// Lock order: `sessions` before `parked` (never the other way); both are held only for
/// map lookups, never across an `.await`.
pub(crate) struct Shared {
    pub broker: Arc<Broker>,
    /// Live sessions by `vhost \0 client id`: the connection a takeover closes.
    pub sessions: Mutex<HashMap<String, ConnectionId>>,
    /// Persistent sessions with no connection, by `vhost \0 client id`: their QoS 2 state
    /// and a generation that their pending will / expiry timer checks, so a reconnect
    /// (which removes the entry) cancels both.
    pub parked: Mutex<HashMap<String, session::Parked>>,
    /// Retained messages by `vhost \0 topic`: the in-memory copy of what the store holds.
    retained: Mutex<HashMap<String, (String, Arc<Message>)>>,
    /// Shared-subscription groups and their member sessions.
    groups: shared_sub::Groups,
    /// Set once a task waits on the server's shutdown signal for all MQTT connections
    /// (see [`Shared::watch_shutdown`]).
    shutdown_watched: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Asks every MQTT connection to close when `shutdown` fires, through the registry's
    /// close request that each connection already waits on (MQTT 5: DISCONNECT 0x8B). One
    /// task per front-end instead of a watch wait in every connection: each pending wait
    /// is ~80 bytes of every idle device's task. A connection registered after the sweep
    /// sees the flag itself ([`session::close_if_shutting_down`]).
    fn watch_shutdown(self: &Arc<Self>, shutdown: &watch::Receiver<bool>) {
        use std::sync::atomic::Ordering;
        if self.shutdown_watched.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut shutdown = shutdown.clone();
        let shared = self.clone();
        tokio::spawn(async move {
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    return;
                }
            }
            for e in shared.broker.connections().list() {
                if e.info.protocol.starts_with("MQTT") {
                    e.request_close(session::SHUTDOWN_REASON);
                }
            }
        });
    }

    /// Stores (or, with an empty payload, clears) the retained message of a topic, in
    /// memory and durably; returns the store ticket to wait for.
    pub async fn retain(
        &self,
        vhost: &str,
        topic_name: &str,
        msg: Arc<Message>,
    ) -> Option<warren_core::Ticket> {
        let key = format!("{vhost}\0{topic_name}");
        let clear = msg.body.is_empty();
        {
            let mut r = self.retained.lock();
            if clear {
                r.remove(&key);
            } else {
                r.insert(key, (topic_name.to_owned(), msg.clone()));
            }
        }
        let stored = if clear { None } else { Some(msg.as_ref()) };
        match self.broker.store_retained(vhost, topic_name, stored).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "retained message not stored");
                None
            }
        }
    }

    /// Retained messages whose topic matches `filter`, wildcards included, parents before
    /// children (`a`, `a/b`, `a/b/c`): the order of Mosquitto's walk of its topic tree.
    pub fn retained_matching(&self, vhost: &str, filter: &str) -> Vec<(String, Arc<Message>)> {
        let prefix = format!("{vhost}\0");
        let mut found: Vec<(String, Arc<Message>)> = self
            .retained
            .lock()
            .iter()
            .filter(|(k, (t, _))| k.starts_with(&prefix) && topic::matches(filter, t))
            .map(|(_, (t, m))| (t.clone(), m.clone()))
            .collect();
        found.sort_by(|a, b| a.0.split('/').cmp(b.0.split('/')));
        found
    }
}

/// A running MQTT front-end: the state every connection shares. TCP connections come
/// through [`MqttFrontend::serve`]; other transports (MQTT over WebSocket) hand their byte
/// stream to [`MqttFrontend::handle_stream`], so every transport runs the same session code.
pub struct MqttFrontend {
    shared: Arc<Shared>,
    config: Arc<MqttConfig>,
}

impl MqttFrontend {
    /// Creates the front-end and loads the retained messages from the store (they survive
    /// restarts).
    pub fn new(broker: Arc<Broker>, config: MqttConfig) -> Arc<Self> {
        let mut retained = HashMap::new();
        match broker.load_retained() {
            Ok(all) => {
                for (vhost, topic_name, msg) in all {
                    retained.insert(
                        format!("{vhost}\0{topic_name}"),
                        (topic_name, Arc::new(msg)),
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "retained messages could not be loaded"),
        }
        let shared = Arc::new(Shared {
            broker,
            sessions: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            retained: Mutex::new(retained),
            groups: shared_sub::Groups::default(),
            shutdown_watched: Default::default(),
        });
        session::recover_sessions(&shared);
        Arc::new(Self {
            shared,
            config: Arc::new(config),
        })
    }

    /// Accepts MQTT connections on `listener` until `shutdown`, then gives the open ones
    /// a grace period to close.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        warren_core::shutdown::serve_connections(listener, shutdown, |s, peer, local, sd| {
            self.clone().handle_stream(s, peer, local, sd)
        })
        .await
    }

    /// Runs one MQTT connection over `stream` to its end: any transport that yields the
    /// MQTT byte stream (a TCP socket, a WebSocket's binary messages). `shutdown` closes
    /// it (MQTT 5: DISCONNECT 0x8B).
    /// `local` is the listener's address (for the management API's connection name).
    ///
    /// A plain function returning the session's future, not an `async fn` wrapper: each
    /// async layer would keep its own copy of the arguments for the connection's life.
    pub fn handle_stream<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        local: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.handle_stream_with(stream, peer, local, shutdown, ConnectionAuth::default())
    }

    /// [`Self::handle_stream`] on a transport that vouches for the client: a CONNECT
    /// without username logs in as the certificate's user.
    pub fn handle_stream_with<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        local: SocketAddr,
        shutdown: watch::Receiver<bool>,
        auth: ConnectionAuth,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.shared.watch_shutdown(&shutdown);
        session::run(session::Accepted {
            socket: stream,
            peer,
            local,
            auth,
            shared: self.shared.clone(),
            cfg: self.config.clone(),
            shutdown,
        })
    }
}

/// Accepts MQTT connections until `shutdown` (a thin wrapper over [`MqttFrontend`]).
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: MqttConfig,
    shutdown: watch::Receiver<bool>,
) {
    MqttFrontend::new(broker, config)
        .serve(listener, shutdown)
        .await
}

#[cfg(test)]
mod footprint {
    use super::*;

    /// An idle connection is its task's future plus what it points at; the future is
    /// allocated whole for as long as the connection lives (docs/PERFORMANCE.md, idle
    /// MQTT connection), so its size is watched here. Tokio allocates a task in steps of
    /// 128 bytes (its cell is cache-line aligned) with ~104 bytes of header and trailer:
    /// up to 1,176 bytes of future the task takes 1,280; 1,152 leaves a little room.
    #[tokio::test]
    async fn the_connection_task_stays_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = warren_core::Store::open(dir.path(), warren_core::StoreOptions::default())
            .expect("store");
        let broker = Broker::open(store, warren_core::BrokerConfig::default()).expect("broker");
        let fe = MqttFrontend::new(broker, MqttConfig::default());
        let (stream, _peer) = tokio::io::duplex(64);
        let addr: SocketAddr = ([127, 0, 0, 1], 1883).into();
        let (_tx, shutdown) = watch::channel(false);
        let task = fe.handle_stream(stream, addr, addr, shutdown);
        let size = std::mem::size_of_val(&task);
        println!("mqtt connection future: {size} bytes");
        assert!(size <= 1152, "the connection future grew to {size} bytes");
    }
}
