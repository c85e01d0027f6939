//! The broker: vhosts, users, the store, and recovery at start-up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use amq_protocol_types::ShortString;
use parking_lot::RwLock;
use warren_store::{Op, Store, StoreQueueId, Ticket};

use crate::auth::{self, AuthError, User};
use crate::connections::Connections;
use crate::error::{CoreError, CoreResult};
use crate::exchange::{Binding, Exchange, Target};
use crate::global_parameters::{self, GlobalParameterMap};
use crate::limits::{self, LimitMap, LimitOwner};
use crate::message::Message;
use crate::meta::{self, BindingRecord, ExchangeRecord, QueueRecord, UserRecord, VHostRecord};
use crate::permissions::{self, Access, CompiledPermission, PermissionRecord, ResourceKind};
use crate::policies::{Policy, PolicyKind, PolicyRecord};
use crate::queue::QueueConfig;
use crate::topic_permissions::{self, TopicPermissionRecord, TopicPermissions};
use crate::vhost::{QueueDecl, VHost, VHostMetadata};

/// Settings the core needs.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Created with this password on first start (RabbitMQ's guest/guest).
    pub default_user: String,
    pub default_pass: String,
    /// Users that may only log in from a loopback address.
    pub loopback_users: Vec<String>,
    /// RabbitMQ-style node name, e.g. `rabbit@host`: the cluster name until one is set.
    pub node_name: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            default_user: "guest".into(),
            default_pass: "guest".into(),
            loopback_users: vec!["guest".into()],
            node_name: default_node_name(),
        }
    }
}

/// `rabbit@<hostname>`, RabbitMQ's default node name.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    // RabbitMQ's default node name: monitoring tools (nagios-plugins-rabbitmq's
    // check_rabbitmq_server and friends) ask for `/api/nodes/rabbit@<host>`.
    format!("rabbit@{host}")
}

/// The whole broker state shared by every connection.
pub struct Broker {
    pub config: BrokerConfig,
    store: Store,
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    users: RwLock<HashMap<String, UserRecord>>,
    next_store_id: Arc<AtomicU64>,
    /// (vhost, user) → permission, regexes compiled.
    permissions: RwLock<HashMap<(String, String), Arc<CompiledPermission>>>,
    /// (vhost, user) → topic permissions by exchange; replaced whole on a change so
    /// front-ends can hold the `Arc` until the generation moves.
    topic_permissions: RwLock<HashMap<(String, String), Arc<TopicPermissions>>>,
    /// Bumped on every permission change, so front-ends may cache check results.
    permissions_generation: AtomicU64,
    connections: Arc<Connections>,
    /// Vhost and user limits (crate::limits), by owner and name.
    limits: RwLock<HashMap<(LimitOwner, String), LimitMap>>,
    pub(crate) global_parameters: RwLock<GlobalParameterMap>,
    /// Memory and disk alarms; set by the binary's resource monitor.
    pub alarms: crate::alarm::Alarms,
}

