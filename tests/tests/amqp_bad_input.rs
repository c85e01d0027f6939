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
    let (s, ok) = open_vhost(addr, "/").await;
    assert_eq!(&ok[7..11], &[0, 10, 0, 41], "connection.open-ok");
    s
}

/// Connects, takes connection.start and answers with a PLAIN start-ok of `response`;
/// `client_properties` is an encoded field table (empty: none).
async fn start_ok(
    addr: std::net::SocketAddr,
    client_properties: &[u8],
    response: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(HEADER).await.unwrap();
    read_frame(&mut s).await; // start
    let mut args = (client_properties.len() as u32).to_be_bytes().to_vec();
    args.extend_from_slice(client_properties);
    args.extend(shortstr("PLAIN"));
    args.extend_from_slice(&(response.len() as u32).to_be_bytes());
    args.extend_from_slice(response);
    args.extend(shortstr("en_US"));
    s.write_all(&frame(1, 0, &method(10, 11, &args)))
        .await
        .unwrap();
    s
}

/// The handshake with connection.open of `vhost`; returns the frame that answers it.
async fn open_vhost(addr: std::net::SocketAddr, vhost: &str) -> (TcpStream, Vec<u8>) {
    let mut s = start_ok(addr, &[], b"\0guest\0guest").await;
    let tune = read_frame(&mut s).await;
    assert_eq!(&tune[7..11], &[0, 10, 0, 30], "connection.tune");
    let mut tune_ok = 2047u16.to_be_bytes().to_vec();
    tune_ok.extend_from_slice(&131072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&frame(1, 0, &method(10, 31, &tune_ok)))
        .await
        .unwrap();
    let mut open = shortstr(vhost);
    open.extend(shortstr(""));
    open.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &open)))
        .await
        .unwrap();
    let answer = read_frame(&mut s).await;
    (s, answer)
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

/// basic.qos with a prefetch_size: 540 naming basic.qos (60, 10); the client's close-ok is
/// still read and the socket closed at once, as RabbitMQ does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_prefetch_size_is_540_and_close_ok_ends_it() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    open_channel(&mut s, 1).await;
    let mut qos = 4096u32.to_be_bytes().to_vec();
    qos.extend_from_slice(&[0, 1, 0]);
    s.write_all(&frame(1, 1, &method(60, 10, &qos)))
        .await
        .unwrap();
    let close = read_frame(&mut s).await;
    let text = b"NOT_IMPLEMENTED - prefetch_size!=0 (4096)";
    let mut want = vec![0, 10, 0, 50, 0x02, 0x1C, text.len() as u8];
    want.extend_from_slice(text);
    want.extend_from_slice(&[0, 60, 0, 10]);
    assert_eq!(&close[7..close.len() - 1], &want[..]);
    s.write_all(&frame(1, 0, &method(10, 51, &[])))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "socket closed after close-ok");
}

/// connection.close 530 naming connection.open (10, 40), as RabbitMQ's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhost_is_530_naming_connection_open() {
    let b = common::start().await;
    let (_s, close) = open_vhost(b.addr, "no-such-vhost").await;
    let text = b"NOT_ALLOWED - vhost no-such-vhost not found";
    let mut want = vec![0, 10, 0, 50, 0x02, 0x12, text.len() as u8];
    want.extend_from_slice(text);
    want.extend_from_slice(&[0, 10, 0, 40]);
    assert_eq!(&close[7..close.len() - 1], &want[..]);
}

