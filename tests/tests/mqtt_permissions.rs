//! MQTT and the shared user store: vhost access at CONNECT, write on amq.topic to publish,
//! read to subscribe, and MQTT connections in the management registry.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_core::permissions::PermissionRecord;

/// A 3.1.1 CONNECT with these connect flags and payload strings, keep-alive 60 s.
fn connect_311(flags: u8, payload: &[&str]) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3C];
    for s in payload {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// A 3.1.1 CONNECT with clean session, username and password.
fn connect_packet(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    connect_311(0xC2, &[client_id, user, pass])
}

async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("reply in time")
        .expect("bytes");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_permissions_and_registry() {
    let b = common::start().await;
    let broker = b.server.as_ref().unwrap().broker.clone();
    broker.put_user("nobody", "pw", vec![]).await.unwrap();
    broker.put_user("reader", "pw", vec![]).await.unwrap();
    broker
        .set_permission(PermissionRecord {
            user: "reader".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: "^mqtt-subscription-.*".into(),
            read: ".*".into(),
        })
        .await
        .unwrap();
    // No permissions in the vhost: CONNACK 5 (not authorised).
    let mut s = TcpStream::connect(b.mqtt_addr).await.unwrap();
    s.write_all(&connect_packet("p1", "nobody", "pw"))
        .await
        .unwrap();
    assert_eq!(read_n(&mut s, 4).await, [0x20, 0x02, 0x00, 0x05]);

    // Read but no write on amq.topic: may subscribe, may not publish.
    let mut s = TcpStream::connect(b.mqtt_addr).await.unwrap();
    s.write_all(&connect_packet("p2", "reader", "pw"))
        .await
        .unwrap();
    assert_eq!(read_n(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);
    assert!(broker
        .connections()
        .list()
        .iter()
        .any(|e| e.info.protocol == "MQTT 3.1.1" && e.info.user == "reader"));
    s.write_all(&[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x00])
        .await
        .unwrap();
    assert_eq!(read_n(&mut s, 5).await, [0x90, 0x03, 0x00, 0x01, 0x00]);
    // PUBLISH QoS 1 a/b: 3.1.1 has no negative PUBACK, so the connection closes.
    s.write_all(&[
        0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'h', b'i',
    ])
    .await
    .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed, no PUBACK: {:?}", &buf[..n]);
}

/// A 3.1.1 CONNECT with a QoS 0 will on `will_topic`.
fn connect_with_will(client_id: &str, user: &str, pass: &str, will_topic: &str) -> Vec<u8> {
    // Flags: username, password, will (QoS 0, not retained), clean session.
    connect_311(0xC6, &[client_id, will_topic, "gone", user, pass])
}

/// The will is checked at CONNECT like a publish, as RabbitMQ's MQTT plugin does: no
/// write on amq.topic, or a topic permission that refuses its topic, is CONNACK 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_topic_is_authorised_at_connect() {
    let b = common::start().await;
    let broker = b.server.as_ref().unwrap().broker.clone();
    for (user, write) in [("reader", "^mqtt-subscription-.*"), ("device", ".*")] {
        broker.put_user(user, "pw", vec![]).await.unwrap();
        broker
            .set_permission(PermissionRecord {
                user: user.into(),
                vhost: "/".into(),
                configure: ".*".into(),
                write: write.into(),
                read: ".*".into(),
            })
            .await
            .unwrap();
    }
    broker
        .set_topic_permission(warren_core::TopicPermissionRecord {
            user: "device".into(),
            vhost: "/".into(),
            exchange: "amq.topic".into(),
            write: "^devices\\.{client_id}\\.".into(),
            read: ".*".into(),
        })
        .await
        .unwrap();
    let connack = |client: &'static str, user: &'static str, topic: &'static str| {
        let addr = b.mqtt_addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&connect_with_will(client, user, "pw", topic))
                .await
                .unwrap();
            read_n(&mut s, 4).await[3]
        }
    };
    assert_eq!(
        connack("w1", "reader", "any/topic").await,
        5,
        "no write on amq.topic"
    );
    assert_eq!(connack("w2", "device", "devices/w2/status").await, 0);
    assert_eq!(
        connack("w3", "device", "devices/other/status").await,
        5,
        "{{client_id}} is w3, so another device's topic is refused"
    );
}
