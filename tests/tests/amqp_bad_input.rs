//! Raw sockets: bad input gets the spec's answer, the connection closes, and the broker
//! keeps serving others; and wire details a client library hides (confirm batching, the
//! socket after close-ok).

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// Reads until EOF (or 5 s) and returns everything received.
async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection not closed within 5 s; got {} bytes", out.len()),
        }
    }
}

fn frame(ty: u8, ch: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![ty];
    f.extend_from_slice(&ch.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

fn shortstr(s: &str) -> Vec<u8> {
    let mut v = vec![s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

fn method(class: u16, m: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&m.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// Drives the handshake up to connection.open-ok with PLAIN guest/guest.
async fn open(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(HEADER).await.unwrap();
    read_frame(&mut s).await; // start
    let mut args = 0u32.to_be_bytes().to_vec(); // empty client-properties table
    args.extend(shortstr("PLAIN"));
    let resp = b"\0guest\0guest";
    args.extend_from_slice(&(resp.len() as u32).to_be_bytes());
    args.extend_from_slice(resp);
    args.extend(shortstr("en_US"));
    s.write_all(&frame(1, 0, &method(10, 11, &args)))
        .await
        .unwrap();
    let tune = read_frame(&mut s).await;
    assert_eq!(&tune[7..11], &[0, 10, 0, 30], "connection.tune");
    let mut tune_ok = 2047u16.to_be_bytes().to_vec();
    tune_ok.extend_from_slice(&131072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&frame(1, 0, &method(10, 31, &tune_ok)))
        .await
        .unwrap();
    let mut open = shortstr("/");
    open.extend(shortstr(""));
    open.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &open)))
        .await
        .unwrap();
    let ok = read_frame(&mut s).await;
    assert_eq!(&ok[7..11], &[0, 10, 0, 41], "connection.open-ok");
    s
}

async fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("frame in time")
        .expect("frame");
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut rest = vec![0u8; size + 1];
    s.read_exact(&mut rest).await.unwrap();
    let mut f = head.to_vec();
    f.extend(rest);
    f
}

/// The reply code of a connection.close (10,50) frame among `bytes`.
fn close_code(bytes: &[u8]) -> Option<u16> {
    let mut i = 0;
    while i + 7 <= bytes.len() {
        let size =
            u32::from_be_bytes([bytes[i + 3], bytes[i + 4], bytes[i + 5], bytes[i + 6]]) as usize;
        let p = &bytes.get(i + 7..i + 7 + size)?;
        if bytes[i] == 1 && p.len() >= 6 && p[0..4] == [0, 10, 0, 50] {
            return Some(u16::from_be_bytes([p[4], p[5]]));
        }
        i += 8 + size;
    }
    None
}

async fn still_serves(b: &common::TestBroker) {
    let (_c, ch) = b.channel().await;
    common::declare(&ch, "alive", Default::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_gets_ours_back() {
    let b = common::start().await;
    for bad in [
        &b"AMQP\x00\x00\x08\x00"[..],
        b"GET / HTTP/1.1\r\n",
        b"AMQP\x01\x01\x00\x0a",
    ] {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(bad).await.unwrap();
        assert_eq!(read_all(&mut s).await, HEADER);
    }
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_handshake_is_a_frame_error() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    s.write_all(b"\x09\x09\x09\x09\x09\x09\x09\x09\x09garbage")
        .await
        .unwrap();
    let got = read_all(&mut s).await;
    assert_eq!(close_code(&got), Some(501));
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_end_is_501() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    let mut f = frame(1, 1, &method(20, 10, &[0]));
    *f.last_mut().unwrap() = 0x00;
    s.write_all(&f).await.unwrap();
    assert_eq!(close_code(&read_all(&mut s).await), Some(501));
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_frame_max_is_501() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    // Header announcing 1 MiB (> 128 KiB frame_max); the payload never comes.
    let mut head = vec![3u8, 0, 1];
    head.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&head).await.unwrap();
    assert_eq!(close_code(&read_all(&mut s).await), Some(501));
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_on_unopened_channel_is_504() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    let mut args = 0u16.to_be_bytes().to_vec();
    args.extend(shortstr("q"));
    args.extend_from_slice(&[0, 0, 0, 0, 0]);
    s.write_all(&frame(1, 5, &method(50, 10, &args)))
        .await
        .unwrap();
    assert_eq!(close_code(&read_all(&mut s).await), Some(504));
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_without_header_is_505() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    s.write_all(&frame(1, 1, &method(20, 10, &[0])))
        .await
        .unwrap();
    read_frame(&mut s).await; // open-ok
    s.write_all(&frame(3, 1, b"orphan body")).await.unwrap();
    assert_eq!(close_code(&read_all(&mut s).await), Some(505));
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_closes_the_connection() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    s.write_all(&frame(1, 1, &method(20, 10, &[0])))
        .await
        .unwrap();
    read_frame(&mut s).await;
    s.write_all(&frame(1, 1, &method(60, 999, &[])))
        .await
        .unwrap();
    let code = close_code(&read_all(&mut s).await);
    assert!(
        matches!(code, Some(540) | Some(503) | Some(502)),
        "{code:?}"
    );
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_then_silence_does_not_block_others() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    s.write_all(&frame(1, 1, &method(20, 10, &[0]))[..6])
        .await
        .unwrap();
    still_serves(&b).await;
    drop(s);
    still_serves(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_handshake_timeout_elsewhere_unaffected() {
    let b = common::start().await;
    let _idle = TcpStream::connect(b.addr).await.unwrap();
    still_serves(&b).await;
}

/// A client that is still writing when its connection.close is answered (amqplib writes
/// other channels' frames after it) is not reset: the broker keeps reading until the
/// client closes, as RabbitMQ does, so the client sees close-ok, not ECONNRESET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_after_connection_close_do_not_reset_the_socket() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    let mut close = 200u16.to_be_bytes().to_vec();
    close.extend(shortstr("bye"));
    close.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&frame(1, 0, &method(10, 50, &close)))
        .await
        .unwrap();
    let ok = read_frame(&mut s).await;
    assert_eq!(&ok[7..11], &[0, 10, 0, 51], "connection.close-ok");
    // Heartbeat frames, as a stand-in for anything the client had queued.
    let heartbeat = frame(8, 0, &[]);
    for _ in 0..50 {
        s.write_all(&heartbeat.repeat(200))
            .await
            .expect("the broker reset the connection after close-ok");
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    still_serves(&b).await;
}

/// A burst of publishes read together is confirmed with `multiple` acks, as RabbitMQ
/// does (amqplib's tests wait for one), and every tag is covered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_publishes_is_confirmed_with_multiple_acks() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    s.write_all(&frame(1, 1, &method(20, 10, &shortstr(""))))
        .await
        .unwrap();
    read_frame(&mut s).await; // channel.open-ok
    s.write_all(&frame(1, 1, &method(85, 10, &[0])))
        .await
        .unwrap();
    let ok = read_frame(&mut s).await;
    assert_eq!(&ok[7..11], &[0, 85, 0, 11], "confirm.select-ok");
    // Unroutable and not mandatory: confirmed at once.
    let mut publish = 0u16.to_be_bytes().to_vec();
    publish.extend(shortstr(""));
    publish.extend(shortstr("nowhere"));
    publish.push(0);
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&1u64.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    let mut one = frame(1, 1, &method(60, 40, &publish));
    one.extend(frame(2, 1, &header));
    one.extend(frame(3, 1, b"x"));
    const N: u64 = 500;
    s.write_all(&one.repeat(N as usize)).await.unwrap();
    let (mut covered, mut acks, mut multiple) = (0u64, 0, 0);
    while covered < N {
        let f = read_frame(&mut s).await;
        assert_eq!(&f[7..11], &[0, 60, 0, 80], "only basic.ack expected");
        let tag = u64::from_be_bytes(f[11..19].try_into().unwrap());
        assert!(tag > covered, "tag {tag} acked twice");
        if f[19] & 1 == 1 {
            multiple += 1;
        } else {
            assert_eq!(tag, covered + 1, "a single ack skipped tags");
        }
        covered = tag;
        acks += 1;
    }
    assert!(multiple > 0 && acks < N, "{acks} acks, {multiple} multiple");
}

/// The class and method ids of a frame's method.
fn method_ids(f: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([f[7], f[8]]),
        u16::from_be_bytes([f[9], f[10]]),
    )
}

/// As RabbitMQ 3.10 (rabbit_reader): channel_max bounds how many channels are open, not
/// their numbers (aiormq's tests open channel 65535 with channel_max 2047).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_numbers_above_channel_max_open() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    s.write_all(&frame(1, 65535, &method(20, 10, &shortstr(""))))
        .await
        .unwrap();
    let ok = read_frame(&mut s).await;
    assert_eq!(
        (u16::from_be_bytes([ok[1], ok[2]]), method_ids(&ok)),
        (65535, (20, 11))
    );
}

