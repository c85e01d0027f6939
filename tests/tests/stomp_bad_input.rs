//! Bad STOMP input is answered with an ERROR frame (and a close, but for a client's mistake
//! in a frame, as RabbitMQ) and never disturbs other connections; and STOMP traffic crosses to MQTT and back through amq.topic.

mod common;

use std::time::Duration;

use common::stomp::{send_frame, StompClient};
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use warren_stomp::codec::Frame;

async fn expect_error(c: &mut StompClient, message: &str) {
    let f = c.recv().await.expect("an ERROR frame");
    assert_eq!(f.command, "ERROR", "{f:?}");
    assert_eq!(f.get("message"), Some(message), "{f:?}");
    assert!(!f.body.is_empty());
    assert!(c.closed().await, "closed after ERROR");
}

/// A client's mistake in a frame: ERROR, and the connection goes on (RabbitMQ's
/// `error/3`), so a following SEND still gets its RECEIPT.
async fn expect_refused(c: &mut StompClient, message: &str) {
    let f = c.recv().await.expect("an ERROR frame");
    assert_eq!(f.command, "ERROR", "{f:?}");
    assert_eq!(f.get("message"), Some(message), "{f:?}");
    assert!(!f.body.is_empty());
    c.send_receipted(send_frame("/queue/after", b"x"), "after")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_error_then_close() {
    let b = start().await;
    // A healthy subscriber that must keep working throughout.
    let mut watcher = StompClient::connect(b.stomp_addr).await;
    watcher.subscribe("w", "/queue/health", "auto").await;

    let mut c = StompClient::open(b.stomp_addr).await;
    c.send_raw(b"\x16\x03\x01 garbage that is not stomp\n\n\0")
        .await;
    expect_error(&mut c, "Malformed frame").await;

    let mut c = StompClient::open(b.stomp_addr).await;
    c.send_raw(b"SEND\ndestination:/queue/x\n\nhi\0").await;
    expect_error(&mut c, "Illegal command").await;

    let mut c = StompClient::connect(b.stomp_addr).await;
    c.send_raw(b"SEND\ndestination:/queue/x\n\nno terminator")
        .await;
    let t = std::time::Instant::now();
    expect_error(&mut c, "Incomplete frame").await;
    assert!(t.elapsed() < Duration::from_secs(4));

    let mut c = StompClient::connect(b.stomp_addr).await;
    c.send_raw(b"SEND\ndestination:/queue/x\ncontent-length:999999999999\n\n")
        .await;
    expect_error(&mut c, "Frame too large").await;

    let mut c = StompClient::connect(b.stomp_addr).await;
    let mut big = b"SEND\nx:".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70_000));
    c.send_raw(&big).await;
    expect_error(&mut c, "Header too long").await;

    let mut c = StompClient::connect(b.stomp_addr).await;
    let mut many = b"SEND\ndestination:/queue/x\n".to_vec();
    for i in 0..1001 {
        many.extend_from_slice(format!("h{i}:v\n").as_bytes());
    }
    many.extend_from_slice(b"\n\0");
    c.send_raw(&many).await;
    expect_error(&mut c, "Too many headers").await;

    let mut c = StompClient::connect(b.stomp_addr).await;
    c.send(Frame::new("FOO")).await;
    expect_refused(&mut c, "Bad command").await;
    c.send(send_frame("/nowhere/x", b"")).await;
    expect_refused(&mut c, "Unknown destination").await;
    c.send(send_frame("/queue/x", b"").with("message-id", "mine"))
        .await;
    expect_refused(&mut c, "Invalid header").await;
    c.send(Frame::new("ACK").with("id", "garbage")).await;
    expect_refused(&mut c, "Invalid header").await;
    c.send(
        Frame::new("SEND")
            .with("transaction", "nope")
            .with("destination", "/queue/x"),
    )
    .await;
    expect_refused(&mut c, "Bad transaction").await;
    c.send(Frame::new("COMMIT")).await;
    expect_refused(&mut c, "Missing transaction").await;
    c.send(Frame::new("UNSUBSCRIBE").with("id", "nope")).await;
    expect_refused(&mut c, "No subscription found").await;
    c.send(Frame::new("SEND")).await;
    expect_refused(&mut c, "Missing destination").await;

    // A BEGIN of an open transaction starts it afresh, without an ERROR (RabbitMQ).
    c.send(Frame::new("BEGIN").with("transaction", "t")).await;
    c.send_receipted(Frame::new("BEGIN").with("transaction", "t"), "again")
        .await;

    // A second subscription with the same id: ERROR, then RabbitMQ closes.
    let mut c = StompClient::connect(b.stomp_addr).await;
    c.subscribe("dup", "/queue/d1", "auto").await;
    c.send(
        Frame::new("SUBSCRIBE")
            .with("id", "dup")
            .with("destination", "/queue/d2"),
    )
    .await;
    expect_error(&mut c, "Duplicated subscription identifier").await;

    // A well-formed id of no unsettled message is RabbitMQ's channel error: it closes.
    let mut c = StompClient::connect(b.stomp_addr).await;
    c.send(Frame::new("ACK").with("id", "T_s@@session-x@@99"))
        .await;
    expect_error(&mut c, "precondition_failed").await;

    let mut c = StompClient::connect(b.stomp_addr).await;
    c.send(Frame::new("CONNECT")).await;
    expect_error(&mut c, "Already connected").await;

    // The watcher never noticed.
    let mut p = StompClient::connect(b.stomp_addr).await;
    p.publish("/queue/health", "still here").await;
    let m = watcher.recv().await.unwrap();
    assert_eq!(&m.body[..], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_topics_meet_mqtt() {
    let b = start().await;
    let mut o = MqttOptions::new("stomp-x", b.mqtt_addr.ip().to_string(), b.mqtt_addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 10);
    client.subscribe("x/y", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    let mut s = StompClient::connect(b.stomp_addr).await;
    s.subscribe("m", "/topic/dev.*.pos", "auto").await;
    // STOMP /topic/x.y → MQTT x/y.
    s.publish("/topic/x.y", "from stomp").await;
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.topic, "x/y");
    assert_eq!(&got.payload[..], b"from stomp");
    // MQTT dev/7/pos → STOMP /topic/dev.*.pos, all 256 byte values intact.
    let payload: Vec<u8> = (0..=255u8).collect();
    client
        .publish("dev/7/pos", QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let m = s.recv().await.unwrap();
    assert_eq!(m.get("destination"), Some("/topic/dev.7.pos"));
    assert_eq!(&m.body[..], &payload[..]);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_and_the_connection_registry() {
    use warren_core::permissions::PermissionRecord;
    let b = start().await;
    let broker = b.server.as_ref().unwrap().broker.clone();
    broker.put_user("reader", "pw", vec![]).await.unwrap();
    broker.put_user("nobody", "pw", vec![]).await.unwrap();
    broker
        .set_permission(PermissionRecord {
            user: "reader".into(),
            vhost: "/".into(),
            configure: "^$".into(),
            write: "^$".into(),
            read: ".*".into(),
        })
        .await
        .unwrap();
    // No permission on the vhost at all: refused at CONNECT.
    let (mut c, f) =
        StompClient::connect_with(b.stomp_addr, &[("login", "nobody"), ("passcode", "pw")]).await;
    assert_eq!(f.command, "ERROR");
    assert_eq!(f.get("message"), Some("Bad CONNECT"));
    assert!(c.closed().await);
    // Listed in the registry as RabbitMQ lists STOMP connections.
    let (mut c, f) =
        StompClient::connect_with(b.stomp_addr, &[("login", "reader"), ("passcode", "pw")]).await;
    assert_eq!(f.command, "CONNECTED");
    let listed = broker.connections().list();
    assert!(listed
        .iter()
        .any(|e| e.info.protocol == "STOMP 1.2" && e.info.user == "reader"));
    // Publishing needs write on the exchange.
    c.send(send_frame("/topic/x", b"no")).await;
    let e = c
        .recv_within(Duration::from_secs(5))
        .await
        .expect("ERROR for SEND")
        .unwrap();
    assert_eq!(e.command, "ERROR");
    assert_eq!(e.get("message"), Some("access_refused"));
    let body = String::from_utf8_lossy(&e.body).into_owned();
    assert!(
        body.contains("ACCESS_REFUSED - access to exchange 'amq.topic' in vhost '/' refused for user 'reader'"),
        "{body}"
    );
    assert!(c.closed().await);
    // Declaring /queue/ needs configure on the queue.
    let (mut c, _) =
        StompClient::connect_with(b.stomp_addr, &[("login", "reader"), ("passcode", "pw")]).await;
    c.send(
        Frame::new("SUBSCRIBE")
            .with("id", "s")
            .with("destination", "/queue/private"),
    )
    .await;
    let e = c
        .recv_within(Duration::from_secs(5))
        .await
        .expect("ERROR for SUBSCRIBE")
        .unwrap();
    assert_eq!(e.get("message"), Some("access_refused"));
    assert!(c.closed().await);
}
