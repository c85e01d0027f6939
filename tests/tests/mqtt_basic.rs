//! MQTT 3.1.1 with rumqttc against an in-process Warren, and MQTT ↔ AMQP through amq.topic.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};

fn opts(b: &TestBroker, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, b.mqtt_addr.ip().to_string(), b.mqtt_addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// Polls until CONNACK; returns the event loop (keep polling it to make progress).
async fn connect(o: MqttOptions) -> (AsyncClient, EventLoop) {
    let (c, mut el) = AsyncClient::new(o, 100);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .expect("connack in time")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return (c, el),
            Ok(_) => {}
            Err(e) => panic!("mqtt connect failed: {e}"),
        }
    }
}

/// Polls the event loop until a PUBLISH arrives (10 s in all: keep-alive pings must not
/// keep a missing message waiting for ever).
async fn next_publish(el: &mut EventLoop) -> rumqttc::Publish {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(e) => panic!("mqtt connection failed: {e}"),
            }
        }
    })
    .await
    .expect("publish in time")
}

/// Polls until a PUBACK: the broker has routed (and, if durable, synced) the publish.
async fn wait_puback(el: &mut EventLoop) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .expect("puback in time")
        {
            Ok(Event::Incoming(Packet::PubAck(_))) => return,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// Polls until a SUBACK: the subscription's binding exists.
async fn wait_suback(el: &mut EventLoop) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .expect("suback in time")
        {
            Ok(Event::Incoming(Packet::SubAck(_))) => return,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

/// Polls for `ms` and fails on any PUBLISH.
async fn no_publish(el: &mut EventLoop, ms: u64) {
    let end = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(r) = tokio::time::timeout_at(end, el.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = r {
            panic!("unexpected publish on {}", p.topic);
        }
    }
}

/// Drives an event loop in the background (for clients that only publish).
fn drive(mut el: EventLoop) {
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_between_mqtt_clients() {
    let b = start().await;
    let (sub, mut sel) = connect(opts(&b, "sub")).await;
    sub.subscribe("sensors/+/temp", QoS::ExactlyOnce)
        .await
        .unwrap();
    // SUBACK
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(a))) = sel.poll().await {
            assert_eq!(a.return_codes.len(), 1);
            break;
        }
    }
    let (publ, pel) = connect(opts(&b, "pub")).await;
    drive(pel);
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publ.publish(format!("sensors/{i}/temp"), qos, false, format!("t{i}"))
            .await
            .unwrap();
        let p = next_publish(&mut sel).await;
        assert_eq!(p.topic, format!("sensors/{i}/temp"));
        assert_eq!(p.payload, Bytes::from(format!("t{i}")));
        assert_eq!(p.qos, qos);
    }
    publ.publish("other/1/temp", QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    no_publish(&mut sel, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_amqp_meet_on_amq_topic() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "from-mqtt", FieldTable::default()).await;
    ch.queue_bind(
        "from-mqtt".into(),
        "amq.topic".into(),
        "vehicles.*.gps".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (m, mut el) = connect(opts(&b, "bridge")).await;
    m.subscribe("alerts/#", QoS::AtLeastOnce).await.unwrap();
    m.publish("vehicles/42/gps", QoS::AtLeastOnce, false, "52.1,4.3")
        .await
        .unwrap();
    // The PUBACK comes after the message was routed (and synced).
    wait_puback(&mut el).await;
    let got = ch
        .basic_get("from-mqtt".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("MQTT publish reached the AMQP queue");
    assert_eq!(got.delivery.data, b"52.1,4.3");
    assert_eq!(got.delivery.routing_key.as_str(), "vehicles.42.gps");
    ch.basic_publish(
        "amq.topic".into(),
        "alerts.fire.north".into(),
        BasicPublishOptions::default(),
        b"evacuate",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();
    let p = next_publish(&mut el).await;
    assert_eq!(p.topic, "alerts/fire/north");
    assert_eq!(p.payload, Bytes::from_static(b"evacuate"));
    assert_eq!(
        p.qos,
        QoS::AtLeastOnce,
        "persistent AMQP message at the granted QoS 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_wildcard_subscribers_and_clear() {
    let b = start().await;
    let (p, pel) = connect(opts(&b, "retainer")).await;
    drive(pel);
    p.publish("home/kitchen/temp", QoS::AtLeastOnce, true, "21.5")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, mut sel) = connect(opts(&b, "late")).await;
    s.subscribe("home/#", QoS::AtLeastOnce).await.unwrap();
    let got = next_publish(&mut sel).await;
    assert_eq!(got.topic, "home/kitchen/temp");
    assert!(got.retain);
    assert_eq!(got.payload, Bytes::from_static(b"21.5"));
    p.publish("home/kitchen/temp", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    let cleared = next_publish(&mut sel).await;
    assert!(cleared.payload.is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s2, mut sel2) = connect(opts(&b, "later")).await;
    s2.subscribe("home/+/temp", QoS::AtLeastOnce).await.unwrap();
    no_publish(&mut sel2, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_fires_on_abnormal_disconnect_only() {
    let b = start().await;
    let (w, mut wel) = connect(opts(&b, "watcher")).await;
    w.subscribe("status/#", QoS::AtLeastOnce).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), wel.poll()).await;
    let mut o = opts(&b, "dev1");
    o.set_last_will(LastWill::new(
        "status/dev1",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (_d, del) = connect(o).await;
    drop(del); // the socket goes away without DISCONNECT
    let p = next_publish(&mut wel).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("status/dev1", &b"offline"[..])
    );
    let mut o = opts(&b, "dev2");
    o.set_last_will(LastWill::new(
        "status/dev2",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (d2, mut d2el) = connect(o).await;
    d2.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), d2el.poll()).await;
    no_publish(&mut wel, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_keeps_messages_while_offline() {
    let b = start().await;
    let mut o = opts(&b, "keeper");
    o.set_clean_session(false);
    let (c, mut el) = connect(o.clone()).await;
    c.subscribe("jobs/#", QoS::AtLeastOnce).await.unwrap();
    // One poll may only queue the SUBSCRIBE: wait for its SUBACK, or the DISCONNECT
    // below can close a connection that never subscribed.
    wait_suback(&mut el).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), el.poll()).await;
    drop(el);
    let (p, mut pel) = connect(opts(&b, "producer")).await;
    p.publish("jobs/1", QoS::AtLeastOnce, false, "queued while offline")
        .await
        .unwrap();
    wait_puback(&mut pel).await;
    drive(pel);
    let (_c2, mut el2) = connect(o).await;
    let got = next_publish(&mut el2).await;
    assert_eq!(got.payload, Bytes::from_static(b"queued while offline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused() {
    let b = start().await;
    let mut o = opts(&b, "intruder");
    o.set_credentials("guest", "wrong");
    let (_c, mut el) = AsyncClient::new(o, 10);
    match tokio::time::timeout(Duration::from_secs(5), el.poll())
        .await
        .expect("answer in time")
    {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart() {
    let b = start().await;
    {
        let (p, mut pel) = connect(opts(&b, "r-pub")).await;
        p.publish("plant/boiler/state", QoS::AtLeastOnce, true, "on")
            .await
            .unwrap();
        // The PUBACK comes after the retained copy is synced.
        wait_puback(&mut pel).await;
    }
    let b = b.restart().await;
    let (s, mut sel) = connect(opts(&b, "r-sub")).await;
    s.subscribe("plant/+/state", QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = next_publish(&mut sel).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        ("plant/boiler/state", &b"on"[..], true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_messages_between_members() {
    let b = start().await;
    let (a, mut ael) = connect(opts(&b, "worker-a")).await;
    let (c, mut cel) = connect(opts(&b, "worker-c")).await;
    a.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    c.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    for el in [&mut ael, &mut cel] {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), el.poll())
                .await
                .expect("suback in time")
            {
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    assert_eq!(
                        s.return_codes,
                        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                    );
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
    let (p, pel) = connect(opts(&b, "dispatcher")).await;
    drive(pel);
    for i in 0..20 {
        p.publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let mut got_a = Vec::new();
    let mut got_c = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got_a.len() + got_c.len() < 20 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            r = ael.poll() => if let Ok(Event::Incoming(Packet::Publish(m))) = r { got_a.push(String::from_utf8(m.payload.to_vec()).unwrap()) },
            r = cel.poll() => if let Ok(Event::Incoming(Packet::Publish(m))) = r { got_c.push(String::from_utf8(m.payload.to_vec()).unwrap()) },
        }
    }
    let mut all: Vec<u32> = got_a
        .iter()
        .chain(&got_c)
        .map(|s| s.parse().unwrap())
        .collect();
    all.sort();
    assert_eq!(
        all,
        (0..20).collect::<Vec<_>>(),
        "every message once across the group"
    );
    assert!(
        !got_a.is_empty() && !got_c.is_empty(),
        "both members got work: {got_a:?} / {got_c:?}"
    );
}

/// Whether a queue exists (a passive declare on a fresh channel).
async fn queue_exists(b: &TestBroker, name: &str) -> bool {
    let (_c, ch) = b.channel().await;
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_ok()
}

/// MQTT 5 §4.8.2: a shared subscription lives as long as a session is subscribed to it,
/// connected or not. A persistent member gets, on resuming without subscribing again, what
/// was published to the group while it was away, across a restart too (Mosquitto's
/// 02-subpub-recover-subscriptions); its UNSUBSCRIBE ends the group and its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_shared_subscription_outlives_its_connection_and_a_restart() {
    let b = start().await;
    let mut o = opts(&b, "shared-keeper");
    o.set_clean_session(false);
    let (c, mut el) = connect(o).await;
    c.subscribe("$share/g/work/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_suback(&mut el).await;
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), el.poll()).await;
    drop(el);
    let (p, mut pel) = connect(opts(&b, "shared-producer")).await;
    p.publish("work/1", QoS::AtLeastOnce, false, "before the restart")
        .await
        .unwrap();
    wait_puback(&mut pel).await;
    drop(pel);
    let b = b.restart().await;
    assert!(queue_exists(&b, "mqtt-shared-g-work/+").await);
    let (p, mut pel) = connect(opts(&b, "shared-producer")).await;
    p.publish("work/2", QoS::AtLeastOnce, false, "after the restart")
        .await
        .unwrap();
    wait_puback(&mut pel).await;
    drive(pel);
    let mut o = opts(&b, "shared-keeper");
    o.set_clean_session(false);
    let (c, mut el) = connect(o).await;
    for want in ["before the restart", "after the restart"] {
        let got = next_publish(&mut el).await;
        assert_eq!(got.payload, Bytes::from(want));
    }
    c.unsubscribe("$share/g/work/+").await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .expect("unsuback in time")
        {
            Ok(Event::Incoming(Packet::UnsubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!queue_exists(&b, "mqtt-shared-g-work/+").await);
    // A clean session's membership ends with its connection.
    let (t, mut tel) = connect(opts(&b, "shared-transient")).await;
    t.subscribe("$share/h/tmp", QoS::AtMostOnce).await.unwrap();
    wait_suback(&mut tel).await;
    assert!(queue_exists(&b, "mqtt-shared-h-tmp").await);
    t.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), tel.poll()).await;
    drop(tel);
    let gone = async {
        while queue_exists(&b, "mqtt-shared-h-tmp").await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .expect("the group's queue goes with its last member");
}

/// MQTT allows client ids of 65,535 bytes and Mosquitto takes them: the session queue's
/// name stays an AMQP short string and one per client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_client_ids_keep_their_own_sessions() {
    let b = start().await;
    let long_a = format!("{}a", "d".repeat(400));
    let long_b = format!("{}b", "d".repeat(400));
    let mut oa = opts(&b, &long_a);
    oa.set_clean_session(false);
    let (a, mut ael) = connect(oa.clone()).await;
    a.subscribe("long/a", QoS::AtLeastOnce).await.unwrap();
    wait_suback(&mut ael).await;
    let (bb, mut bel) = connect(opts(&b, &long_b)).await;
    bb.subscribe("long/b", QoS::AtLeastOnce).await.unwrap();
    wait_suback(&mut bel).await;
    a.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), ael.poll()).await;
    drop(ael);
    bb.publish("long/a", QoS::AtLeastOnce, false, "for a")
        .await
        .unwrap();
    bb.publish("long/b", QoS::AtLeastOnce, false, "for b")
        .await
        .unwrap();
    assert_eq!(next_publish(&mut bel).await.payload, Bytes::from("for b"));
    let (_a, mut ael) = connect(oa).await;
    let got = next_publish(&mut ael).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("long/a", &b"for a"[..])
    );
}

/// MQTT topics are strings of up to 65,535 bytes (MQTT-1.5.3), as Mosquitto takes them, up
/// to its 200-level limit (Mosquitto's test 02-subpub-qos0-long-topic). The core carries
/// them whole, the store too (the retained copy across a restart); an AMQP 0-9-1 consumer
/// gets the routing key cut to a short string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_topics_route_whole_and_reach_amqp_cut() {
    let b = start().await;
    let topic = "abc/".repeat(199) + "d";
    let (_c, ch) = b.channel().await;
    declare(&ch, "everything", FieldTable::default()).await;
    ch.queue_bind(
        "everything".into(),
        "amq.topic".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (s, mut sel) = connect(opts(&b, "long-sub")).await;
    s.subscribe(topic.as_str(), QoS::AtLeastOnce).await.unwrap();
    wait_suback(&mut sel).await;
    let (p, mut pel) = connect(opts(&b, "long-pub")).await;
    p.publish(topic.as_str(), QoS::AtLeastOnce, true, "deep")
        .await
        .unwrap();
    wait_puback(&mut pel).await;
    let got = next_publish(&mut sel).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (topic.as_str(), &b"deep"[..])
    );
    let amqp = ch
        .basic_get("everything".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the long topic reached the AMQP queue");
    let key = topic.replace('/', ".");
    assert_eq!(amqp.delivery.routing_key.as_str(), &key[..255]);

    // A filter deeper than 200 levels ends the connection (Mosquitto's answer).
    let (d, mut del) = connect(opts(&b, "too-deep")).await;
    d.subscribe("/".repeat(201), QoS::AtMostOnce).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if del.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection closed after a 201-level filter");

    let b = b.restart().await;
    let (s2, mut sel2) = connect(opts(&b, "long-late")).await;
    s2.subscribe("abc/#", QoS::AtLeastOnce).await.unwrap();
    let got = next_publish(&mut sel2).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        (topic.as_str(), &b"deep"[..], true)
    );
}
