//! What connects a queue to a consumer's connection: the consumer's description, the
//! channel-wide credit, and the connection's bounded [`Outbox`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use crate::ids::{ConnectionId, ConsumerId, MsgSeq};
use crate::message::Message;
use crate::queue::Queue;

/// Channel-wide credit (AMQP `basic.qos` with `global=true`): shared by every consumer of a
/// channel. Queues take one unit per delivery; the front-end returns it on settle.
#[derive(Debug, Default)]
pub struct Credit {
    /// 0 = unlimited.
    pub limit: AtomicU32,
    pub used: AtomicU32,
    /// AMQP channel.flow(active=false): deliveries to this channel stop until resumed.
    pub paused: std::sync::atomic::AtomicBool,
}

impl Credit {
    pub fn has_room(&self) -> bool {
        if self.paused.load(Ordering::Relaxed) {
            return false;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || self.used.load(Ordering::Relaxed) < limit
    }
    pub(crate) fn take(&self) {
        self.used.fetch_add(1, Ordering::Relaxed);
    }
    /// Returns `n` units; true if the channel was at its limit before (queues may need a
    /// kick).
    pub fn give_back(&self, n: u32) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let prev = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            })
            .unwrap_or(0);
        limit != 0 && prev >= limit
    }
}

/// A consumer as the queue sees it.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub id: ConsumerId,
    pub tag: Arc<str>,
    /// The front-end's own routing token, handed back in every [`Delivery`] (AMQP: the
    /// channel number), so deliveries in flight when a consumer is cancelled still find
    /// their way.
    pub token: u64,
    pub owner: ConnectionId,
    pub no_ack: bool,
    pub exclusive: bool,
    /// `x-priority`: higher first.
    pub priority: i32,
    /// Per-consumer prefetch; 0 = unlimited.
    pub prefetch: u32,
    pub channel_credit: Arc<Credit>,
    pub outbox: Arc<Outbox>,
}

/// A message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    pub consumer: ConsumerId,
    pub tag: Arc<str>,
    pub token: u64,
    /// Settled on delivery: nothing to ack, nothing to requeue.
    pub no_ack: bool,
    pub queue: Arc<Queue>,
    pub seq: MsgSeq,
    pub message: Arc<Message>,
    pub redelivered: bool,
}

/// Gives back the deliveries still waiting in a closed connection's outbox: they were
/// never written, so each goes back to its queue (no-ack ones were already settled).
/// Call after the connection's consumers are removed, so nothing new arrives.
pub async fn return_undelivered(rx: &mut mpsc::Receiver<Delivery>) {
    rx.close();
    while let Ok(d) = rx.try_recv() {
        if !d.no_ack {
            d.queue.requeue(&[d.seq]).await;
        }
    }
}

/// Out-of-band news for a connection.
#[derive(Debug)]
pub enum OutboxEvent {
    /// The queue went away: the consumer is gone (AMQP server-initiated basic.cancel).
    Cancelled(ConsumerId),
    /// A delivery found the outbox full; resume the queue once drained.
    Stalled(Weak<Queue>),
}

/// A connection's inbox of deliveries: bounded, so a consumer that cannot keep up stalls
/// its queues instead of growing memory.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Delivery>,
    events: Mutex<Vec<OutboxEvent>>,
    notify: Notify,
}

impl Outbox {
    /// A new outbox holding at most `capacity` deliveries, and its receiving end.
    pub fn new(capacity: usize) -> (Arc<Outbox>, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Arc::new(Outbox {
                tx,
                events: Mutex::new(Vec::new()),
                notify: Notify::new(),
            }),
            rx,
        )
    }

    pub(crate) fn try_deliver(&self, d: Delivery) -> Result<(), Delivery> {
        self.tx.try_send(d).map_err(|e| match e {
            mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
        })
    }

    pub(crate) fn note_stalled(&self, q: Weak<Queue>) {
        self.push_event(OutboxEvent::Stalled(q));
    }

    pub(crate) fn push_event(&self, e: OutboxEvent) {
        self.events.lock().push(e);
        self.notify.notify_one();
    }

    /// Takes the pending events.
    pub fn take_events(&self) -> Vec<OutboxEvent> {
        std::mem::take(&mut *self.events.lock())
    }

    /// Resolves when events are pending.
    pub async fn events_ready(&self) {
        self.notify.notified().await
    }
}
