//! AMQP 0-9-1 front-end: one task per connection turns frames (decoded by
//! `warren-amqp-codec`) into calls on the core and deliveries back into frames.
//!
//! Behaviour follows RabbitMQ's where the spec leaves room: its reply codes and texts, its
//! extensions (publisher confirms, basic.nack, consumer cancel notifications,
//! exchange-to-exchange bindings, direct reply-to, consumer priorities) and its server
//! properties. docs/amqp.md lists the decisions.

mod channel;
mod connection;
pub mod error;
mod fastpath;
mod props;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use warren_core::{Broker, ConnectionAuth};

pub use error::AmqpError;

/// Settings of the AMQP listener (config file section `[amqp]`).
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Largest frame the server accepts and proposes in connection.tune.
    pub frame_max: u32,
    /// Highest channel number proposed in connection.tune.
    pub channel_max: u16,
    /// Heartbeat interval proposed in connection.tune, seconds (0 = off).
    pub heartbeat: u16,
    /// Largest message body accepted (RabbitMQ's `max_message_size`).
    pub max_message_size: u64,
    /// Deliveries buffered per connection before its consumers stall.
    pub outbox_capacity: usize,
    /// Time allowed from TCP accept to connection.open.
    pub handshake_timeout: Duration,
    /// Connections accepted at once (0 = unlimited).
    pub max_connections: usize,
    /// An unacknowledged delivery older than this closes its channel (RabbitMQ's
    /// `consumer_timeout`); `None` = never.
    pub consumer_timeout: Option<Duration>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            max_message_size: 134_217_728,
            outbox_capacity: 2048,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 0,
            consumer_timeout: Some(Duration::from_secs(1800)),
        }
    }
}

/// The AMQP front-end: shared by the plain listener and the TLS (AMQPS) listener.
pub struct AmqpFrontend {
    broker: Arc<Broker>,
    config: Arc<AmqpConfig>,
    /// `max_connections` across every listener.
    limit: Arc<Semaphore>,
}

impl AmqpFrontend {
    pub fn new(broker: Arc<Broker>, config: AmqpConfig) -> Arc<Self> {
        let limit = Arc::new(Semaphore::new(if config.max_connections == 0 {
            Semaphore::MAX_PERMITS
        } else {
            config.max_connections
        }));
        Arc::new(Self {
            broker,
            config: Arc::new(config),
            limit,
        })
    }

    /// Accepts AMQP connections on `listener` until `shutdown` becomes true; then asks
    /// every connection to close (connection.close 320) and waits for them.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        // Connections see the same shutdown signal and close themselves.
        warren_core::shutdown::serve_connections(listener, shutdown, |s, peer, local, sd| {
            self.clone().handle_stream(s, peer, local, sd)
        })
        .await
    }

    /// Runs one AMQP connection over any byte stream (TCP, TLS). `local` is the listener's
    /// address, for the connection's name.
    pub async fn handle_stream<S: connection::Stream>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        local: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) {
        self.handle_stream_with(stream, peer, local, shutdown, ConnectionAuth::default())
            .await
    }

    /// [`Self::handle_stream`] on a transport that vouches for the client: with a
    /// certificate user, connection.start offers EXTERNAL as well.
    pub async fn handle_stream_with<S: connection::Stream>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        local: SocketAddr,
        shutdown: watch::Receiver<bool>,
        auth: ConnectionAuth,
    ) {
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "amqp connection refused: connection limit reached");
            return;
        };
        connection::run(
            stream,
            peer,
            local,
            auth,
            self.broker.clone(),
            self.config.clone(),
            shutdown,
        )
        .await;
        drop(permit);
    }
}

/// Accepts AMQP connections on `listener` until `shutdown` (a front-end of its own).
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: AmqpConfig,
    shutdown: watch::Receiver<bool>,
) {
    AmqpFrontend::new(broker, config)
        .serve(listener, shutdown)
        .await
}
