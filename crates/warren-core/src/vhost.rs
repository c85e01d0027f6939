//! A virtual host: its exchanges, queues and bindings, routing, and their durable records.

use crate::RoutingKey;
use std::sync::{Arc, Weak};
use std::time::Instant;

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};
use parking_lot::RwLock;
use warren_store::{Op, Store, StoreQueueId, Ticket};

use crate::consumer::OutboxEvent;
use crate::deadletter::{dead_lettered, DeadReason};
use crate::error::{CoreError, CoreResult, ErrorKind};
use crate::exchange::{Binding, Exchange, ExchangeKind, Target};
use crate::fast_map::FastMap;
use crate::ids::ConnectionId;
use crate::message::Message;
use crate::meta;
use crate::policies::{Object, Policies, Policy, PolicyKind};
use crate::queue::{EnqueueOutcome, Queue, QueueConfig};

/// Exchanges every vhost has (RabbitMQ's predeclared set).
const PREDECLARED: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    // RabbitMQ's firehose exchange: internal, so only the broker could publish to it
    // (Warren has no firehose; it is declared so that listings match).
    (TRACE_EXCHANGE, ExchangeKind::Topic),
];

const TRACE_EXCHANGE: &str = "amq.rabbitmq.trace";

/// RabbitMQ's 403 for declaring, deleting, binding or unbinding the default exchange.
pub fn refuse_default_exchange(name: &str) -> CoreResult<()> {
    if name.is_empty() {
        return Err(CoreError::access_refused(
            "operation not permitted on the default exchange",
        ));
    }
    Ok(())
}

/// Parameters of exchange.declare.
#[derive(Debug, Clone)]
pub struct ExchangeDecl {
    pub name: ShortString,
    pub kind: String,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// Parameters of queue.declare.
#[derive(Debug, Clone)]
pub struct QueueDecl {
    pub name: ShortString,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

/// The result of a publish.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublishOutcome {
    /// Number of queues the message was put in.
    pub routed: usize,
    /// A queue refused it (`x-overflow: reject-publish`): the confirm must be a nack.
    pub rejected: bool,
    /// The store write the confirm must wait for.
    pub ticket: Option<Ticket>,
}

impl PublishOutcome {
    /// Adds one queue's answer.
    fn count(&mut self, enqueued: EnqueueOutcome) {
        match enqueued {
            EnqueueOutcome::Accepted => self.routed += 1,
            EnqueueOutcome::Rejected => self.rejected = true,
        }
    }
}

/// What [`VHost::deliver_now`] could not do without an await; hand it to
/// [`VHost::finish_delivery`].
pub struct Unfinished(UnfinishedKind);

enum UnfinishedKind {
    /// Store writes or a possible refusal: the whole delivery goes the awaiting way.
    Deliver {
        queues: Vec<Arc<Queue>>,
        msg: Arc<Message>,
    },
    /// Enqueued; some queues have effects to finish (writes, dead letters, deletion).
    Finish {
        out: PublishOutcome,
        effects: Vec<(Arc<Queue>, crate::queue::Effects)>,
    },
}

/// A virtual host.
pub struct VHost {
    pub name: String,
    pub(crate) store: Store,
    exchanges: RwLock<FastMap<ShortString, Arc<Exchange>>>,
    queues: RwLock<FastMap<ShortString, Arc<Queue>>>,
    /// queue.declare calls, queues created and deleted (the API's `churn_rates`).
    pub churn: QueueChurn,
    self_ref: Weak<VHost>,
    next_store_id: Arc<std::sync::atomic::AtomicU64>,
    /// Replaced as a whole when a policy changes (rare); read on every declare.
    policies: RwLock<Arc<Policies>>,
    operator_policies: RwLock<Arc<Policies>>,
    /// The `max-queues` limit (crate::limits); `u64::MAX` when there is none.
    max_queues: std::sync::atomic::AtomicU64,
    metadata: RwLock<VHostMetadata>,
}

/// Queue churn counters of a vhost since start.
#[derive(Debug, Default)]
pub struct QueueChurn {
    pub declared: std::sync::atomic::AtomicU64,
    pub created: std::sync::atomic::AtomicU64,
    pub deleted: std::sync::atomic::AtomicU64,
}

/// What an operator says about a vhost (RabbitMQ's `description`, `tags` and
/// `default_queue_type`), shown by the API and kept in definitions.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VHostMetadata {
    pub description: String,
    pub tags: Vec<String>,
    /// `None` is classic.
    pub default_queue_type: Option<String>,
}

impl std::fmt::Debug for VHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VHost").field("name", &self.name).finish()
    }
}

impl VHost {
    /// Its description, tags and default queue type.
    pub fn metadata(&self) -> VHostMetadata {
        self.metadata.read().clone()
    }

    pub(crate) fn set_metadata(&self, m: VHostMetadata) {
        *self.metadata.write() = m;
    }

