//! MQTT 5 sessions, wills, subscription options and limits with rumqttc's v5 client, plus
//! raw-socket checks (QoS 2 state across a restart, MQTT 3.1, reason codes) against an
//! in-process Warren.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::mqtt::poll_until;
use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, LastWill, LastWillProperties, Packet, Publish, PublishProperties,
    RetainForwardRule,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn opts(b: &TestBroker, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, b.mqtt_addr.ip().to_string(), b.mqtt_addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o
}

fn persistent(b: &TestBroker, id: &str, expiry: u32) -> MqttOptions {
    let mut o = opts(b, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

/// Polls until CONNACK; returns the client, its event loop and Session Present.
async fn connect(o: MqttOptions) -> (AsyncClient, EventLoop, bool) {
    let (c, mut el) = AsyncClient::new(o, 100);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .expect("connack in time")
        {
            Ok(Event::Incoming(Packet::ConnAck(a))) => {
                assert_eq!(a.code, ConnectReturnCode::Success);
                return (c, el, a.session_present);
            }
            Ok(_) => {}
            Err(e) => panic!("mqtt connect failed: {e}"),
        }
    }
}

async fn next_publish(el: &mut EventLoop) -> Publish {
    poll_until(el, "publish", |p| match p {
        Packet::Publish(p) => Some(p),
        _ => None,
    })
    .await
}

async fn suback(el: &mut EventLoop) {
    poll_until(el, "suback", |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await
}

/// Polls for `ms` and returns the PUBLISHes seen.
async fn publishes_within(el: &mut EventLoop, ms: u64) -> Vec<Publish> {
    let end = tokio::time::Instant::now() + Duration::from_millis(ms);
    let mut out = Vec::new();
    while let Ok(r) = tokio::time::timeout_at(end, el.poll()).await {
        match r {
            Ok(Event::Incoming(Packet::Publish(p))) => out.push(p),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    out
}

fn drive(mut el: EventLoop) {
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
}

async fn publisher(b: &TestBroker, id: &str) -> AsyncClient {
    let (c, el, _) = connect(opts(b, id)).await;
    drive(el);
    c
}

async fn disconnect(c: &AsyncClient, el: &mut EventLoop) {
    c.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while el.poll().await.is_ok() {}
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_resumes_then_deletes_the_session() {
    let b = start().await;
    let (c, mut el, present) = connect(persistent(&b, "exp", 2)).await;
    assert!(!present, "a new session is not present");
    c.subscribe("exp/t", QoS::AtLeastOnce).await.unwrap();
    suback(&mut el).await;
    disconnect(&c, &mut el).await;

    let p = publisher(&b, "exp-pub").await;
    p.publish("exp/t", QoS::AtLeastOnce, false, "while offline")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Within the expiry: the session, its subscription and the queued message are there.
    let (c, mut el, present) = connect(persistent(&b, "exp", 2)).await;
    assert!(present, "MQTT-3.2.2-3: session present on resume");
    assert_eq!(&next_publish(&mut el).await.payload[..], b"while offline");
    disconnect(&c, &mut el).await;

    // After the expiry the session is gone.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (c, mut el, present) = connect(persistent(&b, "exp", 2)).await;
    assert!(!present, "an expired session is deleted");
    p.publish("exp/t", QoS::AtLeastOnce, false, "unsubscribed")
        .await
        .unwrap();
    assert!(publishes_within(&mut el, 500).await.is_empty());
    disconnect(&c, &mut el).await;

    // Session expiry 0 (the 5.0 default): the session ends with the connection.
    let (c, mut el, _) = connect(persistent(&b, "zero", 0)).await;
    c.subscribe("zero/t", QoS::AtLeastOnce).await.unwrap();
    suback(&mut el).await;
    disconnect(&c, &mut el).await;
    let (_c, _el, present) = connect(persistent(&b, "zero", 0)).await;
    assert!(!present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_durable_across_a_restart() {
    let b = start().await;
    for (id, expiry) in [("short", 2), ("long", 3600)] {
        let (c, mut el, _) = connect(persistent(&b, id, expiry)).await;
        c.subscribe(format!("{id}/t"), QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut el).await;
        disconnect(&c, &mut el).await;
    }
    let p = publisher(&b, "dur-pub").await;
    p.publish("long/t", QoS::AtLeastOnce, false, "kept")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = b.restart().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c, _el, present) = connect(persistent(&b, "short", 2)).await;
    assert!(
        !present,
        "the short session expired (its clock survives the restart)"
    );
    let (_c2, mut el2, present) = connect(persistent(&b, "long", 3600)).await;
    assert!(present, "the long session survives the restart");
    let m = next_publish(&mut el2).await;
    assert_eq!(&m.payload[..], b"kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_and_cancel_on_reconnect() {
    let b = start().await;
    let (w, mut wel, _) = connect(opts(&b, "will-watch")).await;
    w.subscribe("wills/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut wel).await;

    let will = |topic: &str| {
        LastWill::new(
            topic,
            "gone",
            QoS::AtLeastOnce,
            false,
            Some(LastWillProperties {
                delay_interval: Some(2),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: vec![],
            }),
        )
    };
    // Dropped connection, not resumed: the will arrives after ~2 s, not at once.
    let mut o = persistent(&b, "w1", 60);
    o.set_last_will(will("wills/w1"));
    let (_c, el, _) = connect(o).await;
    drop(el);
    assert!(
        publishes_within(&mut wel, 1000).await.is_empty(),
        "will waits for its delay"
    );
    let m = next_publish(&mut wel).await;
    assert_eq!(m.topic, Bytes::from("wills/w1"));

    // Resumed within the delay: no will (MQTT-3.1.3-9).
    let mut o = persistent(&b, "w2", 60);
    o.set_last_will(will("wills/w2"));
    let (_c, el, _) = connect(o).await;
    drop(el);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_c2, el2, _) = connect(persistent(&b, "w2", 60)).await;
    drive(el2);
    assert!(
        publishes_within(&mut wel, 3000).await.is_empty(),
        "will cancelled by reconnect"
    );

    // Session expiry shorter than the delay: the will goes when the session ends.
    let mut o = persistent(&b, "w3", 0);
    o.set_last_will(will("wills/w3"));
    let (_c, el, _) = connect(o).await;
    drop(el);
    let got = publishes_within(&mut wel, 1000).await;
    assert_eq!(got.len(), 1, "will at session end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_retain_handling_and_retain_as_published() {
    let b = start().await;
    let (c, mut el, _) = connect(opts(&b, "opts")).await;
    let mut f = Filter::new("nl/t", QoS::AtLeastOnce);
    f.nolocal = true;
    c.subscribe_many([f]).await.unwrap();
    suback(&mut el).await;
    c.publish("nl/t", QoS::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    let other = publisher(&b, "opts-other").await;
    other
        .publish("nl/t", QoS::AtLeastOnce, false, "theirs")
        .await
        .unwrap();
    let got = publishes_within(&mut el, 800).await;
    let bodies: Vec<_> = got.iter().map(|p| p.payload.clone()).collect();
    assert_eq!(
        bodies,
        vec![Bytes::from("theirs")],
        "no-local drops own messages"
    );

    other
        .publish("rh/t", QoS::AtLeastOnce, true, "retained")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut never = Filter::new("rh/t", QoS::AtLeastOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    c.subscribe_many([never]).await.unwrap();
    assert!(
        publishes_within(&mut el, 500).await.is_empty(),
        "retain handling 2"
    );
    c.unsubscribe("rh/t").await.unwrap();
    let mut on_new = Filter::new("rh/t", QoS::AtLeastOnce);
    on_new.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    on_new.preserve_retain = true;
    c.subscribe_many([on_new.clone()]).await.unwrap();
    let first = publishes_within(&mut el, 500).await;
    assert_eq!(first.len(), 1, "retain handling 1, new subscription");
    assert!(first[0].retain);
    c.subscribe_many([on_new]).await.unwrap();
    assert!(
        publishes_within(&mut el, 500).await.is_empty(),
        "retain handling 1, existing"
    );
    // Retain as published: a live retained publish keeps RETAIN.
    other
        .publish("rh/t", QoS::AtLeastOnce, true, "live")
        .await
        .unwrap();
    let live = next_publish(&mut el).await;
    assert!(live.retain, "MQTT-3.3.1-13 retain as published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifiers_overlap_and_dollar_topics() {
    let b = start().await;
    let (c, mut el, _) = connect(opts(&b, "ids")).await;
    c.subscribe_with_properties(
        "ids/+",
        QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::v5::SubscribeProperties {
            id: Some(5),
            user_properties: vec![],
        },
    )
    .await
    .unwrap();
    suback(&mut el).await;
    c.subscribe_with_properties(
        "ids/#",
        QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::v5::SubscribeProperties {
            id: Some(9),
            user_properties: vec![],
        },
    )
    .await
    .unwrap();
    suback(&mut el).await;
    c.subscribe("#", QoS::AtMostOnce).await.unwrap();
    suback(&mut el).await;
    let p = publisher(&b, "ids-pub").await;
    p.publish("ids/x", QoS::AtLeastOnce, false, "one")
        .await
        .unwrap();
    p.publish("$SYS/x", QoS::AtLeastOnce, false, "sys")
        .await
        .unwrap();
    let got = publishes_within(&mut el, 800).await;
    assert_eq!(
        got.len(),
        1,
        "overlapping subscriptions deliver once; # skips $SYS"
    );
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "the highest granted QoS");
    let ids = got[0]
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone())
        .unwrap_or_default();
    // Ascending, though the filters sort the other way ("ids/#" < "ids/+").
    assert_eq!(ids, vec![5, 9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_packet_size_and_message_expiry() {
    let b = start().await;
    let mut o = opts(&b, "limits");
    o.set_receive_maximum(Some(2));
    o.set_max_packet_size(Some(200));
    o.set_manual_acks(true);
    let (c, mut el, _) = connect(o).await;
    c.subscribe("lim/t", QoS::AtLeastOnce).await.unwrap();
    suback(&mut el).await;
    let p = publisher(&b, "lim-pub").await;
    p.publish("lim/t", QoS::AtLeastOnce, false, vec![b'x'; 1000])
        .await
        .unwrap();
    for i in 0..5 {
        p.publish("lim/t", QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    let first = publishes_within(&mut el, 800).await;
    assert_eq!(
        first.len(),
        2,
        "MQTT-3.3.4-9: at most receive maximum in flight"
    );
    assert!(
        first.iter().all(|m| m.payload.len() < 200),
        "too large dropped"
    );
    for m in &first {
        c.ack(m).await.unwrap();
    }
    let next = publishes_within(&mut el, 800).await;
    assert_eq!(next.len(), 2);

    // Message expiry: the remaining interval is sent; expired messages are not.
    let (s, mut sel, _) = connect(opts(&b, "expiry-sub")).await;
    s.subscribe("me/t", QoS::AtLeastOnce).await.unwrap();
    suback(&mut sel).await;
    let props = PublishProperties {
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    p.publish_with_properties("me/t", QoS::AtLeastOnce, false, "e", props)
        .await
        .unwrap();
    let m = next_publish(&mut sel).await;
    let left = m.properties.and_then(|p| p.message_expiry_interval);
    assert!(matches!(left, Some(1..=60)), "remaining expiry {left:?}");
    // Ten years: longer than the core's longest TTL (RabbitMQ's ~49.7 days), delivered.
    let props = PublishProperties {
        message_expiry_interval: Some(10 * 365 * 86_400),
        ..Default::default()
    };
    p.publish_with_properties("me/t", QoS::AtLeastOnce, false, "long", props)
        .await
        .unwrap();
    let m = next_publish(&mut sel).await;
    assert_eq!(&m.payload[..], b"long");
    assert!(m
        .properties
        .and_then(|p| p.message_expiry_interval)
        .is_some());
}

/// MQTT-3.3.2-15, -16, -17, -20: response topic, correlation data, user properties and
/// content type reach a 5.0 subscriber unaltered, including what no AMQP property holds
/// (binary correlation data, strings over 255 bytes), as Mosquitto forwards them
/// (mqtt.js's request/response echoes binary correlation data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_properties_pass_unaltered() {
    let b = start().await;
    let p = publisher(&b, "rr-pub").await;
    let (s, mut sel, _) = connect(opts(&b, "rr-sub")).await;
    s.subscribe("rr/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut sel).await;
    let long = "l".repeat(300);
    for props in [
        PublishProperties {
            correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xff])),
            response_topic: Some("rr/reply".into()),
            content_type: Some("application/octet-stream".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        },
        PublishProperties {
            correlation_data: Some(Bytes::from(long.clone())),
            response_topic: Some(format!("rr/{long}")),
            content_type: Some(long.clone()),
            user_properties: vec![(long.clone(), "v".into()), ("a".into(), "b".into())],
            ..Default::default()
        },
    ] {
        p.publish_with_properties("rr/req", QoS::AtLeastOnce, false, "q", props.clone())
            .await
            .unwrap();
        let got = next_publish(&mut sel).await.properties.expect("properties");
        assert_eq!(got.correlation_data, props.correlation_data);
        assert_eq!(got.response_topic, props.response_topic);
        assert_eq!(got.content_type, props.content_type);
        assert_eq!(got.user_properties, props.user_properties);
    }
}

/// Topic aliases towards a client that allows them only when configured: Mosquitto never
/// sends them, and mqtt.js 4.3 advertises a maximum it cannot read aliases for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_to_clients_only_when_configured() {
    for on in [false, true] {
        let b = common::start_with(|c| c.mqtt.outbound_topic_aliases = on).await;
        let p = publisher(&b, "alias-pub").await;
        let mut o = opts(&b, "alias-sub");
        o.set_topic_alias_max(Some(5));
        let (s, mut sel, _) = connect(o).await;
        s.subscribe("al/t", QoS::AtLeastOnce).await.unwrap();
        suback(&mut sel).await;
        let mut aliases = Vec::new();
        for body in ["one", "two"] {
            p.publish("al/t", QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
            let m = next_publish(&mut sel).await;
            assert_eq!(&m.payload[..], body.as_bytes());
            aliases.push(m.properties.and_then(|p| p.topic_alias));
        }
        let want = if on {
            vec![Some(1), Some(1)]
        } else {
            vec![None, None]
        };
        assert_eq!(aliases, want, "outbound_topic_aliases = {on}");
    }
}

// ---- raw sockets: exact bytes -------------------------------------------------------

async fn raw(b: &TestBroker) -> TcpStream {
    TcpStream::connect(b.mqtt_addr).await.expect("tcp connect")
}

/// Reads one packet (first byte, body).
async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let fut = async {
        let mut h = [0u8; 1];
        s.read_exact(&mut h).await.ok()?;
        let mut len = 0usize;
        for i in 0..4 {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.ok()?;
            len |= ((b[0] & 0x7f) as usize) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        Some((h[0], body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()?
}

fn connect_v4(id: &str, clean: bool) -> Vec<u8> {
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        if clean { 2 } else { 0 },
        0,
        30,
    ];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

fn publish_qos2(topic: &str, id: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![0x34 | if dup { 0x08 } else { 0 }, body.len() as u8];
    p.extend(body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_ids_survive_a_restart() {
    let b = start().await;
    let mut s = raw(&b).await;
    s.write_all(&connect_v4("q2-pub", false)).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap().0, 0x20);
    s.write_all(&publish_qos2("q2/t", 7, false, b"once"))
        .await
        .unwrap();
    let (t, body) = read_packet(&mut s).await.unwrap();
    assert_eq!((t, body), (0x50, vec![0, 7]), "PUBREC");
    drop(s);
    // The consumer of the result: a durable AMQP queue bound to the topic... bound after
    // the first publish would miss it, so count on a persistent MQTT session instead.
    let b = b.restart().await;
    let (c, mut el, _) = connect(persistent(&b, "q2-sub", 600)).await;
    c.subscribe("q2/t", QoS::ExactlyOnce).await.unwrap();
    suback(&mut el).await;

    let mut s = raw(&b).await;
    s.write_all(&connect_v4("q2-pub", false)).await.unwrap();
    let (t, body) = read_packet(&mut s).await.unwrap();
    assert_eq!((t, body), (0x20, vec![1, 0]), "session present");
    // The client re-sends the PUBLISH (it never saw the PUBREC): a duplicate.
    s.write_all(&publish_qos2("q2/t", 7, true, b"once"))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x50, vec![0, 7]));
    s.write_all(&[0x62, 2, 0, 7]).await.unwrap();
    assert_eq!(
        read_packet(&mut s).await.unwrap(),
        (0x70, vec![0, 7]),
        "PUBCOMP"
    );
    assert!(
        publishes_within(&mut el, 800).await.is_empty(),
        "the duplicate is not routed after the restart"
    );
    // The id is free again: a new PUBLISH with it is a new message.
    s.write_all(&publish_qos2("q2/t", 7, false, b"new"))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x50, vec![0, 7]));
    let m = next_publish(&mut el).await;
    assert_eq!(&m.payload[..], b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_outbound_messages_are_redelivered_with_dup_after_a_restart() {
    let b = start().await;
    let p = publisher(&b, "redeliver-pub").await;
    let mut s = raw(&b).await;
    s.write_all(&connect_v4("redeliver", false)).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap().0, 0x20);
    // SUBSCRIBE id 1, "rd/t" QoS 2.
    s.write_all(&[0x82, 9, 0, 1, 0, 4, b'r', b'd', b'/', b't', 2])
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x90, vec![0, 1, 2]));
    p.publish("rd/t", QoS::ExactlyOnce, false, "q2")
        .await
        .unwrap();
    let (t, first) = read_packet(&mut s).await.unwrap();
    assert_eq!(t & 0xF6, 0x34, "QoS 2 PUBLISH, not acknowledged");
    let first_id = [first[6], first[7]];
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = b.restart().await;
    let mut s = raw(&b).await;
    s.write_all(&connect_v4("redeliver", false)).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x20, vec![1, 0]));
    let (t, body) = read_packet(&mut s).await.unwrap();
    assert_eq!(t & 0xF6, 0x34);
    assert!(t & 0x08 != 0, "DUP on redelivery");
    assert!(body.ends_with(b"q2"));
    // MQTT-4.4.0-1: resent with its original packet id.
    let id = [body[6], body[7]];
    assert_eq!(id, first_id, "original packet id");
    // PUBREC → PUBREL; after a reconnect the PUBREL (not the PUBLISH) is sent again.
    s.write_all(&[0x50, 2, id[0], id[1]]).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x62, id.to_vec()));
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = b.restart().await;
    let mut s = raw(&b).await;
    s.write_all(&connect_v4("redeliver", false)).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x20, vec![1, 0]));
    assert_eq!(
        read_packet(&mut s).await.unwrap(),
        (0x62, id.to_vec()),
        "PUBREL re-sent, no second PUBLISH"
    );
    s.write_all(&[0x70, 2, id[0], id[1]]).await.unwrap();
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_31_is_accepted_and_bad_levels_refused() {
    let b = start().await;
    let id = b"a-3.1-client-id-longer-than-23";
    let mut body = vec![0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    let mut s = raw(&b).await;
    s.write_all(&p).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x20, vec![0, 0]));
    s.write_all(&[0xC0, 0]).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0xD0, vec![]));
    // MQTT 3.1 clients re-send PUBREL with DUP set (0x6A); it is completed, not a
    // malformed packet.
    s.write_all(&publish_qos2("v31/t", 9, false, b"x"))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x50, vec![0, 9]));
    s.write_all(&[0x6A, 2, 0, 9]).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x70, vec![0, 9]));

    let mut s = raw(&b).await;
    s.write_all(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 30, 0, 1, b'x',
    ])
    .await
    .unwrap();
    assert_eq!(
        read_packet(&mut s).await.unwrap(),
        (0x20, vec![0, 1]),
        "MQTT-3.1.2-2: level 6 → 0x01"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_exceeded_disconnects_with_0x93() {
    let b = start().await;
    let mut s = raw(&b).await;
    // 5.0 CONNECT, clean start, no properties.
    s.write_all(&[
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30, 0, 0, 1, b'r',
    ])
    .await
    .unwrap();
    let connack = read_packet(&mut s).await.unwrap();
    assert_eq!(connack.0, 0x20);
    // 21 QoS 2 publishes without PUBREL: the 21st exceeds receive maximum 20, which
    // the CONNACK says.
    let (_, connack) = connack;
    let rm = connack.windows(3).position(|w| w == [0x21, 0, 20]);
    assert!(rm.is_some(), "Receive Maximum 20: {connack:x?}");
    for id in 1..=21u16 {
        let mut body = vec![0, 1, b'x'];
        body.extend_from_slice(&id.to_be_bytes());
        body.push(0); // no properties
        let mut p = vec![0x34, body.len() as u8];
        p.extend(body);
        s.write_all(&p).await.unwrap();
    }
    // Like a client that answers each PUBREC before it reads the DISCONNECT: the broker
    // drains what it still sends instead of resetting the connection.
    let mut pubrecs = 0u16;
    loop {
        let (t, body) = read_packet(&mut s).await.expect("DISCONNECT before close");
        if t == 0xE0 {
            assert_eq!(body[0], 0x93);
            break;
        }
        assert_eq!(t, 0x50);
        pubrecs += 1;
        let mut pubrel = vec![0x62, 2];
        pubrel.extend_from_slice(&pubrecs.to_be_bytes());
        s.write_all(&pubrel)
            .await
            .expect("PUBREL after the broker's DISCONNECT");
    }
    for id in 1..=50u16 {
        let mut pubrel = vec![0x62, 2];
        pubrel.extend_from_slice(&id.to_be_bytes());
        s.write_all(&pubrel)
            .await
            .expect("no reset after DISCONNECT");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// SUBSCRIBE (3.1.1) of `topic` at QoS 1 with packet id 1.
fn subscribe_qos1(topic: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.push(1);
    let mut p = vec![0x82, body.len() as u8];
    p.extend(body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resends_unacked_publishes_with_their_original_ids() {
    let b = start().await;
    let p = publisher(&b, "ids-pub").await;
    let mut s = raw(&b).await;
    s.write_all(&connect_v4("ids", false)).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap().0, 0x20);
    s.write_all(&subscribe_qos1("ids/t")).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x90, vec![0, 1, 1]));
    for n in 0..3u8 {
        p.publish("ids/t", QoS::AtLeastOnce, false, vec![b'm', b'0' + n])
            .await
            .unwrap();
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        let (t, body) = read_packet(&mut s).await.unwrap();
        assert_eq!(t & 0xF6, 0x32, "QoS 1 PUBLISH");
        first.push(([body[7], body[8]], body[9..].to_vec()));
    }
    // Acknowledge the middle one only.
    let (acked, _) = first[1].clone();
    s.write_all(&[0x40, 2, acked[0], acked[1]]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = raw(&b).await;
    s.write_all(&connect_v4("ids", false)).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x20, vec![1, 0]));
    let mut again = Vec::new();
    for _ in 0..2 {
        let (t, body) = read_packet(&mut s).await.unwrap();
        assert_eq!(t, 0x3A, "QoS 1 PUBLISH with DUP");
        again.push(([body[7], body[8]], body[9..].to_vec()));
    }
    assert_eq!(again, vec![first[0].clone(), first[2].clone()]);
    // New messages get ids that do not collide with the resent ones.
    s.write_all(&[0x40, 2, again[0].0[0], again[0].0[1]])
        .await
        .unwrap();
    p.publish("ids/t", QoS::AtLeastOnce, false, "fresh")
        .await
        .unwrap();
    let (t, body) = read_packet(&mut s).await.unwrap();
    assert_eq!(t, 0x32);
    assert_ne!([body[7], body[8]], again[1].0, "fresh id is not in use");
    assert!(body.ends_with(b"fresh"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_will_survives_a_restart_and_goes_once() {
    let b = start().await;
    let mut o = persistent(&b, "will-restart", 600);
    o.set_last_will(LastWill::new(
        "wills/restart",
        "gone",
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(3),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
    ));
    let (_c, el, _) = connect(o).await;
    drop(el);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = b.restart().await;
    let (w, mut wel, _) = connect(persistent(&b, "will-restart-watch", 600)).await;
    w.subscribe("wills/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut wel).await;
    let got = publishes_within(&mut wel, 5000).await;
    assert_eq!(got.len(), 1, "the will, once, after the restart: {got:?}");
    assert_eq!(got[0].topic, Bytes::from("wills/restart"));
    // Sent: another restart does not send it again.
    drop((w, wel));
    let b = b.restart().await;
    let (_w, mut wel, _) = connect(persistent(&b, "will-restart-watch", 600)).await;
    assert!(publishes_within(&mut wel, 1500).await.is_empty());
}

/// A 5.0 CONNECT (clean start) with the given properties and optional username.
fn connect_v5(id: &str, props: &[u8], user: Option<&str>) -> Vec<u8> {
    let flags = 2 | if user.is_some() { 0x80 } else { 0 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 30];
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    if let Some(u) = user {
        body.extend_from_slice(&(u.len() as u16).to_be_bytes());
        body.extend_from_slice(u.as_bytes());
    }
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_authentication_is_refused_with_0x8c() {
    let b = start().await;
    let mut s = raw(&b).await;
    // Authentication Method (0x15) "SCRAM-SHA-1".
    let mut props = vec![0x15, 0, 11];
    props.extend_from_slice(b"SCRAM-SHA-1");
    s.write_all(&connect_v5("scram", &props, None))
        .await
        .unwrap();
    let (t, body) = read_packet(&mut s).await.unwrap();
    assert_eq!((t, &body[..2]), (0x20, &[0u8, 0x8C][..]), "MQTT-4.12.0-1");
    assert!(read_packet(&mut s).await.is_none(), "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_are_refused_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config(dir.path());
    c.mqtt.allow_anonymous = false;
    let server = warren::Server::start(&c).await.unwrap();
    let addr = server.mqtt_addr.unwrap();
    // 3.1.1 without username: 0x05 not authorized.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_v4("anon", true)).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x20, vec![0, 5]));
    // 5.0 without username: 0x87.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_v5("anon5", &[], None)).await.unwrap();
    let (t, body) = read_packet(&mut s).await.unwrap();
    assert_eq!((t, &body[..2]), (0x20, &[0u8, 0x87][..]));
    // A client that names its user still logs in.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut p = connect_v4("named", true);
    // Username + password flags, then the strings.
    p[9] |= 0xC0;
    for f in ["guest", "guest"] {
        p.extend_from_slice(&(f.len() as u16).to_be_bytes());
        p.extend_from_slice(f.as_bytes());
    }
    p[1] = (p.len() - 2) as u8;
    s.write_all(&p).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap(), (0x20, vec![0, 0]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_takeover_closes_the_older_connection() {
    let b = start().await;
    // 5.0: the older connection gets DISCONNECT 0x8E, then the socket closes.
    let mut old = raw(&b).await;
    old.write_all(&connect_v5("twin", &[], None)).await.unwrap();
    assert_eq!(read_packet(&mut old).await.unwrap().0, 0x20);
    let mut new = raw(&b).await;
    new.write_all(&connect_v5("twin", &[], None)).await.unwrap();
    let (t, body) = read_packet(&mut new).await.unwrap();
    assert_eq!((t, body[1]), (0x20, 0), "the newer connection is accepted");
    let (t, body) = read_packet(&mut old).await.expect("DISCONNECT");
    assert_eq!(
        (t, body[0]),
        (0xE0, 0x8E),
        "MQTT-3.1.4-3: 0x8E Session taken over"
    );
    assert!(read_packet(&mut old).await.is_none(), "then closed");
    // The newer one keeps working.
    new.write_all(&[0xC0, 0]).await.unwrap();
    assert_eq!(read_packet(&mut new).await.unwrap(), (0xD0, vec![]));
    // 3.1.1: no server DISCONNECT, the older socket just closes.
    let mut old = raw(&b).await;
    old.write_all(&connect_v4("twin4", true)).await.unwrap();
    assert_eq!(read_packet(&mut old).await.unwrap().0, 0x20);
    let mut new = raw(&b).await;
    new.write_all(&connect_v4("twin4", true)).await.unwrap();
    assert_eq!(read_packet(&mut new).await.unwrap(), (0x20, vec![0, 0]));
    assert!(
        read_packet(&mut old).await.is_none(),
        "closed without a packet"
    );
}

/// The CONNACK properties Warren sends, by id, walked with their spec sizes.
fn connack_property_ids(body: &[u8]) -> Vec<u8> {
    // flags, reason, property length (one byte here), properties.
    let len = body[2] as usize;
    let mut p = &body[3..3 + len];
    let mut ids = Vec::new();
    while let Some((&id, rest)) = p.split_first() {
        let size = match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x21 | 0x22 | 0x13 => 2,
            0x27 | 0x11 => 4,
            0x12 | 0x1F | 0x1A | 0x1C => 2 + u16::from_be_bytes([rest[0], rest[1]]) as usize,
            other => panic!("unexpected CONNACK property {other:#x}"),
        };
        ids.push(id);
        p = &rest[size..];
    }
    ids
}

/// Findings of Mosquitto's own broker tests (test/broker), each a spec rule: the CONNACK
/// names no Maximum QoS, PUBACK says 0x10 when nobody is subscribed, a Payload Format
/// Indicator of 0 is forwarded, a will with an empty topic closes the connection, and a
/// session without subscriptions taken over from a live connection is still present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_suite_rules() {
    let b = start().await;
    // MQTT 5 §3.2.2.3.4: Maximum QoS is 0 or 1; a server with QoS 2 leaves it out.
    let mut publ = raw(&b).await;
    publ.write_all(&connect_v5("pfi-pub", &[], None))
        .await
        .unwrap();
    let (t, body) = read_packet(&mut publ).await.unwrap();
    assert_eq!(t, 0x20);
    let ids = connack_property_ids(&body);
    assert!(!ids.contains(&0x24), "no Maximum QoS: {ids:x?}");
    assert!(ids.contains(&0x21), "Receive Maximum: {ids:x?}");
    // Capabilities that are the defaults (available) are left out, as Mosquitto does.
    for absent in [0x25, 0x28, 0x29, 0x2A] {
        assert!(!ids.contains(&absent), "{absent:#x} left out: {ids:x?}");
    }
    assert!(
        body.len() <= 14,
        "a CONNACK that fits in 20 bytes: {body:x?}"
    );

    // QoS 1 to a topic nobody subscribes: PUBACK 0x10, three bytes (no property length).
    let publish = |qos: u8, topic: &str, id: u16, props: &[u8], payload: &[u8]| {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.push(props.len() as u8);
        body.extend_from_slice(props);
        body.extend_from_slice(payload);
        let mut p = vec![0x30 | (qos << 1), body.len() as u8];
        p.extend(body);
        p
    };
    publ.write_all(&publish(1, "pfi/none", 5, &[], b"x"))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut publ).await.unwrap(),
        (0x40, vec![0, 5, 0x10])
    );

    // MQTT-3.3.2-4: Payload Format Indicator 0 arrives unaltered.
    let mut sub = raw(&b).await;
    sub.write_all(&connect_v5("pfi-sub", &[], None))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut sub).await.unwrap().0, 0x20);
    let topic = b"pfi/t";
    let mut body = vec![0, 1, 0, 0, topic.len() as u8];
    body.extend_from_slice(topic);
    body.push(0);
    let mut p = vec![0x82, body.len() as u8];
    p.extend(body);
    sub.write_all(&p).await.unwrap();
    assert_eq!(read_packet(&mut sub).await.unwrap().0, 0x90);
    publ.write_all(&publish(1, "pfi/t", 6, &[0x01, 0x00], b"raw"))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut publ).await.unwrap(),
        (0x40, vec![0, 6]),
        "delivered: plain success"
    );
    let (t, body) = read_packet(&mut sub).await.unwrap();
    assert_eq!(t & 0xF0, 0x30);
    let props_at = 2 + topic.len();
    let props = &body[props_at + 1..props_at + 1 + body[props_at] as usize];
    assert!(
        props.windows(2).any(|w| w == [0x01, 0x00]),
        "PFI 0 forwarded: {props:x?}"
    );
    // Any other value goes through as published too (Mosquitto 2.0's
    // 12-prop-subpub-payload-format sends 0xED).
    publ.write_all(&publish(1, "pfi/t", 7, &[0x01, 0xED], b"raw"))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut publ).await.unwrap(), (0x40, vec![0, 7]));
    let (_, body) = read_packet(&mut sub).await.unwrap();
    let props = &body[props_at + 1..props_at + 1 + body[props_at] as usize];
    assert!(
        props.windows(2).any(|w| w == [0x01, 0xED]),
        "PFI 0xED forwarded: {props:x?}"
    );

    // MQTT-4.7.3-1: a will topic of zero length closes the connection, no CONNACK.
    let mut p = connect_v4("empty-will", true);
    p[9] |= 0x04;
    p.extend_from_slice(&[0, 0, 0, 1, b'w']);
    p[1] = (p.len() - 2) as u8;
    let mut s = raw(&b).await;
    s.write_all(&p).await.unwrap();
    assert!(
        read_packet(&mut s).await.is_none(),
        "closed without CONNACK"
    );

    // MQTT-3.2.2-2: a persistent session exists even without subscriptions; taking it
    // over from a live connection resumes it.
    let mut first = raw(&b).await;
    first.write_all(&connect_v4("tk", false)).await.unwrap();
    assert_eq!(read_packet(&mut first).await.unwrap(), (0x20, vec![0, 0]));
    let mut second = raw(&b).await;
    second.write_all(&connect_v4("tk", false)).await.unwrap();
    assert_eq!(
        read_packet(&mut second).await.unwrap(),
        (0x20, vec![1, 0]),
        "Session Present"
    );

    // A will: not sent when a persistent session is taken over and resumed (it goes on);
    // sent when the newer connection starts clean (the session ends), as Mosquitto.
    let mut watcher = raw(&b).await;
    watcher
        .write_all(&connect_v4("will-watcher", true))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut watcher).await.unwrap().0, 0x20);
    watcher.write_all(&subscribe_qos1("will/tk")).await.unwrap();
    assert_eq!(read_packet(&mut watcher).await.unwrap().0, 0x90);
    let with_will = |id: &str| {
        let mut p = connect_v4(id, false);
        p[9] |= 0x04;
        for f in [&b"will/tk"[..], b"LWT"] {
            p.extend_from_slice(&(f.len() as u16).to_be_bytes());
            p.extend_from_slice(f);
        }
        p[1] = (p.len() - 2) as u8;
        p
    };
    let mut old = raw(&b).await;
    old.write_all(&with_will("wt")).await.unwrap();
    assert_eq!(read_packet(&mut old).await.unwrap(), (0x20, vec![0, 0]));
    let mut resumed = raw(&b).await;
    resumed.write_all(&with_will("wt")).await.unwrap();
    assert_eq!(read_packet(&mut resumed).await.unwrap(), (0x20, vec![1, 0]));
    let quiet = tokio::time::timeout(Duration::from_millis(300), read_packet(&mut watcher)).await;
    assert!(quiet.is_err(), "no will on a resumed takeover: {quiet:?}");
    let mut clean = raw(&b).await;
    clean.write_all(&connect_v4("wt", true)).await.unwrap();
    assert_eq!(read_packet(&mut clean).await.unwrap(), (0x20, vec![0, 0]));
    let (t, body) = read_packet(&mut watcher).await.expect("the will");
    assert_eq!(t & 0xF0, 0x30);
    assert!(body.ends_with(b"LWT"), "{body:?}");
}

