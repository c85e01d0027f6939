//! Message rates for the API (`*_details.rate`), sampled every few seconds.
//!
//! Queues count their publishes, deliveries and acks under the lock they already take
//! for each of those operations; this sampler turns the counters into per-second rates by
//! differencing two samples, so nothing extra runs on the message path. Global totals add
//! the last counts of queues that have since been deleted, so they never go backwards.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use std::sync::RwLock;

use warren_core::{Broker, ChannelCounts, ChannelStat, ConnectionEntry, QueueCounts};

use crate::history::{History, MAX_WATCHED};

/// How far back the broker's and each vhost's samples go (RabbitMQ's `global` and
/// `basic` retention: an hour).
pub(crate) const KEEP_GLOBAL: Duration = Duration::from_secs(3600);
/// How far back a watched queue's samples go.
pub(crate) const KEEP_QUEUE: Duration = Duration::from_secs(600);

/// The counters of [`Totals`] by their API names, in [`Totals::counters`] order: first
/// those a queue counts ([`QUEUE_COUNTERS`]), then those of channels (per vhost and
/// broker), the connections' bytes (a vhost's `recv_oct`/`send_oct`), and the broker's
/// churn (the overview's `churn_rates`, from [`CHURN`] on).
pub const COUNTERS: [&str; 21] = [
    "publish",
    "deliver_get",
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "get_empty",
    "ack",
    "redeliver",
    "confirm",
    "return_unroutable",
    "drop_unroutable",
    "recv_oct",
    "send_oct",
    "connection_created",
    "connection_closed",
    "channel_created",
    "channel_closed",
    "queue_declared",
    "queue_created",
    "queue_deleted",
];
/// Where the churn counters start in [`COUNTERS`].
pub const CHURN: usize = 14;
/// How many of [`COUNTERS`] a queue's `message_stats` has.
pub const QUEUE_COUNTERS: usize = 9;
/// How many of [`COUNTERS`] the overview's and a vhost's `message_stats` have.
pub const MESSAGE_COUNTERS: usize = 12;

/// Per-second rates of one queue or of the whole broker.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rates {
    /// In [`COUNTERS`] order.
    pub counters: [f64; COUNTERS.len()],
    pub messages: f64,
    pub ready: f64,
    pub unacked: f64,
}

/// Counters summed over queues (and, for a vhost or the broker, channels and
/// connections), and queue depths.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Totals {
    pub publish: u64,
    pub deliver_get: u64,
    /// Deliveries to consumers that ack (RabbitMQ's `deliver`).
    pub deliver: u64,
    pub deliver_no_ack: u64,
    pub get: u64,
    pub get_no_ack: u64,
    pub get_empty: u64,
    pub ack: u64,
    pub redeliver: u64,
    pub confirm: u64,
    pub return_unroutable: u64,
    pub drop_unroutable: u64,
    pub recv_oct: u64,
    pub send_oct: u64,
    /// Broker-wide since start (the global totals only).
    pub churn: [u64; COUNTERS.len() - CHURN],
    pub ready: u64,
    pub unacked: u64,
}

impl Totals {
    /// The counters in [`COUNTERS`] order.
    pub fn counters(&self) -> [u64; COUNTERS.len()] {
        let c = &self.churn;
        [
            self.publish,
            self.deliver_get,
            self.deliver,
            self.deliver_no_ack,
            self.get,
            self.get_no_ack,
            self.get_empty,
            self.ack,
            self.redeliver,
            self.confirm,
            self.return_unroutable,
            self.drop_unroutable,
            self.recv_oct,
            self.send_oct,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6],
        ]
    }

    fn counters_mut(&mut self) -> [&mut u64; COUNTERS.len()] {
        let [c0, c1, c2, c3, c4, c5, c6] = &mut self.churn;
        [
            &mut self.publish,
            &mut self.deliver_get,
            &mut self.deliver,
            &mut self.deliver_no_ack,
            &mut self.get,
            &mut self.get_no_ack,
            &mut self.get_empty,
            &mut self.ack,
            &mut self.redeliver,
            &mut self.confirm,
            &mut self.return_unroutable,
            &mut self.drop_unroutable,
            &mut self.recv_oct,
            &mut self.send_oct,
            c0,
            c1,
            c2,
            c3,
            c4,
            c5,
            c6,
        ]
    }

    /// Adds the message counters (not the depths) of `other`.
    fn add_counters(&mut self, other: &Totals) {
        for (a, b) in self.counters_mut().into_iter().zip(other.counters()) {
            *a += b;
        }
    }

    pub(crate) fn add(&mut self, c: &QueueCounts) {
        let s = &c.stats;
        self.publish += s.published;
        self.deliver_get += s.delivered;
        self.deliver += s
            .delivered
            .saturating_sub(s.delivered_no_ack + s.got + s.got_no_ack);
        self.deliver_no_ack += s.delivered_no_ack;
        self.get += s.got;
        self.get_no_ack += s.got_no_ack;
        self.get_empty += s.get_empty;
        self.ack += s.acked;
        self.redeliver += s.redelivered;
        self.ready += c.ready as u64;
        self.unacked += c.unacked as u64;
    }

    /// Adds a channel's confirms and unroutable publishes.
    fn add_channel(&mut self, c: &ChannelCounts) {
        self.confirm += c[ChannelStat::Confirm as usize];
        self.return_unroutable += c[ChannelStat::ReturnUnroutable as usize];
        self.drop_unroutable += c[ChannelStat::DropUnroutable as usize];
    }
}

