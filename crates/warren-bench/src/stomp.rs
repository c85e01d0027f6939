//! STOMP scenarios on a small client over Warren's codec: `stomp-queue` (a `/queue/`
//! destination with RabbitMQ's defaults, SEND → one subscriber) and `stomp-topic`
//! (`/topic/`), auto ack, so RabbitMQ and Warren do the same work. (RabbitMQ makes a
//! `/queue/` subscribed with `auto-delete:true` exclusive, so the defaults are kept.)

use std::time::Instant;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_stomp_codec::{decode, encode, Decoded, Frame, Limits, Version};

use crate::report::{stamp, Pacer, Tracker};
use crate::{begin, Args, Run};

async fn connect(args: &Args) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut s = TcpStream::connect((args.host.as_str(), args.stomp_port))
        .await
        .context("stomp connect")?;
    s.set_nodelay(true)?;
    let f = Frame::new("CONNECT")
        .with("accept-version", "1.2")
        .with("host", "/")
        .with("login", "guest")
        .with("passcode", "guest");
    let mut out = BytesMut::new();
    encode(&f, Version::V1_2, &mut out);
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let reply = next_frame(&mut s, &mut buf).await?;
    if reply.command != "CONNECTED" {
        bail!("stomp: {:?}", reply.get("message"));
    }
    Ok((s, buf))
}

async fn next_frame(s: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<Frame> {
    loop {
        match decode(buf, Version::V1_2, &Limits::default())? {
            Some(Decoded::Frame(f)) => return Ok(f),
            Some(Decoded::HeartBeat) => continue,
            None => {}
        }
        if s.read_buf(buf).await? == 0 {
            bail!("stomp: connection closed");
        }
    }
}

pub async fn run(args: &Args) -> anyhow::Result<Run> {
    let dest = if args.scenario == "stomp-queue" {
        format!("/queue/{}", args.run_id())
    } else {
        format!("/topic/{}", args.run_id())
    };
    let tracker = Tracker::new(args.messages, 1);
    let (mut sub, mut sbuf) = connect(args).await?;
    let subscribe = Frame::new("SUBSCRIBE")
        .with("id", "0")
        .with("destination", dest.clone())
        .with("ack", "auto")
        .with("receipt", "sub");
    let mut out = BytesMut::new();
    encode(&subscribe, Version::V1_2, &mut out);
    sub.write_all(&out).await?;
    let r = next_frame(&mut sub, &mut sbuf).await?;
    if r.command != "RECEIPT" {
        bail!("stomp subscribe: {:?}", r.get("message"));
    }
    let t = tracker.clone();
    tokio::spawn(async move {
        while let Ok(f) = next_frame(&mut sub, &mut sbuf).await {
            if f.command == "MESSAGE" {
                t.record(0, &f.body);
            }
        }
    });
    let (mut publisher, _) = connect(args).await?;
    let started = begin(args);
    let mut pace = Pacer::start(args.pace(), &tracker);
    let mut body = vec![0u8; args.size];
    let mut out = BytesMut::with_capacity(128 * 1024);
    let content_length = args.size.to_string();
    for i in 0..args.messages {
        let sent = pace.before(i, &tracker, 1).await;
        stamp(&mut body, i, sent);
        let mut f = Frame::new("SEND")
            .with("destination", dest.clone())
            .with("content-length", content_length.clone());
        f.body = Bytes::copy_from_slice(&body);
        encode(&f, Version::V1_2, &mut out);
        // Batch writes when running flat out; write each frame when paced.
        if out.len() >= 64 * 1024 || !pace.is_max() {
            publisher.write_all(&out).await?;
            out.clear();
        }
    }
    publisher.write_all(&out).await?;
    let publish_done = Instant::now();
    let cleanup = async move {
        let mut out = BytesMut::new();
        encode(&Frame::new("DISCONNECT"), Version::V1_2, &mut out);
        let _ = publisher.write_all(&out).await;
    };
    Ok(Run::each_once(
        started,
        tracker,
        args.messages,
        publish_done,
        cleanup,
    ))
}