/// A client that publishes, drops its socket and connects again at once (taking over its
/// own session before the broker noticed the close) has the last PUBLISH handled first,
/// as Mosquitto reads them in order: here a retained clear, which the new subscription
/// must see. Raced 20 times (without the drain it failed about one time in six).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_sent_before_a_takeover_are_routed() {
    let b = start().await;
    let publish = |qos: u8, topic: &str, payload: &[u8]| {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&1u16.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut p = vec![0x31 | (qos << 1), body.len() as u8];
        p.extend(body);
        p
    };
    for i in 0..20 {
        let topic = format!("fresh/{i}");
        let mut old = raw(&b).await;
        old.write_all(&connect_v4("fresh", true)).await.unwrap();
        assert_eq!(read_packet(&mut old).await.unwrap().0, 0x20);
        old.write_all(&publish(1, &topic, b"x")).await.unwrap();
        assert_eq!(read_packet(&mut old).await.unwrap().0, 0x40);
        old.write_all(&publish(0, &topic, b"")).await.unwrap();
        drop(old);
        let mut new = raw(&b).await;
        new.write_all(&connect_v4("fresh", true)).await.unwrap();
        assert_eq!(read_packet(&mut new).await.unwrap().0, 0x20);
        new.write_all(&subscribe_qos1(&topic)).await.unwrap();
        assert_eq!(read_packet(&mut new).await.unwrap().0, 0x90);
        let stale = tokio::time::timeout(Duration::from_millis(50), read_packet(&mut new)).await;
        assert!(
            stale.is_err(),
            "round {i}: a cleared retained message came back"
        );
    }
}

