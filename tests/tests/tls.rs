//! TLS listeners (AMQPS, MQTTS, STOMP over TLS, HTTPS, Web-STOMP/Web-MQTT over TLS) with
//! a self-signed certificate: each speaks its protocol through rustls exactly as on the
//! plain port.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

async fn read_some(s: &mut tokio_rustls::client::TlsStream<TcpStream>, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while got.len() < n {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
        }
    })
    .await
    .expect("reply in time");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_mqtts_and_stomps_speak_through_tls() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (server, ca) = tls_broker(dir.path(), data.path()).await;

    // AMQPS: the protocol header is answered with connection.start (class 10, method 10).
    let mut s = tls_connect(server.tls_addrs.amqps.unwrap(), &ca).await;
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let f = read_some(&mut s, 11).await;
    assert_eq!(f[0], 1, "a method frame");
    assert_eq!(&f[7..11], &[0, 10, 0, 10], "connection.start");

    // MQTTS: CONNECT → CONNACK accepted.
    let mut s = tls_connect(server.tls_addrs.mqtts.unwrap(), &ca).await;
    s.write_all(&[
        0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x00,
    ])
    .await
    .unwrap();
    assert_eq!(read_some(&mut s, 4).await, [0x20, 0x02, 0x00, 0x00]);

    // STOMP over TLS: CONNECT → CONNECTED.
    let mut s = tls_connect(server.tls_addrs.stomps.unwrap(), &ca).await;
    s.write_all(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0")
        .await
        .unwrap();
    let f = read_some(&mut s, 10).await;
    assert!(
        f.starts_with(b"CONNECTED\n"),
        "{}",
        String::from_utf8_lossy(&f)
    );

    // A plain-text client on a TLS port gets no protocol answer.
    let mut plain = TcpStream::connect(server.tls_addrs.amqps.unwrap())
        .await
        .unwrap();
    plain.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    assert!(n == 0 || buf[0] != 1, "no AMQP frame in clear text");
    server.shutdown().await;
}

/// A broker with every TLS listener on, using a self-signed certificate for "localhost".
async fn tls_broker(
    dir: &std::path::Path,
    data: &std::path::Path,
) -> (warren::Server, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.key_pair.serialize_pem()).unwrap();
    let mut c = common::config(data);
    c.tls.cert_file = cert_path.display().to_string();
    c.tls.key_file = key_path.display().to_string();
    for l in [
        &mut c.listeners.amqps,
        &mut c.listeners.mqtts,
        &mut c.listeners.stomps,
        &mut c.listeners.https,
        &mut c.listeners.web_stomp_tls,
        &mut c.listeners.web_mqtt_tls,
    ] {
        *l = "127.0.0.1:0".into();
    }
    let server = warren::Server::start(&c).await.unwrap();
    (server, ck.cert.der().clone())
}

/// Reads until the peer closes (an HTTP/1.1 response with `Connection: close`).
async fn read_to_end(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("response in time")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

/// Opens `wss://localhost/ws` on `addr` asking for `protocol`, sends `msg` and returns
/// the chosen subprotocol and the first message back.
async fn wss_exchange(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    protocol: &str,
    msg: Message,
) -> (Option<String>, Message) {
    let s = tls_connect(addr, ca).await;
    let mut req = "wss://localhost/ws".into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, s)
        .await
        .expect("wss upgrade");
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    ws.send(msg).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("reply in time")
        .expect("open")
        .expect("message");
    (chosen, reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_management_api_and_wss() {
    use base64::Engine;

    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (server, ca) = tls_broker(dir.path(), data.path()).await;
    let tls = server.tls_addrs.clone();

    // HTTPS: GET /api/overview with basic auth; the TLS listeners are listed as RabbitMQ
    // names them.
    let mut s = tls_connect(tls.https.unwrap(), &ca).await;
    let auth = base64::engine::general_purpose::STANDARD.encode("guest:guest");
    s.write_all(
        format!(
            "GET /api/overview HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = read_to_end(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    let overview: serde_json::Value = serde_json::from_str(body).expect("JSON overview");
    let protocols: Vec<&str> = overview["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["protocol"].as_str())
        .collect();
    for p in [
        "https",
        "https/web-stomp",
        "https/web-mqtt",
        "amqp/ssl",
        "http",
    ] {
        assert!(protocols.contains(&p), "{p} in {protocols:?}");
    }
    // Without credentials: 401, as over plain HTTP.
    let mut s = tls_connect(tls.https.unwrap(), &ca).await;
    s.write_all(b"GET /api/overview HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_to_end(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");

    // WSS (Web-STOMP over TLS): CONNECT → CONNECTED with subprotocol v12.stomp.
    let connect = "CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0";
    let (chosen, reply) = wss_exchange(
        tls.web_stomp.unwrap(),
        &ca,
        "v12.stomp",
        Message::Text(connect.into()),
    )
    .await;
    assert_eq!(chosen.as_deref(), Some("v12.stomp"));
    let text = match reply {
        Message::Text(t) => t.to_string(),
        Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("unexpected {other:?}"),
    };
    assert!(text.starts_with("CONNECTED\n"), "{text}");

    // WSS (Web-MQTT over TLS): CONNECT → CONNACK accepted, in a binary message.
    let connect = vec![
        0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x00,
    ];
    let (chosen, reply) = wss_exchange(
        tls.web_mqtt.unwrap(),
        &ca,
        "mqtt",
        Message::Binary(connect.into()),
    )
    .await;
    assert_eq!(chosen.as_deref(), Some("mqtt"));
    assert_eq!(reply, Message::Binary(vec![0x20, 0x02, 0x00, 0x00].into()));
    server.shutdown().await;
}
