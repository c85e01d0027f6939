//! `--client raw` for `mqtt-qos0` / `mqtt-qos1`: a minimal MQTT 3.1.1 client written here,
//! one task per socket, TCP_NODELAY, no event loop between the socket and the measurement.
//! Why: at a fixed 10k msg/s rumqttc's own queueing put p99s of 3–28 ms on Warren and
//! Mosquitto alike while a TCP relay's was 0.25 ms (docs/PERFORMANCE.md), so the MQTT
//! latency targets could not be measured with it. Like amqp_raw.rs, it trusts the broker:
//! it is a load generator, not a client library (no window: 3.1.1 has no receive maximum).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::report::{stamp, Pacer, Tracker};
use crate::{begin, Args, Run};

/// How long the broker may stay silent before the run gives up (as mqtt.rs).
const STALL: Duration = Duration::from_secs(10);

/// Appends an MQTT Variable Byte Integer.
fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A packet: first byte, then the remaining length and `body`.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(body.len() + 5);
    p.push(first);
    put_len(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One whole packet from `buf`: (first byte, body), or `None` until it is complete.
fn next_packet(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 || i > 4 {
            break;
        }
    }
    if buf.len() < i + len {
        return None;
    }
    let first = buf[0];
    buf.advance(i);
    Some((first, buf.split_to(len)))
}

/// Connects with a clean session and waits for a successful CONNACK.
async fn connect(args: &Args, client_id: &str) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut s = TcpStream::connect((args.host.as_str(), args.mqtt_port))
        .await
        .context("mqtt connect")?;
    s.set_nodelay(true)?;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    put_str(&mut body, client_id);
    s.write_all(&packet(0x10, &body)).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (first, body) = read_packet(&mut s, &mut buf).await?;
    if first != 0x20 || body.get(1) != Some(&0) {
        bail!("mqtt connect refused: {first:#04x} {body:?}");
    }
    Ok((s, buf))
}

async fn read_packet(s: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<(u8, BytesMut)> {
    loop {
        if let Some(p) = next_packet(buf) {
            return Ok(p);
        }
        match tokio::time::timeout(STALL, s.read_buf(buf)).await {
            Ok(Ok(0)) => bail!("mqtt connection closed"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("mqtt: nothing from the broker for {STALL:?}"),
        }
    }
}

pub async fn one_to_one(args: &Args) -> anyhow::Result<Run> {
    let qos: u8 = match args.scenario.as_str() {
        "mqtt-qos0" => 0,
        "mqtt-qos1" => 1,
        other => bail!("--client raw runs mqtt-qos0 and mqtt-qos1, not {other}"),
    };
    let topic = format!("bench/{}", args.run_id());
    let tracker = Tracker::new(args.messages, 1);

    // The subscriber: records every PUBLISH and acknowledges QoS 1 ones, one write per read.
    let (mut sub, mut sbuf) = connect(args, &format!("{}-sub", args.run_id())).await?;
    let mut body = vec![0, 1];
    put_str(&mut body, &topic);
    body.push(qos);
    sub.write_all(&packet(0x82, &body)).await?;
    let (first, _) = read_packet(&mut sub, &mut sbuf).await?;
    if first != 0x90 {
        bail!("mqtt: expected SUBACK, got {first:#04x}");
    }
    let t = tracker.clone();
    tokio::spawn(async move {
        let mut acks = Vec::new();
        loop {
            while let Some((first, mut p)) = next_packet(&mut sbuf) {
                if first & 0xF0 != 0x30 || p.len() < 2 {
                    continue;
                }
                let topic_len = u16::from_be_bytes([p[0], p[1]]) as usize;
                let q = (first >> 1) & 3;
                let head = 2 + topic_len + if q > 0 { 2 } else { 0 };
                if p.len() < head {
                    continue;
                }
                if q == 1 {
                    acks.extend_from_slice(&[0x40, 2, p[head - 2], p[head - 1]]);
                }
                p.advance(head);
                t.record(0, &p);
            }
            if !acks.is_empty() {
                if sub.write_all(&acks).await.is_err() {
                    return;
                }
                acks.clear();
            }
            match sub.read_buf(&mut sbuf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });

    // The publisher: PUBLISH per message as paced; its PUBACKs are counted by a reader.
    let (publisher, mut pbuf) = connect(args, &format!("{}-pub", args.run_id())).await?;
    let (mut rd, mut wr) = publisher.into_split();
    let acks_needed = if qos == 0 { 0 } else { args.messages };
    let acker = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < acks_needed {
            while let Some((first, _)) = next_packet(&mut pbuf) {
                if first == 0x40 {
                    acked += 1;
                }
            }
            if acked >= acks_needed {
                break;
            }
            match tokio::time::timeout(STALL, rd.read_buf(&mut pbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    eprintln!("mqtt: no ack for {STALL:?}, {acked} of {acks_needed} acked");
                    break;
                }
            }
        }
        Instant::now()
    });
    let started = begin(args);
    let mut pace = Pacer::start(args.pace(), &tracker);
    let mut payload = vec![0u8; args.size];
    let mut head = Vec::with_capacity(topic.len() + 8);
    put_str(&mut head, &topic);
    let mut out = Vec::with_capacity(args.size + head.len() + 8);
    let mut pkid: u16 = 0;
    for i in 0..args.messages {
        let sent = pace.before(i, &tracker, 1).await;
        stamp(&mut payload, i, sent);
        let mut body = head.clone();
        if qos > 0 {
            pkid = pkid.checked_add(1).unwrap_or(1);
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(&payload);
        out.clear();
        out.push(0x30 | (qos << 1));
        put_len(&mut out, body.len());
        out.extend_from_slice(&body);
        if let Err(e) = wr.write_all(&out).await {
            eprintln!("mqtt: publish {i} failed ({e}); the rest count as lost");
            break;
        }
    }
    let publish_done = if qos == 0 {
        Instant::now()
    } else {
        acker.await.unwrap_or_else(|_| Instant::now())
    };
    let cleanup = async move {
        let _ = wr.write_all(&[0xE0, 0]).await;
    };
    Ok(Run::each_once(
        started,
        tracker,
        args.messages,
        publish_done,
        cleanup,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_split_and_whole() {
        let p = packet(0x30, &[0, 1, b't', b'x']);
        assert_eq!(p, [0x30, 4, 0, 1, b't', b'x']);
        let mut buf = BytesMut::from(&p[..3]);
        assert!(next_packet(&mut buf).is_none());
        buf.extend_from_slice(&p[3..]);
        let (first, body) = next_packet(&mut buf).unwrap();
        assert_eq!((first, &body[..]), (0x30, &[0, 1, b't', b'x'][..]));
        let mut long = Vec::new();
        put_len(&mut long, 321);
        assert_eq!(long, [0xC1, 0x02]);
    }
}