/// An acknowledgement of the wrong kind for an outbound PUBLISH (PUBREC for QoS 1, PUBACK
/// or an early PUBCOMP for QoS 2) is a protocol error: the connection ends, as Mosquitto
/// ends it (its 02-subpub-qos1-bad-pubrec and friends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_kind_of_ack_ends_the_connection() {
    let b = start().await;
    for (qos, wrong) in [(1u8, 0x50u8), (1, 0x70), (2, 0x40), (2, 0x70)] {
        let mut sub = raw(&b).await;
        sub.write_all(&connect_v4("bad-ack-sub", true))
            .await
            .unwrap();
        assert_eq!(read_packet(&mut sub).await.unwrap().0, 0x20);
        let topic = b"bad/ack";
        let mut body = vec![0, 1, 0, topic.len() as u8];
        body.extend_from_slice(topic);
        body.push(qos);
        let mut subscribe = vec![0x82, body.len() as u8];
        subscribe.extend(body);
        sub.write_all(&subscribe).await.unwrap();
        assert_eq!(read_packet(&mut sub).await.unwrap().0, 0x90, "SUBACK");
        let mut publisher = raw(&b).await;
        publisher
            .write_all(&connect_v4("bad-ack-pub", true))
            .await
            .unwrap();
        assert_eq!(read_packet(&mut publisher).await.unwrap().0, 0x20);
        let mut body = vec![0, topic.len() as u8];
        body.extend_from_slice(topic);
        body.extend_from_slice(&[0, 9]); // packet id
        body.extend_from_slice(b"m");
        publisher
            .write_all(&[0x30 | (qos << 1), body.len() as u8])
            .await
            .unwrap();
        publisher.write_all(&body).await.unwrap();
        let (t, p) = read_packet(&mut sub).await.expect("the delivery");
        assert_eq!(t & 0xF6, 0x30 | (qos << 1), "PUBLISH at QoS {qos}");
        let id = [p[p.len() - 3], p[p.len() - 2]];
        sub.write_all(&[wrong, 2, id[0], id[1]]).await.unwrap();
        sub.write_all(&[0xC0, 0]).await.unwrap(); // PINGREQ
        assert_eq!(
            read_packet(&mut sub).await,
            None,
            "QoS {qos} answered with {wrong:#04x}: closed, no PINGRESP"
        );
    }
}

