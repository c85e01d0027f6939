//! STOMP 1.0–1.2 front-end with the semantics of RabbitMQ's STOMP plugin: destinations
//! `/queue`, `/amq/queue`, `/topic`, `/exchange`, `/temp-queue` and `/reply-queue` map onto
//! the shared core's exchanges and queues, and STOMP headers onto message properties, so
//! STOMP traffic meets AMQP and MQTT traffic (docs/stomp.md).

pub use warren_stomp_codec as codec;
pub mod destination;
pub mod props;
mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use warren_core::{Broker, ConnectionAuth};

/// Settings of the STOMP front-end.
#[derive(Debug, Clone)]
pub struct StompConfig {
    /// Frame size, header count and header length limits (answered with ERROR).
    pub limits: codec::Limits,
    /// Time allowed for CONNECT after the TCP accept.
    pub connect_timeout: Duration,
    /// A partial frame left unfinished this long ends the connection with an ERROR.
    pub incomplete_frame_timeout: Duration,
    /// Vhost when CONNECT has no `host` header.
    pub default_vhost: String,
    /// Credentials for a CONNECT without `login` (RabbitMQ's stomp.default_user).
    pub default_user: String,
    pub default_pass: String,
    /// Refuse CONNECT without `login` when false.
    pub allow_anonymous: bool,
}

impl Default for StompConfig {
    fn default() -> Self {
        Self {
            limits: codec::Limits::default(),
            connect_timeout: Duration::from_secs(10),
            incomplete_frame_timeout: Duration::from_secs(10),
            default_vhost: "/".into(),
            default_user: "guest".into(),
            default_pass: "guest".into(),
            allow_anonymous: true,
        }
    }
}

/// The STOMP front-end: shared by the TCP listener and the Web-STOMP transport.
pub struct StompFrontend {
    pub(crate) broker: Arc<Broker>,
    pub(crate) config: StompConfig,
}

impl StompFrontend {
    pub fn new(broker: Arc<Broker>, config: StompConfig) -> Arc<Self> {
        Arc::new(Self { broker, config })
    }

    /// Accepts STOMP connections until `shutdown`; on shutdown each connection gets an
    /// ERROR frame and is closed.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        warren_core::shutdown::serve_connections(listener, shutdown, |s, peer, local, sd| {
            self.clone().handle_stream(s, peer, local, sd)
        })
        .await
    }

    /// Runs one STOMP session over any byte stream (a TCP socket, a WebSocket). `local`
    /// is the listener's address (shown in the management API's connection name).
    /// Plain functions returning the session's future: an `async fn` wrapper would keep
    /// its own copy of the arguments for the connection's whole life.
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
    /// without `login` logs in as the certificate's user.
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
        session::run(stream, peer, local, auth, self, shutdown)
    }
}
