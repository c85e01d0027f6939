//! The broker's registry of client connections, for the management API (list, close) and
//! metrics. Every front-end registers its connections here once the client is
//! authenticated and has chosen its vhost.
//!
//! # How a front-end uses it
//! ```ignore
//! let mut guard = broker.connections().register(ConnectionInfo {
//!     id: conn_id,
//!     protocol: "MQTT 3.1.1".into(),
//!     user: user.clone(),
//!     vhost: "/".into(),
//!     peer,
//!     local,
//!     client_properties: ClientProperties::plugin("MQTT client", Some("device-1")),
//! });
//! loop {
//!     tokio::select! {
//!         reason = guard.closed() => { /* send the protocol's close (or just drop), then return */ }
//!         // ... the session's own events ...
//!     }
//! }
//! // Dropping the guard unregisters the connection.
//! ```
//! `guard.channel_opened(n)` / `guard.channel_closed(n)` keep the channel list of protocols
//! that have channels (AMQP); MQTT and STOMP sessions may call `channel_opened(1)` once so
//! that the API shows one channel, as RabbitMQ does for them.
//!
//! # Invariants
//! - An entry is in the registry exactly as long as its [`ConnectionGuard`] lives.
//! - The registry lock is a `parking_lot` lock held only to insert, remove or clone the
//!   entry list, never across an `.await`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use amq_protocol_types::{AMQPValue, FieldTable};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::ids::ConnectionId;

/// What a front-end tells the registry about a new connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub id: ConnectionId,
    /// As RabbitMQ shows it: `"AMQP 0-9-1"`, `"MQTT 3.1.1"`, `"MQTT 5.0"`, `"STOMP 1.2"`.
    /// Borrowed for the fixed names ("AMQP 0-9-1", "MQTT 3.1.1", …): no allocation per
    /// connection.
    pub protocol: Cow<'static, str>,
    pub user: String,
    pub vhost: String,
    pub peer: SocketAddr,
    /// The broker's side of the socket.
    pub local: SocketAddr,
    pub client_properties: ClientProperties,
    /// The SASL mechanism the client logged in with (AMQP only).
    pub auth_mechanism: Option<&'static str>,
    /// The limits agreed in connection.tune-ok (AMQP only).
    pub tuning: Option<Tuning>,
    /// Set when the connection came through a TLS listener. Boxed: most connections are
    /// plain, and two inline strings are 48 bytes of every idle device's registry entry.
    pub tls: Option<Box<TlsDetails>>,
}

/// A connection's `client_properties`, as the management API shows them.
#[derive(Debug, Clone)]
pub enum ClientProperties {
    /// What the AMQP client sent in connection.start-ok.
    Amqp(FieldTable),
    /// RabbitMQ's MQTT and STOMP plugins show `{"product": "MQTT client", "client_id":
    /// "…"}`. Kept as these two and built into a table only when asked: a `FieldTable`
    /// held per idle device cost ~900 B of the 4 KB budget per MQTT connection.
    Plugin {
        product: &'static str,
        client_id: Option<Box<str>>,
    },
}

impl ClientProperties {
    pub fn plugin(product: &'static str, client_id: Option<&str>) -> Self {
        ClientProperties::Plugin {
            product,
            client_id: client_id.map(Box::from),
        }
    }

    pub fn table(&self) -> Cow<'_, FieldTable> {
        match self {
            ClientProperties::Amqp(t) => Cow::Borrowed(t),
            ClientProperties::Plugin { product, client_id } => {
                let mut t = FieldTable::default();
                t.insert("product".into(), AMQPValue::LongString((*product).into()));
                if let Some(id) = client_id {
                    t.insert("client_id".into(), AMQPValue::LongString((&**id).into()));
                }
                Cow::Owned(t)
            }
        }
    }
}

/// AMQP's negotiated connection limits, shown as RabbitMQ's `channel_max`, `frame_max`
/// and `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub channel_max: u16,
    pub frame_max: u32,
    /// Heartbeat interval in seconds (0: none).
    pub heartbeat: u16,
}

/// The TLS session of a connection (RabbitMQ's `ssl_protocol` and `ssl_cipher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDetails {
    /// `tlsv1.2` or `tlsv1.3`, RabbitMQ's spelling.
    pub protocol: String,
    /// The negotiated cipher suite's IANA name.
    pub cipher: String,
}

