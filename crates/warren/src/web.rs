//! The axum applications (management API, Web-STOMP, Web-MQTT) on a plain or a TLS
//! listener: one serve path for HTTP/HTTPS and WS/WSS.

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::tls::TlsListener;

/// Where an axum application accepts connections.
pub enum WebListener {
    Plain(TcpListener),
    Tls(TlsListener),
}

impl WebListener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            WebListener::Plain(l) => l.local_addr().ok(),
            WebListener::Tls(l) => Some(l.local_addr()),
        }
    }
}

/// Serves `app` until `shutdown`, with the peer's address as `ConnectInfo<SocketAddr>`
/// (the management API refuses loopback-only users from elsewhere).
pub async fn serve(
    what: &'static str,
    listener: WebListener,
    app: Router,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown;
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let served = match listener {
        WebListener::Plain(l) => axum::serve(l, app).with_graceful_shutdown(stopped).await,
        // axum lends `SocketAddr` connect info to TcpListener and to any tapped listener
        // whose address is a SocketAddr; the no-op tap is what gives it to TLS.
        WebListener::Tls(l) => {
            axum::serve(l.tap_io(|_| {}), app)
                .with_graceful_shutdown(stopped)
                .await
        }
    };
    if let Err(e) = served {
        tracing::warn!(error = %e, "{what} listener stopped");
    }
}
