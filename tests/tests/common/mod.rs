//! Starts Warren in-process on 127.0.0.1:0 with a temporary RocksDB dir.

#![allow(dead_code)]

pub mod mqtt;
pub mod stomp;

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties,
};

pub struct TestBroker {
    pub server: Option<warren::Server>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub mqtt_addr: std::net::SocketAddr,
    pub stomp_addr: std::net::SocketAddr,
    pub web_stomp_addr: std::net::SocketAddr,
    pub web_mqtt_addr: std::net::SocketAddr,
    /// The management HTTP API.
    pub http_addr: std::net::SocketAddr,
    /// Prometheus metrics alone.
    pub prometheus_addr: std::net::SocketAddr,
}

pub fn config(dir: &std::path::Path) -> warren::Config {
    let mut c = warren::Config::default();
    c.storage.data_dir = dir.to_path_buf();
    c.listeners.amqp = "127.0.0.1:0".into();
    c.listeners.mqtt = "127.0.0.1:0".into();
    c.listeners.stomp = "127.0.0.1:0".into();
    c.listeners.web_stomp = "127.0.0.1:0".into();
    c.listeners.web_mqtt = "127.0.0.1:0".into();
    c.stomp.incomplete_frame_timeout_ms = 1000;
    c.listeners.http = "127.0.0.1:0".into();
    c.listeners.prometheus = "127.0.0.1:0".into();
    c
}

pub async fn start() -> TestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    start_in(dir).await
}

pub async fn start_in(dir: tempfile::TempDir) -> TestBroker {
    start_configured(dir, |_| {}).await
}

/// A broker with `edit` applied to the test configuration.
#[allow(dead_code)]
pub async fn start_with(edit: impl FnOnce(&mut warren::Config)) -> TestBroker {
    start_configured(tempfile::tempdir().expect("tempdir"), edit).await
}

async fn start_configured(
    dir: tempfile::TempDir,
    edit: impl FnOnce(&mut warren::Config),
) -> TestBroker {
    let mut c = config(dir.path());
    edit(&mut c);
    let server = warren::Server::start(&c).await.expect("start warren");
    let addr = server.amqp_addr.expect("amqp listener");
    let mqtt_addr = server.mqtt_addr.expect("mqtt listener");
    let stomp_addr = server.stomp_addr.expect("stomp listener");
    let web_stomp_addr = server.web_stomp_addr.expect("web-stomp listener");
    let web_mqtt_addr = server.web_mqtt_addr.expect("web-mqtt listener");
    let http_addr = server.http_addr.expect("http listener");
    let prometheus_addr = server.prometheus_addr.expect("prometheus listener");
    TestBroker {
        http_addr,
        prometheus_addr,
        web_mqtt_addr,
        web_stomp_addr,
        mqtt_addr,
        stomp_addr,
        url: format!("amqp://guest:guest@{addr}/%2f"),
        addr,
        server: Some(server),
        dir,
    }
}

impl TestBroker {
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("connect")
    }

    pub async fn channel(&self) -> (Connection, Channel) {
        let c = self.connect().await;
        let ch = c.create_channel().await.expect("channel");
        (c, ch)
    }

    /// Graceful stop and start again on the same data dir.
    pub async fn restart(mut self) -> TestBroker {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        // Let the last handles of the store go (connection tasks finishing).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        start_in(dir).await
    }
}

pub async fn declare(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), args)
        .await
        .expect("queue.declare");
}

/// queue.declare of a durable queue without arguments.
pub async fn declare_durable(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue.declare durable");
}

pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    publish_with(ch, exchange, key, body, BasicProperties::default()).await
}

pub async fn publish_with(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .expect("basic.publish");
}

/// Whether the channel still works: a queue.declare on it succeeds (a channel error
/// arrives asynchronously as channel.close, so the next call is what fails).
pub async fn channel_open(ch: &Channel) -> bool {
    ch.queue_declare(
        "after".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .is_ok()
}

/// Waits (up to 5 s) until `queue` holds at least `n` ready messages. Publishes on
/// another connection are processed in their own order: a test that acts on one
/// connection after publishing on another must wait for the messages to land.
pub async fn wait_ready(ch: &Channel, queue: &str, n: u32) {
    for _ in 0..500 {
        if passive(ch, queue).await.message_count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{queue} did not reach {n} ready messages in 5 s");
}

/// A passive queue.declare: the queue's message and consumer counts.
pub async fn passive(ch: &Channel, queue: &str) -> lapin::Queue {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue.declare passive")
}

/// basic.get with no_ack; the body, or None when the queue is empty.
pub async fn get(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|m| m.delivery.data.clone())
}

/// Next delivery of a consumer, or panic after 5 s.
pub async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("delivery within 5 s")
        .expect("consumer stream open")
        .expect("delivery ok")
}

/// Asserts that no delivery arrives within `ms`.
pub async fn nothing_within(consumer: &mut lapin::Consumer, ms: u64) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(ms), consumer.next()).await {
        panic!(
            "unexpected delivery: {:?}",
            d.map(|d| String::from_utf8_lossy(&d.data).into_owned())
        );
    }
}

pub fn table(kv: &[(&str, lapin::types::AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in kv {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// The AMQP reply code of a failed lapin call.
pub fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}
