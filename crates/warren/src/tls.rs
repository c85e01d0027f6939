//! TLS listeners (AMQPS 5671, MQTTS 8883, STOMP over TLS 61614) with rustls: the TLS
//! stream is handed to the same session code as a plain socket. Certificates and keys are
//! PEM files from `[tls]` in the config; with `ca_file` set, clients must present a
//! certificate signed by that CA (mutual TLS).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
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

/// Accepts TCP connections, completes the TLS handshake, and runs `session` on each, until
/// `shutdown`; then waits (bounded) for the sessions, which see the same signal.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    session: TlsSessionFn,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, peer)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let local = socket.local_addr().unwrap_or(peer);
                let acceptor = acceptor.clone();
                let session = session.clone();
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(tls)) => session(tls, peer, local, shutdown).await,
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            _ = shutdown.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    warren_core::shutdown::drain_connections(&mut tasks, Duration::from_secs(5)).await;
}