/// A channel's settings as RabbitMQ's API shows them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSettings {
    /// Per-consumer prefetch for new consumers (`basic.qos global=false`).
    pub prefetch_count: u32,
    /// Channel-wide prefetch (`basic.qos global=true`).
    pub global_prefetch_count: u32,
    pub confirm: bool,
    pub transactional: bool,
}

/// What RabbitMQ's API counts per channel (`message_stats`), in the order of
/// [`ChannelStat::ALL`]; `deliver_get` is the API's sum of the four delivery kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelStat {
    Publish,
    Confirm,
    ReturnUnroutable,
    DropUnroutable,
    Deliver,
    DeliverNoAck,
    Get,
    GetNoAck,
    GetEmpty,
    Redeliver,
    Ack,
}

/// A snapshot of one channel's counters, indexed by `ChannelStat as usize`.
pub type ChannelCounts = [u64; ChannelStat::ALL.len()];

impl ChannelStat {
    pub const ALL: [ChannelStat; 11] = [
        ChannelStat::Publish,
        ChannelStat::Confirm,
        ChannelStat::ReturnUnroutable,
        ChannelStat::DropUnroutable,
        ChannelStat::Deliver,
        ChannelStat::DeliverNoAck,
        ChannelStat::Get,
        ChannelStat::GetNoAck,
        ChannelStat::GetEmpty,
        ChannelStat::Redeliver,
        ChannelStat::Ack,
    ];

    /// The API's field name.
    pub fn name(self) -> &'static str {
        match self {
            ChannelStat::Publish => "publish",
            ChannelStat::Confirm => "confirm",
            ChannelStat::ReturnUnroutable => "return_unroutable",
            ChannelStat::DropUnroutable => "drop_unroutable",
            ChannelStat::Deliver => "deliver",
            ChannelStat::DeliverNoAck => "deliver_no_ack",
            ChannelStat::Get => "get",
            ChannelStat::GetNoAck => "get_no_ack",
            ChannelStat::GetEmpty => "get_empty",
            ChannelStat::Redeliver => "redeliver",
            ChannelStat::Ack => "ack",
        }
    }

    /// RabbitMQ keeps a channel's publishing counters (per exchange) apart from its
    /// consuming ones (per queue) and shows each group once one of its counters moved.
    pub fn publishing(self) -> bool {
        matches!(
            self,
            ChannelStat::Publish
                | ChannelStat::Confirm
                | ChannelStat::ReturnUnroutable
                | ChannelStat::DropUnroutable
        )
    }
}

/// A channel's counters and gauges for the API, written by its connection task only
/// (relaxed atomics: nothing is ordered by them).
#[derive(Debug, Default)]
pub struct ChannelStats {
    counters: [AtomicU64; ChannelStat::ALL.len()],
    /// Publisher confirms owed (RabbitMQ's `messages_unconfirmed`).
    pub unconfirmed: AtomicU64,
    /// Publishes and acknowledgements held by an open transaction
    /// (`messages_uncommitted`, `acks_uncommitted`).
    pub uncommitted: AtomicU64,
    pub acks_uncommitted: AtomicU64,
}