#[derive(Clone)]
struct Sample {
    counts: QueueCounts,
    rates: Rates,
    vhost: Arc<str>,
    /// The last sample at which the queue's counters had moved (RabbitMQ's idle_since).
    active_at: SystemTime,
}

/// A vhost's totals at the last sample, the counters of its deleted queues, and its rates.
#[derive(Clone, Copy, Default)]
struct VhostSample {
    totals: Totals,
    retired: Totals,
    rates: Rates,
}

/// An exchange's (publish_in, publish_out) counts and their rates at the last sample.
#[derive(Clone, Copy, Default)]
pub struct ExchangeSample {
    counts: (u64, u64),
    pub rates: (f64, f64),
}

/// A channel's counters and their rates at the last sample.
#[derive(Clone)]
struct ChannelSample {
    counts: ChannelCounts,
    rates: [f64; ChannelStat::ALL.len()],
    vhost: Arc<str>,
}

/// Rates of a connection's received and sent bytes.
#[derive(Clone, Default)]
pub struct OctetRates {
    counts: (u64, u64),
    pub recv: f64,
    pub send: f64,
    vhost: Arc<str>,
}

#[derive(Default)]
struct State {
    at: Option<Instant>,
    /// The latest sample's wall-clock time.
    wall: Option<SystemTime>,
    queues: HashMap<u64, Sample>,
    /// By (vhost, exchange name).
    exchanges: HashMap<(String, String), ExchangeSample>,
    /// Message counters of deleted queues.
    retired: Totals,
    vhosts: HashMap<Arc<str>, VhostSample>,
    global: Totals,
    global_rates: Rates,
    /// By (connection id, channel number).
    channels: HashMap<(u64, u16), ChannelSample>,
    /// By connection id.
    connections: HashMap<u64, OctetRates>,
    /// Past samples (`*_details.samples`): the broker's, each vhost's, and those of the
    /// queues asked for lately (by store id, with when they were last asked for).
    history: Histories,
}

#[derive(Default)]
struct Histories {
    global: History,
    vhosts: HashMap<Arc<str>, History>,
    queues: HashMap<u64, (Instant, History)>,
}

/// The sampler; one per HTTP server.
#[derive(Default)]
pub struct Sampler {
    state: RwLock<State>,
    /// The node's figures when last asked for (at most once per [`NODE_INTERVAL`]) and
    /// their rates since the time before.
    node: std::sync::Mutex<Option<NodeSample>>,
}

/// Node figures are sampled when asked for, at most this often (RabbitMQ's 5 s).
const NODE_INTERVAL: Duration = Duration::from_secs(5);

struct NodeSample {
    at: Instant,
    figures: [u64; 5],
    rates: [f64; 5],
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    (now.saturating_sub(before)) as f64 / secs
}

fn signed_rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    (now as f64 - before as f64) / secs
}

fn rates_between(now: &Totals, before: &Totals, secs: f64) -> Rates {
    let (n, b) = (now.counters(), before.counters());
    Rates {
        counters: std::array::from_fn(|i| rate(n[i], b[i], secs)),
        messages: signed_rate(now.ready + now.unacked, before.ready + before.unacked, secs),
        ready: signed_rate(now.ready, before.ready, secs),
        unacked: signed_rate(now.unacked, before.unacked, secs),
    }
}

/// The broker's connection, channel and queue churn since start.
fn churn(broker: &Broker) -> [u64; COUNTERS.len() - CHURN] {
    let (conn_opened, conn_closed) = broker.connections().totals();
    let (chan_opened, chan_closed) = broker.connections().channel_totals();
    let mut queues = [0u64; 3];
    for vh in broker.vhosts() {
        let c = &vh.churn;
        for (sum, n) in queues.iter_mut().zip([&c.declared, &c.created, &c.deleted]) {
            *sum += n.load(std::sync::atomic::Ordering::Relaxed);
        }
    }
    [
        conn_opened,
        conn_closed,
        chan_opened,
        chan_closed,
        queues[0],
        queues[1],
        queues[2],
    ]
}

