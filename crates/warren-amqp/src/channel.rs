//! Channel state and the channel-level classes: channel, exchange, queue, basic, confirm,
//! tx (and access, as RabbitMQ still answers it).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::protocol::{access, basic, channel, confirm, exchange, queue, tx, AMQPClass};
use bytes::{Bytes, BytesMut};
use warren_amqp_codec as codec;
use warren_amqp_codec::ContentHeader;
use warren_core::vhost::refuse_default_exchange;
use warren_core::{
    Access, ChannelStat, ChannelStats, ConsumerId, ConsumerSpec, Credit, Delivery, Exchange,
    ExchangeDecl, ExchangeKind, FastMap, FollowUp, Message, MsgSeq, PublishOutcome, Queue,
    QueueDecl, ResourceKind, ShortString, Target, VHost,
};

use crate::connection::{truncate_short, Conn};
use crate::error::{channel_error, code, connection_error, AmqpError};
use crate::{fastpath, props};

/// The pseudo-queue of RabbitMQ's direct reply-to.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// What a frame leaves to await after its synchronous part; the connection boxes the
/// rest ([`Conn::handle_frame_later`]) only when there is one.
pub(crate) enum FrameLater {
    Done,
    /// A completed publish whose delivery must await (store writes, dead letters).
    Publish(PublishLater),
    /// Queue work an ack left (deleting acked persistent messages from the store).
    FollowUps(Vec<FollowUp>),
    /// Our channel.close's close-ok: the channel's consumers and unacked go back.
    DropChannel(u16),
    /// Any other channel method.
    Dispatch(u16, Box<AMQPClass>),
    /// Connection-level frames and frames before the connection is open.
    Frame(codec::Frame),
}

impl FrameLater {
    pub(crate) fn follow_ups(later: Vec<FollowUp>) -> FrameLater {
        if later.is_empty() {
            FrameLater::Done
        } else {
            FrameLater::FollowUps(later)
        }
    }

    pub(crate) fn publish(later: Option<PublishLater>) -> FrameLater {
        later.map_or(FrameLater::Done, FrameLater::Publish)
    }
}

/// A completed publish whose delivery must await (store writes, dead letters).
pub(crate) struct PublishLater {
    ch: u16,
    confirm_tag: Option<u64>,
    unfinished: warren_core::Unfinished,
}

/// A message being assembled from publish + header + body frames.
struct PendingPublish {
    method: basic::Publish,
    /// Body size, the decoded properties and their bytes as sent.
    header: Option<Box<ContentHeader>>,
    body: BytesMut,
    /// The first body frame, kept zero-copy while it is the only one.
    first: Option<Bytes>,
    received: u64,
}

/// A delivery awaiting ack on this channel.
struct UnackedTag {
    tag: u64,
    queue: Arc<Queue>,
    seq: MsgSeq,
    /// Counted against the channel's global prefetch (consumer deliveries, not basic.get).
    credited: bool,
    /// When it was delivered, on the connection's seconds clock (consumer timeout).
    at: u32,
}

struct ConsumerInfo {
    id: ConsumerId,
    queue: Arc<Queue>,
}

/// A publisher confirm waiting for its store write.
struct PendingConfirm {
    tag: u64,
    ticket: Option<u64>,
    nack: bool,
    /// The basic.return of an unroutable mandatory publish, written just before its ack:
    /// so after the acks of earlier publishes, in RabbitMQ's order (php-amqp's
    /// `amqpexchange_publish_confirms` expects ack 3, return 4, ack 4).
    returned: Option<Box<(basic::Return, Arc<Message>)>>,
}

/// A settle buffered by a transaction.
enum Settle {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
        requeue: bool,
    },
}

#[derive(Default)]
struct TxBuffer {
    publishes: Vec<(basic::Publish, Arc<Message>)>,
    settles: Vec<Settle>,
}

pub(crate) struct Channel {
    /// We sent channel.close and wait for close-ok; everything else is dropped (§4.2.3).
    closing: bool,
    pending: Option<PendingPublish>,
    next_delivery_tag: u64,
    unacked: VecDeque<UnackedTag>,
    consumers: FastMap<ShortString, ConsumerInfo>,
    /// basic.qos global=false: prefetch for consumers created afterwards.
    consumer_prefetch: u32,
    credit: Arc<Credit>,
    confirm: bool,
    next_publish_tag: u64,
    confirms: VecDeque<PendingConfirm>,
    /// A basic.return waiting for its publish's confirm (see [`PendingConfirm::returned`]).
    unsent_return: Option<Box<(basic::Return, Arc<Message>)>>,
    tx: Option<TxBuffer>,
    reply_queue: Option<Arc<Queue>>,
    /// The queue an empty queue name stands for (see `expand_queue_shortcut`).
    last_queue: Option<ShortString>,
    /// What the management API shows of this channel (`message_stats`).
    stats: Arc<ChannelStats>,
}

impl Channel {
    fn new(stats: Arc<ChannelStats>) -> Self {
        Channel {
            closing: false,
            pending: None,
            next_delivery_tag: 1,
            unacked: VecDeque::new(),
            consumers: FastMap::default(),
            consumer_prefetch: 0,
            credit: Arc::new(Credit::default()),
            confirm: false,
            next_publish_tag: 1,
            confirms: VecDeque::new(),
            unsent_return: None,
            tx: None,
            reply_queue: None,
            last_queue: None,
            stats,
        }
    }

    /// Keeps an ack/nack/reject for the commit when a transaction is open (false: none
    /// is, settle it now).
    fn hold_in_tx(&mut self, settle: Settle) -> bool {
        let Some(tx) = self.tx.as_mut() else {
            return false;
        };
        tx.settles.push(settle);
        self.stats
            .set_uncommitted(tx.publishes.len(), tx.settles.len());
        true
    }

    pub(crate) fn waiting_for_sync(&self) -> bool {
        self.confirms.front().is_some_and(|c| c.ticket.is_some())
    }

    /// Removes the unacked deliveries `tag` covers (all up to it with `multiple`; tag 0
    /// with multiple means all). Unknown tags are a 406 as in RabbitMQ.
    fn take_unacked(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
    ) -> Result<Vec<UnackedTag>, AmqpError> {
        if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            // RabbitMQ's collect_acks: all up to the tag, which must itself be
            // outstanding (0 means every outstanding delivery).
            if tag != 0 && self.unacked.binary_search_by_key(&tag, |u| u.tag).is_err() {
                return Err(channel_error(
                    ch,
                    code::PRECONDITION_FAILED,
                    format!("unknown delivery tag {tag}"),
                ));
            }
            let n = self.unacked.partition_point(|u| u.tag <= upto);
            Ok(self.unacked.drain(..n).collect())
        } else {
            match self.unacked.binary_search_by_key(&tag, |u| u.tag) {
                Ok(i) => Ok(self.unacked.remove(i).into_iter().collect()),
                Err(_) => Err(channel_error(
                    ch,
                    code::PRECONDITION_FAILED,
                    format!("unknown delivery tag {tag}"),
                )),
            }
        }
    }
}

