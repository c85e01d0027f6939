//! PUBLISH from the client: checks (topic aliases, permissions, reserved topics), routing
//! through `amq.topic`, and the acknowledgement once the message is safe (MQTT-4.3).

use super::*;

impl Session {
    /// A PUBLISH up to where it needs an await: checked, routed and, for a QoS 0/1
    /// message whose enqueues write nothing to the store, acknowledged. Retained and
    /// QoS 2 messages, and enqueues that need the store, come back as [`PublishLater`].
    pub(super) fn publish_now(
        &mut self,
        mut p: PublishPacket,
    ) -> Result<Option<PublishLater>, End> {
        let qos = p.qos as u8;
        let mut topic_name = std::mem::take(&mut p.topic_name);
        if self.version == 5 {
            if let Some(alias) = p.properties.get_topic_alias() {
                // MQTT-3.3.2-8/9: alias 0 or above our Topic Alias Maximum.
                if alias == 0 || alias > self.cfg.topic_alias_maximum {
                    self.protocol_error(rc::TOPIC_ALIAS_INVALID, "topic alias out of range");
                    return Err(End::ProtocolError);
                }
                if topic_name.is_empty() {
                    match Rare::of(&self.rare).topic_aliases.get(&alias) {
                        Some(t) => topic_name = t.clone(),
                        None => {
                            // MQTT-3.3.4-? : an alias never set is a protocol error.
                            self.protocol_error(rc::PROTOCOL_ERROR, "unknown topic alias");
                            return Err(End::ProtocolError);
                        }
                    }
                } else {
                    Rare::get(&mut self.rare)
                        .topic_aliases
                        .insert(alias, topic_name.clone());
                }
            }
        }
        // MQTT-3.3.2-2: no wildcards in a topic name; MQTT-4.7.3-1: not empty.
        if !mqtt5_protocol::is_valid_topic_name(&topic_name) {
            let why = format!("invalid topic name {topic_name:?}");
            self.protocol_error(rc::TOPIC_NAME_INVALID, &why);
            return Err(End::ProtocolError);
        }
        if qos == 2 {
            if let Some(id) = p.packet_id {
                if self.incoming_qos2.contains(&id) {
                    // A duplicate before PUBREL: acknowledged, not routed again (exactly once,
                    // MQTT-4.3.3-? method B); this survives restarts through the record.
                    codec::encode(&PubRecPacket::new(id), &mut self.out);
                    return Ok(None);
                }
                // MQTT-3.3.4-8: more unreleased QoS 2 publishes than our Receive Maximum.
                // 3.1.1 has no such limit; its 16-bit packet ids bound the set anyway.
                if self.version == 5
                    && self.incoming_qos2.len() >= self.cfg.receive_maximum as usize
                {
                    self.protocol_error(rc::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded");
                    return Err(End::ProtocolError);
                }
            }
        }
        // Publishing needs write on amq.topic (RabbitMQ's MQTT plugin). 5.0 answers a
        // QoS ≥ 1 publish with 0x87 and drops it; 3.1.1 has no negative ack, so the
        // connection closes, as in RabbitMQ.
        // Topic permissions on the routing key answer the same way (RabbitMQ's MQTT plugin).
        if !self.may_publish() || !self.topic_allowed(Access::Write, &topic_name) {
            tracing::info!(client_id = %self.client_id, user = %self.user(), topic = %topic_name, "mqtt publish refused: no write permission");
            if self.version != 5 {
                return Err(End::ProtocolError);
            }
            if let Some(id) = p.packet_id {
                self.ack_publish(qos, id, rc::NOT_AUTHORIZED);
            }
            return Ok(None);
        }
        // Clients may not publish to `$SYS/` (but a bridge's connection state topic) or
        // to `$share/` names, as Mosquitto refuses them: 0x87 in 5.0, dropped
        // with a plain acknowledgement in 3.1.1.
        if reserved_topic(&topic_name) {
            tracing::debug!(client_id = %self.client_id, topic = %topic_name, "mqtt publish to a reserved topic dropped");
            if let Some(id) = p.packet_id {
                self.ack_publish(qos, id, rc::NOT_AUTHORIZED);
            }
            return Ok(None);
        }
        let Some(mut msg) = mqtt_message(&topic_name, p.payload.clone(), qos) else {
            let why = format!("topic name with more than {MAX_TOPIC_DEPTH} levels");
            // Mosquitto 2.0's answer (03-publish-long-topic).
            self.protocol_error(rc::PROTOCOL_ERROR, &why);
            return Err(End::ProtocolError);
        };
        if self.version == 5 {
            map_v5_properties(&p.properties, &mut msg.properties);
        }
        set_origin(&mut msg, &self.client_id, p.retain);
        let msg = Arc::new(msg);
        let packet_id = p.packet_id;
        if p.retain || qos == 2 {
            return Ok(Some(PublishLater::Stored {
                msg,
                topic_name,
                retain: p.retain,
                qos,
                packet_id,
            }));
        }
        let delivered = self
            .vhost
            .exchange("amq.topic")
            .and_then(|x| self.vhost.deliver_now(self.vhost.route(&x, &msg), msg));
        Ok(match delivered {
            Ok(Ok(o)) => match o.ticket {
                // PUBACK only once a durable copy is synced.
                Some(ticket) if qos > 0 => Some(PublishLater::Synced {
                    ticket,
                    routed: o.routed,
                    qos,
                    packet_id,
                }),
                _ => {
                    self.acknowledge_publish(qos, packet_id, o.routed);
                    None
                }
            },
            Ok(Err(unfinished)) => Some(PublishLater::Deliver {
                unfinished,
                qos,
                packet_id,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "mqtt publish failed");
                self.acknowledge_publish(qos, packet_id, 0);
                None
            }
        })
    }

    /// The awaiting rest of a PUBLISH (see [`Session::publish_now`]).
    pub(super) async fn publish_later(&mut self, later: PublishLater) -> Result<(), End> {
        let (ticket, routed, qos, packet_id) = match later {
            PublishLater::Stored {
                msg,
                topic_name,
                retain,
                qos,
                packet_id,
            } => {
                let retained_ticket = if retain {
                    self.shared
                        .retain(&self.vhost.name, &topic_name, msg.clone())
                        .await
                } else {
                    None
                };
                let (mut ticket, routed) = match self.vhost.publish("amq.topic", msg).await {
                    Ok(o) => (o.ticket.max(retained_ticket), o.routed),
                    Err(e) => {
                        tracing::warn!(error = %e, "mqtt publish failed");
                        (retained_ticket, 0)
                    }
                };
                if qos == 2 {
                    if let Some(id) = packet_id {
                        self.incoming_qos2.push(id);
                        ticket = ticket.max(self.persist().await);
                    }
                }
                (ticket, routed, qos, packet_id)
            }
            PublishLater::Deliver {
                unfinished,
                qos,
                packet_id,
            } => match self.vhost.finish_delivery(unfinished).await {
                Ok(o) => (o.ticket, o.routed, qos, packet_id),
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt publish failed");
                    (None, 0, qos, packet_id)
                }
            },
            PublishLater::Synced {
                ticket,
                routed,
                qos,
                packet_id,
            } => (Some(ticket), routed, qos, packet_id),
        };
        if qos > 0 {
            // PUBACK/PUBREC only once a durable copy (and the QoS 2 id) is synced.
            self.wait(ticket).await;
        }
        self.acknowledge_publish(qos, packet_id, routed);
        Ok(())
    }