impl Broker {
    /// Opens the broker on `store`, recovering everything durable in it. Must run inside a
    /// tokio runtime (queues with TTLs start timers).
    pub fn open(store: Store, config: BrokerConfig) -> CoreResult<Arc<Broker>> {
        let broker = Arc::new(Broker {
            config,
            store: store.clone(),
            vhosts: RwLock::new(HashMap::new()),
            users: RwLock::new(HashMap::new()),
            next_store_id: Arc::new(AtomicU64::new(1)),
            permissions: RwLock::new(HashMap::new()),
            topic_permissions: RwLock::new(HashMap::new()),
            limits: RwLock::new(HashMap::new()),
            global_parameters: RwLock::default(),
            permissions_generation: AtomicU64::new(0),
            connections: Arc::new(Connections::default()),
            alarms: crate::alarm::Alarms::default(),
        });
        broker.recover()?;
        Ok(broker)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn recover(self: &Arc<Self>) -> CoreResult<()> {
        let mut first_boot_ops = Vec::new();
        let users = self.store.meta_scan(meta::USER)?;
        let vhosts = self.store.meta_scan(meta::VHOST)?;
        for (_, v) in &users {
            let u: UserRecord = decode(v)?;
            self.users.write().insert(u.name.clone(), u);
        }
        if users.is_empty() && vhosts.is_empty() {
            let u = UserRecord {
                name: self.config.default_user.clone(),
                password_hash: auth::hash_password(&self.config.default_pass),
                hashing_algorithm: auth::SHA256_ALGORITHM.into(),
                tags: vec!["administrator".into()],
            };
            // RabbitMQ's description of the vhost it makes on first boot.
            let metadata = VHostMetadata {
                description: "Default virtual host".into(),
                ..Default::default()
            };
            first_boot_ops.push(meta::vhost_put("/", &metadata));
            first_boot_ops.push(meta::user_put(&u));
            self.users.write().insert(u.name.clone(), u);
            self.add_vhost_in_memory("/").set_metadata(metadata);
        }
        for (_, v) in &vhosts {
            let r: VHostRecord = decode(v)?;
            self.add_vhost_in_memory(&r.name).set_metadata(r.metadata);
        }
        *self.global_parameters.write() = global_parameters::recover(
            self.store.meta_scan(meta::GLOBAL_PARAMETER)?,
            &self.config.node_name,
            &mut first_boot_ops,
        );
        for (k, v) in self.store.meta_scan(meta::LIMIT)? {
            let Some((owner, who)) = meta::limits_key_parts(&k) else {
                continue;
            };
            let m: LimitMap = decode(&v)?;
            if owner == LimitOwner::VHost {
                if let Some(vh) = self.vhost(&who) {
                    vh.set_max_queues(limits::effective(Some(&m), "max-queues"));
                }
            }
            self.limits.write().insert((owner, who), m);
        }
        // Before the queues and exchanges, so they are rebuilt with their policy.
        for kind in [PolicyKind::User, PolicyKind::Operator] {
            for (_, v) in self.store.meta_scan(meta::policy_prefix(kind))? {
                let r: PolicyRecord = decode(&v)?;
                let Some(vh) = self.vhost(&r.vhost) else {
                    continue;
                };
                match Policy::new(kind, r) {
                    Ok(p) => {
                        vh.edit_policies(kind, |ps| ps.set(Arc::new(p)));
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping unusable stored policy"),
                }
            }
        }
        for (_, v) in self.store.meta_scan(meta::PERMISSION)? {
            let r: PermissionRecord = decode(&v)?;
            match CompiledPermission::new(r) {
                Ok(p) => {
                    let key = (p.record.vhost.clone(), p.record.user.clone());
                    self.permissions.write().insert(key, Arc::new(p));
                }
                Err(e) => tracing::warn!(error = %e, "skipping unusable stored permission"),
            }
        }
        for (_, v) in self.store.meta_scan(meta::TOPIC_PERMISSION)? {
            let r: TopicPermissionRecord = decode(&v)?;
            let mut map = self.topic_permissions.write();
            let entry = map
                .entry((r.vhost.clone(), r.user.clone()))
                .or_insert_with(|| Arc::new(TopicPermissions::default()));
            if let Err(e) = Arc::make_mut(entry).insert(r) {
                tracing::warn!(error = %e, "skipping unusable stored topic permission");
            }
        }
        // The default user gets ".*" on "/" on first boot, as in RabbitMQ; data dirs made
        // before permissions existed get it once too (the marker makes a revoke stick).
        if self
            .store
            .meta_scan(meta::PERMISSIONS_INITIALISED)?
            .is_empty()
        {
            if self.users.read().contains_key(&self.config.default_user)
                && self.vhost("/").is_some()
            {
                let p = full_permission(&self.config.default_user, "/");
                first_boot_ops.push(meta::permission_put(&p));
                if let Ok(c) = CompiledPermission::new(p) {
                    self.permissions
                        .write()
                        .insert(("/".into(), self.config.default_user.clone()), Arc::new(c));
                }
            }
            first_boot_ops.push(meta::permissions_initialised());
        }
        // Queue store ids are never reused: the counter starts above every recovered one.
        let mut max_id = 0u64;
        let mut n_msgs = 0usize;
        let mut stale = Vec::new();
        for (_, v) in self.store.meta_scan(meta::QUEUE)? {
            let r: QueueRecord = decode(&v)?;
            max_id = max_id.max(r.store_id);
            let Some(vh) = self.vhost(&r.vhost) else {
                continue;
            };
            let config = QueueConfig::parse(&r.arguments, &r.name, &r.vhost).unwrap_or_default();
            let q = vh.build_queue(
                QueueDecl {
                    name: r.name.as_str().into(),
                    passive: false,
                    durable: true,
                    exclusive: false,
                    auto_delete: r.auto_delete,
                    arguments: r.arguments,
                },
                None,
                StoreQueueId(r.store_id),
                config,
            );
            // Streamed: past the paging threshold a message is decoded, counted and dropped.
            self.store.scan_queue(q.store_id, 0, u64::MAX, |m| {
                if q.is_stream() {
                    // Every stream record stays, whatever its delivery mode.
                    match q.restore_stream(m.seq, m.data) {
                        Ok(()) => n_msgs += 1,
                        Err(e) => {
                            tracing::warn!(queue = %r.name, offset = m.seq, error = %e, "skipping unreadable stream record")
                        }
                    }
                    return true;
                }
                match Message::decode(m.data) {
                    // A transient message paged out before the restart: gone, as in RabbitMQ.
                    Ok(msg) if !msg.is_persistent() => stale.push(Op::DeleteMessage {
                        queue: q.store_id,
                        seq: m.seq,
                    }),
                    Ok(msg) => {
                        q.restore(m.seq, Arc::new(msg), m.delivered);
                        n_msgs += 1;
                    }
                    Err(e) => {
                        tracing::warn!(queue = %r.name, seq = m.seq, error = %e, "skipping unreadable message")
                    }
                }
                true
            })?;
            vh.insert_recovered_queue(q);
        }
        self.next_store_id
            .store(max_id + 1, std::sync::atomic::Ordering::Relaxed);
        for (_, v) in self.store.meta_scan(meta::EXCHANGE)? {
            let r: ExchangeRecord = decode(&v)?;
            if let Some(vh) = self.vhost(&r.vhost) {
                vh.insert_recovered_exchange(Arc::new(Exchange::new(
                    r.name.as_str().into(),
                    r.kind,
                    true,
                    r.auto_delete,
                    r.internal,
                    r.arguments,
                )));
            }
        }
        let mut n_bindings = 0usize;
        for (_, v) in self.store.meta_scan(meta::BINDING)? {
            let r: BindingRecord = decode(&v)?;
            let Some(vh) = self.vhost(&r.vhost) else {
                continue;
            };
            let Ok(x) = vh.exchange(&r.source) else {
                continue;
            };
            let target = if r.destination_type == "queue" {
                match vh.queue(&r.destination) {
                    Ok(q) => Target::Queue(q),
                    Err(_) => continue,
                }
            } else {
                Target::Exchange(ShortString::from(r.destination.as_str()))
            };
            x.bind(Binding {
                target,
                routing_key: r.routing_key.as_str().into(),
                arguments: r.arguments,
            });
            n_bindings += 1;
        }
        if !first_boot_ops.is_empty() {
            self.store.submit_blocking(first_boot_ops)?;
        }
        if !stale.is_empty() {
            self.store.submit_blocking(stale)?;
        }
        tracing::info!(
            vhosts = self.vhosts.read().len(),
            queues = max_id,
            messages = n_msgs,
            bindings = n_bindings,
            "recovered durable state"
        );
        Ok(())
    }

    fn add_vhost_in_memory(&self, name: &str) -> Arc<VHost> {
        let vh = VHost::new(name.into(), self.store.clone(), self.next_store_id.clone());
        self.vhosts.write().insert(name.into(), vh.clone());
        vh
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().get(name).cloned()
    }

    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        self.vhosts.read().values().cloned().collect()
    }

    /// Creates a vhost (durably); returns the existing one if present.
    pub async fn add_vhost(&self, name: &str) -> CoreResult<Arc<VHost>> {
        if let Some(v) = self.vhost(name) {
            return Ok(v);
        }
        self.put_vhost(name, VHostMetadata::default()).await
    }

    /// Creates a vhost or replaces its metadata (RabbitMQ's `PUT /api/vhosts/{v}`), durably.
    pub async fn put_vhost(&self, name: &str, metadata: VHostMetadata) -> CoreResult<Arc<VHost>> {
        if self.vhost(name).is_some_and(|v| v.metadata() == metadata) {
            return self
                .vhost(name)
                .ok_or_else(|| CoreError::not_found("vhost"));
        }
        let t = self
            .store
            .submit(vec![meta::vhost_put(name, &metadata)])
            .await?;
        self.store.wait_synced(t).await?;
        let vh = match self.vhost(name) {
            Some(v) => v,
            None => self.add_vhost_in_memory(name),
        };
        vh.set_metadata(metadata);
        Ok(vh)
    }

    /// Deletes a vhost with everything in it: its connections are asked to close, its
    /// queues (and their messages), exchanges, bindings and permissions go. Returns false if
    /// there was no such vhost.
    pub async fn delete_vhost(&self, name: &str) -> CoreResult<bool> {
        let Some(vh) = self.vhosts.write().remove(name) else {
            return Ok(false);
        };
        self.connections
            .close_vhost(name, &format!("vhost '{name}' is deleted"));
        for q in vh.queues() {
            let _ = vh.delete_queue(q.name.as_str(), None, false, false).await;
        }
        for x in vh.exchanges() {
            let n = x.name.as_str();
            if !n.is_empty() && !n.starts_with("amq.") {
                let _ = vh.delete_exchange(n, false).await;
            }
        }
        let mut ops = vec![meta::vhost_delete(name)];
        {
            let mut perms = self.permissions.write();
            perms.retain(|(v, u), _| {
                if v == name {
                    ops.push(meta::permission_delete(v, u));
                    false
                } else {
                    true
                }
            });
        }
        self.drop_topic_permissions(|v, _| v == name, &mut ops);
        for kind in [PolicyKind::User, PolicyKind::Operator] {
            for p in vh.policies(kind).records() {
                ops.push(meta::policy_delete(kind, name, &p.name));
            }
        }
        self.drop_limits(LimitOwner::VHost, name, &mut ops);
        self.bump_permissions();
        self.persist(ops).await?;
        Ok(true)
    }

    /// Sets (durably) a policy, replacing the one of that name in its vhost, and applies
    /// it at once; true if it is new. 404 without the vhost; a definition RabbitMQ would
    /// refuse is a [`ValidationFailed`](crate::error::ValidationFailed) (400 in the API).
    pub async fn set_policy(&self, kind: PolicyKind, record: PolicyRecord) -> CoreResult<bool> {
        let vh = self
            .vhost(&record.vhost)
            .ok_or_else(|| CoreError::not_found(format!("no vhost '{}'", record.vhost)))?;
        let p = Policy::new(kind, record)?;
        self.persist(vec![meta::policy_put(kind, &p.record)])
            .await?;
        let replaced = vh.edit_policies(kind, |ps| ps.set(Arc::new(p)));
        vh.apply_policies().await;
        Ok(!replaced)
    }

    /// Removes a policy; false if there was none.
    pub async fn clear_policy(
        &self,
        kind: PolicyKind,
        vhost: &str,
        name: &str,
    ) -> CoreResult<bool> {
        let Some(vh) = self.vhost(vhost) else {
            return Ok(false);
        };
        if vh.policies(kind).get(name).is_none() {
            return Ok(false);
        }
        self.persist(vec![meta::policy_delete(kind, vhost, name)])
            .await?;
        vh.edit_policies(kind, |ps| ps.remove(name));
        vh.apply_policies().await;
        Ok(true)
    }

    /// Sets (durably) one limit of a vhost or user; 404 if it does not exist, a
    /// [`ValidationFailed`](crate::error::ValidationFailed) for a name RabbitMQ does not know.
    pub async fn set_limit(
        &self,
        owner: LimitOwner,
        who: &str,
        name: &str,
        value: &serde_json::Value,
    ) -> CoreResult<()> {
        let exists = match owner {
            LimitOwner::VHost => self.vhost(who).is_some(),
            LimitOwner::User => self.users.read().contains_key(who),
        };
        if !exists {
            return Err(CoreError::not_found(format!("no {} '{who}'", owner.key())));
        }
        let v = limits::validate(owner, name, value)?;
        self.change_limits(owner, who, |m| {
            m.insert(name.to_owned(), v);
        })
        .await?;
        Ok(())
    }

    /// Forgets a deleted vhost's or user's limits; the store delete goes into `ops`.
    fn drop_limits(&self, owner: LimitOwner, who: &str, ops: &mut Vec<Op>) {
        if self
            .limits
            .write()
            .remove(&(owner, who.to_owned()))
            .is_some()
        {
            ops.push(meta::limits_put(owner, who, &LimitMap::new()));
        }
    }

    /// Removes one limit; false if it was not set.
    pub async fn clear_limit(&self, owner: LimitOwner, who: &str, name: &str) -> CoreResult<bool> {
        self.change_limits(owner, who, |m| m.remove(name).is_some())
            .await
    }

    async fn change_limits<R>(
        &self,
        owner: LimitOwner,
        who: &str,
        change: impl FnOnce(&mut LimitMap) -> R,
    ) -> CoreResult<R> {
        let (out, next) = {
            let mut all = self.limits.write();
            let m = all.entry((owner, who.to_owned())).or_default();
            let out = change(m);
            let next = m.clone();
            if next.is_empty() {
                all.remove(&(owner, who.to_owned()));
            }
            (out, next)
        };
        if owner == LimitOwner::VHost {
            if let Some(vh) = self.vhost(who) {
                vh.set_max_queues(limits::effective(Some(&next), "max-queues"));
            }
        }
        self.persist(vec![meta::limits_put(owner, who, &next)])
            .await?;
        Ok(out)
    }

    /// Every owner's limits, sorted by name.
    pub fn limits(&self, owner: LimitOwner) -> Vec<(String, LimitMap)> {
        let mut v: Vec<(String, LimitMap)> = self
            .limits
            .read()
            .iter()
            .filter(|((o, _), _)| *o == owner)
            .map(|((_, w), m)| (w.clone(), m.clone()))
            .collect();
        v.sort();
        v
    }

    fn limit(&self, owner: LimitOwner, who: &str, name: &str) -> Option<u64> {
        let all = self.limits.read();
        if all.is_empty() {
            return None;
        }
        limits::effective(all.get(&(owner, who.to_owned())), name)
    }

    /// RabbitMQ's connection limits, checked when a connection opens (after
    /// [`Broker::check_vhost_access`], before it registers): the vhost's and the user's
    /// `max-connections`, over every protocol. 530 NOT_ALLOWED with RabbitMQ's texts.
    pub fn check_connection_limits(&self, user: &str, vhost: &str) -> CoreResult<()> {
        let by_vhost = self.limit(LimitOwner::VHost, vhost, "max-connections");
        let by_user = self.limit(LimitOwner::User, user, "max-connections");
        if by_vhost.is_none() && by_user.is_none() {
            return Ok(());
        }
        let open = self.connections.list();
        if let Some(max) = by_vhost {
            if open.iter().filter(|c| c.info.vhost == vhost).count() as u64 >= max {
                return Err(limits::vhost_connections_reached(vhost, user, max));
            }
        }
        if let Some(max) = by_user {
            if open.iter().filter(|c| c.info.user == user).count() as u64 >= max {
                return Err(limits::user_connections_reached(user, max));
            }
        }
        Ok(())
    }

    /// The user's `max-channels`, checked on channel.open: counts the channels open on
    /// all of the user's connections.
    pub fn check_channel_limit(&self, user: &str) -> CoreResult<()> {
        let Some(max) = self.limit(LimitOwner::User, user, "max-channels") else {
            return Ok(());
        };
        let open: usize = self
            .connections
            .list()
            .iter()
            .filter(|c| c.info.user == user)
            .map(|c| c.channel_count())
            .sum();
        if open as u64 >= max {
            return Err(limits::user_channels_reached(user, max));
        }
        Ok(())
    }

    /// Every policy of one kind in every vhost, by vhost and then priority.
    pub fn policies(&self, kind: PolicyKind) -> Vec<PolicyRecord> {
        let mut vhosts = self.vhosts();
        vhosts.sort_by(|a, b| a.name.cmp(&b.name));
        vhosts
            .iter()
            .flat_map(|vh| vh.policies(kind).records().cloned().collect::<Vec<_>>())
            .collect()
    }

    pub(crate) async fn persist(&self, ops: Vec<Op>) -> CoreResult<()> {
        let t = self.store.submit(ops).await?;
        self.store.wait_synced(t).await?;
        Ok(())
    }

    /// Adds or replaces a user (durably).
    pub async fn put_user(&self, name: &str, password: &str, tags: Vec<String>) -> CoreResult<()> {
        self.put_user_record(UserRecord {
            name: name.into(),
            password_hash: auth::hash_password(password),
            hashing_algorithm: auth::SHA256_ALGORITHM.into(),
            tags,
        })
        .await
    }

    /// Adds or replaces a user from a stored record (a definitions import, or the API's
    /// `password_hash`). An empty hash means the user cannot log in with a password, as in
    /// RabbitMQ.
    pub async fn put_user_record(&self, u: UserRecord) -> CoreResult<()> {
        self.persist(vec![meta::user_put(&u)]).await?;
        self.users.write().insert(u.name.clone(), u);
        Ok(())
    }

    /// Deletes a user, its permissions, and asks its connections to close.
    pub async fn delete_user(&self, name: &str) -> CoreResult<bool> {
        if self.users.write().remove(name).is_none() {
            return Ok(false);
        }
        let mut ops = vec![meta::user_delete(name)];
        self.permissions.write().retain(|(v, u), _| {
            if u == name {
                ops.push(meta::permission_delete(v, u));
                false
            } else {
                true
            }
        });
        self.drop_topic_permissions(|_, u| u == name, &mut ops);
        self.drop_limits(LimitOwner::User, name, &mut ops);
        self.bump_permissions();
        self.persist(ops).await?;
        self.connections
            .close_user(name, &format!("user '{name}' is deleted"));
        Ok(true)
    }

    /// Every user, sorted by name.
    pub fn users(&self) -> Vec<UserRecord> {
        let mut v: Vec<UserRecord> = self.users.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn user(&self, name: &str) -> Option<UserRecord> {
        self.users.read().get(name).cloned()
    }

    /// The connection registry (management API, metrics; front-ends register there).
    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    fn bump_permissions(&self) {
        self.permissions_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes whenever any permission changes: a front-end that caches check results
    /// (per channel, as RabbitMQ does) drops its cache when this moves.
    pub fn permissions_generation(&self) -> u64 {
        self.permissions_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sets (durably) `user`'s permission on `vhost`. The regexes must compile (else 406
    /// PRECONDITION_FAILED with the reason); user and vhost must exist (else 404).
    pub async fn set_permission(&self, p: PermissionRecord) -> CoreResult<()> {
        if self.vhost(&p.vhost).is_none() {
            return Err(CoreError::not_found(format!("no vhost '{}'", p.vhost)));
        }
        if !self.users.read().contains_key(&p.user) {
            return Err(CoreError::not_found(format!("no user '{}'", p.user)));
        }
        let compiled = CompiledPermission::new(p)?;
        self.persist(vec![meta::permission_put(&compiled.record)])
            .await?;
        let key = (compiled.record.vhost.clone(), compiled.record.user.clone());
        self.permissions.write().insert(key, Arc::new(compiled));
        self.bump_permissions();
        Ok(())
    }

    /// Removes `user`'s permission on `vhost`; false if there was none.
    pub async fn clear_permission(&self, vhost: &str, user: &str) -> CoreResult<bool> {
        let removed = self
            .permissions
            .write()
            .remove(&(vhost.to_owned(), user.to_owned()))
            .is_some();
        if removed {
            self.bump_permissions();
            self.persist(vec![meta::permission_delete(vhost, user)])
                .await?;
        }
        Ok(removed)
    }

    /// Every permission, sorted by (vhost, user).
    pub fn permissions(&self) -> Vec<PermissionRecord> {
        let mut v: Vec<PermissionRecord> = self
            .permissions
            .read()
            .values()
            .map(|p| p.record.clone())
            .collect();
        v.sort_by(|a, b| (&a.vhost, &a.user).cmp(&(&b.vhost, &b.user)));
        v
    }

    pub fn permission(&self, vhost: &str, user: &str) -> Option<PermissionRecord> {
        self.permissions
            .read()
            .get(&(vhost.to_owned(), user.to_owned()))
            .map(|p| p.record.clone())
    }

    /// Removes the topic permissions of every (vhost, user) that `which` selects, adding
    /// the deletes to `ops`.
    fn drop_topic_permissions(&self, which: impl Fn(&str, &str) -> bool, ops: &mut Vec<Op>) {
        self.topic_permissions.write().retain(|(v, u), tp| {
            if which(v, u) {
                ops.extend(
                    tp.records()
                        .map(|r| meta::topic_permission_delete(v, u, &r.exchange)),
                );
                false
            } else {
                true
            }
        });
    }

    /// Sets (durably) `user`'s topic permission on one exchange of `vhost`, replacing the
    /// one for that exchange. The regexes must compile (else 406); user and vhost must
    /// exist (else 404). The exchange need not exist, as in RabbitMQ.
    pub async fn set_topic_permission(&self, p: TopicPermissionRecord) -> CoreResult<()> {
        if self.vhost(&p.vhost).is_none() {
            return Err(CoreError::not_found(format!("no vhost '{}'", p.vhost)));
        }
        if !self.users.read().contains_key(&p.user) {
            return Err(CoreError::not_found(format!("no user '{}'", p.user)));
        }
        topic_permissions::validate(&p)?;
        self.persist(vec![meta::topic_permission_put(&p)]).await?;
        {
            let mut map = self.topic_permissions.write();
            let entry = map.entry((p.vhost.clone(), p.user.clone())).or_default();
            let mut next = (**entry).clone();
            next.insert(p)?;
            *entry = Arc::new(next);
        }
        self.bump_permissions();
        Ok(())
    }

    /// Removes `user`'s topic permissions in `vhost`: the one for `exchange`, or all
    /// (RabbitMQ's `clear_topic_permissions`). False if there were none.
    pub async fn clear_topic_permissions(
        &self,
        vhost: &str,
        user: &str,
        exchange: Option<&str>,
    ) -> CoreResult<bool> {
        let key = (vhost.to_owned(), user.to_owned());
        let mut ops = Vec::new();
        {
            let mut map = self.topic_permissions.write();
            let Some(current) = map.get(&key) else {
                return Ok(false);
            };
            let mut next = (**current).clone();
            let gone: Vec<String> = current
                .records()
                .map(|r| r.exchange.clone())
                .filter(|x| exchange.is_none_or(|e| e == x))
                .collect();
            for x in &gone {
                next.remove(x);
                ops.push(meta::topic_permission_delete(vhost, user, x));
            }
            if next.is_empty() {
                map.remove(&key);
            } else {
                map.insert(key, Arc::new(next));
            }
        }
        if ops.is_empty() {
            return Ok(false);
        }
        self.bump_permissions();
        self.persist(ops).await?;
        Ok(true)
    }

    /// Every topic permission, sorted by (vhost, user, exchange).
    pub fn topic_permissions(&self) -> Vec<TopicPermissionRecord> {
        let mut v: Vec<TopicPermissionRecord> = self
            .topic_permissions
            .read()
            .values()
            .flat_map(|t| t.records().cloned().collect::<Vec<_>>())
            .collect();
        v.sort_by(|a, b| (&a.vhost, &a.user, &a.exchange).cmp(&(&b.vhost, &b.user, &b.exchange)));
        v
    }

    /// `user`'s topic permissions in `vhost`, for a front-end to hold until
    /// [`permissions_generation`](Self::permissions_generation) moves. `None`: no rules,
    /// every topic is allowed (RabbitMQ's default).
    pub fn topic_permissions_of(&self, vhost: &str, user: &str) -> Option<Arc<TopicPermissions>> {
        self.topic_permissions
            .read()
            .get(&(vhost.to_owned(), user.to_owned()))
            .cloned()
    }

    /// RabbitMQ's topic check, uncached (bindings; the message paths hold
    /// [`topic_permissions_of`](Self::topic_permissions_of)): `Ok` unless `exchange` is a
    /// topic exchange with a rule for `user` whose regex does not match `routing_key`;
    /// then 403 with RabbitMQ's text.
    pub fn check_topic_permission(
        &self,
        user: &str,
        vhost: &str,
        exchange: &Exchange,
        access: Access,
        routing_key: &str,
    ) -> CoreResult<()> {
        if exchange.kind != crate::exchange::ExchangeKind::Topic {
            return Ok(());
        }
        let name = exchange.name.as_str();
        match self.topic_permissions_of(vhost, user) {
            Some(tp) if !tp.allows(name, access, routing_key) => Err(topic_permissions::refused(
                access,
                routing_key,
                name,
                vhost,
                user,
            )),
            _ => Ok(()),
        }
    }

    /// Whether `user` may open a connection to `vhost` (has any permission record there,
    /// as RabbitMQ's `check_vhost_access`). Front-ends answer a refusal with their "not
    /// authorised" (AMQP 530 NOT_ALLOWED, MQTT CONNACK 5 / 0x87, STOMP ERROR).
    pub fn check_vhost_access(&self, user: &str, vhost: &str) -> CoreResult<()> {
        if self
            .permissions
            .read()
            .contains_key(&(vhost.to_owned(), user.to_owned()))
        {
            Ok(())
        } else {
            Err(CoreError::new(
                crate::error::ErrorKind::NotAllowed,
                format!("access to vhost '{vhost}' refused for user '{user}'"),
            ))
        }
    }

    /// RabbitMQ's resource check: `Ok` if `user` has `access` to the `kind` resource `name`
    /// in `vhost`, else 403 ACCESS_REFUSED with RabbitMQ's text (`access to exchange
    /// 'amq.default' in vhost '/' refused for user 'u'`). The default exchange is checked
    /// as `amq.default`. MQTT/STOMP map the error to their own answers.
    pub fn check_permission(
        &self,
        user: &str,
        vhost: &str,
        access: Access,
        kind: ResourceKind,
        name: &str,
    ) -> CoreResult<()> {
        let allowed = self
            .permissions
            .read()
            .get(&(vhost.to_owned(), user.to_owned()))
            .is_some_and(|p| p.allows(access, permissions::resource_name(kind, name)));
        if allowed {
            Ok(())
        } else {
            Err(permissions::refused(access, kind, name, vhost, user))
        }
    }

    /// Checks a login. `peer` decides whether a loopback-only user may log in.
    pub fn authenticate(&self, user: &str, pass: &str, peer: IpAddr) -> Result<User, AuthError> {
        let users = self.users.read();
        let Some(rec) = users.get(user) else {
            return Err(AuthError::InvalidCredentials(user.into()));
        };
        if !auth::verify_password(&rec.password_hash, pass) {
            return Err(AuthError::InvalidCredentials(user.into()));
        }
        if self.config.loopback_users.iter().any(|u| u == user) && !is_loopback(peer) {
            return Err(AuthError::LoopbackOnly(user.into()));
        }
        Ok(User::from(rec))
    }

    /// Checks a login the transport vouched for (a verified client certificate): the user
    /// must exist, its password is not asked for (as RabbitMQ's internal backend does
    /// for EXTERNAL), and loopback-only users still only log in from loopback.
    pub fn authenticate_external(&self, user: &str, peer: IpAddr) -> Result<User, AuthError> {
        let users = self.users.read();
        let Some(rec) = users.get(user) else {
            return Err(AuthError::InvalidCredentials(user.into()));
        };
        if self.config.loopback_users.iter().any(|u| u == user) && !is_loopback(peer) {
            return Err(AuthError::LoopbackOnly(user.into()));
        }
        Ok(User::from(rec))
    }

    /// Stores (`Some`) or clears (`None`) the retained message of an MQTT topic durably;
    /// returns the ticket to wait for before acknowledging the publish.
    pub async fn store_retained(
        &self,
        vhost: &str,
        topic: &str,
        msg: Option<&Message>,
    ) -> CoreResult<Ticket> {
        let key = meta::retained_key(vhost, topic);
        let op = match msg {
            Some(m) => Op::PutMeta {
                key,
                value: m.encode().to_vec(),
            },
            None => Op::DeleteMeta { key },
        };
        Ok(self.store.submit(vec![op]).await?)
    }

    /// Every stored retained message as (vhost, topic, message).
    pub fn load_retained(&self) -> CoreResult<Vec<(String, String, Message)>> {
        let mut out = Vec::new();
        for (k, v) in self.store.meta_scan(meta::RETAINED)? {
            let rest = &k[meta::RETAINED.len()..];
            let Some(sep) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let vhost = String::from_utf8_lossy(&rest[..sep]).into_owned();
            let topic = String::from_utf8_lossy(&rest[sep + 1..]).into_owned();
            match Message::decode(bytes::Bytes::from(v)) {
                Ok(m) => out.push((vhost, topic, m)),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "skipping unreadable retained message")
                }
            }
        }
        Ok(out)
    }

    /// Stores (`Some`) or deletes (`None`) the durable state record of an MQTT session
    /// (its expiry and in-flight QoS 2 packet ids; the front-end owns the encoding);
    /// returns the ticket to wait for.
    pub async fn store_mqtt_session(
        &self,
        vhost: &str,
        client_id: &str,
        state: Option<Vec<u8>>,
    ) -> CoreResult<Ticket> {
        let key = meta::mqtt_session_key(vhost, client_id);
        let op = match state {
            Some(value) => Op::PutMeta { key, value },
            None => Op::DeleteMeta { key },
        };
        Ok(self.store.submit(vec![op]).await?)
    }

    /// Every stored MQTT session record as (vhost, client id, bytes).
    pub fn load_mqtt_sessions(&self) -> CoreResult<Vec<(String, String, Vec<u8>)>> {
        let mut out = Vec::new();
        for (k, v) in self.store.meta_scan(meta::MQTT_SESSION)? {
            let rest = &k[meta::MQTT_SESSION.len()..];
            let Some(sep) = rest.iter().position(|b| *b == 0) else {
                continue;
            };
            let vhost = String::from_utf8_lossy(&rest[..sep]).into_owned();
            let client_id = String::from_utf8_lossy(&rest[sep + 1..]).into_owned();
            out.push((vhost, client_id, v));
        }
        Ok(out)
    }

    /// Flushes the store: everything submitted so far is on disk when this returns.
    pub fn flush(&self) {
        self.store.close();
    }

    /// Deletes stored messages of queues the broker no longer knows (crash between a
    /// queue's delete record and its messages' range delete cannot happen — both are one
    /// batch — but keep the op for tools).
    pub fn purge_orphans_op(queue: StoreQueueId) -> Op {
        Op::DeleteQueueMessages { queue }
    }
}

/// `".*"` for configure, write and read.
pub fn full_permission(user: &str, vhost: &str) -> PermissionRecord {
    PermissionRecord {
        user: user.into(),
        vhost: vhost.into(),
        configure: ".*".into(),
        write: ".*".into(),
        read: ".*".into(),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: &[u8]) -> CoreResult<T> {
    serde_json::from_slice(v).map_err(|e| CoreError::internal(format!("corrupt metadata: {e}")))
}