/// Groups settled deliveries by queue so each queue is locked once.
/// Settled messages of one queue.
type QueueSeqs = (Arc<Queue>, Vec<MsgSeq>);

fn by_queue(tags: Vec<UnackedTag>) -> (Vec<QueueSeqs>, u32) {
    let mut groups: Vec<QueueSeqs> = Vec::new();
    let mut credited = 0;
    for u in tags {
        if u.credited {
            credited += 1;
        }
        match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, seqs)) => seqs.push(u.seq),
            None => groups.push((u.queue, vec![u.seq])),
        }
    }
    (groups, credited)
}

fn ids(m: &AMQPClass) -> (u16, u16) {
    (m.get_amqp_class_id(), m.get_amqp_method_id())
}

impl Conn {
    /// The vhost chosen by connection.open (channel methods only run after it).
    fn vh(&self) -> Result<Arc<VHost>, AmqpError> {
        self.vhost.clone().ok_or_else(|| {
            connection_error(
                code::COMMAND_INVALID,
                "channel method before connection.open",
            )
        })
    }

    /// RabbitMQ's permission check for a channel operation: a refusal is a 403 channel
    /// error. Results for publishing are cached per connection (RabbitMQ caches per
    /// channel) until any permission changes.
    pub(crate) fn check_access(
        &mut self,
        ch: u16,
        access: Access,
        kind: ResourceKind,
        name: &str,
    ) -> Result<(), AmqpError> {
        let cacheable = access == Access::Write && kind == ResourceKind::Exchange;
        if cacheable {
            let generation = self.broker.permissions_generation();
            if generation != self.perm_generation {
                self.perm_generation = generation;
                self.write_allowed.clear();
            }
            if self.write_allowed.contains(name) {
                return Ok(());
            }
        }
        let vhost = self.vhost.as_ref().map(|v| v.name.as_str()).unwrap_or("");
        self.broker
            .check_permission(&self.user, vhost, access, kind, name)
            .map_err(|e| AmqpError::from_core(e, ch, 0, 0))?;
        if cacheable && self.write_allowed.len() < 64 {
            self.write_allowed.insert(name.to_owned());
        }
        Ok(())
    }

    /// RabbitMQ's topic authorisation on a publish (`write`) to exchange `x`: checked only
    /// if `x` is a topic exchange with a rule for this user; the rules are re-read when the
    /// permissions change, so the usual publish costs a generation load and a hash lookup.
    pub(crate) fn check_topic_write(
        &mut self,
        ch: u16,
        x: &Exchange,
        routing_key: &str,
    ) -> Result<(), AmqpError> {
        let generation = self.broker.permissions_generation();
        if self
            .topic_perms
            .as_ref()
            .is_none_or(|(g, _)| *g != generation)
        {
            let vhost = self.vhost.as_ref().map(|v| v.name.as_str()).unwrap_or("");
            self.topic_perms = Some((
                generation,
                self.broker.topic_permissions_of(vhost, &self.user),
            ));
        }
        let Some((_, Some(tp))) = &self.topic_perms else {
            return Ok(());
        };
        let name = x.name.as_str();
        if !tp.covers(name)
            || x.kind != ExchangeKind::Topic
            || tp.allows(name, Access::Write, routing_key)
        {
            return Ok(());
        }
        let vhost = self.vhost.as_ref().map(|v| v.name.as_str()).unwrap_or("");
        tracing::info!(user = %self.user, exchange = name, routing_key, "topic write refused");
        Err(AmqpError::from_core(
            warren_core::topic_permissions::refused(
                Access::Write,
                routing_key,
                name,
                vhost,
                &self.user,
            ),
            ch,
            60,
            40,
        ))
    }

    /// RabbitMQ's `read` topic check on a binding's source exchange (queue.bind/unbind,
    /// exchange.bind/unbind: `rabbit_channel:binding_action`). A missing source is left
    /// to the bind itself to report.
    fn check_topic_read(
        &self,
        ch: u16,
        vh: &VHost,
        source: &str,
        routing_key: &str,
    ) -> Result<(), AmqpError> {
        let Ok(x) = vh.exchange(source) else {
            return Ok(());
        };
        self.broker
            .check_topic_permission(&self.user, &vh.name, &x, Access::Read, routing_key)
            .map_err(|e| AmqpError::from_core(e, ch, 0, 0))
    }

    fn write(&mut self, ch: u16, m: AMQPClass) {
        codec::encode_method(&mut self.out, ch, &m);
    }

