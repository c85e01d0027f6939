//! SUBSCRIBE: each filter a binding of the session queue on `amq.topic` (or a shared
//! group's queue), created on the first subscription, with the retained messages it
//! matches.

use super::*;

impl Session {
    pub(super) async fn subscribe(
        &mut self,
        f: &TopicFilter,
        sub_id: Option<u32>,
        retained: &mut Vec<(String, Arc<Message>, u8, Vec<u32>)>,
    ) -> SubAckReasonCode {
        let filter = f.filter.as_str();
        let o = &f.options;
        let invalid = if self.version == 5 {
            SubAckReasonCode::TopicFilterInvalid
        } else {
            SubAckReasonCode::UnspecifiedError
        };
        let qos = (o.qos as u8).min(2);
        // Subscribing binds to amq.topic: read on the exchange (RabbitMQ's check).
        // And RabbitMQ's topic authorisation on the filter (without `$share/<group>/`).
        let plain = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
            None => filter,
        };
        if !self.may_use_topic_exchange(Access::Read) || !self.topic_allowed(Access::Read, plain) {
            return if self.version == 5 {
                SubAckReasonCode::NotAuthorized
            } else {
                SubAckReasonCode::UnspecifiedError
            };
        }
        if filter.starts_with("$share/") {
            // MQTT-3.8.3-4: no-local on a shared subscription is a protocol error; refuse
            // the filter rather than the connection.
            if o.no_local {
                return invalid;
            }
            return self.subscribe_shared(filter, qos, sub_id).await;
        }
        let Some(q) = self.ensure_queue().await else {
            return SubAckReasonCode::UnspecifiedError;
        };
        let key = topic::to_amqp(filter);
        let sub = Sub::new(
            qos,
            o.no_local,
            o.retain_as_published,
            sub_id,
            q.is_stored(),
        );
        // Re-subscribing replaces the subscription (MQTT-3.8.4-3): one binding per filter.
        let previous = self.subscriptions.get(filter).cloned();
        if let Some(prev) = &previous {
            let _ = self
                .vhost
                .unbind("amq.topic", Target::Queue(q.clone()), &key, &prev.args())
                .await;
        }
        if let Err(e) = self
            .vhost
            .bind(
                "amq.topic",
                Target::Queue(q),
                key.as_str().into(),
                sub.args(),
            )
            .await
        {
            tracing::warn!(error = %e, "mqtt subscribe failed");
            return SubAckReasonCode::UnspecifiedError;
        }
        if self.subscriptions.is_empty() {
            // Room for one, not four: most devices subscribe to one filter.
            self.subscriptions = LiteMap::with_capacity(1);
        }
        self.subscriptions.insert(filter.to_owned(), sub);
        // MQTT 5 §3.8.3.1 retain handling: 0 always, 1 only for a new subscription, 2
        // never (3.1.1: always).
        let send_retained = match o.retain_handling as u8 {
            0 => true,
            1 => previous.is_none(),
            _ => false,
        };
        if send_retained {
            for (t, m) in self.shared.retained_matching(&self.vhost.name, filter) {
                if remaining_expiry(&m) == Some(0) {
                    continue;
                }
                let mq = msg_qos(&m).min(qos);
                retained.push((t, m, mq, sub_id.into_iter().collect()));
            }
        }
        granted(qos)
    }

    /// The session queue, declared on first use: exclusive and auto-delete for a session
    /// that ends with the connection, durable for a persistent one.
    pub(super) async fn ensure_queue(&mut self) -> Option<Arc<Queue>> {
        if let Some(q) = self.queue.as_ref().filter(|q| !q.is_deleted()) {
            return Some(q.clone());
        }
        let persistent = self.session_expiry > 0;
        let declared = self
            .vhost
            .declare_queue(
                QueueDecl {
                    name: queue_name(&self.client_id).as_str().into(),
                    passive: false,
                    durable: persistent,
                    exclusive: !persistent,
                    auto_delete: !persistent,
                    arguments: FieldTable::default(),
                },
                self.id,
            )
            .await;
        match declared {
            Ok((q, _)) => {
                self.attach(q.clone()).await;
                Some(q)
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, client_id = %self.client_id, error = %e, "mqtt session queue unavailable");
                None
            }
        }
    }

    /// A consumer of this session (acknowledged deliveries, credit shared by the session).
    pub(super) fn consumer_spec(&self, tag: &str) -> (ConsumerId, ConsumerSpec) {
        let id = ConsumerId::next();
        let spec = ConsumerSpec {
            id,
            tag: Arc::from(tag),
            token: 0,
            owner: self.id,
            no_ack: false,
            exclusive: false,
            priority: 0,
            prefetch: 0,
            channel_credit: self.credit.clone(),
            outbox: self.outbox.clone(),
            stream_start: None,
            arguments: Default::default(),
        };
        (id, spec)
    }

    /// Makes `queue` the session queue and consumes from it.
    pub(super) async fn attach(&mut self, queue: Arc<Queue>) {
        let (consumer, spec) = self.consumer_spec("mqtt");
        if queue.add_consumer(spec).await.is_ok() {
            self.consumer = Some(consumer);
        }
        self.queue = Some(queue);
    }

    /// `$share/<group>/<filter>`: competing consumers on one queue per group and filter
    /// (MQTT 5 §4.8.2, see [`shared_sub`]). No retained messages are sent for it (MQTT 5
    /// §4.8.2). A persistent session's record lists it, stored before the SUBACK.
    pub(super) async fn subscribe_shared(
        &mut self,
        full: &str,
        qos: u8,
        sub_id: Option<u32>,
    ) -> SubAckReasonCode {
        // MQTT-4.8.2-1/2: a non-empty group name without wildcards, then a filter.
        let parts = shared_sub::split(full);
        if parts
            .and_then(|(g, f)| shared_sub::queue_name(g, f))
            .is_none()
        {
            return if self.version == 5 {
                SubAckReasonCode::TopicFilterInvalid
            } else {
                SubAckReasonCode::UnspecifiedError
            };
        }
        if !self.join_shared(full, qos, sub_id).await {
            return SubAckReasonCode::UnspecifiedError;
        }
        let t = self.persist().await;
        self.wait(t).await;
        granted(qos)
    }

    /// Joins the group of `full` and consumes from its queue: a new subscription, one
    /// that replaces it (MQTT-3.8.4-3), or one restored with its session.
    pub(super) async fn join_shared(&mut self, full: &str, qos: u8, id: Option<u32>) -> bool {
        if let Some(old) = self.rare.as_mut().and_then(|r| r.shared_subs.remove(full)) {
            old.queue.remove_consumer(old.consumer).await;
        }
        let groups = &self.shared.groups;
        let persistent = self.session_expiry > 0;
        let joined = groups
            .join(&self.vhost, self.id, &self.client_id, full, persistent)
            .await;
        if let Some(queue) = joined {
            let (consumer, spec) = self.consumer_spec("mqtt-shared");
            if queue.add_consumer(spec).await.is_ok() {
                Rare::get(&mut self.rare).shared_subs.insert(
                    full.to_owned(),
                    SharedSub {
                        queue,
                        consumer,
                        qos,
                        id,
                    },
                );
                return true;
            }
        }
        groups.leave(&self.vhost, &self.client_id, &[full]).await;
        false
    }
}
