//! What connects a queue to a consumer's connection: the consumer's description, the
//! channel-wide credit, and the connection's bounded [`Outbox`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;

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
}

impl Credit {
    pub fn has_room(&self) -> bool {
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
    /// Stream queues: where to start reading (`x-stream-offset`; None = next).
    pub stream_start: Option<crate::stream::StreamStart>,
    /// The consume arguments as given (AMQP basic.consume), for the management API.
    pub arguments: amq_protocol_types::FieldTable,
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
pub async fn return_undelivered(rx: &mut Deliveries) {
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
///
/// A mutex-guarded `VecDeque` rather than a tokio mpsc: an empty one allocates nothing
/// (tokio's channel allocates a 32-slot block up front, ~2 KB per connection, which idle
/// MQTT devices pay for nothing), and it gives its memory back when drained after a burst.
#[derive(Debug)]
pub struct Outbox {
    inbox: Mutex<Inbox>,
    /// Wakes the receiver when a delivery arrives (a stored permit covers the race
    /// between its check and its wait).
    ready: Notify,
    events: Mutex<Vec<OutboxEvent>>,
    notify: Notify,
}

#[derive(Debug)]
struct Inbox {
    items: VecDeque<Delivery>,
    capacity: usize,
    /// The receiver is closed or gone: deliveries are handed back.
    closed: bool,
}

/// Slots an idle outbox keeps after a burst; beyond this its buffer is freed when it
/// runs empty.
const IDLE_SLOTS: usize = 32;

impl Outbox {
    /// A new outbox holding at most `capacity` deliveries, and its receiving end.
    pub fn new(capacity: usize) -> (Arc<Outbox>, Deliveries) {
        let outbox = Arc::new(Outbox {
            inbox: Mutex::new(Inbox {
                items: VecDeque::new(),
                capacity: capacity.max(1),
                closed: false,
            }),
            ready: Notify::new(),
            events: Mutex::new(Vec::new()),
            notify: Notify::new(),
        });
        (outbox.clone(), Deliveries { outbox })
    }

    pub(crate) fn try_deliver(&self, d: Delivery) -> Result<(), Delivery> {
        {
            let mut inbox = self.inbox.lock();
            if inbox.closed || inbox.items.len() >= inbox.capacity {
                return Err(d);
            }
            inbox.items.push_back(d);
            if inbox.items.len() > 1 {
                // The receiver was woken for the first one and drains them all.
                return Ok(());
            }
        }
        self.ready.notify_one();
        Ok(())
    }

    pub(crate) fn note_stalled(&self, q: Weak<Queue>) {
        self.push_event(OutboxEvent::Stalled(q));
    }

    pub(crate) fn push_event(&self, e: OutboxEvent) {
        self.events.lock().push(e);
        self.notify.notify_one();
        // Also through `ready`, so a connection may wait on that one signal for both
        // (see [`Deliveries::ready`]); `recv` treats it as a spurious wake-up.
        self.ready.notify_one();
    }

    /// Takes the pending events.
    pub fn take_events(&self) -> Vec<OutboxEvent> {
        std::mem::take(&mut *self.events.lock())
    }

    /// Resolves when events are pending.
    pub fn events_ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

/// The receiving end of an [`Outbox`], owned by the connection.
#[derive(Debug)]
pub struct Deliveries {
    outbox: Arc<Outbox>,
}

/// Nothing to take right now ([`Deliveries::try_recv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

impl Deliveries {
    /// The next delivery; `None` once closed and drained.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            match self.try_recv() {
                Ok(d) => return Some(d),
                Err(Empty) if self.outbox.inbox.lock().closed => return None,
                Err(Empty) => self.outbox.ready.notified().await,
            }
        }
    }

    /// Resolves when a delivery or an event may be waiting: take them with
    /// [`Deliveries::try_recv`] and [`Outbox::take_events`]. Smaller than
    /// [`Deliveries::recv`]'s future (no loop state), and one wait instead of two with
    /// [`Outbox::events_ready`], for connections that wait in one `select!` for their whole
    /// idle life (each pending `Notified` is 64 bytes of every idle MQTT connection).
    pub fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.outbox.ready.notified()
    }

    /// The next delivery if one is waiting. Running empty gives a large buffer back.
    pub fn try_recv(&mut self) -> Result<Delivery, Empty> {
        let mut inbox = self.outbox.inbox.lock();
        match inbox.items.pop_front() {
            Some(d) => Ok(d),
            None => {
                if inbox.items.capacity() > IDLE_SLOTS {
                    inbox.items = VecDeque::new();
                }
                Err(Empty)
            }
        }
    }

    /// No more deliveries are accepted; those waiting can still be taken.
    pub fn close(&mut self) {
        self.outbox.inbox.lock().closed = true;
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        self.close();
    }
}
