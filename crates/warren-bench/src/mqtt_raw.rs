//! `--client raw` for `mqtt-qos0` / `mqtt-qos1` / `mqtt-fanin`: a minimal MQTT 3.1.1
//! client written here, one task per socket (fan-in devices: written by the ticker
//! thread), TCP_NODELAY, no event loop between the socket and the measurement.
//! Why: at a fixed 10k msg/s rumqttc's own queueing put p99s of 3–28 ms on Warren and
//! Mosquitto alike while a TCP relay's was 0.25 ms (docs/PERFORMANCE.md), so the MQTT
//! latency targets could not be measured with it. Like amqp_raw.rs, it trusts the broker:
//! it is a load generator, not a client library (no window: 3.1.1 has no receive maximum).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::mqtt::FanIn;
use crate::report::{stamp, Pacer, Ticker, Tracker};
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

/// A subscriber on `filter`: records every PUBLISH and acknowledges QoS 1 ones, one write
/// per read, on its own task.
async fn subscriber(args: &Args, filter: &str, qos: u8, t: Arc<Tracker>) -> anyhow::Result<()> {
    let (mut sub, mut sbuf) = connect(args, &format!("{}-sub", args.run_id())).await?;
    let mut body = vec![0, 1];
    put_str(&mut body, filter);
    body.push(qos);
    sub.write_all(&packet(0x82, &body)).await?;
    let (first, _) = read_packet(&mut sub, &mut sbuf).await?;
    if first != 0x90 {
        bail!("mqtt: expected SUBACK, got {first:#04x}");
    }
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
    Ok(())
}

/// A QoS 0 PUBLISH of `payload` to `topic`, into `out`.
fn publish_qos0(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    out.clear();
    out.push(0x30);
    put_len(out, 2 + topic.len() + payload.len());
    put_str(out, topic);
    out.extend_from_slice(payload);
}

/// `mqtt-fanin --client raw`: the devices are plain sockets that the ticker thread writes
/// each device's PUBLISH to at its slot, and the subscriber is the reader above. With
/// rumqttc every message also crossed a channel to its device's event loop task, a
/// wake-up of another thread in the load generator, for each of 10k messages a second.
pub async fn fan_in(args: &Args) -> anyhow::Result<Run> {
    let plan = FanIn::new(args);
    let (devices, total) = (plan.devices, plan.total);
    let tracker = Tracker::new(total, 1);
    subscriber(args, &plan.filter(), 0, tracker.clone()).await?;
    // Connect every device first (200 at a time), then start the clock.
    let gate = Arc::new(Semaphore::new(200));
    let mut connecting = Vec::with_capacity(devices);
    for d in 0..devices {
        let gate = gate.clone();
        let id = format!("{}-dev-{d}", args.run_id());
        let args = args.clone();
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let (s, _) = connect(&args, &id).await?;
            // Written from the ticker thread with blocking writes: a full socket buffer
            // holds the ticker back, and its lateness shows in the latencies.
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            anyhow::Ok(s)
        }));
    }
    let mut sockets = Vec::with_capacity(devices);
    for c in connecting {
        sockets.push(c.await??);
    }
    let started = begin(args);
    let topics = plan.topics();
    let mut payload = vec![0u8; args.size];
    let mut out = Vec::with_capacity(args.size + 64);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Vec<std::net::TcpStream>>();
    let mut done_tx = Some(done_tx);
    let mut failed = false;
    Ticker::new(&tracker, total, plan.rate()).run(move |i, due| {
        let (d, id) = plan.slot(i);
        stamp(&mut payload, id, due);
        publish_qos0(&mut out, &topics[d], &payload);
        // A failed write is a lost message, counted by the tracker.
        if std::io::Write::write_all(&mut &sockets[d], &out).is_err() && !failed {
            failed = true;
            eprintln!("mqtt: device {d} write failed; its messages count as lost");
        }
        if i + 1 == total {
            if let Some(tx) = done_tx.take() {
                let _ = tx.send(std::mem::take(&mut sockets));
            }
        }
        true
    });
    let sockets = done_rx.await.unwrap_or_default();
    let publish_done = Instant::now();
    let cleanup = async move {
        for s in &sockets {
            let _ = std::io::Write::write_all(&mut &*s, &[0xE0, 0]);
        }
    };
    Ok(Run::each_once(
        started,
        tracker,
        total,
        publish_done,
        cleanup,
    ))
}

pub async fn one_to_one(args: &Args) -> anyhow::Result<Run> {
    let qos: u8 = match args.scenario.as_str() {
        "mqtt-qos0" => 0,
        "mqtt-qos1" => 1,
        other => bail!("--client raw runs mqtt-qos0 and mqtt-qos1, not {other}"),
    };
    let topic = format!("bench/{}", args.run_id());
    let tracker = Tracker::new(args.messages, 1);

    subscriber(args, &topic, qos, tracker.clone()).await?;

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