    /// A channel method's synchronous part: everything but the awaits. basic.publish and
    /// basic.ack, the hot methods, finish here; the rest comes back as a [`FrameLater`]
    /// for the connection to box and await. A per-frame `async fn` would be copied
    /// whole (hundreds of bytes) into the connection's future for every frame: that was
    /// a fifth of the broker's CPU in a transient 1→1 run (perf, docs/PERFORMANCE.md).
    pub(crate) fn channel_method_now(
        &mut self,
        ch: u16,
        m: Box<AMQPClass>,
    ) -> Result<FrameLater, AmqpError> {
        let (class_id, method_id) = ids(&m);
        // channel.open and frames for closing channels first.
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = *m {
            // As RabbitMQ 3.10 (rabbit_reader:create_channel): channel_max bounds how many
            // channels are open, not their numbers; the 530 names no method.
            let open = self.channels.len();
            if self.channel_max != 0 && open >= self.channel_max as usize {
                return Err(connection_error(
                    code::NOT_ALLOWED,
                    format!(
                        "number of channels opened ({open}) has reached the negotiated channel_max ({})",
                        self.channel_max
                    ),
                ));
            }
            if self.channels.contains_key(&ch) {
                return Err(
                    connection_error(code::CHANNEL_ERROR, "second 'channel.open' seen")
                        .at(class_id, method_id),
                );
            }
            // RabbitMQ's per-user `max-channels`: a connection error (530).
            if let Err(e) = self.broker.check_channel_limit(&self.user) {
                return Err(connection_error(code::NOT_ALLOWED, e.text).at(class_id, method_id));
            }
            let stats = match &self.registration {
                Some(g) => g.channel_opened(ch),
                None => Arc::default(),
            };
            self.channels.insert(ch, Channel::new(stats));
            self.write(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(FrameLater::Done);
        }
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Err(connection_error(
                code::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            )
            .at(class_id, method_id));
        };
        if chan.closing {
            // §4.2.3 and rabbit_reader: after our channel.close only close and close-ok
            // count. A close that crossed ours gets its close-ok, and the channel waits
            // for the close-ok of ours still (freeing it now made that close-ok a 504
            // that killed the whole connection: amqp091-go's Issue43 test).
            return Ok(match *m {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => FrameLater::DropChannel(ch),
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.write(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                    FrameLater::Done
                }
                _ => FrameLater::Done,
            });
        }
        if chan.pending.is_some() {
            return Err(connection_error(
                code::UNEXPECTED_FRAME,
                "expected content header for class 60, got non content header frame instead",
            )
            .at(class_id, method_id));
        }
        match *m {
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                self.vh()
                    .and_then(|_| self.start_publish(ch, p))
                    .map_err(|e| e.at(class_id, method_id))?;
                Ok(FrameLater::Done)
            }
            // Only queue work left after the locks (deleting acked persistent messages
            // from the store) is awaited.
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                let held = Settle::Ack {
                    tag: a.delivery_tag,
                    multiple: a.multiple,
                };
                if self.chan(ch).hold_in_tx(held) {
                    return Ok(FrameLater::Done);
                }
                let later = self
                    .vh()
                    .and_then(|_| self.ack_now(ch, a.delivery_tag, a.multiple))
                    .map_err(|e| e.at(class_id, method_id))?;
                Ok(FrameLater::follow_ups(later))
            }
            _ => Ok(FrameLater::Dispatch(ch, m)),
        }
    }

    /// Every channel method but the hot ones, after [`Conn::channel_method_now`].
    pub(crate) async fn dispatch_method(
        &mut self,
        ch: u16,
        m: Box<AMQPClass>,
    ) -> Result<(), AmqpError> {
        let (class_id, method_id) = ids(&m);
        self.dispatch(ch, *m)
            .await
            .map_err(|e| e.at(class_id, method_id))
    }

    /// basic.publish: the content header and body frames follow.
    fn start_publish(&mut self, ch: u16, p: basic::Publish) -> Result<(), AmqpError> {
        self.publisher = true;
        if p.immediate {
            return Err(connection_error(code::NOT_IMPLEMENTED, "immediate=true"));
        }
        self.chan(ch).pending = Some(PendingPublish {
            method: p,
            header: None,
            body: BytesMut::new(),
            first: None,
            received: 0,
        });
        Ok(())
    }

    async fn dispatch(&mut self, ch: u16, mut m: AMQPClass) -> Result<(), AmqpError> {
        let (class_id, method_id) = ids(&m);
        self.expand_queue_shortcut(ch, &mut m)?;
        tracing::trace!(conn = self.id.0, ch, method = ?m, "amqp method");
        let core = |e: warren_core::CoreError| AmqpError::from_core(e, ch, class_id, method_id);
        let vh = self.vh()?;
        match m {
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                // The channel's confirms owed so far precede its close-ok.
                self.flush_confirms();
                self.write(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                self.drop_channel(ch).await;
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {}
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                // RabbitMQ's answer, which RabbitMQ's clients test for (amqp091-go's
                // TestIntegrationConsumeFlow): consumers use basic.qos instead.
                if !f.active {
                    return Err(connection_error(code::NOT_IMPLEMENTED, "active=false"));
                }
                self.write(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: true,
                    })),
                );
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => {}
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.write(
                    ch,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)) => {
                let nowait = d.nowait;
                if !d.passive {
                    self.check_access(
                        ch,
                        Access::Configure,
                        ResourceKind::Exchange,
                        d.exchange.as_str(),
                    )?;
                }
                vh.declare_exchange(ExchangeDecl {
                    name: d.exchange,
                    kind: d.kind.as_str().to_owned(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                })
                .await
                .map_err(core)?;
                if !nowait {
                    self.write(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(d)) => {
                self.check_access(
                    ch,
                    Access::Configure,
                    ResourceKind::Exchange,
                    d.exchange.as_str(),
                )?;
                match vh.delete_exchange(d.exchange.as_str(), d.if_unused).await {
                    // Deleting a missing exchange succeeds, as in RabbitMQ 3.x.
                    Err(e) if e.kind == warren_core::ErrorKind::NotFound => {}
                    other => other.map_err(core)?,
                }
                if !d.nowait {
                    self.write(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(b)) => {
                self.check_access(
                    ch,
                    Access::Write,
                    ResourceKind::Exchange,
                    b.destination.as_str(),
                )?;
                self.check_access(ch, Access::Read, ResourceKind::Exchange, b.source.as_str())?;
                self.check_topic_read(ch, &vh, b.source.as_str(), b.routing_key.as_str())?;
                vh.exchange(b.destination.as_str()).map_err(core)?;
                vh.bind(
                    b.source.as_str(),
                    Target::Exchange(b.destination),
                    b.routing_key.into(),
                    b.arguments,
                )
                .await
                .map_err(core)?;
                if !b.nowait {
                    self.write(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(b)) => {
                self.check_access(
                    ch,
                    Access::Write,
                    ResourceKind::Exchange,
                    b.destination.as_str(),
                )?;
                self.check_access(ch, Access::Read, ResourceKind::Exchange, b.source.as_str())?;
                self.check_topic_read(ch, &vh, b.source.as_str(), b.routing_key.as_str())?;
                // Unbinding what is not there (source, destination or binding) succeeds,
                // as in RabbitMQ: clients clean up after auto-delete removed things.
                refuse_default_exchange(b.source.as_str()).map_err(core)?;
                if vh.exchange(b.destination.as_str()).is_ok() {
                    vh.unbind(
                        b.source.as_str(),
                        Target::Exchange(b.destination),
                        b.routing_key.as_str(),
                        &b.arguments,
                    )
                    .await
                    .map_err(core)?;
                }
                if !b.nowait {
                    self.write(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                let nowait = d.nowait;
                if d.queue.as_str() == REPLY_TO && d.passive {
                    self.chan(ch).last_queue = Some(d.queue.clone());
                    if !nowait {
                        self.write(
                            ch,
                            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                                queue: d.queue,
                                message_count: 0,
                                // RabbitMQ answers with one consumer, whoever asks.
                                consumer_count: 1,
                            })),
                        );
                    }
                    return Ok(());
                }
                if !d.passive {
                    // A server-named queue is checked under RabbitMQ's generated prefix.
                    let name = match d.queue.as_str() {
                        "" => "amq.gen-",
                        n => n,
                    };
                    self.check_access(ch, Access::Configure, ResourceKind::Queue, name)?;
                }
                let (q, _) = vh
                    .declare_queue(
                        QueueDecl {
                            name: d.queue,
                            passive: d.passive,
                            durable: d.durable,
                            exclusive: d.exclusive,
                            auto_delete: d.auto_delete,
                            arguments: d.arguments,
                        },
                        self.id,
                    )
                    .await
                    .map_err(core)?;
                self.chan(ch).last_queue = Some(q.name.clone());
                if !nowait {
                    let c = q.counts();
                    self.write(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: q.name.clone(),
                            message_count: c.ready,
                            consumer_count: c.consumers,
                        })),
                    );
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => {
                self.check_access(ch, Access::Write, ResourceKind::Queue, b.queue.as_str())?;
                self.check_access(
                    ch,
                    Access::Read,
                    ResourceKind::Exchange,
                    b.exchange.as_str(),
                )?;
                self.check_topic_read(ch, &vh, b.exchange.as_str(), b.routing_key.as_str())?;
                let q = vh.require_queue(b.queue.as_str(), self.id).map_err(core)?;
                vh.bind(
                    b.exchange.as_str(),
                    Target::Queue(q),
                    b.routing_key.into(),
                    b.arguments,
                )
                .await
                .map_err(core)?;
                if !b.nowait {
                    self.write(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(b)) => {
                self.check_access(ch, Access::Write, ResourceKind::Queue, b.queue.as_str())?;
                self.check_access(
                    ch,
                    Access::Read,
                    ResourceKind::Exchange,
                    b.exchange.as_str(),
                )?;
                self.check_topic_read(ch, &vh, b.exchange.as_str(), b.routing_key.as_str())?;
                // A missing queue (or exchange, or binding) is not an error, as in RabbitMQ.
                refuse_default_exchange(b.exchange.as_str()).map_err(core)?;
                match vh.require_queue(b.queue.as_str(), self.id) {
                    Ok(q) => vh
                        .unbind(
                            b.exchange.as_str(),
                            Target::Queue(q),
                            b.routing_key.as_str(),
                            &b.arguments,
                        )
                        .await
                        .map_err(core)?,
                    Err(e) if e.kind == warren_core::ErrorKind::NotFound => {}
                    Err(e) => return Err(core(e)),
                }
                self.write(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(p)) => {
                self.check_access(ch, Access::Read, ResourceKind::Queue, p.queue.as_str())?;
                let q = vh.require_queue(p.queue.as_str(), self.id).map_err(core)?;
                if q.is_stream() {
                    return Err(core(q.stream_refusal("queue.purge")));
                }
                let n = q.purge().await;
                if !p.nowait {
                    self.write(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: n,
                        })),
                    );
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(d)) => {
                self.check_access(ch, Access::Configure, ResourceKind::Queue, d.queue.as_str())?;
                let n = match vh
                    .delete_queue(d.queue.as_str(), Some(self.id), d.if_unused, d.if_empty)
                    .await
                {
                    // Deleting a missing queue succeeds with 0, as in RabbitMQ 3.x.
                    Err(e) if e.kind == warren_core::ErrorKind::NotFound => 0,
                    other => other.map_err(core)?,
                };
                if !d.nowait {
                    self.write(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: n,
                        })),
                    );
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(q)) => {
                let chan = self.chan(ch);
                let n = q.prefetch_count as u32;
                if q.global {
                    chan.credit.limit.store(n, Ordering::Relaxed);
                } else {
                    chan.consumer_prefetch = n;
                }
                if let Some(g) = &self.registration {
                    g.update_channel(ch, |s| match q.global {
                        true => s.global_prefetch_count = n,
                        false => s.prefetch_count = n,
                    });
                }
                self.write(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                self.kick_channel(ch).await;
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => self
                .consume(ch, c, &vh)
                .await
                .map_err(|e| e.at(class_id, method_id))?,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
                let info = self.chan(ch).consumers.remove(&c.consumer_tag);
                if let Some(info) = info {
                    self.consumers.remove(&info.id);
                    info.queue.remove_consumer(info.id).await;
                    let chan = self.chan(ch);
                    if chan
                        .reply_queue
                        .as_ref()
                        .is_some_and(|r| Arc::ptr_eq(r, &info.queue))
                    {
                        let reply = chan.reply_queue.take();
                        self.delete_reply_queue(reply).await;
                    }
                }
                if !c.nowait {
                    self.write(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => self.start_publish(ch, p)?,
            AMQPClass::Basic(basic::AMQPMethod::Get(g)) => {
                self.check_access(ch, Access::Read, ResourceKind::Queue, g.queue.as_str())?;
                let q = vh.require_queue(g.queue.as_str(), self.id).map_err(core)?;
                if q.is_stream() {
                    return Err(core(q.stream_refusal("basic.get")));
                }
                match q.get(g.no_ack).await {
                    None => {
                        self.chan(ch).stats.add(ChannelStat::GetEmpty, 1);
                        self.write(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                        )
                    }
                    Some(r) => {
                        let at = self.clock;
                        let chan = self.chan(ch);
                        chan.stats.add(delivery_stat(g.no_ack, true), 1);
                        if r.redelivered {
                            chan.stats.add(ChannelStat::Redeliver, 1);
                        }
                        let tag = chan.next_delivery_tag;
                        chan.next_delivery_tag += 1;
                        if !g.no_ack {
                            chan.unacked.push_back(UnackedTag {
                                tag,
                                queue: q.clone(),
                                seq: r.seq,
                                credited: false,
                                at,
                            });
                        }
                        self.write(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                                delivery_tag: tag,
                                redelivered: r.redelivered,
                                exchange: r.message.exchange.clone(),
                                routing_key: fastpath::fit_short(r.message.routing_key.as_str())
                                    .into(),
                                message_count: r.remaining,
                            })),
                        );
                        self.write_content(ch, &r.message);
                    }
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                let held = Settle::Ack {
                    tag: a.delivery_tag,
                    multiple: a.multiple,
                };
                if !self.chan(ch).hold_in_tx(held) {
                    self.settle(ch, a.delivery_tag, a.multiple, SettleKind::Ack)
                        .await?;
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => {
                self.nack(ch, n.delivery_tag, n.multiple, n.requeue).await?
            }
            AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => {
                self.nack(ch, r.delivery_tag, false, r.requeue).await?
            }
            AMQPClass::Basic(basic::AMQPMethod::Recover(r)) => {
                if !r.requeue {
                    return Err(connection_error(code::NOT_IMPLEMENTED, "requeue=false"));
                }
                self.settle(ch, 0, true, SettleKind::Requeue).await?;
                self.write(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(r)) => {
                if !r.requeue {
                    return Err(connection_error(code::NOT_IMPLEMENTED, "requeue=false"));
                }
                self.settle(ch, 0, true, SettleKind::Requeue).await?;
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let chan = self.chan(ch);
                if chan.tx.is_some() {
                    return Err(channel_error(
                        ch,
                        code::PRECONDITION_FAILED,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                chan.confirm = true;
                if let Some(g) = &self.registration {
                    g.update_channel(ch, |s| s.confirm = true);
                }
                if !s.nowait {
                    self.write(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
            }
            AMQPClass::Tx(tx::AMQPMethod::Select(_)) => {
                let chan = self.chan(ch);
                if chan.confirm {
                    return Err(channel_error(
                        ch,
                        code::PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if chan.tx.is_none() {
                    chan.tx = Some(TxBuffer::default());
                    if let Some(g) = &self.registration {
                        g.update_channel(ch, |s| s.transactional = true);
                    }
                }
                self.write(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
            }
            AMQPClass::Tx(tx::AMQPMethod::Commit(_)) => {
                let chan = self.chan(ch);
                chan.stats.set_uncommitted(0, 0);
                let Some(buf) = chan.tx.replace(TxBuffer::default()) else {
                    return Err(channel_error(
                        ch,
                        code::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                let mut last_ticket = None;
                for (p, msg) in buf.publishes {
                    let outcome = match self.route_publish(ch, &p, msg)? {
                        Ok(out) => out,
                        Err(later) => self.finish_route(ch, later).await?,
                    };
                    if let Some(t) = outcome.ticket {
                        last_ticket = Some(t);
                    }
                }
                for s in buf.settles {
                    match s {
                        Settle::Ack { tag, multiple } => {
                            self.settle(ch, tag, multiple, SettleKind::Ack).await?
                        }
                        Settle::Nack {
                            tag,
                            multiple,
                            requeue,
                        } => {
                            self.settle(ch, tag, multiple, SettleKind::nack(requeue))
                                .await?
                        }
                    }
                }
                if let Some(t) = last_ticket {
                    self.broker
                        .store()
                        .wait_synced(t)
                        .await
                        .map_err(|e| core(e.into()))?;
                }
                self.write(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
            }
            AMQPClass::Tx(tx::AMQPMethod::Rollback(_)) => {
                let chan = self.chan(ch);
                if chan.tx.is_none() {
                    return Err(channel_error(
                        ch,
                        code::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                }
                chan.tx = Some(TxBuffer::default());
                chan.stats.set_uncommitted(0, 0);
                self.write(
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
            }
            other => {
                let (c, m) = ids(&other);
                return Err(connection_error(
                    code::COMMAND_INVALID,
                    format!("unexpected method {c}.{m} from a client"),
                ));
            }
        }
        Ok(())
    }

    /// An empty queue name stands for the last queue declared on the channel, and
    /// queue.bind's (or unbind's) empty routing key with it for that queue's name
    /// (AMQP 0-9-1 §1.7.2.3.1, §1.8.3.7.1; RabbitMQ's `expand_queue_name_shortcut` and
    /// `expand_routing_key_shortcut`). With none declared yet: 404, as RabbitMQ answers.
    fn expand_queue_shortcut(&mut self, ch: u16, m: &mut AMQPClass) -> Result<(), AmqpError> {
        let (queue, key) = match m {
            AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => {
                (&mut b.queue, Some(&mut b.routing_key))
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(b)) => {
                (&mut b.queue, Some(&mut b.routing_key))
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(p)) => (&mut p.queue, None),
            AMQPClass::Queue(queue::AMQPMethod::Delete(d)) => (&mut d.queue, None),
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => (&mut c.queue, None),
            AMQPClass::Basic(basic::AMQPMethod::Get(g)) => (&mut g.queue, None),
            _ => return Ok(()),
        };
        if !queue.as_str().is_empty() {
            return Ok(());
        }
        let Some(last) = self.chan(ch).last_queue.clone() else {
            return Err(channel_error(
                ch,
                code::NOT_FOUND,
                "no previously declared queue",
            ));
        };
        if let Some(key) = key.filter(|k| k.as_str().is_empty()) {
            *key = last.clone();
        }
        *queue = last;
        Ok(())
    }

    fn chan(&mut self, ch: u16) -> &mut Channel {
        // Callers checked that the channel exists; a fresh one is never observable here.
        self.channels
            .entry(ch)
            .or_insert_with(|| Channel::new(Arc::default()))
    }

    async fn consume(
        &mut self,
        ch: u16,
        c: basic::Consume,
        vh: &Arc<VHost>,
    ) -> Result<(), AmqpError> {
        let (class_id, method_id) = (60, 20);
        let core = |e: warren_core::CoreError| AmqpError::from_core(e, ch, class_id, method_id);
        let tag = if c.consumer_tag.as_str().is_empty() {
            ShortString::from(warren_core::vhost::generated_name("amq.ctag-"))
        } else {
            c.consumer_tag.clone()
        };
        if self.chan(ch).consumers.contains_key(&tag) {
            return Err(connection_error(
                code::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{}'", tag.as_str()),
            ));
        }
        let q = if c.queue.as_str() == REPLY_TO {
            if !c.no_ack {
                return Err(channel_error(
                    ch,
                    code::PRECONDITION_FAILED,
                    "reply consumer cannot acknowledge",
                ));
            }
            if self.chan(ch).reply_queue.is_some() {
                return Err(channel_error(
                    ch,
                    code::PRECONDITION_FAILED,
                    "reply consumer already set",
                ));
            }
            let q = vh.declare_reply_queue(self.id);
            self.chan(ch).reply_queue = Some(q.clone());
            q
        } else {
            self.check_access(ch, Access::Read, ResourceKind::Queue, c.queue.as_str())?;
            vh.require_queue(c.queue.as_str(), self.id).map_err(core)?
        };
        // Quorum queues have no channel-wide prefetch (RabbitMQ 3.10's 540).
        if q.config().quorum && self.chan(ch).credit.limit.load(Ordering::Relaxed) > 0 {
            return Err(connection_error(
                code::NOT_IMPLEMENTED,
                format!(
                    "queue '{}' in vhost '{}' does not support global qos",
                    q.name.as_str(),
                    vh.name
                ),
            ));
        }
        q.check_consumer(c.no_ack, self.chan(ch).consumer_prefetch)
            .map_err(core)?;
        let stream_start = if q.is_stream() {
            Some(
                warren_core::stream::StreamStart::parse(
                    c.arguments.inner().get("x-stream-offset"),
                    q.name.as_str(),
                    &vh.name,
                )
                .map_err(core)?,
            )
        } else {
            None
        };
        let priority = match c.arguments.inner().get("x-priority") {
            None => 0,
            Some(v) => match warren_core::queue::int_value(v) {
                Some(p) => p as i32,
                None => {
                    return Err(channel_error(
                        ch,
                        code::PRECONDITION_FAILED,
                        format!(
                            "invalid arg 'x-priority' for queue '{}' in vhost '{}': \"expected integer, got {}\"",
                            q.name.as_str(),
                            vh.name,
                            warren_core::vhost::rabbit_type(v)
                        ),
                    ))
                }
            },
        };
        let id = ConsumerId::next();
        let (owner, outbox) = (self.id, self.outbox.clone());
        let chan = self.chan(ch);
        let spec = ConsumerSpec {
            id,
            tag: Arc::from(tag.as_str()),
            token: ch as u64,
            owner,
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            priority,
            prefetch: chan.consumer_prefetch,
            channel_credit: chan.credit.clone(),
            outbox,
            stream_start,
            arguments: c.arguments.clone(),
        };
        chan.consumers.insert(
            tag.clone(),
            ConsumerInfo {
                id,
                queue: q.clone(),
            },
        );
        self.consumers.insert(id, (ch, tag.clone()));
        if let Err(e) = q.add_consumer(spec).await {
            // Refused (exclusive use): only the channel error goes out, no consume-ok, as
            // RabbitMQ answers.
            self.chan(ch).consumers.remove(&tag);
            self.consumers.remove(&id);
            return Err(core(e));
        }
        // consume-ok still goes out before the first delivery: deliveries reach the
        // outbox, which this connection's loop writes only after this method is handled.
        if !c.nowait {
            self.write(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.clone(),
                })),
            );
        }
        Ok(())
    }

    /// Delivers again on every queue this channel consumes from (credit came back).
    async fn kick_channel(&mut self, ch: u16) {
        let mut later = Vec::new();
        self.kick_channel_now(ch, &mut later);
        FollowUp::run_all(later).await;
    }

    /// Lets the channel's queues deliver again, up to the awaits, which go to `later`.
    fn kick_channel_now(&mut self, ch: u16, later: &mut Vec<FollowUp>) {
        if let Some(c) = self.channels.get(&ch) {
            for i in c.consumers.values() {
                later.extend(i.queue.kick_now());
            }
        }
    }

    /// basic.ack outside a transaction, up to the awaits, which it returns (usually none).
    fn ack_now(&mut self, ch: u16, tag: u64, multiple: bool) -> Result<Vec<FollowUp>, AmqpError> {
        let mut later = Vec::new();
        let tags = self.chan(ch).take_unacked(ch, tag, multiple)?;
        if tags.is_empty() {
            return Ok(later);
        }
        self.chan(ch).stats.add(ChannelStat::Ack, tags.len() as u64);
        let (groups, credited) = by_queue(tags);
        for (q, seqs) in groups {
            later.extend(q.ack_now(&seqs));
        }
        let credit = self.chan(ch).credit.clone();
        if credited > 0 && credit.give_back(credited) {
            self.kick_channel_now(ch, &mut later);
        }
        Ok(later)
    }

    /// basic.nack / basic.reject: held by an open transaction, else settled now.
    async fn nack(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), AmqpError> {
        let held = Settle::Nack {
            tag,
            multiple,
            requeue,
        };
        if self.chan(ch).hold_in_tx(held) {
            return Ok(());
        }
        self.settle(ch, tag, multiple, SettleKind::nack(requeue))
            .await
    }

    async fn settle(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        kind: SettleKind,
    ) -> Result<(), AmqpError> {
        if kind == SettleKind::Ack {
            FollowUp::run_all(self.ack_now(ch, tag, multiple)?).await;
            return Ok(());
        }
        let tags = self.chan(ch).take_unacked(ch, tag, multiple)?;
        if tags.is_empty() {
            return Ok(());
        }
        let (groups, credited) = by_queue(tags);
        if let Some((q, _)) = groups.iter().find(|(q, _)| q.is_stream()) {
            let e = q.stream_refusal("basic.nack and basic.reject");
            return Err(AmqpError::from_core(e, ch, 0, 0));
        }
        for (q, seqs) in groups {
            if kind == SettleKind::Requeue {
                q.requeue(&seqs).await;
            } else {
                q.reject(&seqs).await;
            }
        }
        let credit = self.chan(ch).credit.clone();
        if credited > 0 && credit.give_back(credited) {
            self.kick_channel(ch).await;
        }
        Ok(())
    }

    /// A content header; completes the publish of an empty body. Like the body and
    /// basic.publish, handled without an await: what must await comes back as
    /// [`PublishLater`] for the caller to box (see `handle_channel_method`).
    pub(crate) fn handle_content_header(
        &mut self,
        ch: u16,
        h: Box<ContentHeader>,
    ) -> Result<Option<PublishLater>, AmqpError> {
        let max = self.cfg.max_message_size;
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Err(connection_error(
                code::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            ));
        };
        if chan.closing {
            return Ok(None);
        }
        let Some(p) = chan.pending.as_mut().filter(|p| p.header.is_none()) else {
            return Err(connection_error(
                code::UNEXPECTED_FRAME,
                "expected method frame, got non method frame instead",
            ));
        };
        if h.class_id != 60 {
            return Err(connection_error(
                code::UNEXPECTED_FRAME,
                format!("content header for class {} on a basic.publish", h.class_id),
            ));
        }
        if h.body_size > max {
            chan.pending = None;
            return Err(channel_error(
                ch,
                code::PRECONDITION_FAILED,
                format!(
                    "message size {} is larger than configured max size {max}",
                    h.body_size
                ),
            )
            .at(60, 40));
        }
        let size = h.body_size;
        // Kept boxed as decoded: the properties are ~300 bytes.
        p.header = Some(h);
        if size == 0 {
            return self.complete_publish(ch);
        }
        Ok(None)
    }

    /// A content body frame; the last one completes the publish.
    pub(crate) fn handle_content_body(
        &mut self,
        ch: u16,
        b: Bytes,
    ) -> Result<Option<PublishLater>, AmqpError> {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return Err(connection_error(
                code::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            ));
        };
        if chan.closing {
            return Ok(None);
        }
        let Some(p) = chan.pending.as_mut().filter(|p| p.header.is_some()) else {
            return Err(connection_error(
                code::UNEXPECTED_FRAME,
                "expected method frame, got non method frame instead",
            ));
        };
        let size = p.header.as_ref().map_or(0, |h| h.body_size);
        p.received += b.len() as u64;
        if p.received > size {
            return Err(connection_error(
                code::FRAME_ERROR,
                "body larger than declared in the content header",
            ));
        }
        match (p.first.take(), p.body.is_empty()) {
            (None, true) => p.first = Some(b),
            (Some(first), _) => {
                p.body.reserve(size as usize);
                p.body.extend_from_slice(&first);
                p.body.extend_from_slice(&b);
            }
            (None, false) => p.body.extend_from_slice(&b),
        }
        if p.received == size {
            return self.complete_publish(ch);
        }
        Ok(None)
    }

    fn complete_publish(&mut self, ch: u16) -> Result<Option<PublishLater>, AmqpError> {
        let Some(p) = self.chan(ch).pending.take() else {
            return Ok(None);
        };
        let body = match p.first {
            Some(b) => b,
            None => p.body.freeze(),
        };
        let Some(mut header) = p.header else {
            return Ok(None);
        };
        let raw_props = std::mem::take(&mut header.raw_properties);
        let mut properties = props::from_amqp(&header.properties);
        let err = |c: u16, text: String| channel_error(ch, c, text).at(60, 40);
        if let Some(uid) = &properties.user_id {
            if uid.as_str() != self.user {
                return Err(err(
                    code::PRECONDITION_FAILED,
                    format!(
                        "user_id property set to '{}' but authenticated user was '{}'",
                        uid.as_str(),
                        self.user
                    ),
                ));
            }
        }
        if let Some(exp) = &properties.expiration {
            if let Err(text) = warren_core::message::parse_expiration(exp.as_str()) {
                return Err(err(code::PRECONDITION_FAILED, text));
            }
        }
        let direct_reply = properties
            .reply_to
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO);
        if direct_reply {
            match &self.chan(ch).reply_queue {
                Some(q) => properties.reply_to = Some(q.name.clone()),
                None => {
                    return Err(err(
                        code::PRECONDITION_FAILED,
                        "fast reply consumer does not exist".into(),
                    ))
                }
            }
        }
        let msg = Message::new(
            p.method.exchange.clone(),
            (&p.method.routing_key).into(),
            properties,
            body,
        );
        // Unchanged properties go out as they came in (RabbitMQ passes the content header
        // through); a rewritten reply-to is encoded afresh, and so is every later change
        // (`Message::with_headers` starts a new encoding).
        if !direct_reply {
            let _ = msg.encoded_properties.set(raw_props);
        }
        let msg = Arc::new(msg);
        if self.chan(ch).tx.is_some() {
            // Validate the exchange now, as RabbitMQ does, but route at commit.
            self.vh()?
                .exchange(p.method.exchange.as_str())
                .map_err(|e| AmqpError::from_core(e, ch, 60, 40))?;
            let chan = self.chan(ch);
            if let Some(tx) = chan.tx.as_mut() {
                tx.publishes.push((p.method, msg));
                chan.stats
                    .set_uncommitted(tx.publishes.len(), tx.settles.len());
            }
            return Ok(None);
        }
        let confirm_tag = {
            let chan = self.chan(ch);
            chan.confirm.then(|| {
                let t = chan.next_publish_tag;
                chan.next_publish_tag += 1;
                t
            })
        };
        match self.route_publish(ch, &p.method, msg)? {
            Ok(outcome) => {
                self.confirm_publish(ch, confirm_tag, outcome);
                Ok(None)
            }
            Err(unfinished) => Ok(Some(PublishLater {
                ch,
                confirm_tag,
                unfinished,
            })),
        }
    }

    /// The rest of a publish that had to await (store writes, dead letters).
    pub(crate) async fn finish_publish(&mut self, later: PublishLater) -> Result<(), AmqpError> {
        let outcome = self.finish_route(later.ch, later.unfinished).await?;
        self.confirm_publish(later.ch, later.confirm_tag, outcome);
        Ok(())
    }

    async fn finish_route(
        &mut self,
        ch: u16,
        unfinished: warren_core::Unfinished,
    ) -> Result<PublishOutcome, AmqpError> {
        self.vh()?
            .finish_delivery(unfinished)
            .await
            .map_err(|e| AmqpError::from_core(e, ch, 60, 40))
    }

    /// Queues the publisher confirm of a routed message (sent once its write is synced).
    fn confirm_publish(&mut self, ch: u16, confirm_tag: Option<u64>, outcome: PublishOutcome) {
        if let Some(tag) = confirm_tag {
            let chan = self.chan(ch);
            let returned = chan.unsent_return.take();
            chan.confirms.push_back(PendingConfirm {
                tag,
                ticket: outcome.ticket.map(|t| t.0),
                nack: outcome.rejected,
                returned,
            });
            chan.stats.set_unconfirmed(chan.confirms.len());
            self.confirms_due = true;
        }
    }

    /// The exchange a publish goes to, once the user may write to it: the last one again
    /// while it lives and the permissions have not changed (one string compare), else
    /// checked and looked up by name.
    fn publish_exchange(
        &mut self,
        ch: u16,
        vh: &VHost,
        name: &str,
    ) -> Result<Arc<Exchange>, AmqpError> {
        let generation = self.broker.permissions_generation();
        if let Some((g, x)) = &self.last_exchange {
            if *g == generation && x.name.as_str() == name && !x.is_deleted() {
                return Ok(x.clone());
            }
        }
        self.check_access(ch, Access::Write, ResourceKind::Exchange, name)
            .map_err(|e| e.at(60, 40))?;
        let x = vh
            .exchange(name)
            .map_err(|e| AmqpError::from_core(e, ch, 60, 40))?;
        self.last_exchange = Some((generation, x.clone()));
        Ok(x)
    }

    /// Routes a complete message; sends basic.return for an unroutable mandatory one.
    /// What must await (store writes) is handed back unfinished.
    fn route_publish(
        &mut self,
        ch: u16,
        p: &basic::Publish,
        msg: Arc<Message>,
    ) -> Result<Result<PublishOutcome, warren_core::Unfinished>, AmqpError> {
        let vh = self.vh()?;
        let x = self.publish_exchange(ch, &vh, p.exchange.as_str())?;
        if x.internal {
            return Err(channel_error(
                ch,
                code::ACCESS_REFUSED,
                format!(
                    "cannot publish to internal exchange '{}' in vhost '{}'",
                    p.exchange.as_str(),
                    vh.name
                ),
            )
            .at(60, 40));
        }
        // After the internal check, as rabbit_channel orders them. The sender-selected
        // CC/BCC keys are routing keys too (RabbitMQ 3.13 checks them as well).
        self.check_topic_write(ch, &x, p.routing_key.as_str())?;
        for key in warren_core::deadletter::sender_selected_keys(&msg) {
            self.check_topic_write(ch, &x, &key)?;
        }
        let queues = vh.route(&x, &msg);
        let unroutable = queues.is_empty();
        let outcome = vh
            .deliver_now(queues, msg.clone())
            .map_err(|e| AmqpError::from_core(e, ch, 60, 40))?;
        let stats = &self.chan(ch).stats;
        stats.add(ChannelStat::Publish, 1);
        if unroutable {
            stats.add(
                if p.mandatory {
                    ChannelStat::ReturnUnroutable
                } else {
                    ChannelStat::DropUnroutable
                },
                1,
            );
        }
        if unroutable && p.mandatory {
            let returned = basic::Return {
                reply_code: code::NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                exchange: p.exchange.clone(),
                routing_key: p.routing_key.clone(),
            };
            let chan = self.chan(ch);
            if chan.confirm {
                chan.unsent_return = Some(Box::new((returned, msg)));
            } else {
                self.write(ch, AMQPClass::Basic(basic::AMQPMethod::Return(returned)));
                self.write_content(ch, &msg);
            }
        }
        Ok(outcome)
    }

    /// Sends the confirms whose writes are synced, in order, coalescing runs of acks into
    /// one `multiple` ack.
    pub(crate) fn flush_confirms(&mut self) {
        self.confirms_due = false;
        let synced = *self.synced.borrow_and_update();
        let mut out = std::mem::take(&mut self.out);
        let frame_max = self.frame_max;
        for (&ch, chan) in self.channels.iter_mut() {
            if chan.confirms.is_empty() {
                continue;
            }
            let mut run: Option<(u64, usize)> = None;
            let mut acked = 0;
            while chan
                .confirms
                .front()
                .is_some_and(|c| c.ticket.is_none_or(|t| t <= synced))
            {
                let Some(c) = chan.confirms.pop_front() else {
                    break;
                };
                if let Some(r) = c.returned {
                    if let Some((tag, n)) = run.take() {
                        write_ack(&mut out, ch, tag, n > 1);
                    }
                    let (method, msg) = *r;
                    codec::encode_method(
                        &mut out,
                        ch,
                        &AMQPClass::Basic(basic::AMQPMethod::Return(method)),
                    );
                    encode_content(&mut out, ch, &msg, frame_max);
                }
                if c.nack {
                    if let Some((tag, n)) = run.take() {
                        write_ack(&mut out, ch, tag, n > 1);
                    }
                    codec::encode_method(
                        &mut out,
                        ch,
                        &AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                            delivery_tag: c.tag,
                            multiple: false,
                            requeue: false,
                        })),
                    );
                } else {
                    acked += 1;
                    run = Some(match run {
                        Some((_, n)) => (c.tag, n + 1),
                        None => (c.tag, 1),
                    });
                }
            }
            if let Some((tag, n)) = run {
                write_ack(&mut out, ch, tag, n > 1);
            }
            chan.stats.add(ChannelStat::Confirm, acked);
            chan.stats.set_unconfirmed(chan.confirms.len());
        }
        self.out = out;
    }

    /// Writes a content header and body frames for `msg`, reusing its encoded properties.
    fn write_content(&mut self, ch: u16, msg: &Message) {
        encode_content(&mut self.out, ch, msg, self.frame_max);
    }

    /// Writes one delivery from the outbox. A delivery made before its consumer was
    /// cancelled is still written (AMQP allows deliveries until cancel-ok); only a closed
    /// channel sends it back to its queue.
    /// Writes a delivery to its channel without an await; a delivery for a channel that
    /// is gone comes back, to be requeued by [`Conn::requeue_undeliverable`].
    pub(crate) fn write_delivery(&mut self, d: Delivery) -> Option<Delivery> {
        let ch = d.token as u16;
        let Some(chan) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
            return (!d.no_ack).then_some(d);
        };
        let dtag = chan.next_delivery_tag;
        chan.next_delivery_tag += 1;
        chan.stats.add(delivery_stat(d.no_ack, false), 1);
        if d.redelivered {
            chan.stats.add(ChannelStat::Redeliver, 1);
        }
        tracing::trace!(conn = self.id.0, ch, dtag, "deliver");
        if !d.no_ack {
            chan.unacked.push_back(UnackedTag {
                tag: dtag,
                queue: d.queue.clone(),
                seq: d.seq,
                credited: true,
                at: self.clock,
            });
        }
        fastpath::encode_deliver(
            &mut self.out,
            ch,
            &d.tag,
            dtag,
            d.redelivered,
            d.message.exchange.as_str(),
            d.message.routing_key.as_str(),
        );
        self.write_content(ch, &d.message);
        None
    }

    /// A cold path, boxed by the callers so that it stays out of every delivery's future.
    pub(crate) async fn requeue_undeliverable(d: Delivery) {
        d.queue.requeue(&[d.seq]).await;
    }

    /// The queue of a consumer went away: basic.cancel to clients that asked for it.
    pub(crate) async fn server_cancel(&mut self, id: ConsumerId) {
        let Some((ch, tag)) = self.consumers.remove(&id) else {
            return;
        };
        if let Some(chan) = self.channels.get_mut(&ch) {
            chan.consumers.remove(&tag);
        }
        if self.cancel_notify {
            self.write(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: tag,
                    nowait: true,
                })),
            );
        }
    }

    /// Sends channel.close for a soft error and releases the channel's resources now (as
    /// RabbitMQ does); a stub stays that ignores everything until close-ok (§4.2.3).
    pub(crate) async fn close_channel_with_error(
        &mut self,
        ch: u16,
        code: u16,
        text: &str,
        class_id: u16,
        method_id: u16,
    ) {
        // Confirms owed so far go first: nothing but close-ok may follow channel.close.
        self.flush_confirms();
        self.write(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: code,
                reply_text: truncate_short(text),
                class_id,
                method_id,
            })),
        );
        let stats = match self.channels.remove(&ch) {
            Some(mut chan) => {
                self.release(&mut chan).await;
                chan.stats.clone()
            }
            None => Arc::default(),
        };
        // Listed until its close-ok, with its counters.
        let mut stub = Channel::new(stats);
        stub.closing = true;
        self.channels.insert(ch, stub);
    }

    /// Closes the channels holding a delivery unacknowledged for longer than the consumer
    /// timeout, with RabbitMQ's 406; their unacked messages are requeued. Checked each
    /// second on a whole-second clock, so it fires between the timeout and 2 s after.
    pub(crate) async fn enforce_consumer_timeout(&mut self) {
        let Some(timeout) = self.cfg.consumer_timeout else {
            return;
        };
        let late: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                !c.closing
                    && c.unacked.front().is_some_and(|u| {
                        std::time::Duration::from_secs(u64::from(self.clock.saturating_sub(u.at)))
                            > timeout
                    })
            })
            .map(|(&ch, _)| ch)
            .collect();
        for ch in late {
            tracing::warn!(
                conn = self.id.0,
                ch,
                "consumer ack timed out, closing the channel"
            );
            let text = format!(
                "PRECONDITION_FAILED - delivery acknowledgement on channel {ch} timed out. Timeout \
                 value used: {} ms. This timeout value can be configured, see consumers doc guide \
                 to learn more",
                timeout.as_millis()
            );
            self.close_channel_with_error(ch, code::PRECONDITION_FAILED, &text, 0, 0)
                .await;
        }
    }

    /// Releases a channel: cancels its consumers and requeues its unacked messages.
    pub(crate) async fn drop_channel(&mut self, ch: u16) {
        if let Some(g) = &self.registration {
            g.channel_closed(ch);
        }
        let Some(mut chan) = self.channels.remove(&ch) else {
            return;
        };
        self.release(&mut chan).await;
    }

    async fn release(&mut self, chan: &mut Channel) {
        let (mut groups, _) = by_queue(chan.unacked.drain(..).collect());
        for (_, info) in chan.consumers.drain() {
            self.consumers.remove(&info.id);
            // Requeue this queue's unacked together with the removal (SAC order).
            let seqs = groups
                .iter()
                .position(|(q, _)| Arc::ptr_eq(q, &info.queue))
                .map(|i| groups.swap_remove(i).1)
                .unwrap_or_default();
            info.queue.remove_consumer_requeue(info.id, &seqs).await;
        }
        for (q, seqs) in groups {
            q.requeue(&seqs).await;
        }
        self.delete_reply_queue(chan.reply_queue.take()).await;
    }

    /// Deletes a channel's direct reply-to queue once its consumer is gone (cancelled or
    /// the channel closed): replies to its address are dropped from then on, and a new
    /// reply consumer gets a new address, as in RabbitMQ.
    async fn delete_reply_queue(&self, reply: Option<Arc<Queue>>) {
        if let (Some(q), Some(vh)) = (reply, self.vhost.as_ref()) {
            let _ = vh.delete_queue(q.name.as_str(), None, false, false).await;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SettleKind {
    Ack,
    Requeue,
    Reject,
}

impl SettleKind {
    fn nack(requeue: bool) -> Self {
        if requeue {
            SettleKind::Requeue
        } else {
            SettleKind::Reject
        }
    }
}

/// The counter of one delivery: a consumer's or a basic.get's, with or without an ack.
fn delivery_stat(no_ack: bool, get: bool) -> ChannelStat {
    match (get, no_ack) {
        (false, false) => ChannelStat::Deliver,
        (false, true) => ChannelStat::DeliverNoAck,
        (true, false) => ChannelStat::Get,
        (true, true) => ChannelStat::GetNoAck,
    }
}

/// A content header and body frames for `msg`, reusing its encoded properties.
fn encode_content(out: &mut BytesMut, ch: u16, msg: &Message, frame_max: u32) {
    let encoded = msg
        .encoded_properties
        .get_or_init(|| codec::encode_properties(&props::to_amqp(&msg.properties)));
    codec::encode_content_preencoded(out, ch, encoded, &msg.body, frame_max);
}

fn write_ack(out: &mut BytesMut, ch: u16, tag: u64, multiple: bool) {
    codec::encode_method(
        out,
        ch,
        &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple,
        })),
    );
}