/// start-ok with a wrong password; everything the broker sends until it closes.
async fn refused_login(addr: std::net::SocketAddr, client_properties: &[u8]) -> Vec<u8> {
    let mut s = start_ok(addr, client_properties, b"\0guest\0wrong").await;
    read_all(&mut s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_login_closes_as_the_client_asked() {
    let b = common::start().await;
    // RabbitMQ's auth-notification: with the authentication_failure_close capability the
    // client gets connection.close 403 ...
    let mut caps = shortstr("authentication_failure_close");
    caps.extend_from_slice(&[b't', 1]);
    let mut props = shortstr("capabilities");
    props.push(b'F');
    props.extend_from_slice(&(caps.len() as u32).to_be_bytes());
    props.extend(caps);
    assert_eq!(close_code(&refused_login(b.addr, &props).await), Some(403));
    // ... and without it no frame, only the closed socket (aioamqp's tests expect that).
    assert_eq!(refused_login(b.addr, &[]).await, b"");
    still_serves(&b).await;
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
    // AMQP 0-9's header (Perl's Net::AMQP sends it) gets connection.start, as RabbitMQ
    // answers it with 0-9-1.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x01\x01\x00\x09").await.unwrap();
    let mut start = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut start))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(
        (start[0], &start[7..11]),
        (1, &[0u8, 10, 0, 10][..]),
        "connection.start"
    );
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
    let close = close_args();
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
    let mut s = confirm_channel(b.addr).await;
    // Unroutable and not mandatory: confirmed at once.
    let mut one = publish_start(1, "nowhere", 1);
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

/// Under confirms, an unroutable mandatory publish's basic.return comes after the acks of
/// the publishes before it and just before its own ack, as RabbitMQ orders them
/// (php-amqp's `amqpexchange_publish_confirms` waits for ack 1, return 2, ack 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_under_confirms_follows_the_earlier_acks() {
    let b = common::start().await;
    let mut s = confirm_channel(b.addr).await;
    let mut two = publish_start(1, "nowhere", 1);
    two.extend(frame(3, 1, b"x"));
    two.extend(publish_start_with(1, "nowhere", 1, 1));
    two.extend(frame(3, 1, b"y"));
    s.write_all(&two).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let f = read_frame(&mut s).await;
        seen.push(match f[0] {
            1 if method_ids(&f) == (60, 80) => {
                let tag = u64::from_be_bytes(f[11..19].try_into().unwrap());
                format!("ack {tag} multiple={}", f[19] & 1)
            }
            1 => format!("method {:?}", method_ids(&f)),
            2 => "header".to_owned(),
            3 => format!("body {}", String::from_utf8_lossy(&f[7..f.len() - 1])),
            t => format!("frame type {t}"),
        });
    }
    assert_eq!(
        seen,
        [
            "ack 1 multiple=0",
            "method (60, 50)",
            "header",
            "body y",
            "ack 2 multiple=0"
        ]
    );
}

/// A message published under confirms to a queue this connection consumes from is
/// delivered before it is confirmed, in RabbitMQ's order: aiormq's tests publish, await
/// the confirm, then wait for the delivery, and hang when the connection dies in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_delivery_goes_out_before_the_confirm() {
    let b = common::start().await;
    let mut s = confirm_channel(b.addr).await;
    declare_queue(&mut s, 1, "own", 4).await;
    let mut consume = 0u16.to_be_bytes().to_vec();
    consume.extend(shortstr("own"));
    consume.extend(shortstr("c"));
    consume.push(2); // no-ack
    consume.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&frame(1, 1, &method(60, 20, &consume)))
        .await
        .unwrap();
    assert_eq!(method_ids(&read_frame(&mut s).await), (60, 21));
    let mut one = publish_start(1, "own", 1);
    one.extend(frame(3, 1, b"x"));
    for i in 0..50 {
        s.write_all(&one).await.unwrap();
        let mut delivered = false;
        loop {
            let f = read_frame(&mut s).await;
            if f[0] != 1 {
                continue;
            }
            match method_ids(&f) {
                (60, 60) => delivered = true,
                (60, 80) => break,
                other => panic!("unexpected method {other:?}"),
            }
        }
        assert!(delivered, "message {i} was confirmed before its delivery");
    }
}

/// A connection with channel 1 open in confirm mode.
async fn confirm_channel(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = open(addr).await;
    open_channel(&mut s, 1).await;
    s.write_all(&frame(1, 1, &method(85, 10, &[0])))
        .await
        .unwrap();
    assert_eq!(
        method_ids(&read_frame(&mut s).await),
        (85, 11),
        "confirm.select-ok"
    );
    s
}

/// basic.publish to the default exchange with `key` and a content header announcing
/// `size` body bytes, on channel `ch`: the body frames follow.
fn publish_start(ch: u16, key: &str, size: u64) -> Vec<u8> {
    publish_start_with(ch, key, size, 0)
}

/// [`publish_start`] with basic.publish's `bits` (1 = mandatory).
fn publish_start_with(ch: u16, key: &str, size: u64, bits: u8) -> Vec<u8> {
    let mut publish = 0u16.to_be_bytes().to_vec();
    publish.extend(shortstr(""));
    publish.extend(shortstr(key));
    publish.push(bits);
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&size.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    let mut out = frame(1, ch, &method(60, 40, &publish));
    out.extend(frame(2, ch, &header));
    out
}