/// A refused exclusive consume gets only the channel.close (403), no consume-ok first:
/// clients that resolve on consume-ok otherwise think they consume (aio-pika's tests).
/// Unbinding a queue or exchange that is not there succeeds, as in RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_consume_has_no_consume_ok_and_unbinding_nothing_is_ok() {
    let b = common::start().await;
    let (_c, ch) = b.channel().await;
    common::declare(&ch, "solo", Default::default()).await;
    let mut s = open(b.addr).await;
    s.write_all(&frame(1, 1, &method(20, 10, &shortstr(""))))
        .await
        .unwrap();
    assert_eq!(method_ids(&read_frame(&mut s).await), (20, 11));
    let consume = |tag: &str, exclusive: bool| {
        let mut a = 0u16.to_be_bytes().to_vec();
        a.extend(shortstr("solo"));
        a.extend(shortstr(tag));
        a.push(if exclusive { 0b100 } else { 0 });
        a.extend_from_slice(&0u32.to_be_bytes());
        frame(1, 1, &method(60, 20, &a))
    };
    s.write_all(&consume("first", true)).await.unwrap();
    assert_eq!(method_ids(&read_frame(&mut s).await), (60, 21));
    s.write_all(&consume("second", false)).await.unwrap();
    let next = read_frame(&mut s).await;
    assert_eq!(method_ids(&next), (20, 40), "channel.close, not consume-ok");
    assert_eq!(u16::from_be_bytes([next[11], next[12]]), 403);
    s.write_all(&frame(1, 1, &method(20, 41, &[])))
        .await
        .unwrap();

    // queue.unbind of a missing queue and exchange.unbind of missing exchanges: ok.
    s.write_all(&frame(1, 2, &method(20, 10, &shortstr(""))))
        .await
        .unwrap();
    assert_eq!(method_ids(&read_frame(&mut s).await), (20, 11));
    let mut a = 0u16.to_be_bytes().to_vec();
    for n in ["no-queue", "no-exchange", "k"] {
        a.extend(shortstr(n));
    }
    a.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&frame(1, 2, &method(50, 50, &a)))
        .await
        .unwrap();
    assert_eq!(method_ids(&read_frame(&mut s).await), (50, 51));
    let mut a = 0u16.to_be_bytes().to_vec();
    for n in ["no-dest", "no-source", "k"] {
        a.extend(shortstr(n));
    }
    a.push(0);
    a.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&frame(1, 2, &method(40, 40, &a)))
        .await
        .unwrap();
    assert_eq!(method_ids(&read_frame(&mut s).await), (40, 51));
    // exchange.declare passive of the default exchange: 403, as RabbitMQ.
    let mut a = 0u16.to_be_bytes().to_vec();
    a.extend(shortstr(""));
    a.extend(shortstr("direct"));
    a.push(1);
    a.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&frame(1, 2, &method(40, 10, &a)))
        .await
        .unwrap();
    let close = read_frame(&mut s).await;
    assert_eq!(method_ids(&close), (20, 40));
    assert_eq!(u16::from_be_bytes([close[11], close[12]]), 403);
}
