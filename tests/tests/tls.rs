//! TLS listeners (AMQPS, MQTTS, STOMP over TLS, HTTPS, Web-STOMP/Web-MQTT over TLS) with
//! a self-signed certificate: each speaks its protocol through rustls exactly as on the
//! plain port. Then client certificates from a test CA: with `ssl_cert_login` the
//! certificate's CN logs in (AMQP SASL EXTERNAL, MQTT and STOMP without credentials).

mod common;

use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use warren_amqp_codec::Frame;

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

/// Sends a STOMP CONNECT frame and expects CONNECTED back.
async fn stomp_connected(s: &mut tokio_rustls::client::TlsStream<TcpStream>, connect: &[u8]) {
    s.write_all(connect).await.unwrap();
    let f = read_some(s, 10).await;
    assert!(
        f.starts_with(b"CONNECTED\n"),
        "{}",
        String::from_utf8_lossy(&f)
    );
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
    stomp_connected(
        &mut s,
        b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0",
    )
    .await;

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
    tls_listeners_on_free_ports(&mut c);
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

/// A test CA, a server certificate for "localhost" and client certificates it signs.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A client certificate and its key.
struct Identity {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Warren test CA");
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    fn leaf(
        &self,
        cn: &str,
        sans: Vec<String>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Warren tests");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert, key)
    }

    fn client(&self, cn: &str) -> Identity {
        let (cert, key) = self.leaf(cn, vec![], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        Identity {
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    /// Writes the server's cert, key and the CA into `dir` and points `[tls]` at them.
    fn configure(&self, dir: &std::path::Path, c: &mut warren::Config) {
        let (cert, key) = self.leaf(
            "localhost",
            vec!["localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (cert_path, key_path, ca_path) = (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("ca.pem"),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&ca_path, self.ca.pem()).unwrap();
        c.tls.cert_file = cert_path.display().to_string();
        c.tls.key_file = key_path.display().to_string();
        c.tls.ca_file = ca_path.display().to_string();
        tls_listeners_on_free_ports(c);
    }
}

/// Every TLS listener on a free loopback port: tests run side by side, and a default
/// port (15676, …) taken by one would fail the other's start.
fn tls_listeners_on_free_ports(c: &mut warren::Config) {
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
}

/// A TLS client presenting `id` (mutual TLS).
async fn tls_connect_as(
    addr: std::net::SocketAddr,
    ca: &CertificateDer<'static>,
    id: &Identity,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone()));
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![id.cert.clone()], key)
            .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// Reads one whole AMQP frame.
async fn amqp_frame(
    s: &mut tokio_rustls::client::TlsStream<TcpStream>,
    buf: &mut BytesMut,
) -> Frame {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(f) = warren_amqp_codec::decode_frame(buf, 1 << 20).unwrap() {
                return f;
            }
            let n = s.read_buf(buf).await.unwrap();
            assert!(n > 0, "connection closed");
        }
    })
    .await
    .expect("a frame in time")
}

fn connection_method(f: Frame) -> connection::AMQPMethod {
    match f {
        Frame::Method(0, m) => match *m {
            AMQPClass::Connection(m) => m,
            other => panic!("not a connection method: {other:?}"),
        },
        other => panic!("not a method frame: {other:?}"),
    }
}

/// AMQP over TLS up to connection.tune (or the refusal): the mechanisms offered, and what
/// followed start-ok with `mechanism`.
async fn amqp_login(
    s: &mut tokio_rustls::client::TlsStream<TcpStream>,
    mechanism: &str,
    response: &[u8],
) -> (String, connection::AMQPMethod) {
    let mut buf = BytesMut::new();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let connection::AMQPMethod::Start(start) = connection_method(amqp_frame(s, &mut buf).await)
    else {
        panic!("expected connection.start");
    };
    let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
    let mut out = BytesMut::new();
    warren_amqp_codec::encode_method(
        &mut out,
        0,
        &AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            // As pika and lapin: a refused login then gets its connection.close 403.
            client_properties: auth_failure_close(),
            mechanism: mechanism.into(),
            response: response.into(),
            locale: "en_US".into(),
        })),
    );
    s.write_all(&out).await.unwrap();
    let next = connection_method(amqp_frame(s, &mut buf).await);
    (mechanisms, next)
}

/// Client properties announcing RabbitMQ's `authentication_failure_close` capability.
fn auth_failure_close() -> FieldTable {
    let mut caps = FieldTable::default();
    caps.insert(
        "authentication_failure_close".into(),
        AMQPValue::Boolean(true),
    );
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props
}

/// MQTT 3.1.1 CONNECT with clean session and no credentials; returns the CONNACK.
async fn mqtt_connect_anonymous(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    s.write_all(&[
        0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x02, b'c',
        b'1',
    ])
    .await
    .unwrap();
    read_some(s, 4).await
}

/// (protocol, user) of the registered connections (the management API's view).
fn connection_users(server: &warren::Server) -> Vec<(String, String)> {
    server
        .broker
        .connections()
        .list()
        .iter()
        .map(|c| (c.info.protocol.to_string(), c.info.user.clone()))
        .collect()
}

fn has_user(server: &warren::Server, protocol: &str, user: &str) -> bool {
    connection_users(server)
        .iter()
        .any(|(p, u)| p.starts_with(protocol) && u == user)
}