    /// PUBACK / PUBREC for a routed QoS 1 / 2 PUBLISH.
    pub(super) fn acknowledge_publish(&mut self, qos: u8, packet_id: Option<u16>, routed: usize) {
        if let (1 | 2, Some(id)) = (qos, packet_id) {
            // MQTT 5 §3.4.2.1: 0x10 tells the sender nobody was subscribed (accepted all
            // the same), as Mosquitto answers a QoS 1 PUBLISH (its PUBREC stays plain).
            let code = if routed == 0 && qos == 1 {
                rc::NO_MATCHING_SUBSCRIBERS
            } else {
                0
            };
            self.ack_publish(qos, id, code);
        }
    }

    /// Write on `amq.topic`, checked once per permission change rather than per publish.
    pub(super) fn may_publish(&mut self) -> bool {
        let generation = self.shared.broker.permissions_generation();
        match self.publish_allowed {
            Some((g, ok)) if g == generation => ok,
            _ => {
                let ok = self.may_use_topic_exchange(Access::Write);
                self.publish_allowed = Some((generation, ok));
                ok
            }
        }
    }

    /// RabbitMQ's topic authorisation for an MQTT topic or filter: the AMQP routing key
    /// (`/`→`.`, `+`→`*`) against the user's rule for `amq.topic`, with `{client_id}`
    /// expanded. The rules are re-read only when the permissions change, and the key is
    /// built only if a rule exists, so an unrestricted publish allocates nothing here.
    pub(super) fn topic_allowed(&mut self, access: Access, mqtt_topic: &str) -> bool {
        let generation = self.shared.broker.permissions_generation();
        if self
            .topic_perms
            .as_ref()
            .is_none_or(|(g, _)| *g != generation)
        {
            let tp = self
                .shared
                .broker
                .topic_permissions_of(&self.vhost.name, self.user())
                .map(|tp| {
                    if tp.per_client() {
                        Arc::new(tp.for_client(&self.client_id))
                    } else {
                        tp
                    }
                });
            self.topic_perms = Some((generation, tp));
        }
        let Some((_, Some(tp))) = &self.topic_perms else {
            return true;
        };
        if !tp.covers(TOPIC_EXCHANGE) {
            return true;
        }
        let key = topic::to_amqp(mqtt_topic);
        let ok = tp.allows(TOPIC_EXCHANGE, access, &key);
        if !ok {
            let e = warren_core::topic_permissions::refused(
                access,
                &key,
                TOPIC_EXCHANGE,
                &self.vhost.name,
                self.user(),
            );
            tracing::warn!(client_id = %self.client_id, "MQTT topic access refused: {e}");
        }
        ok
    }

    /// RabbitMQ's MQTT checks: write on `amq.topic` to publish, read to subscribe.
    pub(super) fn may_use_topic_exchange(&self, access: Access) -> bool {
        self.shared
            .broker
            .check_permission(
                self.user(),
                &self.vhost.name,
                access,
                ResourceKind::Exchange,
                "amq.topic",
            )
            .is_ok()
    }
}