/// Adds the live connections' bytes and their channels' confirms and unroutable
/// publishes (of one vhost, or all).
fn add_connections(t: &mut Totals, broker: &Broker, vhost: Option<&str>) {
    for e in broker.connections().list() {
        if vhost.is_some_and(|v| v != e.info.vhost) {
            continue;
        }
        t.add_counters(&octets(&e));
        for c in e.channel_records() {
            t.add_channel(&c.stats.counts());
        }
    }
}

/// A connection's bytes received and sent, as counters.
fn octets(e: &ConnectionEntry) -> Totals {
    Totals {
        recv_oct: e.recv_oct.load(std::sync::atomic::Ordering::Relaxed),
        send_oct: e.send_oct.load(std::sync::atomic::Ordering::Relaxed),
        ..Totals::default()
    }
}

impl Sampler {
    /// Takes one sample of every queue.
    pub fn sample(&self, broker: &Broker) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut fresh: HashMap<u64, (Arc<str>, QueueCounts)> = HashMap::new();
        let mut fresh_exchanges = Vec::new();
        let mut vhost_names = Vec::new();
        for vh in broker.vhosts() {
            let name: Arc<str> = Arc::from(vh.name.as_str());
            vhost_names.push(name.clone());
            for q in vh.queues() {
                fresh.insert(q.store_id.0, (name.clone(), q.counts()));
            }
            for x in vh.exchanges() {
                let key = (vh.name.clone(), x.name.as_str().to_owned());
                fresh_exchanges.push((key, x.publish_counts()));
            }
        }
        let conns = broker.connections().list();
        let Ok(mut st) = self.state.write() else {
            return;
        };
        let secs = st
            .at
            .map(|t| now.duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        let mut queues = HashMap::with_capacity(fresh.len());
        let mut global = Totals::default();
        // Every vhost, so that one without queues or connections keeps the counters of
        // those it had.
        let mut by_vhost: HashMap<Arc<str>, Totals> = vhost_names
            .into_iter()
            .map(|n| (n, Totals::default()))
            .collect();
        for (id, (vhost, counts)) in fresh {
            let mut t = Totals::default();
            t.add(&counts);
            global.add(&counts);
            by_vhost.entry(vhost.clone()).or_default().add(&counts);
            let (rates, active_at) = match st.queues.get(&id) {
                Some(prev) => {
                    let mut p = Totals::default();
                    p.add(&prev.counts);
                    let moved = p != t;
                    let active_at = if moved { wall } else { prev.active_at };
                    (rates_between(&t, &p, secs), active_at)
                }
                None => (Rates::default(), wall),
            };
            queues.insert(
                id,
                Sample {
                    counts,
                    rates,
                    vhost,
                    active_at,
                },
            );
        }
        // Channels' confirms and unroutable publishes and connections' bytes count for
        // their vhost; those of closed ones are kept at their last sample, as the
        // counters of deleted queues are.
        let mut channels = HashMap::new();
        let mut connections = HashMap::with_capacity(conns.len());
        for e in &conns {
            let id = e.info.id.0;
            let vhost: Arc<str> = Arc::from(e.info.vhost.as_str());
            // The connection's counters: its bytes, then its channels'.
            let mut live = octets(e);
            let octets = (live.recv_oct, live.send_oct);
            let (recv, send) = match st.connections.get(&id) {
                Some(prev) => (
                    rate(octets.0, prev.counts.0, secs),
                    rate(octets.1, prev.counts.1, secs),
                ),
                None => (0.0, 0.0),
            };
            for c in e.channel_records() {
                let counts = c.stats.counts();
                let prev = st.channels.get(&(id, c.number));
                let rates = std::array::from_fn(|i| {
                    prev.map_or(0.0, |p| rate(counts[i], p.counts[i], secs))
                });
                live.add_channel(&counts);
                let vhost = vhost.clone();
                channels.insert(
                    (id, c.number),
                    ChannelSample {
                        counts,
                        rates,
                        vhost,
                    },
                );
            }
            by_vhost
                .entry(vhost.clone())
                .or_default()
                .add_counters(&live);
            global.add_counters(&live);
            connections.insert(
                id,
                OctetRates {
                    counts: octets,
                    recv,
                    send,
                    vhost,
                },
            );
        }
        let mut retired = st.retired;
        let mut vhost_retired: HashMap<Arc<str>, Totals> = st
            .vhosts
            .iter()
            .map(|(k, v)| (k.clone(), v.retired))
            .collect();
        let mut retire = |vhost: &Arc<str>, t: &Totals| {
            retired.add_counters(t);
            vhost_retired
                .entry(vhost.clone())
                .or_default()
                .add_counters(t);
        };
        for (id, old) in st.queues.iter() {
            if !queues.contains_key(id) {
                let mut t = Totals::default();
                t.add(&old.counts);
                retire(&old.vhost, &t);
            }
        }
        for (key, old) in st.channels.iter() {
            if !channels.contains_key(key) {
                let mut t = Totals::default();
                t.add_channel(&old.counts);
                retire(&old.vhost, &t);
            }
        }
        for (id, old) in st.connections.iter() {
            if !connections.contains_key(id) {
                let t = Totals {
                    recv_oct: old.counts.0,
                    send_oct: old.counts.1,
                    ..Totals::default()
                };
                retire(&old.vhost, &t);
            }
        }
        global.add_counters(&retired);
        global.churn = churn(broker);
        // A vhost's counters with its deleted queues'; gone with the vhost itself.
        let vhosts: HashMap<Arc<str>, VhostSample> = by_vhost
            .into_iter()
            .map(|(name, mut totals)| {
                let retired = vhost_retired.get(&name).copied().unwrap_or_default();
                totals.add_counters(&retired);
                let rates = match st.vhosts.get(&name) {
                    Some(prev) if st.at.is_some() => rates_between(&totals, &prev.totals, secs),
                    _ => Rates::default(),
                };
                let sample = VhostSample {
                    totals,
                    retired,
                    rates,
                };
                (name, sample)
            })
            .collect();
        let global_rates = if st.at.is_some() {
            rates_between(&global, &st.global, secs)
        } else {
            Rates::default()
        };
        let exchanges = fresh_exchanges
            .into_iter()
            .map(|(key, counts)| {
                let rates = match st.exchanges.get(&key) {
                    Some(prev) => (
                        rate(counts.0, prev.counts.0, secs),
                        rate(counts.1, prev.counts.1, secs),
                    ),
                    None => (0.0, 0.0),
                };
                (key, ExchangeSample { counts, rates })
            })
            .collect();
        let mut history = std::mem::take(&mut st.history);
        let wall_ms = unix_ms(wall);
        let keep_queue = KEEP_QUEUE.as_millis() as u64;
        let keep_global = KEEP_GLOBAL.as_millis() as u64;
        history.global.push(wall_ms, global, keep_global);
        history.vhosts.retain(|name, _| vhosts.contains_key(name));
        for (name, v) in &vhosts {
            let h = history.vhosts.entry(name.clone()).or_default();
            h.push(wall_ms, v.totals, keep_global);
        }
        // A queue's history lasts while it is asked for; deleted queues' goes at once.
        history.queues.retain(|id, (asked, h)| {
            let Some(q) = queues.get(id) else {
                return false;
            };
            let mut t = Totals::default();
            t.add(&q.counts);
            h.push(wall_ms, t, keep_queue);
            now.duration_since(*asked) < KEEP_QUEUE
        });
        *st = State {
            history,
            at: Some(now),
            wall: Some(wall),
            queues,
            exchanges,
            retired,
            vhosts,
            global,
            global_rates,
            channels,
            connections,
        };
    }

