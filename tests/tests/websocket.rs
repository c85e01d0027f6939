//! Web-STOMP (and later Web-MQTT) over a real WebSocket client: subprotocol negotiation,
//! frames split across messages and packed several to a message, text and binary.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::stomp::StompClient;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use warren_stomp::codec::{decode, Decoded, Frame, Limits, Version};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: std::net::SocketAddr, protocol: &str) -> (Ws, Option<String>) {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, chosen)
}

/// Reads STOMP frames from WebSocket messages, however they were cut.
async fn next_frame(ws: &mut Ws, buf: &mut BytesMut) -> Frame {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // Frames end `\0\n`: the EOL decodes as a heart-beat before the next frame.
            while let Some(d) = decode(buf, Version::V1_2, &Limits::default()).unwrap() {
                if let Decoded::Frame(f) = d {
                    return f;
                }
            }
            match ws.next().await.expect("open").expect("message") {
                Message::Text(t) => buf.extend_from_slice(t.as_bytes()),
                Message::Binary(b) => buf.extend_from_slice(&b),
                _ => {}
            }
        }
    })
    .await
    .expect("a frame in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_stomp_split_and_packed_frames() {
    let b = start().await;
    let (mut ws, chosen) = open(b.web_stomp_addr, "v10.stomp, v11.stomp, v12.stomp").await;
    assert_eq!(chosen.as_deref(), Some("v12.stomp"));
    // CONNECT split across three messages.
    let connect = "CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0";
    for piece in [&connect[..10], &connect[10..30], &connect[30..]] {
        ws.send(Message::Text(piece.into())).await.unwrap();
    }
    let mut buf = BytesMut::new();
    let f = next_frame(&mut ws, &mut buf).await;
    assert_eq!(f.command, "CONNECTED");
    assert_eq!(f.get("version"), Some("1.2"));
    // SUBSCRIBE + SEND + SEND packed into one message.
    ws.send(Message::Text(
        "SUBSCRIBE\nid:0\ndestination:/topic/live\nreceipt:r\n\n\0".into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_frame(&mut ws, &mut buf).await.command, "RECEIPT");
    ws.send(Message::Text(
        "SEND\ndestination:/topic/live\n\none\0SEND\ndestination:/topic/live\n\ntwo\0".into(),
    ))
    .await
    .unwrap();
    let a = next_frame(&mut ws, &mut buf).await;
    let c = next_frame(&mut ws, &mut buf).await;
    assert_eq!((&a.body[..], &c.body[..]), (&b"one"[..], &b"two"[..]));
    // A TCP STOMP publisher reaches the browser; binary bodies arrive intact.
    let mut tcp = StompClient::connect(b.stomp_addr).await;
    let body: Vec<u8> = (0..=255u8).collect();
    let mut f = common::stomp::send_frame("/topic/live", &body);
    f.push("content-length", "256");
    tcp.send(f).await;
    let m = next_frame(&mut ws, &mut buf).await;
    assert_eq!(&m.body[..], &body[..]);
    // Binary WebSocket messages work as well.
    ws.send(Message::Binary(
        b"SEND\ndestination:/topic/live\n\nbin\0".to_vec().into(),
    ))
    .await
    .unwrap();
    assert_eq!(&next_frame(&mut ws, &mut buf).await.body[..], b"bin");
    // DISCONNECT: the server ends the WebSocket with 1000 Normal Closure, as RabbitMQ.
    ws.send(Message::Text("DISCONNECT\n\n\0".into()))
        .await
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(f) = m {
                return f.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await;
    assert_eq!(code, Ok(Some(1000)));
}

/// The next `n` bytes of MQTT from binary WebSocket messages.
async fn read_n(ws: &mut Ws, buf: &mut Vec<u8>, n: usize) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(5), async {
        while buf.len() < n {
            match ws.next().await.expect("open").expect("message") {
                Message::Binary(b) => buf.extend_from_slice(&b),
                other => panic!("MQTT over WebSocket must be binary: {other:?}"),
            }
        }
        buf.drain(..n).collect()
    })
    .await
    .expect("bytes in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_mqtt_binary_packets_reach_amqp_and_back() {
    let b = start().await;
    let (mut ws, chosen) = open(b.web_mqtt_addr, "mqtt").await;
    assert_eq!(chosen.as_deref(), Some("mqtt"));
    // CONNECT (3.1.1, clean session, empty client id) split over two messages.
    let connect = [
        0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x00,
    ];
    for piece in [&connect[..5], &connect[5..]] {
        ws.send(Message::Binary(piece.to_vec().into()))
            .await
            .unwrap();
    }
    let mut buf = Vec::new();
    assert_eq!(read_n(&mut ws, &mut buf, 4).await, [0x20, 0x02, 0x00, 0x00]);
    // SUBSCRIBE a/b QoS 0, then an AMQP publish to amq.topic with key a.b arrives.
    ws.send(Message::Binary(
        vec![0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x00].into(),
    ))
    .await
    .unwrap();
    assert_eq!(
        read_n(&mut ws, &mut buf, 5).await,
        [0x90, 0x03, 0x00, 0x01, 0x00]
    );
    let (_conn, ch) = b.channel().await;
    ch.basic_publish(
        "amq.topic".into(),
        "a.b".into(),
        Default::default(),
        b"hi",
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        read_n(&mut ws, &mut buf, 9).await,
        [0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i']
    );
}

/// A client that closes the WebSocket (no DISCONNECT) ends its session at once, as
/// RabbitMQ's Web-STOMP: the TCP connection closes, the connection leaves the registry
/// and its unacknowledged message goes back to the queue for another consumer.
/// (stomp.js waits for the close; Warren used to keep the socket and the session.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_close_ends_the_session() {
    let b = start().await;
    let mut p = StompClient::connect(b.stomp_addr).await;
    p.send_receipted(
        Frame::new("SEND")
            .with("destination", "/queue/ws-close")
            .with("receipt", "p"),
        "p",
    )
    .await;
    let (mut ws, _) = open(b.web_stomp_addr, "v12.stomp").await;
    let mut buf = BytesMut::new();
    ws.send(Message::Text(
        "CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0".into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_frame(&mut ws, &mut buf).await.command, "CONNECTED");
    ws.send(Message::Text(
        "SUBSCRIBE\nid:a\ndestination:/queue/ws-close\nack:client\n\n\0".into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_frame(&mut ws, &mut buf).await.command, "MESSAGE");
    ws.close(None).await.unwrap();
    // The server answers the close and then closes the TCP connection: the stream ends.
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the server closed the socket");
    let mut other = StompClient::connect(b.stomp_addr).await;
    other.subscribe("b", "/queue/ws-close", "client").await;
    let m = other.recv().await.expect("the unacked message, requeued");
    assert_eq!(m.get("redelivered"), Some("true"));
}