/// MQTT 5 §4.13.1 leaves the DISCONNECT before closing on a protocol error to the server.
/// As Mosquitto 2.0 (its 01-connect-duplicate, 01-connect-connack-2163 and bad-ack tests):
/// a second CONNECT, a server-to-client packet or a wrong-kind acknowledgement just close
/// the connection; a malformed SUBSCRIBE gets DISCONNECT 0x81 first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn which_v5_protocol_errors_get_a_disconnect() {
    let b = start().await;
    let connect = connect_v5("errors-v5", &[], None);
    let quiet: [&[u8]; 3] = [&connect, &[0x29, 0x02, 0x00, 0x01], &[0x40, 2, 0, 7]];
    for (i, bad) in quiet.into_iter().enumerate() {
        let mut s = raw(&b).await;
        s.write_all(&connect).await.unwrap();
        assert_eq!(read_packet(&mut s).await.unwrap().0, 0x20);
        if i == 2 {
            // A PUBACK is only wrong for a QoS 2 delivery: make one.
            let mut sub = subscribe_qos1("errors/t");
            sub.insert(4, 0); // no properties
            sub[1] += 1;
            *sub.last_mut().unwrap() = 2;
            s.write_all(&sub).await.unwrap();
            assert_eq!(read_packet(&mut s).await.unwrap().0, 0x90);
            // PUBLISH QoS 2 to itself, packet id 9, no properties.
            let topic = b"errors/t";
            let mut body = vec![0, topic.len() as u8];
            body.extend_from_slice(topic);
            body.extend_from_slice(&[0, 9, 0, b'm']);
            let mut publish = vec![0x34, body.len() as u8];
            publish.extend(body);
            s.write_all(&publish).await.unwrap();
            let mut delivery_id = None;
            while delivery_id.is_none() {
                let (t, p) = read_packet(&mut s).await.expect("PUBREC and the delivery");
                if t & 0xF0 == 0x30 {
                    let at = 2 + topic.len();
                    delivery_id = Some([p[at], p[at + 1]]);
                }
            }
            let id = delivery_id.unwrap();
            s.write_all(&[0x40, 2, id[0], id[1]]).await.unwrap();
        } else {
            s.write_all(bad).await.unwrap();
        }
        s.write_all(&[0xC0, 0]).await.unwrap(); // PINGREQ
        loop {
            match read_packet(&mut s).await {
                None => break,
                // The QoS 2 exchange of case 2 may still be finishing.
                Some((t, _)) if i == 2 && (t == 0x50 || t == 0x70) => continue,
                Some((t, p)) => panic!("case {i}: got {t:#04x} {p:?}, not a plain close"),
            }
        }
    }
    let mut s = raw(&b).await;
    s.write_all(&connect).await.unwrap();
    assert_eq!(read_packet(&mut s).await.unwrap().0, 0x20);
    // SUBSCRIBE with reserved flags 0 instead of 2 (MQTT-3.8.1-1): malformed.
    s.write_all(&[0x80, 9, 0, 1, 0, 0, 4, b'a', b'/', b'b', 0])
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await, Some((0xE0, vec![0x81])));
    // A filter with `#` not last (MQTT-4.7.1-2), in SUBSCRIBE or UNSUBSCRIBE: malformed,
    // DISCONNECT 0x81 as Mosquitto, not a SUBACK failure code.
    let filter = b"a/#/b";
    for first in [0x82u8, 0xA2] {
        let mut s = raw(&b).await;
        s.write_all(&connect).await.unwrap();
        assert_eq!(read_packet(&mut s).await.unwrap().0, 0x20);
        let mut body = vec![0, 1, 0, 0, filter.len() as u8];
        body.extend_from_slice(filter);
        if first == 0x82 {
            body.push(1);
        }
        let mut packet = vec![first, body.len() as u8];
        packet.extend(body);
        s.write_all(&packet).await.unwrap();
        assert_eq!(read_packet(&mut s).await, Some((0xE0, vec![0x81])));
        assert_eq!(read_packet(&mut s).await, None);
    }
}

