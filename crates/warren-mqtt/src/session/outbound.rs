//! Deliveries to the client: which subscription a message came through, the PUBLISH
//! written for it, and the in-flight window until PUBACK / PUBCOMP settle it (MQTT-4.3,
//! MQTT-4.4).

use super::*;

impl Session {
    /// Writes a delivery from the session queue (or a shared-subscription queue) as PUBLISH:
    /// once per message however many subscriptions match (MQTT-3.3.4-2), at the highest
    /// granted QoS, with every matching subscription identifier (MQTT-3.3.4-3).
    /// Writes one delivery into the write buffer; the queue work it leaves that needs an
    /// await is added to `later`.
    pub(super) fn deliver(&mut self, d: Delivery, later: &mut Vec<FollowUp>) {
        let t = topic::to_mqtt(d.message.routing_key.as_str());
        let mut granted_qos = None;
        let mut sub_ids = Vec::new();
        let mut rap = false;
        if let Some(s) = Rare::of(&self.rare)
            .shared_subs
            .values()
            .find(|s| s.consumer == d.consumer && Arc::ptr_eq(&s.queue, &d.queue))
        {
            granted_qos = Some(s.qos);
            sub_ids.extend(s.id);
        } else {
            let from_self = matches!(header(&d.message, ORIGIN_HEADER),
                Some(AMQPValue::LongString(o)) if o.as_bytes() == self.client_id.as_bytes());
            // MQTT-4.7.2-1 ($-topics and leading wildcards) is applied here too: the AMQP
            // binding `#` matches `$SYS.x`, the MQTT filter `#` does not.
            for (f, s) in &self.subscriptions {
                if !topic::matches(f, &t) || (s.no_local && from_self) {
                    continue;
                }
                granted_qos = Some(granted_qos.unwrap_or(0).max(s.qos));
                sub_ids.extend(s.id);
                rap |= s.retain_as_published;
            }
            // In the order the client numbered its subscriptions, not the filters' order
            // (Paho C's test10/test11 expect 1 then 2).
            sub_ids.sort_unstable();
        }
        let expired = remaining_expiry(&d.message) == Some(0);
        let Some(granted_qos) = granted_qos.filter(|_| !expired) else {
            // No subscription wants it (no-local, `$` topic, literal `*`), or it expired.
            self.give_back_now(1, later);
            later.extend(d.queue.ack_now(&[d.seq]));
            return;
        };
        let qos = msg_qos(&d.message).min(granted_qos);
        // MQTT-3.3.1-12/13: RETAIN is kept only for retain-as-published subscriptions.
        let retain = rap
            && matches!(
                header(&d.message, RETAIN_HEADER),
                Some(AMQPValue::Boolean(true))
            );
        let msg = d.message.clone();
        if qos == 0 {
            self.give_back_now(1, later);
            later.extend(d.queue.ack_now(&[d.seq]));
            self.send_publish(Outgoing {
                topic: t,
                msg: &msg,
                qos: 0,
                retain,
                dup: false,
                pkid: None,
                track: None,
                sub_ids,
            });
        } else {
            let pkid = self.reused_pkid(&d);
            let sent = self.send_publish(Outgoing {
                topic: t,
                msg: &msg,
                qos,
                retain,
                dup: d.redelivered,
                pkid,
                track: Some((d.queue.clone(), d.seq)),
                sub_ids,
            });
            if !sent {
                self.give_back_now(1, later);
                later.extend(d.queue.ack_now(&[d.seq]));
            }
        }
    }

    /// The original packet id of a redelivery from the session queue (MQTT-4.4.0-1). A
    /// first delivery means the redeliveries are through (requeued messages go first), so
    /// the ids left reserved are of messages gone otherwise (expired, purged) and are freed.
    pub(super) fn reused_pkid(&mut self, d: &Delivery) -> Option<u16> {
        if Rare::of(&self.rare).reserved_ids.is_empty() || !self.is_own_queue(&d.queue) {
            return None;
        }
        if !d.redelivered {
            if let Some(r) = self.rare.as_mut() {
                r.reserved_ids.clear();
            }
            return None;
        }
        self.rare
            .as_mut()
            .and_then(|r| r.reserved_ids.remove(&d.seq.0))
    }

    /// Returns credit units; if the session was at the client's receive maximum, its
    /// queues may deliver again. The queue work that needs an await is added to `later`.
    pub(super) fn give_back_now(&mut self, n: u32, later: &mut Vec<FollowUp>) {
        if self.credit.give_back(n) {
            if let Some(q) = &self.queue {
                later.extend(q.kick_now());
            }
            for s in Rare::of(&self.rare).shared_subs.values() {
                later.extend(s.queue.kick_now());
            }
        }
    }

