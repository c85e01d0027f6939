//! CONNECT: authentication, the client id, taking over or resuming a session (MQTT-3.1.4),
//! and the CONNACK with what 5.0 clients are told about the server's limits.

use super::*;

/// A connection whose CONNECT was accepted.
pub(super) struct Connected<S> {
    pub(super) session: Session,
    pub(super) deliveries: warren_core::Deliveries,
    pub(super) rd: tokio::io::ReadHalf<S>,
    pub(super) wr: tokio::io::WriteHalf<S>,
    pub(super) rbuf: BytesMut,
}

/// A connection before CONNECT: what [`run`] starts from.
pub(crate) struct Accepted<S> {
    pub socket: S,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub auth: ConnectionAuth,
    pub shared: Arc<Shared>,
    pub cfg: Arc<MqttConfig>,
    pub shutdown: watch::Receiver<bool>,
}

/// Reads and answers CONNECT.
pub(super) async fn connect<S>(a: Accepted<S>) -> Option<Connected<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        socket,
        peer,
        local,
        auth,
        shared,
        cfg,
        shutdown,
    } = a;
    let (mut rd, mut wr) = tokio::io::split(socket);
    // Small at first: an idle connection keeps this buffer (docs/PERFORMANCE.md); it grows
    // to the packet being read, bounded by `max_packet_size`.
    let mut rbuf = BytesMut::with_capacity(128);
    // MQTT-3.1.0-1: the first packet must be CONNECT, within the connect timeout.
    let connect = match tokio::time::timeout(cfg.connect_timeout, async {
        loop {
            match codec::decode(&mut rbuf, 0, cfg.max_packet_size) {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            match rd.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    })
    .await
    {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Err(CodecError::UnsupportedLevel(level))) => {
            // MQTT-3.1.2-2: CONNACK 0x01 (unacceptable protocol level), then close.
            tracing::debug!(%peer, level, "mqtt: unsupported protocol level");
            let _ = wr.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "mqtt: bad first packet");
            return None;
        }
        // MQTT-3.1.0-1: anything else first closes the connection.
        _ => return None,
    };
    let (session, deliveries) =
        connect_session(&mut wr, peer, local, &auth, shared, cfg, connect).await?;
    close_if_shutting_down(&session, &shutdown);
    Some(Connected {
        session,
        deliveries,
        rd,
        wr,
        rbuf,
    })
}