impl ChannelStats {
    pub fn add(&self, stat: ChannelStat, n: u64) {
        self.counters[stat as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn counts(&self) -> ChannelCounts {
        std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    pub fn set_unconfirmed(&self, n: usize) {
        self.unconfirmed.store(n as u64, Ordering::Relaxed);
    }

    /// What an open transaction holds: publishes and acknowledgements.
    pub fn set_uncommitted(&self, publishes: usize, settles: usize) {
        self.uncommitted.store(publishes as u64, Ordering::Relaxed);
        self.acks_uncommitted
            .store(settles as u64, Ordering::Relaxed);
    }
}

/// One open channel as the API lists it.
#[derive(Debug, Clone)]
pub struct ChannelRecord {
    pub number: u16,
    pub settings: ChannelSettings,
    pub stats: Arc<ChannelStats>,
}

/// One registered connection.
#[derive(Debug)]
pub struct ConnectionEntry {
    pub info: ConnectionInfo,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
    /// Open channels by number (empty, so unallocated, for MQTT and STOMP sessions).
    channels: Mutex<Vec<ChannelRecord>>,
    /// Bytes received/sent, if the front-end reports them.
    pub recv_oct: AtomicU64,
    pub send_oct: AtomicU64,
    /// Why the connection was asked to close, once it was; the connection task waits on
    /// `close_requested`. (A mutex and a `Notify`, not a watch channel: a watch costs
    /// ~350 bytes per connection, which idle MQTT devices pay for nothing.)
    close_reason: Mutex<Option<String>>,
    close_requested: Notify,
    /// Set once a requested close has released what the connection held (channels,
    /// exclusive queues), though it may still wait for the client's close-ok.
    released: AtomicBool,
}

impl ConnectionEntry {
    /// RabbitMQ's connection name: `"127.0.0.1:53412 -> 127.0.0.1:5672"` (made when asked,
    /// not kept: the registry holds an entry per idle connection).
    pub fn name(&self) -> String {
        format!("{} -> {}", self.info.peer, self.info.local)
    }

    /// Open channel numbers, ascending.
    pub fn channels(&self) -> Vec<u16> {
        self.channels.lock().iter().map(|c| c.number).collect()
    }

    /// How many channels are open.
    pub fn channel_count(&self) -> usize {
        self.channels.lock().len()
    }

    /// The open channels with their settings and counters, by number.
    pub fn channel_records(&self) -> Vec<ChannelRecord> {
        self.channels.lock().clone()
    }

    /// Asks the front-end to close the connection with `reason` (RabbitMQ's
    /// `CONNECTION_FORCED - <reason>` for AMQP).
    pub fn request_close(&self, reason: &str) {
        *self.close_reason.lock() = Some(reason.to_owned());
        // One waiter, the connection task; a permit is kept if it is not waiting yet.
        self.close_requested.notify_one();
    }

    /// Whether a requested close has released the connection's resources (see
    /// [`ConnectionGuard::mark_released`]); a connection that has left the registry
    /// has too.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }
}

/// The registry; one per broker.
#[derive(Debug, Default)]
pub struct Connections {
    entries: RwLock<HashMap<ConnectionId, Arc<ConnectionEntry>>>,
    opened_total: AtomicU64,
    closed_total: AtomicU64,
    /// Channels opened and closed since start (the API's `churn_rates`).
    channels_opened: AtomicU64,
    channels_closed: AtomicU64,
    /// Closed connections by (protocol, reason), for `/metrics`.
    closed_by_reason: Mutex<HashMap<(&'static str, &'static str), u64>>,
}

impl Connections {
    /// Registers a connection; it stays listed until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, info: ConnectionInfo) -> ConnectionGuard {
        let entry = Arc::new(ConnectionEntry {
            connected_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            channels: Mutex::new(Vec::new()),
            recv_oct: AtomicU64::new(0),
            send_oct: AtomicU64::new(0),
            close_reason: Mutex::new(None),
            close_requested: Notify::new(),
            released: AtomicBool::new(false),
            info,
        });
        self.entries.write().insert(entry.info.id, entry.clone());
        self.opened_total.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            entry,
            registry: self.clone(),
            close_kind: "unknown",
        }
    }

    /// Every registered connection (a snapshot).
    pub fn list(&self) -> Vec<Arc<ConnectionEntry>> {
        self.entries.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection called `name` (RabbitMQ's connection name), if registered.
    pub fn by_name(&self, name: &str) -> Option<Arc<ConnectionEntry>> {
        self.entries
            .read()
            .values()
            .find(|e| e.name() == name)
            .cloned()
    }

    pub fn get(&self, id: ConnectionId) -> Option<Arc<ConnectionEntry>> {
        self.entries.read().get(&id).cloned()
    }

    /// Asks every connection to `vhost` to close (the vhost is being deleted).
    pub fn close_vhost(&self, vhost: &str, reason: &str) {
        for e in self.list() {
            if e.info.vhost == vhost {
                e.request_close(reason);
            }
        }
    }

    /// Asks every connection of `user` to close (the user was deleted).
    pub fn close_user(&self, user: &str, reason: &str) {
        for e in self.list() {
            if e.info.user == user {
                e.request_close(reason);
            }
        }
    }

    /// Connections closed since start by (protocol, reason), sorted (Prometheus counters).
    pub fn closed_by_reason(&self) -> Vec<((&'static str, &'static str), u64)> {
        let mut v: Vec<_> = self
            .closed_by_reason
            .lock()
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect();
        v.sort_unstable();
        v
    }

    /// Connections opened and closed since start (Prometheus counters).
    pub fn totals(&self) -> (u64, u64) {
        (
            self.opened_total.load(Ordering::Relaxed),
            self.closed_total.load(Ordering::Relaxed),
        )
    }

    /// Channels opened and closed since start.
    pub fn channel_totals(&self) -> (u64, u64) {
        (
            self.channels_opened.load(Ordering::Relaxed),
            self.channels_closed.load(Ordering::Relaxed),
        )
    }
}

/// Keeps a connection registered; unregisters it on drop.
#[derive(Debug)]
pub struct ConnectionGuard {
    entry: Arc<ConnectionEntry>,
    registry: Arc<Connections>,
    /// Why the connection ended, as a metrics label (set by the front-end before it drops
    /// the guard).
    close_kind: &'static str,
}

impl ConnectionGuard {
    /// Records why the connection ends (`client_closed`, `heartbeat_timeout`, …), counted
    /// by reason when the guard is dropped.
    pub fn set_close_reason(&mut self, kind: &'static str) {
        self.close_kind = kind;
    }

    pub fn entry(&self) -> &Arc<ConnectionEntry> {
        &self.entry
    }

    /// A requested close has released the channels and exclusive queues: the management
    /// API's DELETE answers then, as RabbitMQ's does, without waiting for a close-ok.
    pub fn mark_released(&self) {
        self.entry.released.store(true, Ordering::Release);
    }

    /// Resolves when the management API (or a vhost/user deletion) asks this connection to
    /// close; yields the reason. Cancel-safe: use it in `select!`. Never resolves otherwise.
    pub async fn closed(&mut self) -> String {
        loop {
            if let Some(r) = self.entry.close_reason.lock().clone() {
                return r;
            }
            self.entry.close_requested.notified().await;
        }
    }

    /// Lists channel `n`; the front-end counts its messages in the returned stats.
    pub fn channel_opened(&self, n: u16) -> Arc<ChannelStats> {
        self.registry
            .channels_opened
            .fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(ChannelStats::default());
        let mut all = self.entry.channels.lock();
        let at = all.partition_point(|c| c.number < n);
        all.insert(
            at,
            ChannelRecord {
                number: n,
                settings: ChannelSettings::default(),
                stats: stats.clone(),
            },
        );
        stats
    }

    pub fn channel_closed(&self, n: u16) {
        let mut all = self.entry.channels.lock();
        let before = all.len();
        all.retain(|c| c.number != n);
        let closed = (before - all.len()) as u64;
        self.registry
            .channels_closed
            .fetch_add(closed, Ordering::Relaxed);
    }

    /// Records a change of channel `n`'s settings (basic.qos, confirm.select, tx.select).
    pub fn update_channel(&self, n: u16, change: impl FnOnce(&mut ChannelSettings)) {
        if let Some(c) = self
            .entry
            .channels
            .lock()
            .iter_mut()
            .find(|c| c.number == n)
        {
            change(&mut c.settings);
        }
    }

    /// Adds to the byte counters shown by the API.
    pub fn add_octets(&self, recv: u64, send: u64) {
        self.entry.recv_oct.fetch_add(recv, Ordering::Relaxed);
        self.entry.send_oct.fetch_add(send, Ordering::Relaxed);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.registry.entries.write().remove(&self.entry.info.id);
        self.registry.closed_total.fetch_add(1, Ordering::Relaxed);
        // Channels still listed close with their connection.
        let open = self.entry.channels.lock().len() as u64;
        self.registry
            .channels_closed
            .fetch_add(open, Ordering::Relaxed);
        let p = self.entry.info.protocol.as_ref();
        let family = if p.starts_with("AMQP") {
            "amqp"
        } else if p.starts_with("MQTT") {
            "mqtt"
        } else if p.starts_with("STOMP") {
            "stomp"
        } else {
            "other"
        };
        *self
            .registry
            .closed_by_reason
            .lock()
            .entry((family, self.close_kind))
            .or_insert(0) += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64) -> ConnectionInfo {
        ConnectionInfo {
            id: ConnectionId(id),
            protocol: "AMQP 0-9-1".into(),
            user: "guest".into(),
            vhost: "/".into(),
            peer: "127.0.0.1:50000".parse().expect("addr"),
            local: "127.0.0.1:5672".parse().expect("addr"),
            client_properties: ClientProperties::Amqp(FieldTable::default()),
            auth_mechanism: None,
            tuning: None,
            tls: None,
        }
    }

    #[tokio::test]
    async fn register_close_and_drop() {
        let reg = Arc::new(Connections::default());
        let mut g = reg.register(info(1));
        assert_eq!(reg.len(), 1);
        let e = reg
            .by_name("127.0.0.1:50000 -> 127.0.0.1:5672")
            .expect("listed");
        e.request_close("bye");
        assert_eq!(g.closed().await, "bye");
        drop(g);
        assert!(reg.is_empty());
        assert_eq!(reg.totals(), (1, 1));
    }
}
