//! Topic permissions (RabbitMQ's topic authorisation) over AMQP, MQTT 5, MQTT 3.1.1 and
//! STOMP (MQTT 3.1.1 shares the refusal path with the exchange check, tested in
//! mqtt_permissions.rs): write on the routing key to publish to a topic exchange, read to bind or
//! subscribe; no rule for an exchange means allowed.

mod common;

use std::time::Duration;

use common::mqtt::{poll_until, puback_reason, suback_codes};
use common::stomp::{send_frame, StompClient};
use common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use warren_core::{full_permission, Broker, TopicPermissionRecord};
use warren_stomp::codec::Frame;

/// User `bob` with full permissions on `/` and topic rules on `amq.topic` and `tx`.
async fn setup(b: &TestBroker) -> std::sync::Arc<Broker> {
    let broker = b.server.as_ref().expect("server").broker.clone();
    broker.put_user("bob", "pw", vec![]).await.unwrap();
    broker
        .set_permission(full_permission("bob", "/"))
        .await
        .unwrap();
    for x in ["amq.topic", "tx"] {
        broker
            .set_topic_permission(TopicPermissionRecord {
                user: "bob".into(),
                vhost: "/".into(),
                exchange: x.into(),
                write: "^{username}\\.".into(),
                read: "^public\\.".into(),
            })
            .await
            .unwrap();
    }
    broker
}

