//! The machine's ceiling: a plain TCP relay measured with the same tool. `--relay ADDR`
//! runs the relay (a process in the broker's place that copies bytes from each publisher
//! to the consumer that connected just before it, no parsing, no queue); the `tcp`
//! scenario sends the same stamped 16-byte records through it with the same pacing and
//! counting as the broker scenarios.

use std::time::Instant;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::report::{stamp, Pacer, Tracker, HEADER};
use crate::{begin, Args, Run};

/// Runs the relay until killed: connections pair up in order (consumer, then publisher).
pub async fn serve(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await.context("relay bind")?;
    loop {
        let (mut consumer, _) = l.accept().await?;
        let (mut publisher, _) = l.accept().await?;
        consumer.set_nodelay(true)?;
        publisher.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut publisher, &mut consumer).await;
        });
    }
}

pub async fn run(args: &Args) -> anyhow::Result<Run> {
    let addr = (args.host.as_str(), args.relay_port);
    let tracker = Tracker::new(args.messages, 1);
    let consumer = TcpStream::connect(addr).await.context("relay connect")?;
    consumer.set_nodelay(true)?;
    // Let the relay take the consumer before the publisher connects.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut publisher = TcpStream::connect(addr).await.context("relay connect")?;
    publisher.set_nodelay(true)?;
    let t = tracker.clone();
    let (mut rd, _wr) = consumer.into_split();
    tokio::spawn(async move {
        let _keep = _wr;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            while buf.len() >= HEADER {
                let rec = buf.split_to(HEADER);
                t.record(0, &rec);
            }
            match rd.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    });
    let started = begin(args);
    let mut pace = Pacer::start(args.pace(), &tracker);
    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut rec = [0u8; HEADER];
    for i in 0..args.messages {
        if pace.would_wait(i, &tracker, 1) && !out.is_empty() {
            publisher.write_all(&out).await?;
            out.clear();
        }
        let sent = pace.before(i, &tracker, 1).await;
        stamp(&mut rec, i, sent);
        out.extend_from_slice(&rec);
        if out.len() >= 64 * 1024 {
            publisher.write_all(&out).await?;
            out.clear();
        }
    }
    publisher.write_all(&out).await?;
    let publish_done = Instant::now();
    let cleanup = async move {
        let _ = publisher.shutdown().await;
    };
    Ok(Run::each_once(
        started,
        tracker,
        args.messages,
        publish_done,
        cleanup,
    ))
}