    pub(crate) fn new(
        name: String,
        store: Store,
        next_store_id: Arc<std::sync::atomic::AtomicU64>,
    ) -> Arc<VHost> {
        Arc::new_cyclic(|weak| {
            let mut exchanges = FastMap::default();
            for (n, k) in PREDECLARED {
                exchanges.insert(
                    ShortString::from(*n),
                    Arc::new(Exchange::new(
                        (*n).into(),
                        *k,
                        true,
                        false,
                        *n == TRACE_EXCHANGE,
                        FieldTable::default(),
                    )),
                );
            }
            VHost {
                name,
                store,
                exchanges: RwLock::new(exchanges),
                queues: RwLock::new(FastMap::default()),
                churn: QueueChurn::default(),
                self_ref: weak.clone(),
                next_store_id,
                policies: RwLock::new(Arc::new(Policies::default())),
                operator_policies: RwLock::new(Arc::new(Policies::default())),
                max_queues: std::sync::atomic::AtomicU64::new(u64::MAX),
                metadata: RwLock::new(VHostMetadata::default()),
            }
        })
    }

    fn not_found_exchange(&self, name: &str) -> CoreError {
        CoreError::not_found(format!("no exchange '{name}' in vhost '{}'", self.name))
    }

    fn not_found_queue(&self, name: &str) -> CoreError {
        CoreError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
    }