async fn bob_channel(b: &TestBroker) -> (Connection, lapin::Channel) {
    let url = format!("amqp://bob:pw@{}/%2f", b.addr);
    let c = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = c.create_channel().await.expect("channel");
    (c, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_publish_and_bind() {
    let b = start().await;
    let broker = setup(&b).await;
    let (conn, ch) = bob_channel(&b).await;
    ch.exchange_declare(
        "tx".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let qn = q.name().as_str().to_owned();
    // Read allowed: bind to public.#.
    ch.queue_bind(
        qn.as_str().into(),
        "tx".into(),
        "public.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Write allowed: confirmed.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "tx".into(),
            "bob.x".into(),
            BasicPublishOptions::default(),
            b"ok",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    // An exchange without a rule is unrestricted.
    publish(&ch, "amq.direct", "anything", b"x").await;
    // Write refused: the channel closes with 403 and RabbitMQ's text. The publish's
    // pending confirm fails with the channel's close (a later method could instead find
    // the channel already closing, depending on timing).
    let e = match ch
        .basic_publish(
            "tx".into(),
            "alice.x".into(),
            BasicPublishOptions::default(),
            b"no",
            BasicProperties::default(),
        )
        .await
    {
        Ok(confirm) => confirm
            .await
            .expect_err("the refused publish is not confirmed"),
        Err(e) => e,
    };
    assert_eq!(reply_code(&e), Some(403), "{e:?}");
    let text = format!("{e:?}");
    assert!(
        text.contains(
            "write access to topic 'alice.x' in exchange 'tx' in vhost '/' refused for user 'bob'"
        ),
        "{text}"
    );
    // A CC key is a routing key too: an allowed key with a refused CC is refused.
    let ch = conn.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "CC".into(),
        lapin::types::AMQPValue::FieldArray(
            vec![lapin::types::AMQPValue::LongString("alice.cc".into())].into(),
        ),
    );
    let _ = ch
        .basic_publish(
            "tx".into(),
            "bob.y".into(),
            BasicPublishOptions::default(),
            b"cc",
            BasicProperties::default().with_headers(headers),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !channel_open(&ch).await,
        "the refused CC key closed the channel"
    );
    // Bind refused: read on the routing key.
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .queue_bind(
            qn.as_str().into(),
            "tx".into(),
            "private.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(403), "{e:?}");
    assert!(format!("{e:?}").contains("read access to topic 'private.#'"));
    // Clearing the rules lifts the refusal on an open connection.
    assert!(broker
        .clear_topic_permissions("/", "bob", None)
        .await
        .unwrap());
    let ch = conn.create_channel().await.unwrap();
    ch.queue_bind(
        qn.as_str().into(),
        "tx".into(),
        "private.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "tx", "alice.x", b"now allowed").await;
    assert!(channel_open(&ch).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_survive_a_restart() {
    let b = start().await;
    setup(&b).await;
    let b = b.restart().await;
    let broker = b.server.as_ref().unwrap().broker.clone();
    let all = broker.topic_permissions();
    assert_eq!(all.len(), 2, "{all:?}");
    let tp = broker.topic_permissions_of("/", "bob").expect("recovered");
    assert!(tp.allows("amq.topic", warren_core::Access::Write, "bob.a"));
    assert!(!tp.allows("amq.topic", warren_core::Access::Write, "eve.a"));
    // Deleting the user takes its topic permissions along.
    broker.delete_user("bob").await.unwrap();
    assert!(broker.topic_permissions().is_empty());
}

fn mqtt_opts(b: &TestBroker, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, b.mqtt_addr.ip().to_string(), b.mqtt_addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_credentials("bob", "pw");
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_publish_and_subscribe() {
    let b = start().await;
    let broker = setup(&b).await;
    // {client_id} expands per connection.
    broker
        .set_topic_permission(TopicPermissionRecord {
            user: "bob".into(),
            vhost: "/".into(),
            exchange: "amq.topic".into(),
            write: "^{username}\\.".into(),
            read: "^(public|{client_id})\\.".into(),
        })
        .await
        .unwrap();
    let (c, mut el) = AsyncClient::new(mqtt_opts(&b, "dev1"), 100);
    poll_until(&mut el, "connack", |p| {
        matches!(p, Packet::ConnAck(_)).then_some(())
    })
    .await;
    c.subscribe("secret/#", QoS::AtLeastOnce).await.unwrap();
    let codes = suback_codes(&mut el).await;
    assert_eq!(codes, vec![SubscribeReasonCode::NotAuthorized]);
    c.subscribe("dev1/+", QoS::AtLeastOnce).await.unwrap();
    let codes = suback_codes(&mut el).await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    // Denied publish: PUBACK 0x87, the connection stays.
    c.publish("alice/x", QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    let reason = puback_reason(&mut el).await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    c.publish("bob/x", QoS::AtLeastOnce, false, "yes")
        .await
        .unwrap();
    let reason = puback_reason(&mut el).await;
    // Allowed; nobody subscribes to bob/x, which MQTT 5 reports as 0x10.
    assert_eq!(reason, PubAckReason::NoMatchingSubscribers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_send_and_subscribe() {
    let b = start().await;
    setup(&b).await;
    let creds = [("login", "bob"), ("passcode", "pw")];
    let (mut c, f) = StompClient::connect_with(b.stomp_addr, &creds).await;
    assert_eq!(f.command, "CONNECTED");
    c.send_receipted(send_frame("/topic/bob.ok", b"yes"), "r1")
        .await;
    c.send(send_frame("/topic/alice.x", b"no")).await;
    let e = c
        .recv_within(Duration::from_secs(5))
        .await
        .expect("ERROR in time")
        .expect("a frame");
    assert_eq!(e.command, "ERROR");
    assert_eq!(e.get("message"), Some("access_refused"));
    let body = String::from_utf8_lossy(&e.body).into_owned();
    assert!(
        body.contains("write access to topic 'alice.x' in exchange 'amq.topic' in vhost '/' refused for user 'bob'"),
        "{body}"
    );
    assert!(c.closed().await);
    // SUBSCRIBE to a topic binds: read on the key.
    let (mut c, _) = StompClient::connect_with(b.stomp_addr, &creds).await;
    c.subscribe("s1", "/topic/public.news", "auto").await;
    c.send(
        Frame::new("SUBSCRIBE")
            .with("id", "s2")
            .with("destination", "/topic/private.news"),
    )
    .await;
    let e = c
        .recv_within(Duration::from_secs(5))
        .await
        .expect("ERROR in time")
        .expect("a frame");
    assert_eq!(e.get("message"), Some("access_refused"), "{e:?}");
    assert!(c.closed().await);
}