    /// Since when queue `store_id` has been idle (nothing published, delivered, acknowledged
    /// or changed in length), to the sampling interval; `None` while it is busy (it moved
    /// at the latest sample), as RabbitMQ shows `idle_since` only for an idle queue.
    pub fn queue_idle_since(&self, store_id: u64) -> Option<SystemTime> {
        let s = self.state.read().ok()?;
        let q = s.queues.get(&store_id)?;
        (Some(q.active_at) < s.wall).then_some(q.active_at)
    }

    /// The rates of queue `store_id` at the last sample (zero for a new queue).
    pub fn queue_rates(&self, store_id: u64) -> Rates {
        self.state
            .read()
            .ok()
            .and_then(|s| s.queues.get(&store_id).map(|x| x.rates))
            .unwrap_or_default()
    }

    /// The rates of channel `number` of connection `conn` at the last sample (zero for
    /// a new channel).
    pub fn channel_rates(&self, conn: u64, number: u16) -> [f64; ChannelStat::ALL.len()] {
        self.state
            .read()
            .ok()
            .and_then(|s| s.channels.get(&(conn, number)).map(|c| c.rates))
            .unwrap_or_default()
    }

    /// The byte rates of connection `conn` at the last sample.
    pub fn connection_rates(&self, conn: u64) -> OctetRates {
        self.state
            .read()
            .ok()
            .and_then(|s| s.connections.get(&conn).cloned())
            .unwrap_or_default()
    }

