//! A minimal AMQP 0-9-1 client on Warren's codec for the data path of the AMQP scenarios
//! (`--client raw`): publishes are encoded into one buffer and written in batches, and
//! deliveries are parsed straight from the read buffer. lapin hands every frame to its own
//! I/O thread and makes a syscall per frame: on a 2-core box it used as much CPU as the
//! broker and, at a fixed rate, stalled for tens of milliseconds now and then, so the AMQP
//! figures measured lapin rather than the broker. Setup (declares, bindings, cleanup)
//! still goes through lapin; only publishing and consuming use this client, against
//! every broker alike.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use amq_protocol::protocol::{basic, channel, confirm, connection, AMQPClass, BasicProperties};
use amq_protocol::types::FieldTable;
use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use warren_amqp_codec::{
    decode_frame, encode_content_preencoded, encode_method, encode_properties, Frame,
};

/// Channel every raw connection uses.
const CH: u16 = 1;
/// Frame size this client asks for.
const FRAME_MAX: u32 = 131_072;

/// One open connection with channel 1 open.
pub struct RawConn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    inbuf: BytesMut,
    frame_max: u32,
}

impl RawConn {
    /// Connects, logs in with PLAIN and opens channel 1.
    pub async fn open(url: &str) -> anyhow::Result<RawConn> {
        let uri = amq_protocol_uri::AMQPUri::from_str(url).map_err(|e| anyhow!("url: {e}"))?;
        let s = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
            .await
            .context("connect")?;
        s.set_nodelay(true)?;
        let (rd, wr) = s.into_split();
        let mut c = RawConn {
            rd,
            wr,
            inbuf: BytesMut::with_capacity(256 * 1024),
            frame_max: FRAME_MAX,
        };
        c.wr.write_all(b"AMQP\x00\x00\x09\x01").await?;
        c.expect(|m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::Start(_))))
            .await?;
        let u = &uri.authority.userinfo;
        c.send_on(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{}\0{}", u.username, u.password).into(),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let tune = c
            .expect(|m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::Tune(_))))
            .await?;
        if let AMQPClass::Connection(connection::AMQPMethod::Tune(t)) = tune {
            if t.frame_max != 0 {
                c.frame_max = t.frame_max.min(FRAME_MAX);
            }
        }
        c.send_on(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 1,
                frame_max: c.frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        c.send_on(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: uri.vhost.as_str().into(),
            })),
        )
        .await?;
        c.expect(|m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))))
            .await?;
        c.send_on(
            CH,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        c.expect(|m| matches!(m, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
            .await?;
        Ok(c)
    }

    async fn send_on(&mut self, ch: u16, m: AMQPClass) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        encode_method(&mut out, ch, &m);
        self.wr.write_all(&out).await?;
        Ok(())
    }

    /// The next frame from the socket.
    async fn frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.inbuf, self.frame_max + 8)? {
                return Ok(f);
            }
            if self.rd.read_buf(&mut self.inbuf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    /// Reads methods until one matches `want`; a close from the broker is an error.
    async fn expect(&mut self, want: impl Fn(&AMQPClass) -> bool) -> anyhow::Result<AMQPClass> {
        loop {
            if let Frame::Method(_, m) = self.frame().await? {
                if want(&m) {
                    return Ok(*m);
                }
                if let AMQPClass::Connection(connection::AMQPMethod::Close(c)) = &*m {
                    bail!("connection closed: {} {}", c.reply_code, c.reply_text);
                }
                if let AMQPClass::Channel(channel::AMQPMethod::Close(c)) = &*m {
                    bail!("channel closed: {} {}", c.reply_code, c.reply_text);
                }
            }
        }
    }

    /// Starts consuming `queue` (returns once the broker confirmed the consumer); the
    /// deliveries are read by [`RawConn::deliveries`].
    pub async fn subscribe(
        &mut self,
        queue: &str,
        prefetch: u16,
        no_ack: bool,
    ) -> anyhow::Result<()> {
        self.send_on(
            CH,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: prefetch,
                global: false,
            })),
        )
        .await?;
        self.expect(|m| matches!(m, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))))
            .await?;
        self.send_on(
            CH,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: queue.into(),
                consumer_tag: "".into(),
                no_local: false,
                no_ack,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await?;
        self.expect(|m| matches!(m, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))))
            .await?;
        Ok(())
    }

    /// Calls `record` with every delivered body until the connection ends; with manual
    /// acks, acks every 100th delivery with `multiple`.
    pub async fn deliveries(
        mut self,
        no_ack: bool,
        mut record: impl FnMut(&[u8]),
    ) -> anyhow::Result<()> {
        let (mut tag, mut want, mut body) = (0u64, 0usize, BytesMut::new());
        let mut acks = BytesMut::new();
        loop {
            // Everything already read is handled before acks go out: one write per read.
            let more = match decode_frame(&mut self.inbuf, self.frame_max + 8)? {
                Some(f) => f,
                None => {
                    if !acks.is_empty() {
                        self.wr.write_all(&acks).await?;
                        acks.clear();
                    }
                    if self.rd.read_buf(&mut self.inbuf).await? == 0 {
                        return Ok(());
                    }
                    continue;
                }
            };
            match more {
                Frame::Method(_, m) => match *m {
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
                        tag = d.delivery_tag;
                        body.clear();
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                        bail!("channel closed: {} {}", c.reply_code, c.reply_text)
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                        bail!("connection closed: {} {}", c.reply_code, c.reply_text)
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => return Ok(()),
                    _ => {}
                },
                Frame::Header(_, h) => {
                    want = h.body_size as usize;
                    if want == 0 {
                        record(&[]);
                    }
                }
                Frame::Body(_, b) => {
                    body.extend_from_slice(&b);
                    if body.len() >= want {
                        record(&body);
                        if !no_ack && tag.is_multiple_of(100) {
                            encode_method(
                                &mut acks,
                                CH,
                                &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                                    delivery_tag: tag,
                                    multiple: true,
                                })),
                            );
                        }
                    }
                }
                Frame::Heartbeat(_) => {}
            }
        }
    }

    /// Turns on publisher confirms and splits the connection: the returned publisher
    /// writes, a task counts the broker's acks (a nack fails the run).
    pub async fn into_publisher(mut self, confirms: bool) -> anyhow::Result<RawPublisher> {
        let confirmed = Arc::new(Confirmed::default());
        if confirms {
            self.send_on(
                CH,
                AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                    nowait: false,
                })),
            )
            .await?;
            self.expect(|m| matches!(m, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))))
                .await?;
        }
        let c = confirmed.clone();
        let RawConn {
            mut rd,
            wr,
            mut inbuf,
            frame_max,
        } = self;
        tokio::spawn(async move {
            let mut singles = BTreeSet::new();
            loop {
                while let Ok(Some(f)) = decode_frame(&mut inbuf, frame_max + 8) {
                    if let Frame::Method(_, m) = f {
                        match *m {
                            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                                c.ack(a.delivery_tag, a.multiple, &mut singles)
                            }
                            AMQPClass::Basic(basic::AMQPMethod::Nack(_))
                            | AMQPClass::Channel(channel::AMQPMethod::Close(_))
                            | AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                                c.failed.store(true, Ordering::Relaxed);
                                c.notify.notify_one();
                            }
                            _ => {}
                        }
                    }
                }
                match rd.read_buf(&mut inbuf).await {
                    Ok(n) if n > 0 => {}
                    _ => {
                        c.failed.store(true, Ordering::Relaxed);
                        c.notify.notify_one();
                        return;
                    }
                }
            }
        });
        Ok(RawPublisher {
            wr,
            out: BytesMut::with_capacity(128 * 1024),
            frame_max,
            published: 0,
            confirmed,
        })
    }
}