/// queue.declare's arguments: `bits` 1 = passive, 4 = exclusive; no arguments table.
fn declare_args(name: &str, bits: u8) -> Vec<u8> {
    let mut declare = 0u16.to_be_bytes().to_vec();
    declare.extend(shortstr(name));
    declare.push(bits);
    declare.extend_from_slice(&0u32.to_be_bytes());
    declare
}

/// queue.declare on `ch` and its declare-ok, returned.
async fn declare_queue(s: &mut TcpStream, ch: u16, name: &str, bits: u8) -> Vec<u8> {
    s.write_all(&frame(1, ch, &method(50, 10, &declare_args(name, bits))))
        .await
        .unwrap();
    let ok = read_frame(s).await;
    assert_eq!(method_ids(&ok), (50, 11), "queue.declare-ok");
    ok
}

/// The arguments of a channel.close or connection.close: 200 "bye".
fn close_args() -> Vec<u8> {
    let mut close = 200u16.to_be_bytes().to_vec();
    close.extend(shortstr("bye"));
    close.extend_from_slice(&[0, 0, 0, 0]);
    close
}

/// channel.open on `ch`, and its open-ok.
async fn open_channel(s: &mut TcpStream, ch: u16) {
    s.write_all(&frame(1, ch, &method(20, 10, &shortstr(""))))
        .await
        .unwrap();
    let ok = read_frame(s).await;
    assert_eq!(method_ids(&ok), (20, 11), "channel.open-ok");
}

/// A body frame carrying exactly frame_max bytes is taken, as RabbitMQ takes it (its
/// 8-byte allowance; AMQPStorm splits bodies so), one byte more is a 501 with RabbitMQ's
/// text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_frame_of_frame_max_payload_is_taken() {
    let b = common::start().await;
    let mut s = open(b.addr).await; // frame_max 131072
    open_channel(&mut s, 1).await;
    declare_queue(&mut s, 1, "fm", 0).await;
    let mut burst = publish_start(1, "fm", 131_073);
    burst.extend(frame(3, 1, &vec![b'x'; 131_072]));
    burst.extend(frame(3, 1, b"y"));
    s.write_all(&burst).await.unwrap();
    // A passive declare sees the message (frames are handled in order).
    let ok = declare_queue(&mut s, 1, "fm", 1).await;
    let count_at = 11 + 1 + 2;
    assert_eq!(&ok[count_at..count_at + 4], &1u32.to_be_bytes());
    let mut over = publish_start(1, "fm", 131_073);
    over.extend(frame(3, 1, &vec![b'x'; 131_073]));
    s.write_all(&over).await.unwrap();
    let rest = read_all(&mut s).await;
    assert_eq!(close_code(&rest), Some(501));
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("FRAME_ERROR - type 3, all octets = <<>>: {frame_too_large,131073,131064}"),
        "{text}"
    );
}

/// A channel.close that crosses the broker's own (the client closes right after a
/// command that fails) gets its close-ok, and the client's close-ok for the broker's
/// close is taken quietly: the connection and its other channels live on (rabbit_reader;
/// amqp091-go's Issue43 test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_channel_closes_keep_the_connection() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    open_channel(&mut s, 1).await;
    open_channel(&mut s, 2).await;
    // basic.ack of an unknown tag (406), then our channel.close, back to back.
    let mut ack = 99u64.to_be_bytes().to_vec();
    ack.push(0);
    let close = close_args();
    let mut burst = frame(1, 1, &method(60, 80, &ack));
    burst.extend(frame(1, 1, &method(20, 40, &close)));
    s.write_all(&burst).await.unwrap();
    let theirs = read_frame(&mut s).await;
    assert_eq!(method_ids(&theirs), (20, 40), "the broker's channel.close");
    assert_eq!(&theirs[11..13], &406u16.to_be_bytes());
    assert_eq!(
        method_ids(&read_frame(&mut s).await),
        (20, 41),
        "close-ok of ours"
    );
    s.write_all(&frame(1, 1, &method(20, 41, &[])))
        .await
        .unwrap();
    // Channel 1 can be opened again and channel 2 still works.
    open_channel(&mut s, 1).await;
    declare_queue(&mut s, 2, "still.here", 0).await;
}