/// CONNECT handling (MQTT-3.1.4): checks, auth, takeover, the session queue, CONNACK.
pub(super) async fn connect_session<W: AsyncWrite + Unpin>(
    socket: &mut W,
    peer: SocketAddr,
    local: SocketAddr,
    auth: &ConnectionAuth,
    shared: Arc<Shared>,
    cfg: Arc<MqttConfig>,
    c: Box<ConnectPacket>,
) -> Option<(Session, warren_core::Deliveries)> {
    // Taken boxed: moving out of the decoder's box in `run` would keep its allocation for
    // the connection's whole life; here it is freed when connecting ends.
    let c = *c;
    let level = c.protocol_version;
    // MQTT 3.1 (level 3) is decoded as 3.1.1 and answered as 3.1.1 (same CONNACK).
    let version = if level == 3 { 4 } else { level };
    let refuse = |code: ReasonCode| {
        let mut out = BytesMut::new();
        if version == 5 {
            codec::encode(&ConnAckPacket::new(false, code), &mut out);
        } else {
            codec::encode(&ConnAckPacket::new_v311(false, code), &mut out);
        }
        out
    };
    // MQTT-3.1.3-7/8: an empty client id needs a clean session (3.1.1); 5.0 assigns one.
    // MQTT 3.1 has no empty ids: identifier rejected, as Mosquitto answers. The 3.1 limit
    // of 23 characters is not enforced (as in RabbitMQ).
    let mut assigned = None;
    let client_id = if c.client_id.is_empty() {
        if (version == 4 && !c.clean_start) || level == 3 {
            let _ = socket
                .write_all(&refuse(ReasonCode::ClientIdentifierNotValid))
                .await;
            return None;
        }
        let id = assigned_client_id();
        assigned = Some(id.clone());
        id
    } else if c.client_id.contains('\0') {
        // NUL separates the parts of store keys.
        let _ = socket
            .write_all(&refuse(ReasonCode::ClientIdentifierNotValid))
            .await;
        return None;
    } else {
        c.client_id.clone()
    };
    // MQTT-4.7.3-1 / MQTT-3.3.2-2: a will topic is a topic name, at least one character and
    // no wildcards. Like Mosquitto, the connection closes without a CONNACK.
    if let Some(w) = &c.will {
        if w.topic.is_empty() || w.topic.contains(['+', '#']) {
            tracing::info!(%peer, topic = %w.topic, "mqtt will topic is not a valid topic name");
            return None;
        }
    }
    // Session lifetime: 3.1.1 clean session ↔ 5.0 clean start + session expiry interval
    // (MQTT-3.1.2-11: absent = 0; 0xFFFFFFFF = never).
    let session_expiry = if version == 5 {
        c.properties.get_session_expiry_interval().unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        NEVER
    };
    // MQTT-3.1.2-21/22 (5.0 §3.1.2.11): the client's limits on what it receives.
    let client_receive_max = c.properties.get_receive_maximum().unwrap_or(u16::MAX);
    let client_max_packet = c
        .properties
        .get_maximum_packet_size()
        .map(|m| m as usize)
        .unwrap_or(usize::MAX);
    if version == 5 && (client_receive_max == 0 || client_max_packet == 0) {
        // Receive Maximum / Maximum Packet Size 0 is a protocol error.
        let _ = socket.write_all(&refuse(ReasonCode::ProtocolError)).await;
        return None;
    }
    // MQTT-4.12.0-1: no enhanced authentication method is supported, so a CONNECT that
    // names one gets 0x8C Bad Authentication Method (as in Mosquitto without plugins).
    if version == 5 && c.properties.get_authentication_method().is_some() {
        tracing::info!(%peer, "mqtt enhanced authentication refused: no method supported");
        let _ = socket
            .write_all(&refuse(ReasonCode::BadAuthenticationMethod))
            .await;
        return None;
    }
    // Credentials: `vhost:user` selects the vhost, as RabbitMQ's MQTT plugin does; no
    // username means the client certificate's user (RabbitMQ's mqtt.ssl_cert_login),
    // else the configured default user (mqtt.default_user). A username always wins.
    // An empty user name without a password (or with an empty one) is no user name, as
    // Mosquitto takes it: some clients always set the flags.
    let username = c
        .username
        .as_ref()
        .filter(|u| !(u.is_empty() && c.password.as_deref().is_none_or(|p| p.is_empty())));
    let (vhost_name, user, pass) = match username {
        Some(u) => {
            let (vh, user) = match u.split_once(':') {
                Some((vh, user)) => (vh.to_owned(), user.to_owned()),
                None => (cfg.default_vhost.clone(), u.clone()),
            };
            let pass = c
                .password
                .as_deref()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            (vh, user, Some(pass))
        }
        None => match &auth.cert_user {
            Some(user) => (cfg.default_vhost.clone(), user.clone(), None),
            None if cfg.allow_anonymous => (
                cfg.default_vhost.clone(),
                cfg.default_user.clone(),
                Some(cfg.default_pass.clone()),
            ),
            None => {
                let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
                return None;
            }
        },
    };
    let login = match &pass {
        Some(pass) => shared.broker.authenticate(&user, pass, peer.ip()),
        None => shared.broker.authenticate_external(&user, peer.ip()),
    };
    // A refused login is CONNACK 4 / 0x86, as RabbitMQ's (its TLS tests expect the same
    // for a certificate user that does not exist).
    if let Err(e) = login {
        tracing::warn!(%peer, error = %e, "mqtt login refused");
        let _ = socket
            .write_all(&refuse(ReasonCode::BadUsernameOrPassword))
            .await;
        return None;
    }
    let Some(vhost) = shared.broker.vhost(&vhost_name) else {
        let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
        return None;
    };
    // No permissions in the vhost: CONNACK 5 / 0x87, as RabbitMQ's MQTT plugin.
    if shared
        .broker
        .check_vhost_access(&user, &vhost_name)
        .is_err()
    {
        tracing::warn!(%peer, %user, vhost = %vhost_name, "mqtt vhost access refused");
        let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
        return None;
    }
    // Vhost and user connection limits: 5.0 says so (0x97 Quota exceeded); 3.1.1 has only
    // "not authorised" (5), which RabbitMQ's MQTT plugin answers.
    if let Err(e) = shared.broker.check_connection_limits(&user, &vhost_name) {
        tracing::warn!(%peer, %user, vhost = %vhost_name, error = %e, "mqtt connection limit reached");
        let code = if version == 5 {
            ReasonCode::QuotaExceeded
        } else {
            ReasonCode::NotAuthorized
        };
        let _ = socket.write_all(&refuse(code)).await;
        return None;
    }
    // The will is a publish the client asks for now: RabbitMQ's MQTT plugin checks its
    // topic at CONNECT (write on amq.topic, then the topic permission) and answers
    // CONNACK 5 / 0x87.
    if let Some(w) = &c.will {
        if !will_allowed(&shared.broker, &user, &vhost_name, &client_id, &w.topic) {
            tracing::warn!(%peer, %user, topic = %w.topic, "mqtt will topic refused");
            let _ = socket.write_all(&refuse(ReasonCode::NotAuthorized)).await;
            return None;
        }
    }
    let id = ConnectionId::next();
    let registration = shared.broker.connections().register(ConnectionInfo {
        id,
        protocol: if version == 5 {
            "MQTT 5.0".into()
        } else {
            "MQTT 3.1.1".into()
        },
        user: user.clone(),
        vhost: vhost_name.clone(),
        peer,
        local,
        client_properties: warren_core::ClientProperties::plugin(
            "MQTT client",
            Some(client_id.as_str()),
        ),
        auth_mechanism: None,
        tuning: None,
        tls: auth.tls.clone(),
    });
    // Session takeover (MQTT-3.1.4-2): the older connection with this client id goes.
    let key = format!("{vhost_name}\0{client_id}");
    let previous = shared.sessions.lock().insert(key.clone(), id);
    let qname = queue_name(&client_id);
    if let Some(old) = previous {
        // Through the connection registry, like a close from the management API; the
        // reason tells the old connection to answer 0x8E.
        if let Some(e) = shared.broker.connections().get(old) {
            e.request_close(if c.clean_start {
                TAKEN_OVER_REASON
            } else {
                TAKEN_OVER_RESUMED
            });
        }
        // Wait for it to end (it may be closing already, for a DISCONNECT read before
        // this CONNECT): to release or delete its queue and hand over its session state
        // (parked below, even when it had no queue: MQTT-3.2.2-2). Bounded: a connection
        // stuck writing to a dead peer does not hold its client id for long.
        // It leaves the registry only after its close has released the session.
        for _ in 0..200 {
            if shared.broker.connections().get(old).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // A parked session is resumed (or, with clean start, discarded): its timers stop.
    let mut parked = shared.parked.lock().remove(&key);
    // One past its expiry is gone, though its timer may not have run yet (a reconnect in
    // that instant found it, 1 in 31 in a Mosquitto-suite loop): its will goes now, and
    // the session starts anew.
    let now = now_ms();
    let expired = |p: &mut Parked| {
        p.record.expiry != NEVER
            && now >= (p.record.disconnected_at).saturating_add(u64::from(p.record.expiry) * 1000)
    };
    if let Some(p) = parked.take_if(expired) {
        if let Some(w) = p
            .record
            .will
            .as_ref()
            .and_then(|w| PendingWill::from_stored(w, now))
        {
            publish_will(&shared, &vhost, w.msg, w.retain).await;
        }
        let _ = vhost.delete_queue(&qname, None, false, false).await;
        leave_groups(&shared, &vhost, &client_id, &p.record).await;
        let _ = shared
            .broker
            .store_mqtt_session(&vhost_name, &client_id, None)
            .await;
    }
    // MQTT-3.1.2-4 / 3.1.2-5: clean start discards any existing session.
    let parked_record = parked.is_some();
    let had_session = parked_record || vhost.queue(&qname).is_ok();
    let mut record = parked.map(|p| p.record).unwrap_or_default();
    if c.clean_start {
        let _ = vhost.delete_queue(&qname, None, false, false).await;
        leave_groups(&shared, &vhost, &client_id, &record).await;
        if had_session {
            let _ = shared
                .broker
                .store_mqtt_session(&vhost_name, &client_id, None)
                .await;
        }
        record = SessionRecord::default();
    }
    // The session queue exists once the session has subscribed (it is created on the
    // first SUBSCRIBE, as in RabbitMQ): a device that only publishes holds no queue.
    let existing = vhost.queue(&qname).ok().filter(|q| !q.is_deleted());
    let had_record = parked_record && !c.clean_start;
    let existed = existing.is_some() || had_record;
    if !existed {
        // A new session starts without QoS 2 state.
        record = SessionRecord::default();
    }
    // MQTT-3.2.2-2/3: Session Present only when an existing session is resumed. MQTT 3.1
    // has no such flag: the byte is reserved, 0.
    let session_present = !c.clean_start && existed && level != 3;
    let mut out = BytesMut::new();
    if version == 5 {
        // Only what differs from the defaults, as Mosquitto: absent Retain, Wildcard,
        // Subscription Identifier and Shared Subscription Available mean 1 (MQTT 5
        // §3.2.2.3), and a CONNACK of 16 bytes fits a client's small Maximum Packet Size
        // (Mosquitto's 12-prop-maximum-packet-size-publish sets 20). No Maximum QoS:
        // absent means QoS 2 is supported, and 2 is not a value the property may take
        // (§3.2.2.3.4; clients treat it as a protocol error).
        codec::encode_connack_v5(
            &codec::ConnAckV5 {
                session_present,
                topic_alias_maximum: cfg.topic_alias_maximum,
                assigned_client_id: assigned.as_deref(),
                receive_maximum: cfg.receive_maximum,
                maximum_packet_size: cfg.max_packet_size.min(u32::MAX as usize) as u32,
            },
            &mut out,
        );
    } else {
        let ack = ConnAckPacket::new_v311(session_present, ReasonCode::Success);
        codec::encode(&ack, &mut out);
    }
    // MQTT-3.1.2-24: nothing larger than the client's Maximum Packet Size is sent; without
    // its CONNACK the connection closes, as Mosquitto closes it.
    if out.len() > client_max_packet || socket.write_all(&out).await.is_err() {
        let mut sessions = shared.sessions.lock();
        if sessions.get(&key).is_some_and(|i| *i == id) {
            sessions.remove(&key);
        }
        return None;
    }
    let will = c.will.as_ref().and_then(|w| {
        let mut msg = mqtt_message(&w.topic, Bytes::from(w.payload.clone()), w.qos as u8)?;
        if version == 5 {
            let mut props = mqtt5_protocol::Properties::default();
            w.properties.apply_to_publish_properties(&mut props);
            map_v5_properties(&props, &mut msg.properties);
        }
        set_origin(&mut msg, &client_id, w.retain);
        Some(PendingWill {
            msg: Arc::new(msg),
            retain: w.retain,
            delay: Duration::from_secs(w.properties.will_delay_interval.unwrap_or(0) as u64),
        })
    });
    let credit = Arc::new(Credit::default());
    credit.limit.store(
        u32::from(client_receive_max.min(cfg.max_inflight).max(1)),
        std::sync::atomic::Ordering::Relaxed,
    );
    let (outbox, deliveries) = Outbox::new(cfg.max_inflight as usize * 2);
    let mut s = Session {
        registration,
        publish_allowed: None,
        topic_perms: None,
        shared,
        cfg: cfg.clone(),
        id,
        peer,
        // MQTT 3.1 sessions keep level 3 for the decoder's DUP leniency; everything else
        // treats them as 3.1.1.
        version: level.min(version),
        client_id,
        vhost,
        queue: None,
        consumer: None,
        outbox,
        credit,
        out: BytesMut::new(),
        subscriptions: LiteMap::new(),
        rare: None,
        inflight: BTreeMap::new(),
        next_pkid: 1,
        incoming_qos2: record.incoming_qos2.clone(),
        will,
        session_expiry,
        connect_expiry: session_expiry,
        keep_alive: c.keep_alive,
        client_max_packet,
        client_alias_max: if version == 5 && cfg.outbound_topic_aliases {
            c.properties.get_topic_alias_maximum().unwrap_or(0)
        } else {
            0
        },
    };
    if let Some(queue) = &existing {
        // Restore the subscriptions of a resumed session from its bindings.
        for (_, b) in s.vhost.bindings() {
            if matches!(&b.target, Target::Queue(q) if Arc::ptr_eq(q, queue)) {
                s.subscriptions.insert(
                    topic::filter_to_mqtt(b.routing_key.as_str()),
                    Sub::from_args(b.arguments.clone()),
                );
            }
        }
    }
    if existed {
        // Shared subscriptions are the group's bindings: the record names them.
        for sub in &record.shared_subs {
            if !s.join_shared(&sub.filter, sub.qos, sub.id).await {
                tracing::warn!(client_id = %s.client_id, filter = %sub.filter, "mqtt shared subscription not restored");
            }
        }
        // MQTT-4.4.0-1: unacknowledged PUBLISHes go again with their original ids.
        if !record.outgoing_unacked.is_empty() {
            Rare::get(&mut s.rare).reserved_ids = record.outgoing_unacked.iter().copied().collect();
        }
        // MQTT-4.4.0-1: PUBREL again for outbound QoS 2 messages the client has (PUBREC
        // seen) but whose PUBCOMP never came.
        for pkid in &record.outgoing_pubrel {
            s.inflight.insert(
                *pkid,
                Inflight {
                    queue: None,
                    credit: false,
                    released: true,
                    qos: 2,
                },
            );
            codec::encode(&PubRelPacket::new(*pkid), &mut s.out);
        }
    }
    if s.session_expiry > 0 {
        // Connected: the record says so (a crash counts from the restart).
        s.persist().await;
    } else if had_session && !c.clean_start {
        // Resumed with expiry 0: the session ends with this connection; its old record
        // (and any delayed will in it) must not outlive it in the store.
        let _ = s
            .shared
            .broker
            .store_mqtt_session(&s.vhost.name, &s.client_id, None)
            .await;
    }
    if let Some(queue) = existing {
        s.attach(queue).await;
    }
    tracing::info!(%peer, client_id = %s.client_id, level, session_expiry, session_present, "mqtt connection opened");
    Some((s, deliveries))
}

/// A client id for a 5.0 client that sent none (MQTT-3.1.3-6): `auto-` and a random UUID,
/// as Mosquitto assigns them.
pub(super) fn assigned_client_id() -> String {
    let r: [u8; 16] = rand::random();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    format!(
        "auto-{}-{}-{}-{}-{}",
        hex(&r[..4]),
        hex(&r[4..6]),
        hex(&r[6..8]),
        hex(&r[8..10]),
        hex(&r[10..])
    )
}

/// The session queue: RabbitMQ's name, `mqtt-subscription-<client id>qos1`, while it fits
/// an AMQP short string. A longer client id (MQTT allows 65,535 bytes, and Mosquitto takes
/// them) keeps its first 180 bytes and adds a digest of the whole id, so the name stays
/// one per client id and readable in the management API.
pub(super) fn queue_name(client_id: &str) -> String {
    let name = format!("mqtt-subscription-{client_id}qos1");
    if name.len() <= MAX_SHORT {
        return name;
    }
    let mut cut = 180;
    while !client_id.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = sha2::Sha256::digest(client_id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("mqtt-subscription-{}~{hex}qos1", &client_id[..cut])
}
