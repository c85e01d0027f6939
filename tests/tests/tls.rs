//! TLS listeners (AMQPS, MQTTS, STOMP over TLS) with a self-signed certificate: each
//! speaks its protocol through rustls exactly as on the plain port.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

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
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.key_pair.serialize_pem()).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut c = common::config(data.path());
    c.tls.cert_file = cert_path.display().to_string();
    c.tls.key_file = key_path.display().to_string();
    c.listeners.amqps = "127.0.0.1:0".into();
    c.listeners.mqtts = "127.0.0.1:0".into();
    c.listeners.stomps = "127.0.0.1:0".into();
    let server = warren::Server::start(&c).await.unwrap();
    let ca = ck.cert.der().clone();

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