    /// The (publish_in, publish_out) rates of an exchange at the last sample.
    pub fn exchange_rates(&self, vhost: &str, name: &str) -> (f64, f64) {
        self.state
            .read()
            .ok()
            .and_then(|s| {
                s.exchanges
                    .get(&(vhost.to_owned(), name.to_owned()))
                    .map(|x| x.rates)
            })
            .unwrap_or_default()
    }

    /// A vhost's counters (its live queues now plus its deleted queues' last counts) and
    /// its rates at the last sample.
    pub fn vhost(&self, broker: &Broker, vh: &warren_core::VHost) -> (Totals, Rates) {
        let mut t = Totals::default();
        for q in vh.queues() {
            t.add(&q.counts());
        }
        add_connections(&mut t, broker, Some(&vh.name));
        let (retired, rates) = self
            .state
            .read()
            .ok()
            .and_then(|s| s.vhosts.get(vh.name.as_str()).map(|v| (v.retired, v.rates)))
            .unwrap_or_default();
        t.add_counters(&retired);
        (t, rates)
    }

    /// Global counters: live queues now plus deleted queues' last counts.
    pub fn global(&self, broker: &Broker) -> (Totals, Rates) {
        let mut t = Totals::default();
        for vh in broker.vhosts() {
            for q in vh.queues() {
                t.add(&q.counts());
            }
        }
        add_connections(&mut t, broker, None);
        t.churn = churn(broker);
        let (retired, rates) = self
            .state
            .read()
            .map(|s| (s.retired, s.global_rates))
            .unwrap_or_default();
        t.add_counters(&retired);
        (t, rates)
    }

    /// The broker's past samples and its present counts, for `*_details.samples`.
    pub fn global_history(&self, now: Totals) -> Vec<(u64, Totals)> {
        let now_ms = unix_ms(SystemTime::now());
        match self.state.read() {
            Ok(s) => s.history.global.with_now(now_ms, now),
            Err(_) => History::default().with_now(now_ms, now),
        }
    }

    /// A vhost's past samples and its present counts.
    pub fn vhost_history(&self, vhost: &str, now: Totals) -> Vec<(u64, Totals)> {
        let now_ms = unix_ms(SystemTime::now());
        let s = self.state.read().ok();
        let h = s.as_ref().and_then(|s| s.history.vhosts.get(vhost));
        h.cloned().unwrap_or_default().with_now(now_ms, now)
    }

    /// Queue `store_id`'s past samples and its present counts; from now on its history
    /// is kept (for [`KEEP_QUEUE`] after the last time it is asked for, and for at most
    /// [`MAX_WATCHED`] queues).
    pub fn queue_history(&self, store_id: u64, now: &QueueCounts) -> Vec<(u64, Totals)> {
        let now_ms = unix_ms(SystemTime::now());
        let mut t = Totals::default();
        t.add(now);
        let Ok(mut s) = self.state.write() else {
            return History::default().with_now(now_ms, t);
        };
        let queues = &mut s.history.queues;
        if !queues.contains_key(&store_id) && queues.len() >= MAX_WATCHED {
            return History::default().with_now(now_ms, t);
        }
        let (asked, h) = queues
            .entry(store_id)
            .or_insert_with(|| (Instant::now(), History::default()));
        *asked = Instant::now();
        h.with_now(now_ms, t)
    }

    /// Per-second rates of the node's `figures` (memory, descriptors, sockets, threads,
    /// free disk: RabbitMQ's `*_details` of a node) over the last interval of at least
    /// [`NODE_INTERVAL`]; zero until there are two samples.
    pub fn node_rates(&self, figures: [u64; 5]) -> [f64; 5] {
        let now = Instant::now();
        let Ok(mut node) = self.node.lock() else {
            return [0.0; 5];
        };
        match node.as_mut() {
            Some(n) if now.duration_since(n.at) < NODE_INTERVAL => n.rates,
            Some(n) => {
                let secs = now.duration_since(n.at).as_secs_f64();
                n.rates = std::array::from_fn(|i| signed_rate(figures[i], n.figures[i], secs));
                n.at = now;
                n.figures = figures;
                n.rates
            }
            None => {
                *node = Some(NodeSample {
                    at: now,
                    figures,
                    rates: [0.0; 5],
                });
                [0.0; 5]
            }
        }
    }

    /// Samples every `period` until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        broker: Arc<Broker>,
        period: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(&broker),
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
            }
        }
    }
}