    /// Encodes a PUBLISH; false if it was dropped: over the client's Maximum Packet Size
    /// (MQTT-3.1.2-25: discarded as if sent), or a topic MQTT cannot carry.
    pub(super) fn send_publish(&mut self, o: Outgoing<'_>) -> bool {
        let q = match o.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let payload = o.msg.body.clone();
        let mut new_alias = None;
        let mut p = if self.version == 5 {
            let mut p = PublishPacket::new(o.topic, payload, q);
            v5_properties_of(o.msg, &mut p);
            if let Some(secs) = remaining_expiry(o.msg) {
                p.properties.set_message_expiry_interval(secs.max(1));
            }
            for id in &o.sub_ids {
                p.properties.set_subscription_identifier(*id);
            }
            // Server → client topic aliases when the client allows them (MQTT 5 §3.3.2.3.4).
            if self.client_alias_max > 0 {
                if let Some(a) = Rare::of(&self.rare).out_aliases.get(&p.topic_name) {
                    p.properties.set_topic_alias(*a);
                    p.topic_name.clear();
                } else if Rare::of(&self.rare).out_aliases.len()
                    < self.client_alias_max.min(64) as usize
                {
                    let a = Rare::of(&self.rare).out_aliases.len() as u16 + 1;
                    p.properties.set_topic_alias(a);
                    new_alias = Some(a);
                }
            }
            p
        } else {
            PublishPacket::new_v311(o.topic, payload, q)
        };
        p = p.with_retain(o.retain).with_dup(o.dup && o.qos > 0);
        let id = if o.qos > 0 {
            let id = o
                .pkid
                .filter(|id| !self.inflight.contains_key(id))
                .unwrap_or_else(|| self.next_pkid());
            p = p.with_packet_id(id);
            Some(id)
        } else {
            None
        };
        let before = self.out.len();
        if !codec::encode_publish(&p, &mut self.out) {
            return false;
        }
        if self.out.len() - before > self.client_max_packet {
            self.out.truncate(before);
            tracing::debug!(client_id = %self.client_id, "publish larger than the client's maximum packet size dropped");
            return false;
        }
        if let Some(a) = new_alias {
            Rare::get(&mut self.rare)
                .out_aliases
                .insert(p.topic_name, a);
        }
        if let Some(id) = id {
            let credit = o.track.is_some();
            self.inflight.insert(
                id,
                Inflight {
                    queue: o.track,
                    credit,
                    released: false,
                    qos: o.qos,
                },
            );
        }
        true
    }

    /// An acknowledgement of an outbound PUBLISH must be the one its QoS and state call
    /// for (PUBACK for QoS 1; PUBREC, then PUBCOMP after our PUBREL, for QoS 2); another
    /// is a protocol error that ends the connection, as Mosquitto ends it (MQTT-4.3). One
    /// for an id not in flight is let pass (it may answer a delivery of an earlier
    /// connection).
    pub(super) fn check_ack(
        &mut self,
        pkid: u16,
        kind: &str,
        fits: fn(&Inflight) -> bool,
    ) -> Result<(), End> {
        match self.inflight.get(&pkid) {
            Some(i) if !fits(i) => {
                let why = format!("{kind} for packet {pkid} sent at QoS {}", i.qos);
                self.protocol_error_quiet(&why);
                Err(End::ProtocolError)
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn settle(&mut self, pkid: u16) {
        FollowUp::run_all(self.settle_now(pkid)).await;
    }

    /// Settles an outbound delivery up to the awaits, which it returns (usually none).
    pub(super) fn settle_now(&mut self, pkid: u16) -> Vec<FollowUp> {
        let mut later = Vec::new();
        if let Some(i) = self.inflight.remove(&pkid) {
            self.finish_inflight_now(i, &mut later);
        }
        later
    }

    /// Acks the queue message of a finished delivery and returns its credit, up to the
    /// awaits, which are added to `later`.
    pub(super) fn finish_inflight_now(&mut self, i: Inflight, later: &mut Vec<FollowUp>) {
        if let Some((q, seq)) = i.queue {
            later.extend(q.ack_now(&[seq]));
        }
        if i.credit {
            self.give_back_now(1, later);
        }
    }

    /// Acks (`ack`) or requeues the queue message of a finished delivery and returns its
    /// credit.
    pub(super) async fn finish_inflight(&mut self, mut i: Inflight, ack: bool) {
        if !ack {
            if let Some((q, seq)) = i.queue.take() {
                q.requeue(&[seq]).await;
            }
        }
        let mut later = Vec::new();
        self.finish_inflight_now(i, &mut later);
        FollowUp::run_all(later).await;
    }
}
