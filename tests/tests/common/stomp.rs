//! A small STOMP test client on Warren's own codec (async-stomp would pull in a C TLS
//! build); enough to drive every frame and see every byte the broker sends.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_stomp::codec::{self, Decoded, Frame, Limits, Version};

pub struct StompClient {
    pub stream: TcpStream,
    buf: BytesMut,
    pub version: Version,
    /// Heart-beat EOLs received so far.
    pub heart_beats: usize,
    /// Every frame ends `\0\n` (as RabbitMQ's): that EOL is no heart-beat.
    trailing_lf: bool,
    /// Whether every frame so far came with its trailing EOL.
    pub all_frames_had_lf: bool,
}

impl StompClient {
    /// Opens a socket without sending anything.
    pub async fn open(addr: SocketAddr) -> StompClient {
        StompClient {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
            version: Version::V1_2,
            heart_beats: 0,
            trailing_lf: false,
            all_frames_had_lf: true,
        }
    }

    /// CONNECT as guest with `extra` headers; returns the client and CONNECTED (or ERROR).
    pub async fn connect_with(addr: SocketAddr, extra: &[(&str, &str)]) -> (StompClient, Frame) {
        let mut c = Self::open(addr).await;
        let mut f = Frame::new("CONNECT");
        if !extra.iter().any(|(k, _)| *k == "accept-version") {
            f.push("accept-version", "1.0,1.1,1.2");
        }
        if !extra.iter().any(|(k, _)| *k == "login") {
            f.push("login", "guest");
            f.push("passcode", "guest");
        }
        for (k, v) in extra {
            f.push(k, *v);
        }
        c.send(f).await;
        let reply = c.recv().await.expect("a reply to CONNECT");
        if let Some(v) = reply.get("version").and_then(Version::parse) {
            c.version = v;
        } else {
            c.version = Version::V1_0;
        }
        (c, reply)
    }

    pub async fn connect(addr: SocketAddr) -> StompClient {
        let (c, f) = Self::connect_with(addr, &[]).await;
        assert_eq!(f.command, "CONNECTED", "{f:?}");
        c
    }

    pub async fn send(&mut self, f: Frame) {
        let mut out = BytesMut::new();
        codec::encode(&f, self.version, &mut out);
        self.stream.write_all(&out).await.expect("write");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame (heart-beats counted and skipped), or `None` at EOF; panics after 5 s.
    pub async fn recv(&mut self) -> Option<Frame> {
        self.recv_within(Duration::from_secs(5))
            .await
            .expect("a frame within 5 s")
    }

    /// `Err` on timeout.
    pub async fn recv_within(&mut self, d: Duration) -> Result<Option<Frame>, ()> {
        tokio::time::timeout(d, async {
            loop {
                match codec::decode(&mut self.buf, self.version, &Limits::default()) {
                    Ok(Some(Decoded::Frame(f))) => {
                        // The EOL after the previous frame never came.
                        self.all_frames_had_lf &= !self.trailing_lf;
                        self.trailing_lf = true;
                        return Some(f);
                    }
                    Ok(Some(Decoded::HeartBeat)) if self.trailing_lf => {
                        self.trailing_lf = false;
                        continue;
                    }
                    Ok(Some(Decoded::HeartBeat)) => {
                        self.heart_beats += 1;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => panic!("broker sent a bad frame: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    /// Sends a frame with a receipt and waits for that RECEIPT.
    pub async fn send_receipted(&mut self, f: Frame, receipt: &str) {
        self.send(f.with("receipt", receipt)).await;
        let r = self.recv().await.expect("RECEIPT");
        assert_eq!(r.command, "RECEIPT", "{r:?}");
        assert_eq!(r.get("receipt-id"), Some(receipt));
    }

    pub async fn subscribe(&mut self, id: &str, dest: &str, ack: &str) {
        let f = Frame::new("SUBSCRIBE")
            .with("id", id)
            .with("destination", dest)
            .with("ack", ack);
        self.send_receipted(f, &format!("sub-{id}")).await;
    }

    pub async fn publish(&mut self, dest: &str, body: &str) {
        let mut f = Frame::new("SEND").with("destination", dest);
        f.body = bytes::Bytes::copy_from_slice(body.as_bytes());
        self.send(f).await;
    }

    /// Waits for the connection to be closed by the broker (EOF), skipping frames.
    pub async fn closed(&mut self) -> bool {
        loop {
            match self.recv_within(Duration::from_secs(5)).await {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(()) => return false,
            }
        }
    }
}

pub fn send_frame(dest: &str, body: &[u8]) -> Frame {
    let mut f = Frame::new("SEND").with("destination", dest);
    f.body = bytes::Bytes::copy_from_slice(body);
    f
}