fn assert_connected_as(server: &warren::Server, protocol: &str, user: &str) {
    assert!(
        has_user(server, protocol, user),
        "no {protocol} connection of {user}: {:?}",
        connection_users(server)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_logs_in_as_its_common_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let mut c = common::config(data.path());
    pki.configure(dir.path(), &mut c);
    c.tls.ssl_cert_login = true;
    let server = warren::Server::start(&c).await.unwrap();
    server
        .broker
        .put_user("alice", "not-used-here", vec![])
        .await
        .unwrap();
    server
        .broker
        .set_permission(warren_core::full_permission("alice", "/"))
        .await
        .unwrap();
    let ca = pki.ca.der().clone();
    let (alice, mallory) = (pki.client("alice"), pki.client("mallory"));
    let tls = server.tls_addrs.clone();

    // AMQP: EXTERNAL is offered and logs alice in; the connection opens as alice.
    let mut s = tls_connect_as(tls.amqps.unwrap(), &ca, &alice).await;
    let (mechanisms, next) = amqp_login(&mut s, "EXTERNAL", b"").await;
    assert_eq!(mechanisms, "PLAIN AMQPLAIN EXTERNAL");
    assert!(matches!(next, connection::AMQPMethod::Tune(_)), "{next:?}");
    let mut out = BytesMut::new();
    for m in [
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 0,
        }),
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        }),
    ] {
        warren_amqp_codec::encode_method(&mut out, 0, &AMQPClass::Connection(m));
    }
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let open_ok = connection_method(amqp_frame(&mut s, &mut buf).await);
    assert!(
        matches!(open_ok, connection::AMQPMethod::OpenOk(_)),
        "{open_ok:?}"
    );
    assert_connected_as(&server, "AMQP", "alice");
    drop(s);

    // A certificate whose CN is no user: 403 ACCESS_REFUSED, as RabbitMQ.
    let mut s = tls_connect_as(tls.amqps.unwrap(), &ca, &mallory).await;
    let (_, next) = amqp_login(&mut s, "EXTERNAL", b"").await;
    let connection::AMQPMethod::Close(close) = next else {
        panic!("expected connection.close, got {next:?}");
    };
    assert_eq!(close.reply_code, 403);
    assert!(close.reply_text.as_str().contains("EXTERNAL"), "{close:?}");

    // Credentials still work on a connection with a certificate.
    let mut s = tls_connect_as(tls.amqps.unwrap(), &ca, &mallory).await;
    let (_, next) = amqp_login(&mut s, "PLAIN", b"\0guest\0guest").await;
    assert!(matches!(next, connection::AMQPMethod::Tune(_)), "{next:?}");

    // MQTT: CONNECT without username → accepted as alice; mallory → CONNACK 4 (bad user
    // name or password), as RabbitMQ's MQTT TLS tests expect.
    let mut s = tls_connect_as(tls.mqtts.unwrap(), &ca, &alice).await;
    assert_eq!(
        mqtt_connect_anonymous(&mut s).await,
        [0x20, 0x02, 0x00, 0x00]
    );
    assert_connected_as(&server, "MQTT", "alice");
    drop(s);
    let mut s = tls_connect_as(tls.mqtts.unwrap(), &ca, &mallory).await;
    assert_eq!(
        mqtt_connect_anonymous(&mut s).await,
        [0x20, 0x02, 0x00, 0x04]
    );

    // STOMP: CONNECT without login → CONNECTED as alice; mallory → ERROR.
    let mut s = tls_connect_as(tls.stomps.unwrap(), &ca, &alice).await;
    stomp_connected(&mut s, b"CONNECT\naccept-version:1.2\nhost:/\n\n\0").await;
    assert_connected_as(&server, "STOMP", "alice");
    let mut s = tls_connect_as(tls.stomps.unwrap(), &ca, &mallory).await;
    s.write_all(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
        .await
        .unwrap();
    let f = read_to_end(&mut s).await;
    assert!(f.starts_with("ERROR\n") && f.contains("mallory"), "{f}");

    // With ca_file, a client without a certificate does not get in.
    let mut s = tls_connect(tls.amqps.unwrap(), &ca).await;
    let _ = s.write_all(b"AMQP\x00\x00\x09\x01").await;
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "no AMQP frame without a client certificate");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ssl_cert_login_the_certificate_names_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let mut c = common::config(data.path());
    pki.configure(dir.path(), &mut c);
    let server = warren::Server::start(&c).await.unwrap();
    server.broker.put_user("alice", "pw", vec![]).await.unwrap();
    let ca = pki.ca.der().clone();
    let alice = pki.client("alice");
    // No EXTERNAL offered; choosing it anyway is an unknown mechanism.
    let mut s = tls_connect_as(server.tls_addrs.amqps.unwrap(), &ca, &alice).await;
    let (mechanisms, next) = amqp_login(&mut s, "EXTERNAL", b"").await;
    assert_eq!(mechanisms, "PLAIN AMQPLAIN");
    assert!(matches!(next, connection::AMQPMethod::Close(_)), "{next:?}");
    // MQTT without username is the default user (guest), not alice.
    let mut s = tls_connect_as(server.tls_addrs.mqtts.unwrap(), &ca, &alice).await;
    assert_eq!(
        mqtt_connect_anonymous(&mut s).await,
        [0x20, 0x02, 0x00, 0x00]
    );
    assert_connected_as(&server, "MQTT", "guest");
    assert!(!has_user(&server, "MQTT", "alice"));
    server.shutdown().await;
}
