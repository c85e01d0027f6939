//! MQTT and the shared user store: vhost access at CONNECT, write on amq.topic to publish,
//! read to subscribe, and MQTT connections in the management registry.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_core::permissions::PermissionRecord;

/// A 3.1.1 CONNECT with clean session, username and password.
fn connect_packet(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xC2, 0x00, 0x3C];
    for s in [client_id, user, pass] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
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
