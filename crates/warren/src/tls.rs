//! TLS listeners (AMQPS 5671, MQTTS 8883, STOMP over TLS 61614, HTTPS 15671, Web-STOMP
//! over TLS 15673, Web-MQTT over TLS 15676) with rustls: the TLS stream is handed to the
//! same session code as a plain socket. Certificates and keys are
//! PEM files from `[tls]` in the config; with `ca_file` set, clients must present a
//! certificate signed by that CA (mutual TLS), and with `ssl_cert_login` the certificate's
//! CN names the user (RabbitMQ's rabbitmq_auth_mechanism_ssl).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The session's protocol and cipher suite, for the management API's `ssl_*` fields.
pub fn details(s: &TlsStream<TcpStream>) -> warren_core::TlsDetails {
    let conn = s.get_ref().1;
    let protocol = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "tlsv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "tlsv1.2".to_owned(),
        Some(other) => format!("{other:?}").to_lowercase(),
        None => String::new(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .unwrap_or_default()
        .to_owned();
    warren_core::TlsDetails { protocol, cipher }
}

/// Builds the acceptor from PEM files (`ca_file` empty: no client certificates).
pub fn acceptor(
    cert_file: &Path,
    key_file: &Path,
    ca_file: Option<&Path>,
) -> Result<TlsAcceptor, TlsError> {
    let pem_err = |what, path: &Path, e: &dyn std::fmt::Display| TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| pem_err("certificates", cert_file, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("certificates", cert_file, &e))?;
    if certs.is_empty() {
        return Err(pem_err("certificates", cert_file, &"no certificate found"));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| pem_err("private key", key_file, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| pem_err("CA certificates", ca, &e))?
            {
                let c = c.map_err(|e| pem_err("CA certificates", ca, &e))?;
                roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs one session over an accepted TLS stream (stream, peer, listener address, shutdown).
pub type TlsSessionFn = Arc<
    dyn Fn(
            TlsStream<TcpStream>,
            SocketAddr,
            SocketAddr,
            watch::Receiver<bool>,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Time allowed for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for the listener's owner to take them.
const BACKLOG: usize = 64;

/// A TLS listener: every TLS port (AMQPS, MQTTS, STOMPS, HTTPS, WSS) accepts through it.
/// Handshakes run concurrently in a task of their own, so a slow or silent client holds
/// up no one; [`TlsListener::next`] yields the established streams. Dropping the listener
/// stops accepting and abandons the handshakes in progress.
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    handshakes: JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(BACKLOG);
        let handshakes = tokio::spawn(handshakes(listener, acceptor, tx));
        Ok(Self {
            incoming,
            local,
            handshakes,
        })
    }

    /// The next established TLS connection and its peer.
    pub async fn next(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.incoming.recv().await
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.handshakes.abort();
    }
}

/// Lets axum (management API over HTTPS, Web-STOMP/Web-MQTT over WSS) serve on it.
impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.next().await {
            Some(conn) => conn,
            // The handshake task only ends when the listener goes; nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Accepts TCP connections and hands each completed handshake to `tx`, until its
/// receiver (the [`TlsListener`]) is gone.
async fn handshakes(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut pending = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                pending.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            Some(_) = pending.join_next(), if !pending.is_empty() => {}
            _ = tx.closed() => break,
        }
    }
}

/// The TLS listeners of the protocol front-ends run through the same accept loop as
/// their plain ones.
impl warren_core::shutdown::Incoming for TlsListener {
    type Io = TlsStream<TcpStream>;

    async fn next(&mut self) -> Option<(Self::Io, SocketAddr, SocketAddr)> {
        let (tls, peer) = TlsListener::next(self).await?;
        let local = tls.get_ref().0.local_addr().unwrap_or(self.local);
        Some((tls, peer, local))
    }
}

/// Runs `session` on each connection of `listener` until `shutdown`; then waits (bounded)
/// for the sessions, which see the same signal.
pub async fn serve(listener: TlsListener, session: TlsSessionFn, shutdown: watch::Receiver<bool>) {
    warren_core::shutdown::serve_connections(listener, shutdown, |s, peer, local, sd| {
        session(s, peer, local, sd)
    })
    .await
}