/// channel.flow(active=false) is refused as RabbitMQ refuses it (540, a connection
/// error, which RabbitMQ's clients' suites expect); active=true is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_off_is_540_as_rabbitmq() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    open_channel(&mut s, 1).await;
    s.write_all(&frame(1, 1, &method(20, 20, &[1])))
        .await
        .unwrap();
    let ok = read_frame(&mut s).await;
    assert_eq!((method_ids(&ok), ok[11]), ((20, 21), 1), "flow-ok active");
    s.write_all(&frame(1, 1, &method(20, 20, &[0])))
        .await
        .unwrap();
    let close = read_frame(&mut s).await;
    assert_eq!(close_code(&close), Some(540));
    assert!(String::from_utf8_lossy(&close).contains("NOT_IMPLEMENTED - active=false"));
    // The broker closes the socket on our close-ok, at once (no linger: amqp091-go's
    // Close waits for it).
    s.write_all(&frame(1, 0, &method(10, 51, &[])))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(1000), s.read(&mut buf))
        .await
        .expect("socket closed after close-ok");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

/// connection.close-ok comes once the connection's channels are released (RabbitMQ
/// shuts them first): a client that reconnects on close-ok consumes exclusively again
/// and redeclares its exclusive queue (amqp091-go's reconnect example, which failed once
/// in ~300 runs with close-ok sent first; not reproduced here, where the release after
/// close-ok was still faster than the client). At close-ok the consumer is gone, the
/// exclusive queue deleted and the 20,000 unacked deliveries requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ok_after_consumers_and_exclusive_queues_are_released() {
    let b = common::start().await;
    let broker = b.server.as_ref().expect("server").broker.clone();
    let mut s = open(b.addr).await;
    open_channel(&mut s, 1).await;
    declare_queue(&mut s, 1, "reconnect.q", 0).await;
    declare_queue(&mut s, 1, "reconnect.mine", 4).await;
    const N: usize = 20_000;
    let mut one = publish_start(1, "reconnect.q", 1);
    one.extend(frame(3, 1, b"m"));
    s.write_all(&one.repeat(N)).await.unwrap();
    let mut consume = 0u16.to_be_bytes().to_vec();
    consume.extend(shortstr("reconnect.q"));
    consume.extend(shortstr("only"));
    consume.push(4); // exclusive
    consume.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&frame(1, 1, &method(60, 20, &consume)))
        .await
        .unwrap();
    let mut delivered = 0;
    while delivered < N {
        let f = read_frame(&mut s).await;
        if f[0] == 1 && method_ids(&f) == (60, 60) {
            delivered += 1;
        }
    }
    let close = close_args();
    s.write_all(&frame(1, 0, &method(10, 50, &close)))
        .await
        .unwrap();
    loop {
        let f = read_frame(&mut s).await;
        if f[0] == 1 && method_ids(&f) == (10, 51) {
            break;
        }
    }
    let vh = broker.vhost("/").expect("vhost");
    let q = vh.queue("reconnect.q").expect("queue");
    assert_eq!(q.consumer_count(), 0, "consumer still there at close-ok");
    assert!(
        vh.queue("reconnect.mine").is_err(),
        "exclusive queue still there"
    );
    assert_eq!(q.counts().ready as usize, N, "unacked requeued");
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

/// One HTTP/1.1 request to the management API as guest; the status code.
async fn api_status(b: &common::TestBroker, method: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(b.http_addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&resp);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A close from the management API releases the connection's exclusive queue before its
/// DELETE answers, also for a client that never answers with close-ok: RabbitMQ's reader
/// ends the channels with the close it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_close_releases_exclusive_queues_before_close_ok() {
    let b = common::start().await;
    let mut s = open(b.addr).await;
    open_channel(&mut s, 1).await;
    // queue.declare: ticket, "mine", bits (exclusive = 4), no arguments.
    let mut args = 0u16.to_be_bytes().to_vec();
    args.extend(shortstr("mine"));
    args.push(4);
    args.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&frame(1, 1, &method(50, 10, &args)))
        .await
        .unwrap();
    assert_eq!(&read_frame(&mut s).await[7..11], &[0, 50, 0, 11]);
    assert_eq!(api_status(&b, "GET", "/api/queues/%2F/mine").await, 200);
    let name = format!("{} -> {}", s.local_addr().unwrap(), b.addr)
        .replace(' ', "%20")
        .replace('>', "%3E");
    let started = std::time::Instant::now();
    assert_eq!(
        api_status(&b, "DELETE", &format!("/api/connections/{name}")).await,
        204
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "no wait for close-ok"
    );
    assert_eq!(api_status(&b, "GET", "/api/queues/%2F/mine").await, 404);
    // The client (which has not answered yet) gets connection.close 320.
    assert_eq!(close_code(&read_frame(&mut s).await), Some(320));
    still_serves(&b).await;
}
