//! WebSocket transport (Web-STOMP, Web-MQTT, and both over TLS): axum accepts the
//! upgrade on `/ws`, and the WebSocket's messages become a plain byte stream that the
//! protocol's own session code reads and writes — no second protocol implementation. STOMP frames may be split across
//! messages or packed several to a message; the byte stream makes both work.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

use crate::web::WebListener;

/// Runs one protocol session over the byte stream of an accepted WebSocket
/// (stream, peer address, listener address, shutdown).
pub type SessionFn = Arc<
    dyn Fn(
            DuplexStream,
            SocketAddr,
            SocketAddr,
            watch::Receiver<bool>,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// How outgoing bytes are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Text messages while the bytes are UTF-8 and the client writes text (STOMP, as
    /// RabbitMQ's Web-STOMP does); binary otherwise.
    TextPreferred,
    /// Always binary (MQTT: MQTT-6.0.0-1).
    Binary,
}

#[derive(Clone)]
struct Transport {
    protocols: &'static [&'static str],
    framing: Framing,
    session: SessionFn,
    shutdown: watch::Receiver<bool>,
    local: SocketAddr,
}

/// Bytes buffered between the WebSocket and the session in each direction.
const PIPE: usize = 64 * 1024;

/// Serves WebSocket upgrades on `/ws` (over TCP or TLS) until `shutdown`.
pub async fn serve(
    what: &'static str,
    listener: WebListener,
    protocols: &'static [&'static str],
    framing: Framing,
    session: SessionFn,
    shutdown: watch::Receiver<bool>,
) {
    let Some(local) = listener.local_addr() else {
        tracing::warn!("{what} listener has no address");
        return;
    };
    let t = Transport {
        protocols,
        framing,
        session,
        shutdown: shutdown.clone(),
        local,
    };
    let app = Router::new().route("/ws", get(upgrade)).with_state(t);
    crate::web::serve(what, listener, app, shutdown).await;
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(t): State<Transport>,
) -> Response {
    let ws = ws.protocols(t.protocols.iter().map(|p| Cow::Borrowed(*p)));
    ws.on_upgrade(move |socket| bridge(socket, peer, t))
}

/// Pumps WebSocket messages into the session's input and the session's output into
/// WebSocket messages, until either side ends.
async fn bridge(socket: WebSocket, peer: SocketAddr, t: Transport) {
    let (app_side, our_side) = tokio::io::duplex(PIPE);
    let session = tokio::spawn((t.session)(app_side, peer, t.local, t.shutdown.clone()));
    let (mut from_app, mut to_app) = tokio::io::split(our_side);
    let (mut ws_tx, mut ws_rx) = socket.split();
    let mut text = t.framing == Framing::TextPreferred;
    let mut pending = BytesMut::with_capacity(8 * 1024);
    loop {
        tokio::select! {
            msg = ws_rx.next() => {
                let data: Bytes = match msg {
                    Some(Ok(WsMessage::Binary(b))) => {
                        text = false;
                        b
                    }
                    Some(Ok(WsMessage::Text(s))) => Bytes::from(s),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                };
                if to_app.write_all(&data).await.is_err() {
                    break;
                }
            }
            n = from_app.read_buf(&mut pending) => {
                match n {
                    Ok(0) | Err(_) => {
                        let _ = flush(&mut ws_tx, &mut pending, false).await;
                        break;
                    }
                    Ok(_) => {
                        if flush(&mut ws_tx, &mut pending, text).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    // 1000 Normal Closure, as RabbitMQ's Web-STOMP/Web-MQTT close (no code reads as 1005).
    let normal = axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    };
    let _ = ws_tx.send(WsMessage::Close(Some(normal))).await;
    let _ = ws_tx.close().await;
    // The TCP connection closes now, whatever the session still does.
    drop((ws_tx, ws_rx));
    // Both halves of our end go: the duplex closes only when all of it is dropped, and
    // then the session sees EOF on its input and ends (requeueing, wills, ...).
    drop((from_app, to_app));
    let _ = session.await;
}

/// Sends what the session wrote. In text mode a UTF-8 character split across reads waits
/// for its remaining bytes; bytes that are not UTF-8 at all go out as a binary message.
async fn flush<S>(ws_tx: &mut S, pending: &mut BytesMut, text: bool) -> Result<(), axum::Error>
where
    S: futures_util::Sink<WsMessage, Error = axum::Error> + Unpin,
{
    if pending.is_empty() {
        return Ok(());
    }
    if text {
        match std::str::from_utf8(pending) {
            Ok(_) => {
                let b = pending.split().freeze();
                let s = axum::extract::ws::Utf8Bytes::try_from(b).map_err(axum::Error::new)?;
                return ws_tx.send(WsMessage::Text(s)).await;
            }
            Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => {
                let b = pending.split_to(e.valid_up_to()).freeze();
                let s = axum::extract::ws::Utf8Bytes::try_from(b).map_err(axum::Error::new)?;
                return ws_tx.send(WsMessage::Text(s)).await;
            }
            Err(e) if e.error_len().is_none() => return Ok(()),
            Err(_) => {}
        }
    }
    ws_tx
        .send(WsMessage::Binary(pending.split().freeze()))
        .await
}