/// Highest delivery tag up to which every publish is confirmed.
#[derive(Default)]
struct Confirmed {
    upto: AtomicU64,
    failed: AtomicBool,
    notify: Notify,
}

impl Confirmed {
    fn ack(&self, tag: u64, multiple: bool, singles: &mut BTreeSet<u64>) {
        let mut upto = self.upto.load(Ordering::Relaxed);
        if multiple {
            upto = upto.max(tag);
        } else {
            singles.insert(tag);
        }
        while let Some(&t) = singles.first() {
            if t > upto + 1 {
                break;
            }
            upto = upto.max(t);
            singles.pop_first();
        }
        self.upto.store(upto, Ordering::Release);
        self.notify.notify_one();
    }
}

/// The publishing half of a raw connection.
pub struct RawPublisher {
    wr: OwnedWriteHalf,
    out: BytesMut,
    frame_max: u32,
    published: u64,
    confirmed: Arc<Confirmed>,
}

impl RawPublisher {
    /// Encodes the properties every publish carries, once.
    pub fn properties(props: &BasicProperties) -> bytes::Bytes {
        encode_properties(props)
    }

    /// Appends one publish to the write buffer (written by [`RawPublisher::flush`], or
    /// once 64 KB are waiting). `props` from [`RawPublisher::properties`].
    pub async fn publish(
        &mut self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: &[u8],
    ) -> anyhow::Result<()> {
        encode_method(
            &mut self.out,
            CH,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: exchange.into(),
                routing_key: key.into(),
                mandatory: false,
                immediate: false,
            })),
        );
        encode_content_preencoded(&mut self.out, CH, props, body, self.frame_max);
        self.published += 1;
        if self.out.len() >= 64 * 1024 {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Waits until at most `window` publishes are unconfirmed.
    pub async fn wait_confirms(&mut self, window: u64) -> anyhow::Result<()> {
        let confirmed = self.confirmed.clone();
        loop {
            let notified = confirmed.notify.notified();
            if self.confirmed.failed.load(Ordering::Relaxed) {
                bail!("publish nacked or connection lost");
            }
            if self.published - self.confirmed.upto.load(Ordering::Acquire) <= window {
                return Ok(());
            }
            self.flush().await?;
            notified.await;
        }
    }
}