/// A CONNACK over the client's Maximum Packet Size cannot be sent (MQTT-3.1.2-24): the
/// connection closes without one, as Mosquitto's 12-prop-maximum-packet-size-connect
/// expects; a limit that fits it gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connack_over_the_clients_maximum_is_not_sent() {
    let b = start().await;
    let mut s = raw(&b).await;
    s.write_all(&connect_v5("tiny", &[0x27, 0, 0, 0, 2], None))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await, None, "closed without a CONNACK");
    let mut s = raw(&b).await;
    s.write_all(&connect_v5("roomy", &[0x27, 0, 0, 1, 0], None))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await.map(|p| p.0), Some(0x20));
}

/// A client that disconnects with session expiry 0 and connects again at once without
/// clean start finds no session (Session Present 0, no subscriptions), whether the broker
/// read the DISCONNECT before the new CONNECT or the takeover found it still in the
/// socket: raced 20 times (it was resumed in about one run in three). A 3.1.1 clean
/// session taken over by a persistent one is not resumed either, as Mosquitto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_disconnect_is_not_resumed_by_a_quick_reconnect() {
    let b = start().await;
    let mut subscribe_v5 = subscribe_qos1("quick/t");
    subscribe_v5.insert(4, 0); // no properties
    subscribe_v5[1] += 1;
    for i in 0..20 {
        let id = format!("quick-{i}");
        let mut s = raw(&b).await;
        // Session expiry 60 s (0x11) at CONNECT, then 0 at DISCONNECT (MQTT-3.14.2-2 allows
        // lowering it).
        s.write_all(&connect_v5(&id, &[0x11, 0, 0, 0, 60], None))
            .await
            .unwrap();
        assert_eq!(read_packet(&mut s).await.unwrap().0, 0x20);
        s.write_all(&subscribe_v5).await.unwrap();
        assert_eq!(read_packet(&mut s).await.unwrap().0, 0x90);
        // The next connection is open before the DISCONNECT goes, so its CONNECT follows
        // at once and the broker may well read it before the DISCONNECT.
        let mut next = raw(&b).await;
        s.write_all(&[0xE0, 7, 0, 5, 0x11, 0, 0, 0, 0])
            .await
            .unwrap();
        drop(s);
        let mut again = connect_v5(&id, &[0x11, 0, 0, 0, 60], None);
        again[9] &= !2; // no clean start
        next.write_all(&again).await.unwrap();
        let mut s = next;
        let (t, body) = read_packet(&mut s).await.unwrap();
        assert_eq!((t, body[0], body[1]), (0x20, 0, 0), "run {i}: no session");
    }
    // 3.1.1: a clean session's subscription is not handed to a persistent takeover.
    let mut clean = raw(&b).await;
    clean.write_all(&connect_v4("ct", true)).await.unwrap();
    assert_eq!(read_packet(&mut clean).await.unwrap().0, 0x20);
    clean.write_all(&subscribe_qos1("ct/x")).await.unwrap();
    assert_eq!(read_packet(&mut clean).await.unwrap().0, 0x90);
    let mut persistent = raw(&b).await;
    persistent
        .write_all(&connect_v4("ct", false))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut persistent).await.unwrap(),
        (0x20, vec![0, 0]),
        "no Session Present"
    );
    let p = publisher(&b, "ct-pub").await;
    p.publish("ct/x", QoS::AtLeastOnce, false, "for nobody")
        .await
        .unwrap();
    let quiet =
        tokio::time::timeout(Duration::from_millis(500), read_packet(&mut persistent)).await;
    assert!(quiet.is_err(), "no inherited subscription: {quiet:?}");
}

/// A server shutdown ends each MQTT 5 connection with DISCONNECT 0x8B (Server shutting
/// down) and closes 3.1.1 ones, at once rather than after the listeners' grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_disconnects_with_0x8b() {
    let mut b = start().await;
    let mut v5 = raw(&b).await;
    v5.write_all(&connect_v5("shut-v5", &[], None))
        .await
        .expect("connect");
    assert_eq!(read_packet(&mut v5).await.map(|p| p.0), Some(0x20));
    let mut v4 = raw(&b).await;
    v4.write_all(&connect_v4("shut-v4", true))
        .await
        .expect("connect");
    assert_eq!(read_packet(&mut v4).await.map(|p| p.0), Some(0x20));
    let server = b.server.take().expect("server");
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    let (first, body) = read_packet(&mut v5)
        .await
        .expect("DISCONNECT before the close");
    assert_eq!((first, body.first().copied()), (0xE0, Some(0x8B)));
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(3), v4.read_to_end(&mut rest)).await;
    assert!(matches!(eof, Ok(Ok(0))), "3.1.1 connection closed: {eof:?}");
    stopping.await.expect("shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "connections closed at once, not aborted after the grace period: {:?}",
        started.elapsed()
    );
}