    pub fn exchange(&self, name: &str) -> CoreResult<Arc<Exchange>> {
        self.exchanges
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found_exchange(name))
    }

    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    pub fn queue(&self, name: &str) -> CoreResult<Arc<Queue>> {
        self.queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found_queue(name))
    }

    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    pub(crate) fn set_max_queues(&self, limit: Option<u64>) {
        self.max_queues.store(
            limit.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn policy_set(&self, kind: PolicyKind) -> &RwLock<Arc<Policies>> {
        match kind {
            PolicyKind::User => &self.policies,
            PolicyKind::Operator => &self.operator_policies,
        }
    }

    /// The vhost's policies of one kind.
    pub fn policies(&self, kind: PolicyKind) -> Arc<Policies> {
        self.policy_set(kind).read().clone()
    }

    fn policy_for(&self, kind: PolicyKind, object: Object, name: &str) -> Option<Arc<Policy>> {
        let ps = self.policy_set(kind).read();
        if ps.is_empty() {
            return None;
        }
        ps.for_object(object, name).cloned()
    }

    /// Changes the policies in memory (the caller stores the change); call
    /// [`VHost::apply_policies`] after.
    pub(crate) fn edit_policies<R>(
        &self,
        kind: PolicyKind,
        edit: impl FnOnce(&mut Policies) -> R,
    ) -> R {
        let mut g = self.policy_set(kind).write();
        edit(Arc::make_mut(&mut g))
    }

    /// Applies the policies to every queue and exchange of the vhost.
    pub(crate) async fn apply_policies(&self) {
        for x in self.exchanges() {
            x.set_policy(self.policy_for(PolicyKind::User, Object::Exchange, x.name.as_str()));
        }
        for q in self.queues() {
            let object = Object::Queue {
                quorum: q.config().quorum,
                stream: q.config().stream,
            };
            let p = self.policy_for(PolicyKind::User, object, q.name.as_str());
            let op = self.policy_for(PolicyKind::Operator, object, q.name.as_str());
            q.apply_policy(&self.name, p.as_ref(), op.as_ref()).await;
        }
    }

    /// Writes durable metadata and waits for the sync, so a declare-ok means durable.
    async fn persist(&self, ops: Vec<Op>) -> CoreResult<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let t = self.store.submit(ops).await?;
        self.store.wait_synced(t).await?;
        Ok(())
    }

    /// exchange.declare.
    pub async fn declare_exchange(&self, d: ExchangeDecl) -> CoreResult<Arc<Exchange>> {
        let name = d.name.as_str();
        // Passive or not, as RabbitMQ (aiormq's tests rely on the 403).
        refuse_default_exchange(name)?;
        if d.passive {
            return self.exchange(name);
        }
        let kind = ExchangeKind::parse(&d.kind)?;
        if let Ok(x) = self.exchange(name) {
            let inequivalent = |arg: &str, got: String, cur: String| {
                CoreError::precondition(format!(
                    "inequivalent arg '{arg}' for exchange '{name}' in vhost '{}': received '{got}' but current is '{cur}'",
                    self.name
                ))
            };
            if x.kind != kind {
                return Err(inequivalent("type", d.kind.clone(), x.kind.as_str().into()));
            }
            if x.durable != d.durable {
                return Err(inequivalent(
                    "durable",
                    d.durable.to_string(),
                    x.durable.to_string(),
                ));
            }
            if x.auto_delete != d.auto_delete {
                return Err(inequivalent(
                    "auto_delete",
                    d.auto_delete.to_string(),
                    x.auto_delete.to_string(),
                ));
            }
            if x.internal != d.internal {
                return Err(inequivalent(
                    "internal",
                    d.internal.to_string(),
                    x.internal.to_string(),
                ));
            }
            // The one exchange argument RabbitMQ compares on a re-declaration.
            let ae = "alternate-exchange";
            self.compare_arg(
                "exchange",
                name,
                ae,
                d.arguments.inner().get(ae),
                x.arguments.inner().get(ae),
            )?;
            return Ok(x);
        }
        if name.starts_with("amq.") {
            return Err(CoreError::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let x = Arc::new(Exchange::new(
            d.name.clone(),
            kind,
            d.durable,
            d.auto_delete,
            d.internal,
            d.arguments,
        ));
        x.set_policy(self.policy_for(PolicyKind::User, Object::Exchange, name));
        let created = {
            let mut g = self.exchanges.write();
            match g.get(name) {
                Some(existing) => existing.clone(),
                None => {
                    g.insert(d.name.clone(), x.clone());
                    x.clone()
                }
            }
        };
        if Arc::ptr_eq(&created, &x) && x.durable {
            self.persist(vec![meta::exchange_put(&self.name, &x)])
                .await?;
        }
        Ok(created)
    }

    /// exchange.delete.
    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> CoreResult<()> {
        refuse_default_exchange(name)?;
        if name.starts_with("amq.") {
            return Err(CoreError::access_refused(format!(
                "deletion of system exchange '{name}' in vhost '{}' not allowed",
                self.name
            )));
        }
        let x = self.exchange(name)?;
        if if_unused && x.has_bindings() {
            return Err(CoreError::precondition(format!(
                "exchange '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        if let Some(gone) = self.exchanges.write().remove(name) {
            gone.mark_deleted();
        }
        let mut ops = Vec::new();
        for b in x.bindings() {
            if let Some(op) = meta::binding_delete(&self.name, &x, &b) {
                ops.push(op);
            }
        }
        let target = Target::Exchange(x.name.clone());
        for other in self.exchanges() {
            for b in other.bindings().into_iter().filter(|b| b.target == target) {
                if let Some(op) = meta::binding_delete(&self.name, &other, &b) {
                    ops.push(op);
                }
            }
            other.unbind_target(&target);
        }
        if x.durable {
            ops.push(meta::exchange_delete(&self.name, name));
        }
        self.persist(ops).await
    }

    /// queue.declare. Returns the queue and whether it was created.
    pub async fn declare_queue(
        &self,
        mut d: QueueDecl,
        conn: ConnectionId,
    ) -> CoreResult<(Arc<Queue>, bool)> {
        let server_named = d.name.as_str().is_empty() && !d.passive;
        if server_named {
            d.name = generated_name("amq.gen-").as_str().into();
        }
        let name = d.name.clone();
        let name = name.as_str();
        if d.passive {
            let q = self.queue(name)?;
            q.check_access(conn, &self.name)?;
            q.touch();
            return Ok((q, false));
        }
        self.churn
            .declared
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(q) = self.queue(name) {
            q.check_access(conn, &self.name)?;
            self.check_equivalent(&q, &d)?;
            q.touch();
            return Ok((q, false));
        }
        if name.starts_with("amq.") && !server_named {
            return Err(CoreError::access_refused(format!(
                "queue name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        // A dead-letter exchange need not exist yet, as in RabbitMQ.
        let config = QueueConfig::parse(&d.arguments, name, &self.name)?;
        if config.quorum || config.stream {
            self.check_replicated_declare(&d, server_named, config.stream)?;
        }
        // An exclusive queue dies with its connection: RabbitMQ makes it non-durable
        // whatever was asked (`Durable andalso not Exclusive`).
        d.durable &= !d.exclusive;
        let max = self.max_queues.load(std::sync::atomic::Ordering::Relaxed);
        if max != u64::MAX && self.queues.read().len() as u64 >= max {
            return Err(crate::limits::vhost_queues_reached(name, &self.name, max));
        }
        let q = self.create_queue(d, conn, config);
        let created = {
            let mut g = self.queues.write();
            match g.get(&q.name) {
                Some(existing) => existing.clone(),
                None => {
                    g.insert(q.name.clone(), q.clone());
                    q.clone()
                }
            }
        };
        if !Arc::ptr_eq(&created, &q) {
            created.check_access(conn, &self.name)?;
            return Ok((created, false));
        }
        // Every queue is bound to the default exchange by its name; that binding is
        // implicit (routing looks the queue up), as in RabbitMQ.
        if q.is_stored() {
            if let Err(e) = self.persist(vec![meta::queue_put(&self.name, &q)]).await {
                self.queues.write().remove(&q.name);
                return Err(e);
            }
        }
        self.churn
            .created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((q, true))
    }

    /// The private queue behind a direct reply-to consumer (`amq.rabbitmq.reply-to`):
    /// exclusive to `conn`, auto-deleted with its consumer, named so that publishing to the
    /// default exchange with that name as routing key reaches it.
    pub fn declare_reply_queue(&self, conn: ConnectionId) -> Arc<Queue> {
        let d = QueueDecl {
            name: reply_queue_name(conn).as_str().into(),
            passive: false,
            durable: false,
            exclusive: true,
            auto_delete: true,
            arguments: FieldTable::default(),
        };
        let q = self.create_queue(d, conn, QueueConfig::default());
        self.queues.write().insert(q.name.clone(), q.clone());
        q
    }

    /// Builds a queue (not yet registered).
    pub(crate) fn create_queue(
        &self,
        d: QueueDecl,
        conn: ConnectionId,
        config: QueueConfig,
    ) -> Arc<Queue> {
        let store_id = StoreQueueId(
            self.next_store_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        self.build_queue(d, Some(conn), store_id, config)
    }

    pub(crate) fn build_queue(
        &self,
        d: QueueDecl,
        conn: Option<ConnectionId>,
        store_id: StoreQueueId,
        config: QueueConfig,
    ) -> Arc<Queue> {
        let object = Object::Queue {
            quorum: config.quorum,
            stream: config.stream,
        };
        let policy = self.policy_for(PolicyKind::User, object, d.name.as_str());
        let operator = self.policy_for(PolicyKind::Operator, object, d.name.as_str());
        let config = config
            .with_policy(policy.as_ref())
            .with_operator_policy(operator.as_ref());
        Queue::new(
            d.name,
            self.self_ref.clone(),
            store_id,
            d.durable,
            if d.exclusive { conn } else { None },
            d.auto_delete,
            d.arguments,
            config,
        )
    }

    pub(crate) fn insert_recovered_queue(&self, q: Arc<Queue>) {
        self.queues.write().insert(q.name.clone(), q);
    }

    pub(crate) fn insert_recovered_exchange(&self, x: Arc<Exchange>) {
        x.set_policy(self.policy_for(PolicyKind::User, Object::Exchange, x.name.as_str()));
        self.exchanges.write().insert(x.name.clone(), x);
    }

    /// A quorum queue or stream is durable, shared and named by its client: RabbitMQ 3.10
    /// refuses the rest with these texts, checked in this order
    /// (rabbit_quorum_queue:declare, rabbit_stream_queue:declare).
    fn check_replicated_declare(
        &self,
        d: &QueueDecl,
        server_named: bool,
        stream: bool,
    ) -> CoreResult<()> {
        if server_named {
            let module = if stream {
                "rabbit_stream_queue"
            } else {
                "rabbit_quorum_queue"
            };
            return Err(CoreError::precondition(format!(
                "Cannot declare a server-named queue for type {module}"
            )));
        }
        let refused = if d.auto_delete {
            "auto-delete"
        } else if d.exclusive {
            "exclusive-owner"
        } else if !d.durable {
            "non-durable"
        } else {
            return Ok(());
        };
        Err(CoreError::precondition(format!(
            "invalid property '{refused}' for queue '{}' in vhost '{}'",
            d.name.as_str(),
            self.name
        )))
    }

    fn check_equivalent(&self, q: &Queue, d: &QueueDecl) -> CoreResult<()> {
        let name = d.name.as_str();
        let inequivalent = |arg: &str, got: String, cur: String| {
            CoreError::precondition(format!(
                "inequivalent arg '{arg}' for queue '{name}' in vhost '{}': received '{got}' but current is '{cur}'",
                self.name
            ))
        };
        // Exclusivity first, and either way round a lock conflict (405), as RabbitMQ's
        // check_exclusive_access(strict) before any other property.
        if d.exclusive != q.exclusive_owner.is_some() {
            return Err(CoreError::locked(format!(
                "cannot obtain exclusive access to locked queue '{name}' in vhost '{}'. It could \
                 be originally declared on another connection or the exclusive property value \
                 does not match that of the original declaration.",
                self.name
            )));
        }
        // An exclusive queue is never durable, whatever was asked (see declare_queue).
        let durable = d.durable && !d.exclusive;
        if q.durable != durable {
            return Err(inequivalent(
                "durable",
                durable.to_string(),
                q.durable.to_string(),
            ));
        }
        if q.auto_delete != d.auto_delete {
            return Err(inequivalent(
                "auto_delete",
                d.auto_delete.to_string(),
                q.auto_delete.to_string(),
            ));
        }
        // The queue type first (`classic` is the default, so it equals none), then the
        // x- arguments the existing queue's type knows; a missing one on re-declare is
        // fine only if it was missing before too (rabbit_amqqueue:assert_args_equivalence).
        // A stream lists `x-max-length-bytes` before its type (rabbit_stream_queue's
        // capabilities, the order RabbitMQ 3.10 compares in).
        let same = |key: &str| {
            self.compare_arg(
                "queue",
                name,
                key,
                d.arguments.inner().get(key),
                q.arguments.inner().get(key),
            )
        };
        let kind = crate::queue::QueueKind::of(&q.config());
        if kind == crate::queue::QueueKind::Stream {
            same("x-max-length-bytes")?;
        }
        let got = d.arguments.inner().get("x-queue-type");
        let cur = q.arguments.inner().get("x-queue-type");
        let type_name =
            |v: Option<&AMQPValue>| v.and_then(text_of).unwrap_or_else(|| "classic".into());
        if type_name(got) != type_name(cur) {
            self.compare_arg("queue", name, "x-queue-type", got, cur)?;
        }
        for key in kind.own_args() {
            if key != "x-queue-type" {
                same(key)?;
            }
        }
        Ok(())
    }

    /// One argument of a re-declaration (`got`) against the queue's or exchange's (`cur`;
    /// `what` says which): equal values (integers of any width, either string type) or
    /// both absent pass; otherwise a 406 in RabbitMQ's wording.
    fn compare_arg(
        &self,
        what: &str,
        name: &str,
        key: &str,
        got: Option<&AMQPValue>,
        cur: Option<&AMQPValue>,
    ) -> CoreResult<()> {
        let same = match (got, cur) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a == b
                    || matches!((crate::queue::int_value(a), crate::queue::int_value(b)), (Some(x), Some(y)) if x == y)
                    || text_of(a).is_some() && text_of(a) == text_of(b)
            }
            _ => false,
        };
        if same {
            return Ok(());
        }
        // Both sides as values, or "the value 'v' of type 't'" against "none".
        let text = match (got, cur) {
            (Some(a), Some(b)) => format!(
                "received '{}' but current is '{}'",
                rabbit_value(a),
                rabbit_value(b)
            ),
            (Some(a), None) => format!(
                "received the value '{}' of type '{}' but current is none",
                rabbit_value(a),
                rabbit_type(a)
            ),
            (None, Some(b)) => format!(
                "received none but current is the value '{}' of type '{}'",
                rabbit_value(b),
                rabbit_type(b)
            ),
            (None, None) => String::new(),
        };
        Err(CoreError::precondition(format!(
            "inequivalent arg '{key}' for {what} '{name}' in vhost '{}': {text}",
            self.name
        )))
    }

    /// queue.delete: returns the number of ready messages deleted.
    pub async fn delete_queue(
        &self,
        name: &str,
        conn: Option<ConnectionId>,
        if_unused: bool,
        if_empty: bool,
    ) -> CoreResult<u32> {
        let q = self.queue(name)?;
        if let Some(c) = conn {
            q.check_access(c, &self.name)?;
        }
        if if_unused && !q.is_unused() {
            return Err(CoreError::precondition(format!(
                "queue '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        if if_empty && q.message_count() > 0 {
            return Err(CoreError::precondition(format!(
                "queue '{name}' in vhost '{}' not empty",
                self.name
            )));
        }
        {
            let mut g = self.queues.write();
            match g.get(name) {
                Some(cur) if Arc::ptr_eq(cur, &q) => {
                    g.remove(name);
                    self.churn
                        .deleted
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                _ => return Ok(0),
            }
        }
        let (count, consumers) = q.mark_deleted();
        for (id, outbox) in consumers {
            outbox.push_event(OutboxEvent::Cancelled(id));
        }
        let target = Target::Queue(q.clone());
        let mut ops = Vec::new();
        let mut emptied = Vec::new();
        for x in self.exchanges() {
            if q.durable {
                for b in x.bindings().into_iter().filter(|b| b.target == target) {
                    if let Some(op) = meta::binding_delete(&self.name, &x, &b) {
                        ops.push(op);
                    }
                }
            }
            if x.unbind_target(&target) > 0 && x.auto_delete && !x.has_bindings() {
                emptied.push(x);
            }
        }
        if q.durable {
            ops.push(Op::DeleteQueueMessages { queue: q.store_id });
            ops.push(meta::queue_delete(&self.name, name));
        }
        self.persist(ops).await?;
        for x in emptied {
            let _ = self.delete_exchange(x.name.as_str(), false).await;
        }
        Ok(count)
    }

    /// Deletes the exclusive queues of a closed connection.
    pub async fn connection_closed(&self, conn: ConnectionId) {
        let mine: Vec<ShortString> = self
            .queues
            .read()
            .values()
            .filter(|q| q.exclusive_owner == Some(conn))
            .map(|q| q.name.clone())
            .collect();
        for name in mine {
            let _ = self.delete_queue(name.as_str(), None, false, false).await;
        }
    }

    /// queue.bind and exchange.bind.
    pub async fn bind(
        &self,
        source: &str,
        target: Target,
        routing_key: RoutingKey,
        arguments: FieldTable,
    ) -> CoreResult<()> {
        let x = self.exchange(source)?;
        refuse_default_exchange(source)?;
        if x.kind == ExchangeKind::Headers {
            validate_x_match(&arguments)?;
        }
        let durable_target = match &target {
            Target::Queue(q) => q.is_stored(),
            Target::Exchange(e) => self.exchange(e.as_str())?.durable,
        };
        let b = Binding {
            target,
            routing_key,
            arguments,
        };
        if x.bind(b.clone()) && x.durable && durable_target {
            self.persist(vec![meta::binding_put(&self.name, &x, &b)])
                .await?;
        }
        Ok(())
    }

    /// queue.unbind and exchange.unbind. Idempotent, as RabbitMQ: a missing source
    /// exchange (like a missing binding) is not an error.
    pub async fn unbind(
        &self,
        source: &str,
        target: Target,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> CoreResult<()> {
        refuse_default_exchange(source)?;
        let Ok(x) = self.exchange(source) else {
            return Ok(());
        };
        let b = Binding {
            target: target.clone(),
            routing_key: routing_key.into(),
            arguments: arguments.clone(),
        };
        if x.unbind(&target, routing_key, arguments) {
            if let Some(op) = meta::binding_delete(&self.name, &x, &b) {
                self.persist(vec![op]).await?;
            }
            if x.auto_delete && !x.has_bindings() {
                let _ = self.delete_exchange(x.name.as_str(), false).await;
            }
        }
        Ok(())
    }

    /// Every binding in the vhost, as (source exchange, binding).
    pub fn bindings(&self) -> Vec<(ShortString, Binding)> {
        let mut out = Vec::new();
        for x in self.exchanges() {
            for b in x.bindings() {
                out.push((x.name.clone(), b));
            }
        }
        out
    }

    /// The queues a message reaches from `exchange`, deduplicated, following
    /// exchange-to-exchange bindings and alternate exchanges.
    pub fn route(&self, exchange: &Exchange, msg: &Message) -> Vec<Arc<Queue>> {
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        // As rabbit_exchange:route: a work list of exchanges, each visited once (which
        // ends cycles), however long the chain; no hop limit (Celery's delayed delivery
        // chains 28 exchanges). Nothing is allocated for it unless an exchange routes to
        // another.
        let mut work: Vec<ShortString> = Vec::new();
        self.route_one(exchange, msg, &mut queues, &mut work);
        if !work.is_empty() {
            let mut seen: Vec<ShortString> = vec![exchange.name.clone()];
            while let Some(name) = work.pop() {
                if seen.contains(&name) {
                    continue;
                }
                if let Ok(next) = self.exchange(name.as_str()) {
                    self.route_one(&next, msg, &mut queues, &mut work);
                }
                seen.push(name);
            }
        }
        exchange.count_publish(queues.len());
        queues
    }

    /// Routes `msg` through `x` alone: its queues go to `queues`, the exchanges it
    /// routes to (or, when it routes to nothing, its alternate exchange: RabbitMQ's
    /// `process_alternate`) to `work`.
    fn route_one(
        &self,
        x: &Exchange,
        msg: &Message,
        queues: &mut Vec<Arc<Queue>>,
        work: &mut Vec<ShortString>,
    ) {
        let mut routed = false;
        if x.name.as_str().is_empty() {
            // The default exchange: the queue named by the key (no copy of the key made),
            // then by the CC / BCC keys.
            let all = self.queues.read();
            let mut by_key = |key: &str| {
                if let Some(q) = all.get(key) {
                    push_unique(queues, q.clone());
                    routed = true;
                }
            };
            by_key(msg.routing_key.as_str());
            for key in crate::deadletter::sender_selected_keys(msg) {
                by_key(&key);
            }
        } else {
            let mut targets = Vec::new();
            let headers = msg.properties.headers.as_ref();
            x.route(msg.routing_key.as_str(), headers, &mut targets);
            // RabbitMQ's sender-selected distribution: CC and BCC keys route like the key
            // itself.
            for key in crate::deadletter::sender_selected_keys(msg) {
                x.route(&key, headers, &mut targets);
            }
            routed = !targets.is_empty();
            for t in targets {
                match t {
                    Target::Queue(q) => push_unique(queues, q),
                    Target::Exchange(name) => work.push(name),
                }
            }
        }
        if !routed {
            if let Some(ae) = x.alternate_exchange() {
                if let Ok(ae) = ShortString::try_new(ae) {
                    work.push(ae);
                }
            }
        }
    }

    /// Routes and enqueues a message published to `exchange`. Persistent messages bound
    /// for durable queues are written to the store first; the returned ticket is what a
    /// publisher confirm waits for.
    pub async fn publish(&self, exchange: &str, msg: Arc<Message>) -> CoreResult<PublishOutcome> {
        let x = self.exchange(exchange)?;
        let queues = self.route(&x, &msg);
        self.deliver_to(queues, msg).await
    }

    /// Enqueues `msg` on already-routed queues.
    pub async fn deliver_to(
        &self,
        queues: Vec<Arc<Queue>>,
        msg: Arc<Message>,
    ) -> CoreResult<PublishOutcome> {
        match self.deliver_now(queues, msg)? {
            Ok(out) => Ok(out),
            Err(unfinished) => self.finish_delivery(unfinished).await,
        }
    }

    /// [`VHost::deliver_to`] without an await where none is needed: a transient message
    /// (or one for queues that are not stored) whose enqueues leave nothing to write or
    /// dead-letter, the common publish. A front-end's frame handler calls this and boxes
    /// the rest, so the hot path does not build (and copy) the large awaiting future.
    pub fn deliver_now(
        &self,
        queues: Vec<Arc<Queue>>,
        msg: Arc<Message>,
    ) -> CoreResult<Result<PublishOutcome, Unfinished>> {
        let mut out = PublishOutcome::default();
        if queues.is_empty() {
            return Ok(Ok(out));
        }
        msg.expiration_ms()?;
        // BCC keys are routed on and then removed before delivery (RabbitMQ's
        // sender-selected distribution).
        let msg = match crate::deadletter::without_bcc(&msg) {
            Some(m) => Arc::new(m),
            None => msg,
        };
        // Streams are always written (and take their ordered path).
        let persistent = msg.is_persistent();
        let writes = queues
            .iter()
            .any(|q| q.is_stream() || (persistent && q.is_stored()));
        let may_refuse = queues.iter().any(|q| q.config().refuses_when_full());
        if writes || may_refuse {
            return Ok(Err(Unfinished(UnfinishedKind::Deliver { queues, msg })));
        }
        let now = Instant::now();
        let mut effects = Vec::new();
        for q in queues {
            let (outcome, fx) = q.enqueue_now(q.next_seq(), msg.clone(), false, None, now);
            out.count(outcome);
            if !fx.is_empty() {
                effects.push((q, fx));
            }
        }
        if effects.is_empty() {
            Ok(Ok(out))
        } else {
            Ok(Err(Unfinished(UnfinishedKind::Finish { out, effects })))
        }
    }

    /// Completes what [`VHost::deliver_now`] left.
    pub async fn finish_delivery(&self, unfinished: Unfinished) -> CoreResult<PublishOutcome> {
        match unfinished.0 {
            UnfinishedKind::Deliver { queues, msg } => self.deliver_awaiting(queues, msg).await,
            UnfinishedKind::Finish { out, effects } => {
                for (q, fx) in effects {
                    q.finish(fx).await;
                }
                Ok(out)
            }
        }
    }

    /// The delivery that writes to the store first (and may dead-letter refusals).
    async fn deliver_awaiting(
        &self,
        queues: Vec<Arc<Queue>>,
        msg: Arc<Message>,
    ) -> CoreResult<PublishOutcome> {
        let mut out = PublishOutcome::default();
        let persistent = msg.is_persistent();
        let mut ops = Vec::new();
        let mut encoded = None;
        let mut plan = Vec::with_capacity(queues.len());
        // Streams: each append lock (in store-id order, so two publishers cannot deadlock)
        // is held until the message is in the log, so offsets follow the write order.
        // (Split only when there is one: no allocation on the usual persistent publish.)
        let (mut streams, queues) = if queues.iter().any(|q| q.is_stream()) {
            queues.into_iter().partition(|q| q.is_stream())
        } else {
            (Vec::new(), queues)
        };
        streams.sort_by_key(|q| q.store_id.0);
        streams.dedup_by_key(|q| q.store_id.0);
        let mut held = Vec::with_capacity(streams.len());
        for q in &streams {
            held.push(q.lock_append().await);
        }
        let stream_ts = crate::stream::now_ms();
        let mut offsets = Vec::with_capacity(streams.len());
        for q in &streams {
            let offset = q.stream_next_offset();
            ops.push(Op::PutMessage {
                queue: q.store_id,
                seq: offset,
                data: crate::stream::encode_stored(stream_ts, &msg),
            });
            offsets.push(offset);
        }
        // Dead-lettered after the append locks are released (the DLX may route to one).
        let mut refused = Vec::new();
        for q in queues {
            if q.would_reject(&msg) {
                out.rejected = true;
                if q.config().overflow == Some(crate::queue::Overflow::RejectPublishDlx) {
                    refused.push(q);
                }
                continue;
            }
            let seq = q.next_seq();
            let persist = persistent && q.is_stored();
            if persist {
                let data = encoded.get_or_insert_with(|| msg.encode()).clone();
                ops.push(Op::PutMessage {
                    queue: q.store_id,
                    seq,
                    data,
                });
            }
            plan.push((q, seq, persist));
        }
        if !ops.is_empty() {
            out.ticket = Some(self.store.submit(ops).await?);
        }
        let ticket = out.ticket.map_or(0, |t| t.0);
        for (q, offset) in streams.iter().zip(offsets) {
            let fx = q.append_stream(offset, msg.clone(), stream_ts, ticket);
            q.finish(fx).await;
            out.count(EnqueueOutcome::Accepted);
        }
        drop(held);
        for q in refused {
            self.dead_letter(&q, msg.clone(), DeadReason::Maxlen).await;
        }
        let now = Instant::now();
        for (q, seq, persist) in plan {
            let (outcome, fx) = q.enqueue_now(seq, msg.clone(), persist, out.ticket, now);
            q.finish(fx).await;
            out.count(outcome);
        }
        Ok(out)
    }

    /// Republishes a message that left `queue` for `reason` to its dead-letter exchange.
    ///
    /// Boxed with an explicit `Send` bound: dead-lettering can cascade through queues
    /// (publish → enqueue → dead-letter → publish), a recursion the compiler cannot size.
    pub(crate) fn dead_letter<'a>(
        &'a self,
        queue: &'a Queue,
        msg: Arc<Message>,
        reason: DeadReason,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let Some(dlx) = queue.config().dead_letter_exchange.clone() else {
                return;
            };
            let Ok(x) = self.exchange(dlx.as_str()) else {
                return;
            };
            let mut m = dead_lettered(
                &msg,
                queue.name.as_str(),
                reason,
                queue.config().dead_letter_routing_key.as_ref(),
            );
            m.exchange = dlx;
            let m = Arc::new(m);
            let queues = self.route(&x, &m);
            if let Err(e) = self.deliver_to(queues, m).await {
                tracing::debug!(error = %e, "dead-lettering failed");
            }
        })
    }

    /// Error helper for front-ends: 404 for a missing queue.
    pub fn require_queue(&self, name: &str, conn: ConnectionId) -> CoreResult<Arc<Queue>> {
        let q = self.queue(name)?;
        q.check_access(conn, &self.name)?;
        Ok(q)
    }

    /// For front-ends that must fail a connection: the kind of a missing vhost.
    pub fn not_allowed(name: &str) -> CoreError {
        CoreError::new(ErrorKind::NotAllowed, format!("vhost {name} not found"))
    }
}

/// `prefix` + 22 random URL-safe base64 characters, like RabbitMQ's `amq.gen-` names.
pub fn generated_name(prefix: &str) -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

/// A direct reply-to name as RabbitMQ 3.x forms it: `amq.rabbitmq.reply-to.`, padded
/// base64 of the channel's owner (its Erlang pid there, the connection id here), `.`,
/// padded base64 of a 16-byte random key. Clients' tests match that shape (php-amqp's
/// `amq.rabbitmq.reply-to.%s.%s==`).
fn reply_queue_name(conn: ConnectionId) -> String {
    use base64::Engine;
    use rand::RngCore;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut key = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut key);
    format!(
        "amq.rabbitmq.reply-to.{}.{}",
        b64.encode(conn.0.to_be_bytes()),
        b64.encode(key)
    )
}

fn push_unique(queues: &mut Vec<Arc<Queue>>, q: Arc<Queue>) {
    if !queues.iter().any(|x| Arc::ptr_eq(x, &q)) {
        queues.push(q);
    }
}

fn text_of(v: &amq_protocol_types::AMQPValue) -> Option<String> {
    match v {
        amq_protocol_types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        amq_protocol_types::AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A headers binding's `x-match`, as RabbitMQ's headers exchange validates it (406).
fn validate_x_match(arguments: &FieldTable) -> CoreResult<()> {
    match arguments.inner().get("x-match") {
        None => Ok(()),
        Some(v) => match text_of(v) {
            Some(m) if matches!(m.as_str(), "all" | "any" | "all-with-x" | "any-with-x") => Ok(()),
            Some(m) => Err(CoreError::precondition(format!(
                "Invalid x-match field value <<\"{m}\">>; expected all, any, all-with-x, or any-with-x"
            ))),
            None => Err(CoreError::precondition(format!(
                "Invalid x-match field type {} (value {}); expected longstr",
                rabbit_type(v),
                rabbit_value(v)
            ))),
        },
    }
}

/// A field value as RabbitMQ prints it in error texts.
fn rabbit_value(v: &AMQPValue) -> String {
    if let Some(i) = crate::queue::int_value(v) {
        return i.to_string();
    }
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        other => text_of(other).unwrap_or_else(|| format!("{other:?}")),
    }
}

/// RabbitMQ's name for a field type (rabbit_binary_parser).
pub fn rabbit_type(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}
