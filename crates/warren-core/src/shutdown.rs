//! The accept loop and graceful shutdown shared by every listener (plain TCP and TLS).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The listen backlog of every listener (tokio's default, and the binary's dual-stack
/// `bind`), shown by the management API's `socket_opts`.
pub const LISTEN_BACKLOG: u32 = 1024;

/// A source of accepted connections: a TCP listener, or a TLS listener that yields
/// finished handshakes.
pub trait Incoming: Send {
    type Io: Send + 'static;
    /// The next connection: (stream, peer, local address); `None` when none will come.
    fn next(&mut self) -> impl Future<Output = Option<(Self::Io, SocketAddr, SocketAddr)>> + Send;
}

impl Incoming for TcpListener {
    type Io = TcpStream;

    async fn next(&mut self) -> Option<(TcpStream, SocketAddr, SocketAddr)> {
        loop {
            match self.accept().await {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    let local = socket.local_addr().unwrap_or(peer);
                    return Some((socket, peer, local));
                }
                // Out of file descriptors and the like: wait rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Runs `session(stream, peer, local, shutdown)` on each connection of `incoming` until
/// `shutdown`; then stops accepting and waits (bounded) for the sessions, which see the
/// same signal and close with their protocol's close.
pub async fn serve_connections<I, F, Fut>(
    mut incoming: I,
    mut shutdown: watch::Receiver<bool>,
    session: F,
) where
    I: Incoming,
    F: Fn(I::Io, SocketAddr, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            Some((io, peer, local)) = incoming.next() => {
                tasks.spawn(session(io, peer, local, shutdown.clone()));
            }
            _ = shutdown.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(incoming);
    drain_connections(&mut tasks, Duration::from_secs(5)).await;
}

/// Waits for a listener's connection tasks (they saw the shutdown signal and are sending
/// their protocol's close); whatever is still running after `grace` is aborted.
pub async fn drain_connections(tasks: &mut JoinSet<()>, grace: Duration) {
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return },
            _ = &mut deadline => {
                tasks.abort_all();
                return;
            }
        }
    }
}
